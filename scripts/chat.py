"""Interactive chat with a Llama 3 model (see llama/chat.py); works with python and torchrun.

    python scripts/chat.py --help
"""
from llama.chat import main

if __name__ == "__main__":
    main()
