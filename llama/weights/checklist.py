# Meta's checklist.chk: the md5 of every file, as Meta's download ships it; verifying a checkpoint
# against it (rank 0 hashes, every rank hears the verdict).
import hashlib
import logging
import re
import time
from pathlib import Path
from typing import Callable, Optional

from llama import distributed
from llama.weights.checkpoint import PathLike

logger = logging.getLogger(__name__)

CHECKLIST = "checklist.chk"
HASH_CHUNK_BYTES = 8 << 20


def read_checklist(ckpt_dir: PathLike) -> dict[str, str]:
    """File name -> md5 from ckpt_dir/checklist.chk (lines "md5  name", as md5sum writes them)."""
    path = Path(ckpt_dir) / CHECKLIST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: verifying needs the checklist.chk that Meta's download ships")
    sums = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"[0-9a-fA-F]{32}", parts[0]):
            raise ValueError(f"{path} line {n} is not 'md5  filename': {line[:80]!r}")
        sums[parts[1].strip().lstrip("*")] = parts[0].lower()  # md5sum marks binary mode with '*'
    return sums


def checklist_problems(ckpt_dir: PathLike, report: Optional[Callable[[str], None]] = None) -> list[str]:
    """Hash every file checklist.chk names; one line per file that is missing or does not match.
    `report` gets a progress line per file (name, size, time)."""
    ckpt_dir = Path(ckpt_dir)
    sums = read_checklist(ckpt_dir)
    problems = []
    for i, (name, want) in enumerate(sums.items(), 1):
        path = ckpt_dir / name
        if not path.is_file():
            problems.append(f"{name}: missing (checklist.chk lists it)")
            continue
        start, digest = time.perf_counter(), hashlib.md5()
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
        ok = digest.hexdigest() == want
        if not ok:
            problems.append(f"{name}: md5 {digest.hexdigest()} but checklist.chk says {want} (damaged or another version)")
        if report is not None:
            report(f"[{i}/{len(sums)}] {name} {'ok' if ok else 'MISMATCH'} "
                   f"({path.stat().st_size / 1e9:.2f} GB, {time.perf_counter() - start:.1f}s)")
    return problems


def verify_checklist(ckpt_dir: PathLike) -> None:
    """Raise ValueError naming every file of ckpt_dir that checklist.chk says is damaged or missing.
    Rank 0 hashes (logging progress); every rank gets the verdict, so all stop together."""
    read_checklist(ckpt_dir)  # on every rank: a missing or malformed checklist stops all of them alike
    problems = None
    if distributed.is_rank0():
        logger.info("verifying %s against %s ...", ckpt_dir, CHECKLIST)
        try:
            problems = checklist_problems(ckpt_dir, logger.info)
        except OSError as e:  # an unreadable file: the other ranks must hear of it, not wait
            problems = [f"{e.filename}: {e.strerror}"]
    problems = distributed.broadcast_object(problems)
    if problems:
        raise ValueError(f"{ckpt_dir} does not match its {CHECKLIST}: " + "; ".join(problems) + ": download those files again")
