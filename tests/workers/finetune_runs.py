"""Worker for tests/test_finetune_fsdp.py: several llama-finetune runs in one torchrun launch (one
start-up of the processes for all of them). argv: a JSON list of finetune keyword-argument dicts."""
import json
import sys

from llama.train.finetune import finetune

if __name__ == "__main__":
    for kwargs in json.loads(sys.argv[1]):
        finetune(**kwargs)
