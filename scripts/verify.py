#!/usr/bin/env python
"""Check a Meta checkpoint directory against its checklist.chk (the md5 of every file, as Meta's
download ships it), with a line per file as it is hashed.

  python scripts/verify.py CKPT_DIR

Prints one line for each file that is missing or whose md5 differs, and exits 1 if there is any;
exit 0 means every listed file matches. The same check runs before loading with --verify on the
example scripts and chat (Llama.build(verify=True)).
"""
import sys
import time

from llama.weights import checklist
from llama.cli import run


def verify(ckpt_dir: str) -> None:
    """Hash every file CKPT_DIR/checklist.chk names and compare; exit 1 naming each bad file.

    Args:
        ckpt_dir: the checkpoint directory holding checklist.chk.
    """
    start = time.perf_counter()
    n_files = len(checklist.read_checklist(ckpt_dir))
    problems = checklist.checklist_problems(ckpt_dir, report=lambda line: print(line, flush=True))
    for line in problems:
        print(f"bad: {line}", file=sys.stderr)
    if problems:
        raise ValueError(f"{len(problems)} of {n_files} file(s) in {ckpt_dir} do not match checklist.chk: download them again")
    print(f"ok: all {n_files} file(s) match checklist.chk ({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    run(verify)
