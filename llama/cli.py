"""What the command-line scripts share: logs on rank 0 only, and the model they were asked for."""
import logging
import sys
from typing import Callable, Optional

import fire

from llama import distributed
from llama.demo import resolve_paths
from llama.generation import Llama


def build_generator(ckpt_dir: Optional[str], tokenizer_path: Optional[str], **build_kwargs) -> Llama:
    """Llama.build on the given checkpoint, or on the bundled demo model when neither path is given.

    Also shows the library's INFO logs (load progress, device) on rank 0; other ranks stay quiet.
    """
    if distributed.rank_from_env() == 0:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    ckpt_dir, tokenizer_path = resolve_paths(ckpt_dir, tokenizer_path)
    return Llama.build(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, **build_kwargs)


def run(fn: Callable, **fire_kwargs) -> None:
    """fire.Fire(fn, **fire_kwargs), with bad input (a missing file, a shape or count that does not
    fit) reported as one line from rank 0 and exit status 1, instead of a traceback from every rank."""
    try:
        fire.Fire(fn, **fire_kwargs)
    except (FileNotFoundError, ValueError, TypeError) as e:
        if distributed.rank_from_env() == 0:
            print(f"error: {e}", file=sys.stderr)
        distributed.shutdown()
        sys.exit(1)
