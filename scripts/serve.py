"""Serve a Llama 3 model over the OpenAI API, with continuous batching.

    python scripts/serve.py                                   # the bundled demo model on 127.0.0.1:8000
    python scripts/serve.py --ckpt_dir ~/llama3.1-8b --max_batch_size 16 --api_key secret
    torchrun --nproc_per_node 2 scripts/serve.py --ckpt_dir ~/llama3-70b   # tensor-parallel
"""
from llama.serve.cli import main

if __name__ == "__main__":
    main()
