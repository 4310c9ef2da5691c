# The device, dtype and kernel policy: which dtype the weights are held in, and which dtype and
# matrix-product kernels each kind of step computes with. Nothing else in the package chooses kernels
# but llama.graph_kernels, which rewrites compiled graphs of models held in the cache.
import contextlib
import functools
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from llama import distributed

logger = logging.getLogger(__name__)

# Steps by the number of token rows in their matrix products: one-row decode, a small batch of
# decode rows, and everything larger (prefill).
KINDS = ("decode", "small", "prefill")
SMALL_ROWS = 16
# Rows of the product timed for each kind at start-up, and the weight it multiplies. Decode and
# small batches read it from where the model's weights will be read from. A model larger than the
# last-level cache is read from memory at every step: its probe multiplies the Llama 3.2 1B's
# feed-forward shape, 8192x2048 (32 MB in bfloat16), cycling through windows of a buffer twice the
# cache's size (at most PROBE_POOL_MARGIN more than it, and PROBE_POOL_MAX), each product timed by
# the median of its calls. A model that fits is read from the cache: its probe multiplies the
# model's own feed-forward shape (`policy_for`'s `shape`), cycling through as many
# bytes as the model holds in each dtype, so that a model larger than the inner caches streams
# from the last one as the model does. CPUs differ by a factor of eight in that cache (32 MB to 480
# MB seen on this project's machines), and the products of a model of a few megabytes are bound
# by fixed costs per call more than by bytes: on the 2-core Xeon with AMX, the demo model's
# 896x320 product took 10 us in float32 and 20-31 us in bfloat16, where the 1B's shape is faster
# in bfloat16. Prefill is bound by arithmetic more than by memory, and a quarter of the 1B's
# weight keeps start-up short.
PROBE_ROWS = {"decode": 1, "small": 8, "prefill": 64}
PROBE_SHAPE = {"decode": (8192, 2048), "small": (8192, 2048), "prefill": (2048, 2048)}
PROBE_POOL_MAX = 2**30
PROBE_POOL_MARGIN = 256 * 2**20
# The last-level cache assumed where sysfs does not tell it.
FALLBACK_CACHE = 64 * 2**20
# How a step's products may compute: in bfloat16 or float32 over weights of that dtype, or in float32
# over bfloat16 weights upcast one linear at a time ("upcast"); each with oneDNN on or off.
COMPUTES = ("bfloat16", "float32", "upcast")

# SDPA backends for CUDA: not cuDNN, which builds an execution plan for every new sequence length
# (every decode step, every prompt length), where flash and memory-efficient attention need none.
CUDA_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# Weights computed in another dtype are converted this many elements at a time into one reused
# buffer (16 MB in float32): it stays in the last-level cache, and no weight is ever held twice.
UPCAST_CHUNK = 4 * 2**20

DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


@dataclass(frozen=True)
class Plan:
    """How one kind of step computes: the dtype of its activations and products, and whether CPU
    products go through oneDNN (True), PyTorch's own kernels (False) or whatever is set (None)."""

    dtype: torch.dtype
    onednn: Optional[bool] = None


@dataclass(frozen=True)
class Policy:
    """The weights' dtype and a Plan per kind of step; `reason` says where it came from (logged),
    `timings` what it was chosen from (see `measure`), if it was measured."""

    weights: torch.dtype
    decode: Plan
    small: Plan
    prefill: Plan
    reason: str = ""
    timings: Optional[dict] = field(default=None, compare=False, hash=False, repr=False)

    def plan(self, rows: int) -> Plan:
        """The plan for a step whose products have `rows` token rows (batch x sequence length)."""
        return self.decode if rows == 1 else self.small if rows <= SMALL_ROWS else self.prefill

    def describe(self) -> str:
        def one(p: Plan) -> str:
            kernel = "" if p.onednn is None else ", oneDNN" if p.onednn else ", PyTorch's own kernels"
            return _name(p.dtype) + kernel

        plans = "; ".join(f"{k} {one(getattr(self, k))}" for k in KINDS)
        return f"weights in {_name(self.weights)}; {plans}" + (f" ({self.reason})" if self.reason else "")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """A torch floating dtype from its name ("bfloat16", "bf16", "torch.float32", ...) or itself."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    resolved = getattr(torch, DTYPE_ALIASES.get(name, name), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"unknown dtype {dtype!r}: use bfloat16, float16 or float32")
    return resolved


def uniform(dtype: torch.dtype, onednn: Optional[bool] = None, reason: str = "") -> Policy:
    """One dtype everywhere."""
    plan = Plan(dtype, onednn)
    return Policy(dtype, plan, plan, plan, reason)


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
    from_memory = weight_bytes is None or not fits_in_cache(weight_bytes)
    cached = None if from_memory else (tuple(shape or PROBE_SHAPE["decode"]), weight_bytes)
    policy = _measured_cpu_policy(torch.get_num_threads(), from_memory, cached)
    if forced is None:
        return policy
    # bfloat16 forced: the faster kernel measured for it, per kind of step
    plans = {k: Plan(forced, _fastest(policy.timings, k, "bfloat16")[1]) for k in KINDS}
    return Policy(forced, reason="forced", timings=policy.timings, **plans)


def resolve_dtype(
    dtype: Union[str, torch.dtype, None], device: torch.device, weight_bytes: Optional[int] = None
) -> torch.dtype:
    """The dtype weights are held in: `dtype` when given, else the device's policy (`policy_for`)."""
    return policy_for(device, dtype, weight_bytes).weights


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


# ---------------------------------------------------------------- choosing from timings


def choose(timings: dict, reason: str = "measured") -> Policy:
    """The policy the timings call for. `timings` maps (kind, compute, onednn) -> seconds for each
    kind in KINDS, compute in COMPUTES ("upcast" may be missing for decode) and onednn in (True, False).

    The weights go in bfloat16 when its one-row decode product is faster than float32's (half the
    memory, and decode reads every weight once per token), else in float32. Each kind of step then
    takes the fastest way the weights allow: bfloat16 weights compute in bfloat16 or, upcast, in
    float32; float32 weights compute in float32.
    """
    bf16, f32 = _fastest(timings, "decode", "bfloat16"), _fastest(timings, "decode", "float32")
    if bf16[0] < f32[0]:
        weights, allowed = torch.bfloat16, ("bfloat16", "upcast")
    else:
        weights, allowed = torch.float32, ("float32",)
    plans = {}
    for kind in KINDS:
        _, onednn, compute = min((*_fastest(timings, kind, c), c) for c in allowed if _has(timings, kind, c))
        plans[kind] = Plan(torch.bfloat16 if compute == "bfloat16" else torch.float32, onednn)
    return Policy(weights, reason=reason, timings=dict(timings), **plans)


def _has(timings: dict, kind: str, compute: str) -> bool:
    return any((kind, compute, o) in timings for o in (True, False))


def _fastest(timings: dict, kind: str, compute: str) -> tuple[float, bool]:
    """(seconds, onednn) of the faster kernel for this kind and compute."""
    return min((timings[(kind, compute, o)], o) for o in (True, False) if (kind, compute, o) in timings)


# ---------------------------------------------------------------- measuring


def measure(repeats: int = 2, from_memory: bool = True, cached: Optional[tuple] = None) -> dict:
    """Seconds of one product per (kind, compute, onednn) on this CPU, fastest of `repeats` after a
    warm-up (more for the short decode products): PROBE_ROWS rows times a PROBE_SHAPE weight, in
    bfloat16, float32, and float32 over an upcast bfloat16 weight (not timed for one-row decode,
    where it can only lose to float32 weights). `from_memory`: decode and small-batch products
    read each call's weight from memory, not from the last-level cache (see PROBE_SHAPE);
    otherwise `cached`, ((out, in), bytes of the model in bfloat16), gives them the model's shape
    and cycles them through the model's bytes (None: one 1B-shaped weight, read again and again)."""
    own = not from_memory and cached is not None  # the model's shape, over the model's bytes
    big = cached[0] if own else PROBE_SHAPE["decode"]
    n = big[0] * big[1]
    # one buffer of bfloat16 0.01s; read as float32, each pair of them is a float32 of about 0.01
    # (0x3C243C24), so the same bytes serve as the weights of both dtypes
    llc = last_level_cache_bytes()
    # cycling through more bytes than an LRU cache holds misses on every read; the margin keeps the
    # buffer, which counts in a load's peak memory, from doubling a large cache
    pool = max(min(2 * llc, llc + PROBE_POOL_MARGIN), 8 * n) if from_memory else 4 * n
    if own:
        pool = max(2 * cached[1], 8 * n)  # the model's float32 bytes: two bytes of each element
    prefill = PROBE_SHAPE["prefill"][0] * PROBE_SHAPE["prefill"][1] * 2  # in float32, as bfloat16 elements
    buffer = torch.full((max(4 * n, prefill, min(pool, PROBE_POOL_MAX) // 2 // n * n),), 0.01, dtype=torch.bfloat16)
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
        for kind in KINDS:
            shape = PROBE_SHAPE[kind] if kind == "prefill" else big
            x32 = torch.full((PROBE_ROWS[kind], shape[1]), 0.5)
            x16 = x32.bfloat16()
            # prefill's product is bound by arithmetic: one weight, read from the cache after the
            # warm-up; so is a cached model's without its size
            one = kind == "prefill" or not (from_memory or own)
            cases: dict[str, Callable[[], torch.Tensor]] = {
                "bfloat16": lambda: F.linear(x16, weight(torch.bfloat16, shape, one)),
                "float32": lambda: F.linear(x32, weight(torch.float32, shape, one)),
                "upcast": lambda: upcast_linear(x32, weight(torch.bfloat16, shape, one), scratch),
            }
            for compute, fn in cases.items():
                if kind == "decode" and compute == "upcast":
                    continue
                for onednn in (True, False):
                    torch.backends.mkldnn.enabled = onednn
                    calls = repeats * (3 if kind == "decode" else 1)
                    if kind != "prefill" and big != PROBE_SHAPE["decode"]:
                        calls *= 10  # a cached model's products take microseconds: one slow call is most of a few
                    timings[(kind, compute, onednn)] = best_time(fn, calls, median=from_memory and kind != "prefill")
    finally:
        torch.backends.mkldnn.enabled = was
    return timings


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


@functools.lru_cache(maxsize=None)
def _measured_cpu_policy(threads: int, from_memory: bool = True, cached: Optional[tuple] = None) -> Policy:
    start = time.perf_counter()
    where = "weights read from memory" if from_memory else "weights read from the cache"
    if not from_memory and cached is not None:
        where += f", the model's {cached[0][0]}x{cached[0][1]} product"
    # rank 0 alone measures: the other ranks' probes would share its cores and memory bandwidth
    policy = None
    if distributed.is_rank0():
        policy = choose(measure(from_memory=from_memory, cached=cached), reason=_measured_here(threads, where))
    return _rank0s(policy, "Kernel policy", start, format_timings)


def _measured_here(threads: int, where: str = "") -> str:
    return f"measured on this CPU, {threads} thread{'s' if threads > 1 else ''}" + (f", {where}" if where else "")


def _rank0s(policy, label: str, start: float, format: Callable[[dict], str]):
    """Rank 0's measured `policy` (None on the other ranks) on every rank, logged once (from rank 0) with its timings.
    Every rank must compute alike: the all-reduces need one dtype, and ranks running different
    kernels would compute different numbers."""
    policy = distributed.broadcast_object(policy)
    if distributed.is_rank0():
        logger.info(
            "%s: %s. Measured in %.2f s: %s", label, policy.describe(), time.perf_counter() - start,
            format(policy.timings),
        )
    return policy


def format_timings(timings: dict) -> str:
    """One line: milliseconds per kind, compute and kernel."""
    parts = []
    for kind in KINDS:
        cells = [
            f"{compute}{'' if onednn else '-own'} {timings[(kind, compute, onednn)] * 1e3:.3f}"
            for compute in COMPUTES
            for onednn in (True, False)
            if (kind, compute, onednn) in timings
        ]
        if cells:
            rows = PROBE_ROWS[kind]
            parts.append(f"{kind} ({rows} row{'s' if rows > 1 else ''}, ms) " + ", ".join(cells))
    return "; ".join(parts)


# ---------------------------------------------------------------- quantized weights (llama.quantize)

# A quantized product (llama.quantize.QuantizedLinear on CPU) is a "decode" step (at most
# quantize.DECODE_ROWS rows), a "small" batch (at most SMALL_ROWS, as a batch of decode rows or a
# speculative verify pass) or a "prefill"; each can run through PyTorch's packed kernel ("pack":
# torch._weight_int8pack_mm / torch._weight_int4pack_mm_for_cpu) or as dequantize-then-F.linear
# ("dequant"), with bfloat16 or float32 activations. (torch._int_mm with dynamically quantized int8
# activations is not a candidate: it is not weight-only, its results are not those of the weights.)
QUANT_MODES = ("int8", "int4")
QUANT_STEPS = ("decode", "small", "prefill")
QUANT_PATHS = ("pack", "dequant")
QUANT_COMPUTES = (torch.bfloat16, torch.float32)
# The probe of each step: its rows times a weight with the 1B's input width (2048, the kernels'
# inner loop). The slow candidates (float32 activations into the packed kernels, int4 dequantized at
# every product) run 10-100x slower than the fast ones on some CPUs, so the weights are small, and a
# candidate whose first call is GIVE_UP times slower than the best so far is not timed again: the
# whole measurement stays within about half a second even on a busy 2-core machine.
# (A small batch has its own probe: dequantizing a whole weight for 8 rows, which can win at 64, costs
# far more than the packed kernel there.) At a few hundred kilobytes the fixed costs of
# dequantizing set its time (on the Xeon with AMX, int8 dequantized into bfloat16 for 64 rows took
# 1 ns an element at 128x2048 and 0.25 at 8192x2048, where the packed kernel took 0.76 at both), so
# prefill's weight is a megabyte, no larger: the probe's temporaries count in a load's peak memory.
# Each candidate is called once before any of its step is timed: its first call of a shape (oneDNN building its
# kernel, a buffer allocated: 2 ms for a bfloat16 product here) is not its speed.
QUANT_PROBE_ROWS = {"decode": 1, "small": 8, "prefill": 64}
QUANT_PROBE_SHAPE = {"decode": (512, 2048), "small": (512, 2048), "prefill": (512, 2048)}
QUANT_PROBE_GROUP = 32  # the default int4 group size
GIVE_UP = 3.0


@dataclass(frozen=True)
class QuantizedPolicy:
    """The CPU kernel of each quantized product: `kernels` maps (mode, step, compute) to (path,
    dtype), where compute is None (no dtype forced: the fastest path in any dtype) or the forced
    dtype; `reason` and `timings` as Policy's."""

    kernels: dict = field(hash=False)
    reason: str = ""
    timings: Optional[dict] = field(default=None, compare=False, hash=False, repr=False)

    def kernel(self, mode: str, step: str, compute_dtype: Optional[torch.dtype] = None) -> tuple[str, torch.dtype]:
        """(path, compute dtype) of a `mode` product for `step`, in `compute_dtype` if given."""
        if mode not in QUANT_MODES:
            raise ValueError(f"quantize={mode!r} has no CPU kernel: use one of {', '.join(QUANT_MODES)}")
        # a dtype no packed kernel was timed in (float16) runs dequantize-then-F.linear, which takes any
        return self.kernels.get((mode, step, compute_dtype), ("dequant", compute_dtype))

    def describe(self) -> str:
        def one(mode: str, compute: Optional[torch.dtype]) -> str:
            return ", ".join(f"{s} {p} in {_name(dt)}" for s in QUANT_STEPS for p, dt in [self.kernel(mode, s, compute)])

        modes = "; ".join(
            f"{m} {one(m, None)} (forced float32: {one(m, torch.float32)})" for m in QUANT_MODES
        )
        return modes + (f" ({self.reason})" if self.reason else "")


def choose_quantized(timings: dict, reason: str = "measured") -> QuantizedPolicy:
    """The quantized kernels the timings call for: `timings` maps (mode, step, path, compute name)
    -> seconds for each mode in QUANT_MODES, step in QUANT_STEPS, path in QUANT_PATHS and compute
    in QUANT_COMPUTES. Each (mode, step) takes the fastest of all; each forced dtype the fastest in it."""
    chosen = {}
    for mode in QUANT_MODES:
        for step in QUANT_STEPS:
            cells = [
                (timings[(mode, step, p, _name(dt))], p, dt)
                for p in QUANT_PATHS
                for dt in QUANT_COMPUTES
                if (mode, step, p, _name(dt)) in timings
            ]
            chosen[(mode, step, None)] = min(cells, key=lambda c: c[0])[1:]
            for forced in QUANT_COMPUTES:
                chosen[(mode, step, forced)] = min((c for c in cells if c[2] == forced), key=lambda c: c[0])[1:]
    return QuantizedPolicy(chosen, reason=reason, timings=dict(timings))


def measure_quantized(repeats: int = 3) -> dict:
    """Seconds of one product per (mode, step, path, compute name) on this CPU, fastest of
    `repeats` after a warm-up (more for the short decode products): QUANT_PROBE_ROWS rows times a QUANT_PROBE_SHAPE weight quantized as
    `mode`, through each path (a QuantizedLinear forced to it) in each compute dtype. A candidate
    slower than GIVE_UP times the best of its (mode, step) on its first call keeps that time."""
    from llama import quantize  # quantize asks this module for its kernels: imported when measuring

    gen = torch.Generator().manual_seed(0)
    timings = {}
    with torch.no_grad():
        for step in QUANT_STEPS:
            out_features, in_features = QUANT_PROBE_SHAPE[step]
            w = torch.randn(out_features, in_features, generator=gen) * in_features**-0.5
            x = torch.randn(QUANT_PROBE_ROWS[step], in_features, generator=gen)
            for mode in QUANT_MODES:
                stored = quantize.quantize_int8(w) + (None,) if mode == "int8" else quantize.quantize_int4(w, QUANT_PROBE_GROUP)
                probes = {}
                for path in QUANT_PATHS:
                    for dt in QUANT_COMPUTES:
                        lin = quantize.QuantizedLinear(mode, *stored, QUANT_PROBE_GROUP, dt, path=path, compute_dtype=dt)
                        probes[path, dt] = functools.partial(lin.matmul, x.to(dt))
                        probes[path, dt]()  # a first call of the shape builds kernels and buffers: not timed
                best = float("inf")
                for (path, dt), probe in probes.items():
                    t = best_time(probe, repeats * (3 if step == "decode" else 1), give_up=GIVE_UP * best)
                    timings[(mode, step, path, _name(dt))] = t
                    best = min(best, t)
    return timings


def quantized_kernel(mode: str, step: str, compute_dtype: Optional[torch.dtype] = None) -> tuple[str, torch.dtype]:
    """(path, compute dtype) of a CPU product with `mode` weights for `step` ("decode" or
    "prefill"): the fastest measured on this CPU (once per process, on first use; with several
    processes rank 0's), restricted to `compute_dtype` when one is forced."""
    return _measured_quantized_policy(torch.get_num_threads()).kernel(mode, step, compute_dtype)


@functools.lru_cache(maxsize=None)
def _measured_quantized_policy(threads: int) -> QuantizedPolicy:
    start = time.perf_counter()
    policy = choose_quantized(measure_quantized(), reason=_measured_here(threads)) if distributed.is_rank0() else None
    return _rank0s(policy, "Quantized kernels", start, format_quantized_timings)


def format_quantized_timings(timings: dict) -> str:
    """One line: milliseconds per mode, step, path and compute dtype."""
    parts = []
    for mode in QUANT_MODES:
        for step in QUANT_STEPS:
            cells = [
                f"{p}-{_name(dt)} {timings[(mode, step, p, _name(dt))] * 1e3:.2f}"
                for p in QUANT_PATHS
                for dt in QUANT_COMPUTES
                if (mode, step, p, _name(dt)) in timings
            ]
            if cells:
                rows = QUANT_PROBE_ROWS[step]
                parts.append(f"{mode} {step} ({rows} row{'s' if rows > 1 else ''}, ms) " + ", ".join(cells))
    return "; ".join(parts)


# ---------------------------------------------------------------- w8a8: int8 activations too

# quantize="w8a8" is not a candidate of the policy above (its results are not those of the
# weights: it rounds the activations too); it is its own mode, with one kernel: fbgemm's product of
# uint8 inputs (the activations, quantized as given) and prepacked int8 weights, in float32 out.
W8A8_OP = "linear_with_input_q_dq_qweight_dq_output_fp32"


def w8a8_available() -> bool:
    """Whether this PyTorch has fbgemm's int8 product (x86 CPUs) and it computes exactly here."""
    return w8a8_levels() > 0


@contextlib.contextmanager
def _fbgemm() -> Iterator[None]:
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"  # what prepacking packs for; put back after
    try:
        yield
    finally:
        torch.backends.quantized.engine = engine


def w8a8_prepack(q: torch.Tensor, scales: torch.Tensor) -> torch.ScriptObject:
    """int8 weights (out, in) with per-channel scales (out,), packed for fbgemm's product."""
    with warnings.catch_warnings():  # the quantized-tensor API is deprecated; prepacking still takes one
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        qw = torch._make_per_channel_quantized_tensor(q, scales.double(), torch.zeros(len(q), dtype=torch.long), 0)
    with _fbgemm():
        return torch.ops.quantized.linear_prepack(qw, None)


def w8a8_matmul(
    x: torch.Tensor, packed: torch.ScriptObject, levels: int, amax: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """float32 x (rows, in) @ W^T, each row rounded to 2 * levels + 1 levels of its absolute maximum
    (`amax` (rows, 1): that of the whole row where x holds some of its columns).

    fbgemm takes one scale for its whole input: dividing each row by its maximum first (and
    multiplying the row's result back) makes that scale every row's own, so a row's result does not
    depend on the rows batched with it."""
    amax = (x.abs().amax(dim=1, keepdim=True) if amax is None else amax).clamp(min=1e-30)  # (rows, 1)
    out = getattr(torch.ops.quantized, W8A8_OP)(x / amax, 1.0 / levels, levels + 1, packed)
    return out * amax


@functools.lru_cache(maxsize=None)
def w8a8_levels() -> int:
    """The input levels each side of zero fbgemm multiplies exactly on this CPU: 127, or 63 where it
    adds pairs of uint8 x int8 products in int16 with saturation (x86 without VNNI, e.g. AVX2), which
    inputs up to 255 can overflow; 0 if neither is exact. Checked on the worst case, once."""
    if "fbgemm" not in torch.backends.quantized.supported_engines or not hasattr(torch.ops.quantized, W8A8_OP):
        return 0
    in_features = 64
    packed = w8a8_prepack(torch.full((16, in_features), 127, dtype=torch.int8), torch.ones(16))
    for levels in (127, 63):  # one row (decode) and several (fbgemm may take another kernel for them)
        got = torch.cat([w8a8_matmul(torch.ones(rows, in_features), packed, levels) for rows in (1, 8)])
        if torch.equal(got, torch.full_like(got, 127.0 * in_features)):
            if levels != 127 and distributed.is_rank0():
                logger.info("w8a8: fbgemm's int8 product overflows at full range on this CPU: inputs take %d levels each side", levels)
            return levels
    return 0


# ---------------------------------------------------------------- applying a policy to a step


@contextlib.contextmanager
def kernels_for(tokens: torch.Tensor, policy: Optional[Policy], compiled: bool = False) -> Iterator[None]:
    """Run a forward pass of `tokens` (bsz, seqlen) as `policy` plans for its number of rows.

    CUDA: attention from CUDA_ATTENTION. CPU: oneDNN on or off as planned, and a step planned in
    another dtype than the weights runs under `ComputeIn` (float32 activations and products over
    bfloat16 weights, no second copy of any weight kept); a `compiled` step computes in the
    weights' dtype (torch.compile traces the model, not this mode). `policy` None leaves
    PyTorch's defaults.
    """
    if tokens.device.type == "cuda":
        with sdpa_kernel(CUDA_ATTENTION):
            yield
        return
    if policy is None or tokens.device.type != "cpu":
        yield
        return
    plan = policy.plan(tokens.numel())
    was = torch.backends.mkldnn.enabled
    if plan.onednn is not None:
        torch.backends.mkldnn.enabled = plan.onednn
    try:
        if plan.dtype != policy.weights and not compiled:
            with ComputeIn(plan.dtype):
                yield
        else:
            yield
    finally:
        torch.backends.mkldnn.enabled = was


def upcast_linear(
    x: torch.Tensor, weight: torch.Tensor, scratch: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """F.linear(x, weight.to(x.dtype), bias) without converting the whole weight at once: blocks of
    output rows are converted into `scratch` (a 1-D buffer of x's dtype) and multiplied in turn."""
    out_features, in_features = weight.shape
    rows = max(1, scratch.numel() // in_features)
    if rows >= out_features and scratch.numel() >= weight.numel():
        parts = [F.linear(x, scratch[: weight.numel()].view(weight.shape).copy_(weight))]
    else:
        parts = []
        for start in range(0, out_features, rows):
            block = weight[start : start + rows]
            parts.append(F.linear(x, scratch[: block.numel()].view(block.shape).copy_(block)))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # (..., out_features)
    return out if bias is None else out + bias.to(out.dtype)


@functools.lru_cache(maxsize=None)
def upcast_scratch(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The one reused UPCAST_CHUNK buffer of `dtype` on `device` that `upcast_linear` converts
    weights into (allocated once: a fresh buffer of megabytes is page-faulted in at every product)."""
    return torch.empty(UPCAST_CHUNK, dtype=dtype, device=device)


class ComputeIn(TorchFunctionMode):
    """Compute a forward pass in `dtype` over weights (and KV cache) held in another dtype.

    Linear layers multiply `dtype` activations by their weight converted block by block for that
    one product (`upcast_linear`); embeddings are looked up and then converted (never the whole
    table); attention reads the KV cache converted to the query's dtype; writes into a tensor of
    another dtype (the KV cache) convert to the destination's dtype. Everything else follows PyTorch's type promotion, which
    keeps `dtype` activations in `dtype` (norm weights in bfloat16 times float32 is float32).
    """

    WRITES = {torch.Tensor.__setitem__, torch.Tensor.index_put_, torch.Tensor.index_copy_}

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def _linear(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self._cast(input)  # F.linear's own argument names
        if weight.dtype == self.dtype:
            return F.linear(x, weight, self._cast(bias))
        return upcast_linear(x, weight, upcast_scratch(self.dtype, weight.device), bias)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return self._linear(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            q = args[0]
            args = [args[0], *(self._cast(a, q.dtype) for a in args[1:3]), *args[3:]]
        elif func in self.WRITES:
            dst, *rest = args
            if isinstance(rest[-1], torch.Tensor) and rest[-1].dtype != dst.dtype and dst.is_floating_point():
                rest[-1] = rest[-1].to(dst.dtype)
            args = [dst, *rest]
        out = func(*args, **kwargs)
        if func is F.embedding and isinstance(out, torch.Tensor) and out.is_floating_point():
            out = out.to(self.dtype)
        return out

    def _cast(self, t, dtype: Optional[torch.dtype] = None):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.to(dtype or self.dtype)
        return t
