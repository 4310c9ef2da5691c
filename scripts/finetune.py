"""Fine-tune a Meta-format Llama 3 checkpoint: SFT or DPO, full or LoRA (see llama/train/finetune.py,
docs/finetuning.md); works with python and torchrun (FSDP2).

    python scripts/finetune.py --help
"""
from llama.train.finetune import main

if __name__ == "__main__":
    main()
