"""`python scripts/train_demo.py ...` runs recipes/demo/train_demo.py (see scripts/moved.py)."""
from moved import forward

if __name__ == "__main__":
    forward("recipes/demo/train_demo.py")
