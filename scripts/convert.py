"""Convert between Meta checkpoints and the Hugging Face layout (see llama/convert.py).

    python scripts/convert.py to_hf CKPT_DIR OUT_DIR [--overwrite]
    python scripts/convert.py from_hf HF_DIR OUT_DIR --shards N [--overwrite]

OUT_DIR appears only once complete and read back; one that holds files needs --overwrite.
"""
import sys
from pathlib import Path

# Run from a checkout without installing: make the repository's `llama` package importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama.weights.convert import main  # noqa: E402

if __name__ == "__main__":
    main()
