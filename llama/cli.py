"""What the command-line scripts share: logs on rank 0 only, and the model they were asked for."""
import logging
from typing import Optional

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
