"""What the command lines build: the model they were asked for, with the library's logs on rank 0."""
import logging
from typing import Optional

from llama import distributed
from llama.demo import resolve_draft, resolve_paths
from llama.generation import Llama
from llama.runtime import stored


def build_generator(
    ckpt_dir: Optional[str],
    tokenizer_path: Optional[str],
    speculate: bool = False,
    draft_ckpt_dir: Optional[str] = None,
    remeasure: bool = False,
    **build_kwargs,
) -> Llama:
    """Llama.build on the given checkpoint, or on the bundled demo model when neither path is given.
    Speculative decoding with `draft_ckpt_dir`, or with `speculate` and the demo model, its own draft.

    `remeasure`: time this machine's kernels again instead of reading the choice an earlier run kept
    (llama.runtime.stored). Also shows the library's INFO logs (load progress, device) on rank 0; other ranks stay quiet.
    """
    if distributed.rank_from_env() == 0:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    if remeasure:
        stored.request_remeasure()
    draft_ckpt_dir = resolve_draft(ckpt_dir, draft_ckpt_dir, speculate)
    ckpt_dir, tokenizer_path = resolve_paths(ckpt_dir, tokenizer_path)
    return Llama.build(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, draft_ckpt_dir=draft_ckpt_dir, **build_kwargs)
