"""Serve a Llama 3 model over the OpenAI API, with continuous batching.

    python scripts/serve.py                                   # the bundled demo model on 127.0.0.1:8000
    python scripts/serve.py --ckpt_dir ~/llama3.1-8b --max_batch_size 16 --api_key secret
    torchrun --nproc_per_node 2 scripts/serve.py --ckpt_dir ~/llama3-70b   # tensor-parallel
"""
import sys
from pathlib import Path

# Run from a checkout without installing: this checkout's `llama`, not another one installed in the
# environment (an editable install of a different worktree would otherwise serve its own code).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama.serve.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
