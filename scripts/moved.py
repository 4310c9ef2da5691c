"""The scripts that moved to benchmarks/ and recipes/demo/: `python scripts/X.py ...` keeps working by
handing the process over to the script's new home (os.execv: same process id, arguments,
environment and exit status; the new script's own directory first on sys.path, where its
neighbours are imported from)."""
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def forward(relative_path: str) -> None:
    """Replace this process with `python REPO/relative_path` and this process's arguments."""
    target = REPO / relative_path
    os.execv(sys.executable, [sys.executable, str(target), *sys.argv[1:]])
