"""What the command lines build: the model they were asked for, with the library's logs on rank 0."""
import logging
from typing import Optional

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
