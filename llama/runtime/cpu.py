# What the start-up measurements need to know of this machine and how they time: the size of the
# CPU's last-level cache, a best-of timer, and the rule that rank 0 alone measures and every rank
# takes its choice, logged as one line (the timings themselves at debug level).
import functools
import logging
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

from llama import distributed

# The last-level cache assumed where sysfs does not tell it.
FALLBACK_CACHE = 64 * 2**20
# At most this many bytes more than the last-level cache in a probe's buffer of weights read from memory.
STREAM_MARGIN = 256 * 2**20

# Start-up probes time each candidate in this many rounds and keep its fastest: other work on the
# cores only ever adds time, and a choice is kept for every later process on the machine
PROBE_ROUNDS = 2

T = TypeVar("T")


def fits_in_cache(weight_bytes: int) -> bool:
    """Whether weights of this size stay in the CPU's last-level cache from one step to the next:
    their products are then bound by their own work, not by reading memory."""
    return weight_bytes <= last_level_cache_bytes()


def last_level_cache_bytes() -> int:
    """The size of this CPU's largest cache (Linux sysfs), or FALLBACK_CACHE where it is not known."""
    return _last_level_cache_bytes()


@functools.lru_cache(maxsize=None)
def _last_level_cache_bytes() -> int:
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            continue
    return max(sizes, default=FALLBACK_CACHE)


def streamed_bytes() -> int:
    """Bytes a probe cycles through so that each call reads its weight from memory, as a model's
    products do: twice the last-level cache (an LRU cache then misses on every read), at most
    STREAM_MARGIN more than it (the buffer counts in a load's peak memory)."""
    llc = last_level_cache_bytes()
    return min(2 * llc, llc + STREAM_MARGIN)


def streamed_copies(n_bytes: int) -> int:
    """How many copies of a weight of `n_bytes` a probe cycles through (streamed_bytes, two at least)."""
    return max(2, -(-streamed_bytes() // n_bytes))


def best_time(fn: Callable[[], object], repeats: int, give_up: float = float("inf"), median: bool = False) -> float:
    """Fastest of `repeats` calls of `fn` after one warm-up, in seconds (CPU work: no device sync);
    `median`: their median instead (calls that each read other bytes from memory: one that finds
    its bytes still cached is an outlier, not the kernel's speed). A warm-up slower than `give_up`
    seconds is returned as it is, without repeats: that candidate has lost already, and timing it
    again would only lengthen start-up."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if first > give_up:
        return first
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] if median else min(times)


def measured_here(threads: int, where: str = "") -> str:
    """The `reason` of a choice measured on this CPU with `threads` threads."""
    return f"measured on this CPU, {threads} thread{'s' if threads > 1 else ''}" + (f", {where}" if where else "")


def rank0s(choice: Optional[T], label: str, start: float, timings: Callable[[T], str], log: logging.Logger) -> T:
    """Rank 0's measured `choice` (None on the other ranks) on every rank. Rank 0 logs it to `log`
    as one line at INFO (its `describe()` and the time the measurement took) and `timings(choice)`, the
    numbers it was chosen from, at DEBUG. Every rank must compute alike: the all-reduces need one
    dtype, and ranks running different kernels would compute different numbers."""
    choice = distributed.broadcast_object(choice)
    if distributed.is_rank0():
        log.info("%s: %s (measured in %.2f s)", label, choice.describe(), time.perf_counter() - start)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s timings: %s", label, timings(choice))
    return choice
