# The start-up measurement of the dtype and kernel policy on CPU: a few matrix products timed in
# each dtype and kernel (measure), and the policy they call for on this machine (policy_for),
# measured once per process, by rank 0, and logged as one line (the timings at debug level).
import functools
import logging
import time
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from llama import distributed
from llama.runtime import cpu, native, pages, stored
from llama.runtime.compute import upcast_linear, upcast_scratch
from llama.runtime.policy import COMPUTES, KERNELS, KINDS, NATIVE, Policy, choose, fastest, parse_dtype, step_kernels, uniform

logger = logging.getLogger(__name__)

# Rows of the product timed for each kind at start-up, and the weight it multiplies. Decode and
# small batches read it from where the model's weights will be read from. A model larger than the
# last-level cache is read from memory at every step: its probe multiplies the Llama 3.2 1B's
# feed-forward shape, 8192x2048 (32 MB in bfloat16), cycling through windows of a buffer twice the
# cache's size (cpu.streamed_bytes, and at most PROBE_POOL_MAX), each product timed by
# the median of its calls. A model that fits is read from the cache: its probe multiplies the
# model's own feed-forward shape (`policy_for`'s `shape`), cycling through as many
# bytes as the model holds in each dtype, so that a model larger than the inner caches streams
# from the last one as the model does. CPUs differ several-fold in that cache, and the products of
# a model of a few megabytes are bound by fixed costs per call more than by bytes, so the dtype
# faster for the 1B's shape need not be faster for them. Prefill is bound by arithmetic more than by memory, and a quarter of the 1B's
# weight keeps start-up short.
PROBE_ROWS = {"decode": 1, "small": 8, "prefill": 64}
PROBE_SHAPE = {"decode": (8192, 2048), "small": (8192, 2048), "prefill": (2048, 2048)}
PROBE_POOL_MAX = 2**30


def policy_for(
    device: torch.device,
    dtype: Union[str, torch.dtype, None] = None,
    weight_bytes: Optional[int] = None,
    shape: Optional[tuple] = None,
) -> Policy:
    """The policy for a model on `device`; `dtype` forces one dtype everywhere.

    CUDA: bfloat16 where supported, else float16, for every step. CPU: measured once per process
    (`measure`, a fraction of a second) and chosen by `choose`; with several processes, every rank
    takes rank 0's choice. `weight_bytes`, the bytes of one rank's weights in bfloat16, says whether
    they fit in the CPU's last-level cache, and so whether decode products are timed from the cache
    or from memory (None: from memory, as for any model of a billion parameters); `shape`, the
    (out, in) shape of one rank's feed-forward weight, is what a model in the cache is timed with
    (see PROBE_SHAPE; None: the 1B's). A forced bfloat16
    on CPU still takes the faster of oneDNN and PyTorch's own kernels per kind of step from the same
    measurement; a forced float16 or float32 switches no kernel, so float32 results are exactly
    those of plain PyTorch.
    """
    device = torch.device(device)
    forced = None if dtype is None else parse_dtype(dtype)
    if device.type == "cuda":
        if forced is None:
            forced = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return uniform(forced, reason="CUDA")
    if device.type != "cpu":
        return uniform(forced or torch.float32)
    if forced not in (None, torch.bfloat16):
        return uniform(forced, reason="forced")
    from_memory = weight_bytes is None or not cpu.fits_in_cache(weight_bytes)
    cached = None if from_memory else (tuple(shape or PROBE_SHAPE["decode"]), weight_bytes)
    policy = _measured_cpu_policy(torch.get_num_threads(), from_memory, cached)
    if forced is None:
        return policy
    # bfloat16 forced: the faster kernel measured for it, per kind of step
    plans = {k: step_kernels(forced, fastest(policy.timings, k, "bfloat16")[1]) for k in KINDS}
    return Policy(forced, reason="forced", timings=policy.timings, **plans)


def resolve_dtype(
    dtype: Union[str, torch.dtype, None], device: torch.device, weight_bytes: Optional[int] = None
) -> torch.dtype:
    """The dtype weights are held in: `dtype` when given, else the device's policy (`policy_for`)."""
    return policy_for(device, dtype, weight_bytes).weights


def measure(repeats: int = 2, from_memory: bool = True, cached: Optional[tuple] = None,
            rounds: int = cpu.PROBE_ROUNDS) -> dict:
    """Seconds of one product per (kind, compute, kernel) on this CPU, fastest of `repeats` after a
    warm-up (more for the short decode products), the fastest of `rounds` such measurements (other
    work on the cores only ever adds time, and the choice is kept for later processes): PROBE_ROWS
    rows times a PROBE_SHAPE weight (from memory, decode and small batches also its transpose, w2's
    shape, in the same call), in bfloat16, float32, and float32 over an upcast bfloat16 weight (not
    timed for one-row decode, where it can only lose to float32 weights), and for decode and small batches this package's
    bfloat16 product (kernel NATIVE) where it builds. `from_memory`: decode and small-batch products
    read each call's weight from memory, not from the last-level cache (see PROBE_SHAPE);
    otherwise `cached`, ((out, in), bytes of the model in bfloat16), gives them the model's shape
    and cycles them through the model's bytes (None: one 1B-shaped weight, read again and again)."""
    own = not from_memory and cached is not None  # the model's shape, over the model's bytes
    big = cached[0] if own else PROBE_SHAPE["decode"]
    n = big[0] * big[1]
    # one buffer of bfloat16 0.01s; read as float32, each pair of them is a float32 of about 0.01
    # (0x3C243C24), so the same bytes serve as the weights of both dtypes
    pool = max(cpu.streamed_bytes(), 8 * n) if from_memory else 4 * n
    if own:
        pool = max(2 * cached[1], 8 * n)  # the model's float32 bytes: two bytes of each element
    prefill = PROBE_SHAPE["prefill"][0] * PROBE_SHAPE["prefill"][1] * 2  # in float32, as bfloat16 elements
    buffer = torch.empty((max(4 * n, prefill, min(pool, PROBE_POOL_MAX) // 2 // n * n),), dtype=torch.bfloat16)
    pages.advise_huge_pages(buffer)  # in pages like the loader's weights
    buffer.fill_(0.01)
    # bfloat16 elements each dtype's windows cycle through: all of the buffer, or from the cache the
    # model's bytes in that dtype (bfloat16 half of them)
    span = {dtype: buffer.numel() for dtype in (torch.bfloat16, torch.float32)}
    if own:
        span = {torch.bfloat16: max(n, cached[1] // 2), torch.float32: max(2 * n, cached[1])}
        span = {dtype: min(elements, buffer.numel()) for dtype, elements in span.items()}
    cursor = [0]  # where the next weight starts: each call reads the bytes least recently read

    def weight(dtype: torch.dtype, shape: tuple, cached_weight: bool) -> torch.Tensor:
        size = shape[0] * shape[1] * (2 if dtype == torch.float32 else 1)  # in bfloat16 elements
        if not cached_weight and cursor[0] + size > span[dtype]:
            cursor[0] = 0
        start = 0 if cached_weight else cursor[0]
        cursor[0] += 0 if cached_weight else size
        return buffer[start : start + size].view(dtype).view(shape)

    scratch = upcast_scratch(torch.float32, torch.device("cpu"))
    timings = {}
    was = torch.backends.mkldnn.enabled
    try:
        for kind in [k for _ in range(rounds) for k in KINDS]:
            shape = PROBE_SHAPE[kind] if kind == "prefill" else big
            # from memory, a call multiplies both of the feed-forward's shapes, (hidden, dim) as w1 and
            # w3 and (dim, hidden) as w2: kernels rank differently on the two (PyTorch's own bfloat16
            # product read the 1B's w2 at two thirds of this package's speed, its w1 slightly faster)
            shapes = [shape, shape[::-1]] if kind != "prefill" and from_memory else [shape]
            x32 = {s: torch.full((PROBE_ROWS[kind], s[1]), 0.5) for s in shapes}
            x16 = {s: x.bfloat16() for s, x in x32.items()}
            # prefill's product is bound by arithmetic: one weight, read from the cache after the
            # warm-up; so is a cached model's without its size
            one = kind == "prefill" or not (from_memory or own)
            each: dict[str, Callable[[tuple], torch.Tensor]] = {
                "bfloat16": lambda s: F.linear(x16[s], weight(torch.bfloat16, s, one)),
                "float32": lambda s: F.linear(x32[s], weight(torch.float32, s, one)),
                "upcast": lambda s: upcast_linear(x32[s], weight(torch.bfloat16, s, one), scratch),
                NATIVE: lambda s: native.bf16_mm(x16[s], weight(torch.bfloat16, s, one), out_dtype=torch.bfloat16),
            }
            cases = {c: (lambda f=f: [f(s) for s in shapes]) for c, f in each.items()}
            runs = [(c, cases[c], o) for c in ("bfloat16", "float32", "upcast") if not (kind == "decode" and c == "upcast")
                    for o in (True, False)]
            if kind != "prefill" and native.kernels() is not None:  # this package's bfloat16 product, bfloat16 results
                runs.append(("bfloat16", cases[NATIVE], NATIVE))
            for compute, fn, kernel in runs:
                torch.backends.mkldnn.enabled = was if kernel == NATIVE else kernel
                calls = repeats * (3 if kind == "decode" else 1)
                if kind != "prefill" and big != PROBE_SHAPE["decode"]:
                    calls *= 10  # a cached model's products take microseconds: one slow call is most of a few
                t = cpu.best_time(fn, calls, median=from_memory and kind != "prefill")
                timings[(kind, compute, kernel)] = min(t, timings.get((kind, compute, kernel), t))
    finally:
        torch.backends.mkldnn.enabled = was
    return timings


@functools.lru_cache(maxsize=None)
def _measured_cpu_policy(threads: int, from_memory: bool = True, cached: Optional[tuple] = None) -> Policy:
    start = time.perf_counter()
    where = "weights read from memory" if from_memory else "weights read from the cache"
    if not from_memory and cached is not None:
        where += f", the model's {cached[0][0]}x{cached[0][1]} product"
    # rank 0 alone measures: the other ranks' probes would share its cores and memory bandwidth
    policy = None
    if distributed.is_rank0():
        # kept from an earlier process on this machine, for this thread count and shape: a restart
        # makes the same choice (stored); --remeasure measures again
        key = {"threads": threads, "from_memory": from_memory, "cached": cached, "native": native.kernels() is not None}
        timings, kept = stored.kept_or_measured(
            "dtype-policy", key, lambda: measure(from_memory=from_memory, cached=cached),
            stored.encode_timings, lambda rows: stored.checked_timings(rows, choose),
        )
        policy = choose(timings, reason=cpu.measured_here(threads, where) + stored.kept_note(kept))
    return cpu.rank0s(policy, "Kernel policy", start, lambda p: format_timings(p.timings), logger)


def format_timings(timings: dict) -> str:
    """One line: milliseconds per kind, compute and kernel."""
    parts = []
    for kind in KINDS:
        label = {True: "", False: "-own", NATIVE: "-native"}
        cells = [
            f"{compute}{label[kernel]} {timings[(kind, compute, kernel)] * 1e3:.3f}"
            for compute in COMPUTES
            for kernel in KERNELS
            if (kind, compute, kernel) in timings
        ]
        if cells:
            rows = PROBE_ROWS[kind]
            parts.append(f"{kind} ({rows} row{'s' if rows > 1 else ''}, ms) " + ", ".join(cells))
    return "; ".join(parts)
