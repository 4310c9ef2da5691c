"""The bundled lm-eval task suite: YAML tasks over local JSONL files, built from the demo corpus's
held-out pages by recipes/demo/build_eval_tasks.py; lm-eval loads them with no download."""
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
SUITE = "llama_demo"  # the tag of every bundled task
