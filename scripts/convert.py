"""Convert between Meta checkpoints and the Hugging Face layout (see llama/weights/convert.py).

    python scripts/convert.py to_hf CKPT_DIR OUT_DIR [--overwrite]
    python scripts/convert.py from_hf HF_DIR OUT_DIR --shards N [--overwrite]
    python scripts/convert.py adapter_to_peft ADAPTER_DIR OUT_DIR   # a fine-tune's LoRA adapter for PEFT

OUT_DIR appears only once complete and read back; one that holds files needs --overwrite.
"""
from llama.weights.convert import main

if __name__ == "__main__":
    main()
