"""`python scripts/teacher_corpus.py ...` runs recipes/demo/teacher_corpus.py (see scripts/moved.py)."""
from moved import forward

if __name__ == "__main__":
    forward("recipes/demo/teacher_corpus.py")
