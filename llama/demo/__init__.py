"""The bundled demo model: a small Llama 3 trained by scripts/train_demo.py (see the README)."""
import logging
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent
TOKENIZER_PATH = DEMO_DIR / "tokenizer.model"


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
