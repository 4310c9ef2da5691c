"""The bundled demo model: a small Llama 3 trained by recipes/demo/train_demo.py (see docs/demo-model.md)."""
import logging
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent
TOKENIZER_PATH = DEMO_DIR / "tokenizer.model"
DRAFT_DIR = DEMO_DIR / "draft"  # its draft model for speculative decoding (the demo's tokenizer)


def resolve_paths(ckpt_dir: Optional[str], tokenizer_path: Optional[str]) -> tuple[str, str]:
    """The checkpoint and tokenizer to use: the user's, or the bundled demo model when not given."""
    if ckpt_dir is None and tokenizer_path is None:
        if not (DEMO_DIR / "params.json").is_file():
            raise FileNotFoundError(
                f"the bundled demo model is missing from {DEMO_DIR}: pass --ckpt_dir and --tokenizer_path"
            )
        logger.info("No --ckpt_dir/--tokenizer_path given: using the bundled demo model in %s", DEMO_DIR)
        return str(DEMO_DIR), str(TOKENIZER_PATH)
    if ckpt_dir is None:
        raise ValueError("--tokenizer_path was given without --ckpt_dir: pass both, or neither for the demo model")
    if tokenizer_path is None:
        tokenizer_path = str(Path(ckpt_dir) / "tokenizer.model")
    return ckpt_dir, tokenizer_path


def resolve_draft(ckpt_dir: Optional[str], draft_ckpt_dir: Optional[str], speculate: bool) -> Optional[str]:
    """The draft model to decode speculatively with: the user's, the demo's own with --speculate
    when the demo model is used, or None (no speculation)."""
    if draft_ckpt_dir is not None or not speculate:
        return draft_ckpt_dir
    if ckpt_dir is not None:
        raise ValueError("--speculate needs --draft_ckpt_dir for your own checkpoint (only the demo model ships a draft)")
    if not (DRAFT_DIR / "params.json").is_file():
        raise FileNotFoundError(f"the bundled draft model is missing from {DRAFT_DIR}: pass --draft_ckpt_dir")
    logger.info("--speculate with the demo model: its draft in %s", DRAFT_DIR)
    return str(DRAFT_DIR)
