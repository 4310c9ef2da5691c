"""Interactive chat with a Llama 3 model (see llama/chat.py); works with python and torchrun.

    python scripts/chat.py --help
"""
import sys
from pathlib import Path

# Run from a checkout without installing: make the repository's `llama` package importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama.chat import main  # noqa: E402

if __name__ == "__main__":
    main()
