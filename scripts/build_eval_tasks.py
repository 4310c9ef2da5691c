"""`python scripts/build_eval_tasks.py ...` runs recipes/demo/build_eval_tasks.py (see scripts/moved.py)."""
from moved import forward

if __name__ == "__main__":
    forward("recipes/demo/build_eval_tasks.py")
