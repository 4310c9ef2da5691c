"""`python scripts/train_tokenizer.py ...` runs recipes/demo/train_tokenizer.py (see scripts/moved.py)."""
from moved import forward

if __name__ == "__main__":
    forward("recipes/demo/train_tokenizer.py")
