"""`python scripts/demo_corpus.py ...` runs recipes/demo/demo_corpus.py (see scripts/moved.py)."""
from moved import forward

if __name__ == "__main__":
    forward("recipes/demo/demo_corpus.py")
