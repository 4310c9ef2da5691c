"""`python scripts/evaluate_demo.py ...` runs recipes/demo/evaluate_demo.py (see scripts/moved.py)."""
from moved import forward

if __name__ == "__main__":
    forward("recipes/demo/evaluate_demo.py")
