# Start-up measurements kept from one process to the next: a choice measured on this machine (the
# dtype policy, the quantized kernels) is written under the user's cache directory, keyed by what
# it depends on (PyTorch's version, the CPU's model and flags, the thread count, the model's shape),
# and read back by the next process instead of being measured again. Timing noise then cannot flip
# the choice, and with it the tokens, from one run of the same command to the next.
# `--remeasure` (request_remeasure) or LLAMA_REMEASURE=1 measures again and replaces what is kept.
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import torch

from llama.atomic import atomic_write_text

logger = logging.getLogger(__name__)

REMEASURE_ENV = "LLAMA_REMEASURE"
CACHE_NAME = "llama3-ref"
FILE = "policy.json"
T = TypeVar("T")

_remeasure = [False]  # set by request_remeasure (the CLIs' --remeasure), for this process


def cache_root() -> Path:
    """Where this package keeps what it measured: $XDG_CACHE_HOME/llama3-ref, else ~/.cache/llama3-ref."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / CACHE_NAME


def request_remeasure() -> None:
    """Measure again in this process instead of reading what an earlier one kept (--remeasure)."""
    _remeasure[0] = True


def remeasure_requested() -> bool:
    """Whether this process measures afresh: request_remeasure() or LLAMA_REMEASURE=1 in the environment."""
    return _remeasure[0] or os.environ.get(REMEASURE_ENV, "").strip().lower() in ("1", "true", "yes")


@functools.lru_cache(maxsize=None)
def machine() -> dict:
    """What a measurement on this machine depends on besides its arguments: PyTorch's version and the
    CPU's model name and feature flags (Linux /proc/cpuinfo; empty where it cannot be read)."""
    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and not model:
                model = value.strip()
            elif name.strip() in ("flags", "Features") and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    return {"torch": torch.__version__, "cpu": model, "flags": hashlib.sha256(flags.encode()).hexdigest()[:16]}


def digest(key: dict) -> str:
    """A short hash of a JSON-able `key`, for a file name."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def path_for(what: str, key: dict) -> Path:
    """The file that keeps the measurement `what` for `key` on this machine."""
    return cache_root() / "policy" / f"{what}-{digest({'what': what, **machine(), **key})}" / FILE


def kept_or_measured(
    what: str, key: dict, measure: Callable[[], T], encode: Callable[[T], Any], decode: Callable[[Any], T]
) -> tuple[T, Optional[Path]]:
    """(value, path it was read from or None): what an earlier process kept for (`what`, `key`) on this
    machine, else `measure()`, kept for the next one (`encode` to JSON, `decode` back). A file that cannot
    be read or decoded is measured again (one warning); one that cannot be written is only logged."""
    path = path_for(what, key)
    full = json.loads(json.dumps({"what": what, **machine(), **key}))  # as read back: tuples are lists
    if not remeasure_requested() and path.exists():
        try:
            held = json.loads(path.read_text())
            if held.get("key") != full:
                raise ValueError("it was kept for another machine or model")
            return decode(held["value"]), path
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("%s kept in %s is unreadable (%s): measuring again", what, path, e)
    value = measure()
    try:
        atomic_write_text(path, json.dumps({"key": full, "value": encode(value)}, indent=1))
    except (OSError, ValueError) as e:
        logger.warning("could not keep %s in %s (%s): the next process measures again", what, path, e)
    return value, None


def encode_timings(timings: dict) -> list:
    """Timings keyed by tuples of str/bool as JSON: a list of [key, seconds]."""
    return [[list(k), v] for k, v in timings.items()]


def checked_timings(rows: list, choose: Callable[[dict], Any]) -> dict:
    """encode_timings' inverse, checked: positive seconds that `choose` can choose from."""
    out = {tuple(k): float(v) for k, v in rows}
    if not out or any(not (v > 0) for v in out.values()):
        raise ValueError("it holds no timings")
    choose(out)  # raises on a missing candidate
    return out


def kept_note(path: Optional[Path]) -> str:
    """What a policy's reason adds when it was read from `path` (None: measured now)."""
    return "" if path is None else f", as kept in {path} (--remeasure or {REMEASURE_ENV}=1 measures again)"
