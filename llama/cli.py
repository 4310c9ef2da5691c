"""What the command-line scripts share: logs on rank 0 only, and the model they were asked for."""
import json
import logging
import os
import sys
import time
from typing import Callable, Optional, Union

import fire

from llama import distributed
from llama.demo import resolve_draft, resolve_paths
from llama.generation import Llama


def build_generator(
    ckpt_dir: Optional[str],
    tokenizer_path: Optional[str],
    speculate: bool = False,
    draft_ckpt_dir: Optional[str] = None,
    **build_kwargs,
) -> Llama:
    """Llama.build on the given checkpoint, or on the bundled demo model when neither path is given.
    Speculative decoding with `draft_ckpt_dir`, or with `speculate` and the demo model, its own draft.

    Also shows the library's INFO logs (load progress, device) on rank 0; other ranks stay quiet.
    """
    if distributed.rank_from_env() == 0:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    draft_ckpt_dir = resolve_draft(ckpt_dir, draft_ckpt_dir, speculate)
    ckpt_dir, tokenizer_path = resolve_paths(ckpt_dir, tokenizer_path)
    return Llama.build(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, draft_ckpt_dir=draft_ckpt_dir, **build_kwargs)


def split_list(value: Union[str, int, tuple, list]) -> list[str]:
    """A comma-separated list as fire hands it over: "2,3", (2, 3), 2 or "(2,3)"; items stripped."""
    items = value if isinstance(value, (tuple, list)) else str(value).strip("()[] ").split(",")
    return [str(v).strip() for v in items if str(v).strip()]


def int_list(value: Union[str, int, tuple, list]) -> list[int]:
    """A comma-separated list of integers (split_list)."""
    return [int(v) for v in split_list(value)]


def run(fn: Callable, **fire_kwargs) -> None:
    """fire.Fire(fn, **fire_kwargs), with bad input (a missing file, a shape or count that does not
    fit) reported as one line from rank 0 and exit status 1, instead of a traceback from every rank.

    Under torchrun the line also goes to the launcher's error file, so that the failure summary the
    launcher prints last shows it as the root cause."""
    try:
        fire.Fire(fn, **fire_kwargs)
    except (FileNotFoundError, ValueError, TypeError) as e:
        line = f"error: {e}"
        if distributed.rank_from_env() == 0:
            print(line, file=sys.stderr)
        _tell_launcher(line)
        distributed.shutdown()
        sys.exit(1)


def _tell_launcher(message: str) -> None:
    """Write `message` where torch.distributed.elastic's launcher reads a worker's failure (the file
    named by TORCHELASTIC_ERROR_FILE, in the format of its ErrorHandler); nothing without a launcher."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    # the summary prints py_callstack as the "traceback": our one line instead of a Python traceback
    info = {"py_callstack": message, "timestamp": str(int(time.time()))}
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": info}}, f)
    except OSError:
        pass  # the error line is already on stderr
