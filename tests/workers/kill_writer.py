"""A writer (to_hf, from_hf, reshard, quantize) that stops at its k-th file-system step and waits to be killed.

tests/test_writers.py runs `run_writer` in a child process (forked from a server that has imported
torch and the writers once), waits for the child to report that it reached step k, and SIGKILLs it.
The steps are the real calls the writers make (each file written, copied, renamed or removed): the
hook announces the step before the call happens, so step k means "killed just before the k-th"."""
import os
import pathlib
import shutil
import sys
import time

import safetensors.torch
import torch

from llama import atomic
from llama.weights import convert, reshard


# (owner, attribute) of every call that changes the file system while a writer runs
STEPS = [
    (torch, "save"),
    (safetensors.torch, "save_file"),
    (shutil, "copyfile"),
    (shutil, "rmtree"),
    (os, "rename"),
    (atomic, "_exchange"),
    (pathlib.Path, "write_text"),
]


def run_writer(kind: str, src: str, dst: str, overwrite: bool, kill_at: int, conn) -> None:
    """Run writer `kind` from src to dst; before step `kill_at` send the step number and sleep (to be
    killed); after the last one send ("done", steps). Output goes to /dev/null."""
    count = 0

    def hooked(fn):
        def call(*args, **kwargs):
            nonlocal count
            count += 1
            if count == kill_at:
                conn.send(count)
                time.sleep(600)  # the parent kills us here
            return fn(*args, **kwargs)

        return call

    for owner, name in STEPS:
        setattr(owner, name, hooked(getattr(owner, name)))
    sys.stdout = open(os.devnull, "w")
    if kind == "to_hf":
        convert.to_hf(src, dst, max_shard_size="100KB", overwrite=overwrite)
    elif kind == "from_hf":
        convert.from_hf(src, dst, shards=2, overwrite=overwrite)
    elif kind == "quantize":
        reshard.quantize_checkpoint(src, dst, mode="int8", overwrite=overwrite)
    else:
        reshard.reshard(src, dst, shards=2, overwrite=overwrite)
    conn.send(("done", count))
