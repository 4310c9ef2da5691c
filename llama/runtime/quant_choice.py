# The kernel of each quantized product on CPU: which path (quant_kernels) and compute dtype each
# kind of step of int8 and int4 weights runs, measured once per process at first use, by rank 0,
# and logged as one line (the timings at debug level).
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from llama import distributed
from llama.runtime import cpu, native, quant_kernels, stored
from llama.runtime.policy import SMALL_ROWS, dtype_name

logger = logging.getLogger(__name__)

# A quantized product (llama.weights.quant_modules.QuantizedLinear on CPU) is a "decode" step (at
# most DECODE_ROWS rows), a "small" batch (at most SMALL_ROWS, as a batch of decode rows or a
# speculative verify pass) or a "prefill"; each can run through PyTorch's packed kernel ("pack":
# torch._weight_int8pack_mm / torch._weight_int4pack_mm_for_cpu) or as dequantize-then-F.linear
# ("dequant"), with bfloat16 or float32 activations, or through this package's own kernels ("native",
# llama.runtime.native: float32 activations, the stored form read once per call; a candidate only where
# they could be built), or, for a decode step or a small batch, through its kernels with int8
# activations ("native_a8": each activation row rounded to int8 per block of 32 at every product, then
# integer dot products, as llama.cpp's Q8_0 and Q4_0 products; not weight-only, so its results are
# those of the rounded activations: a candidate unless WEIGHT_ONLY_ENV is set, and named in the log).
# (torch._int_mm with activations rounded per row is not a candidate: a row's one scale rounds
# coarsely, and w8a8 is that mode, asked for by name.)
QUANT_MODES = ("int8", "int4")
QUANT_STEPS = ("decode", "small", "prefill")
QUANT_PATHS = ("pack", "dequant", "native", "native_a8")
QUANT_COMPUTES = (torch.bfloat16, torch.float32)
STORED_FORM = ("dequant", "native", "native_a8")  # the paths that read int4's stored form (pack reads PyTorch's layout)
A8_STEPS = ("decode", "small")  # the steps native_a8 is a candidate of: those that read weights at one or few rows
WEIGHT_ONLY_ENV = "LLAMA_WEIGHT_ONLY"  # set (to 1): quantized products keep float activations (no native_a8)
DECODE_ROWS = 4
# The probe of each step: its rows times a weight with the 1B's input width (2048, the kernels'
# inner loop). The slow candidates (float32 activations into the packed kernels, int4 dequantized at
# every product) run 10-100x slower than the fast ones on some CPUs, so the weights are small, and a
# candidate whose first call is GIVE_UP times slower than the best so far is not timed again: the
# whole measurement stays within about half a second even on a busy 2-core machine.
# (A small batch has its own probe: dequantizing a whole weight for 8 rows, which can win at 64, costs
# far more than the packed kernel there.) Below a few hundred kilobytes the fixed costs of
# dequantizing would set its time, so prefill's weight is a megabyte, no larger: the probe's
# temporaries count in a load's peak memory. Each candidate is called once before any of its step
# is timed: its first call of a shape (oneDNN building its kernel, a buffer allocated) is not its speed.
# The probes multiply random int8 and int4 tensors: a product's time does not depend on the values.
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
            return ", ".join(f"{s} {p} in {dtype_name(dt)}" for s in QUANT_STEPS for p, dt in [self.kernel(mode, s, compute)])

        modes = "; ".join(
            f"{m} {one(m, None)} (forced float32: {one(m, torch.float32)})" for m in QUANT_MODES
        )
        if any(p == "native_a8" for p, _ in self.kernels.values()):
            modes += f"; native_a8 rounds the activations to int8 per block of 32 ({WEIGHT_ONLY_ENV}=1: float activations)"
        return modes + (f" ({self.reason})" if self.reason else "")


def choose_quantized(timings: dict, reason: str = "measured") -> QuantizedPolicy:
    """The quantized kernels the timings call for: `timings` maps (mode, step, path, compute name)
    -> seconds for each mode in QUANT_MODES, step in QUANT_STEPS, path in QUANT_PATHS and compute
    in QUANT_COMPUTES (a missing one is no candidate). Each (mode, step) takes the fastest of all; each
    forced dtype the fastest in it. An int4 weight is held in one form only (two would undo what int4
    saves): its decode step, which reads the weights at every token, takes the fastest path, and the
    other steps the fastest of the paths that read the same form (STORED_FORM, or PyTorch's packed one)."""
    chosen = {}
    for mode in QUANT_MODES:
        for choice in (None, *QUANT_COMPUTES):
            for step in QUANT_STEPS:
                cells = [
                    (timings[(mode, step, p, dtype_name(dt))], p, dt)
                    for p in QUANT_PATHS
                    for dt in QUANT_COMPUTES
                    if (mode, step, p, dtype_name(dt)) in timings and choice in (None, dt)
                ]
                if mode == "int4" and step != "decode":
                    stored = chosen[(mode, "decode", choice)][0] in STORED_FORM
                    cells = [c for c in cells if (c[1] in STORED_FORM) == stored] or cells
                chosen[(mode, step, choice)] = min(cells, key=lambda c: c[0])[1:]
    return QuantizedPolicy(chosen, reason=reason, timings=dict(timings))


def step_for(rows: int) -> str:
    """The kind of quantized product (one of QUANT_STEPS) for `rows` token rows."""
    return "decode" if rows <= DECODE_ROWS else "small" if rows <= SMALL_ROWS else "prefill"


def int8_activations_allowed() -> bool:
    """Whether the kernels with int8 activations (native_a8) may be chosen: unless WEIGHT_ONLY_ENV is
    set (to anything but 0), and only where the native kernels built."""
    return os.environ.get(WEIGHT_ONLY_ENV, "0") in ("", "0") and native.kernels() is not None


def measure_quantized(repeats: int = 3) -> dict:
    """Seconds of one product per (mode, step, path, compute name) on this CPU, fastest of
    `repeats` after a warm-up (more for the short decode products): QUANT_PROBE_ROWS rows times a
    QUANT_PROBE_SHAPE weight of random `mode` values, through each path in each compute dtype. A
    candidate slower than GIVE_UP times the best of its (mode, step) on its first call keeps that time."""
    gen = torch.Generator().manual_seed(0)
    timings = {}
    with torch.no_grad():
        for step in QUANT_STEPS:
            x = torch.randn(QUANT_PROBE_ROWS[step], QUANT_PROBE_SHAPE[step][1], generator=gen)
            for mode in QUANT_MODES:
                probes = _probes(mode, QUANT_PROBE_SHAPE[step], x, gen, a8=step in A8_STEPS and int8_activations_allowed())
                best = float("inf")
                for (path, dt), probe in probes.items():
                    t = cpu.best_time(probe, repeats * (3 if step == "decode" else 1), give_up=GIVE_UP * best)
                    timings[(mode, step, path, dtype_name(dt))] = t
                    best = min(best, t)
    return timings


def _probes(mode: str, shape: tuple[int, int], x: torch.Tensor, gen: torch.Generator, a8: bool = False) -> dict:
    """(path, compute dtype) -> a call of that product of `x` by a random `mode` weight of `shape`,
    each called once already (a first call of a shape builds kernels and buffers: not timed);
    `a8`: native_a8 among them."""
    out_features, in_features = shape
    groups = (out_features, in_features // QUANT_PROBE_GROUP)
    if mode == "int8":
        q = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
        scales = torch.rand(out_features, generator=gen) / 127
    else:
        q = torch.randint(0, 256, (out_features, in_features // 2), generator=gen, dtype=torch.uint8)
        scales, zeros = torch.rand(groups, generator=gen).bfloat16(), torch.randn(groups, generator=gen).bfloat16()
        packed = quant_kernels.int4_kernel_layout(q)
    probes: dict[tuple[str, torch.dtype], Callable[[], torch.Tensor]] = {}
    if native.kernels() is not None:  # float32 activations; the stored form as it is
        x32 = x.float()
        if mode == "int8":
            probes["native", torch.float32] = functools.partial(native.int8_mm, x32, q, scales.float())
            if a8:
                probes["native_a8", torch.float32] = functools.partial(native.int8a_mm, x32, q, scales.float())
        else:
            probes["native", torch.float32] = functools.partial(native.int4_mm, x32, q, scales, zeros, QUANT_PROBE_GROUP)
            if a8:
                probes["native_a8", torch.float32] = functools.partial(
                    native.int4a_mm, x32, q, scales, zeros, QUANT_PROBE_GROUP)
    for dt in QUANT_COMPUTES:
        xd = x.to(dt)
        if mode == "int8":
            s = scales.to(dt)
            probes["pack", dt] = functools.partial(quant_kernels.int8_pack_mm, xd, q, s)
            probes["dequant", dt] = functools.partial(quant_kernels.int8_dequant_mm, xd, q, s)
        else:
            sz = quant_kernels.scales_and_zeros(scales, zeros, dt)
            probes["pack", dt] = functools.partial(quant_kernels.int4_pack_mm, xd, packed, QUANT_PROBE_GROUP, sz)
            probes["dequant", dt] = functools.partial(quant_kernels.int4_dequant_mm, xd, q, scales, zeros, QUANT_PROBE_GROUP)
    ordered = {(path, dt): probes[path, dt] for path in QUANT_PATHS for dt in QUANT_COMPUTES if (path, dt) in probes}
    for probe in ordered.values():
        probe()
    return ordered


def quantized_kernel(mode: str, step: str, compute_dtype: Optional[torch.dtype] = None) -> tuple[str, torch.dtype]:
    """(path, compute dtype) of a CPU product with `mode` weights for `step` ("decode" or
    "prefill"): the fastest measured on this CPU (once per process, on first use; with several
    processes rank 0's), restricted to `compute_dtype` when one is forced."""
    return _measured_quantized_policy(torch.get_num_threads(), int8_activations_allowed()).kernel(mode, step, compute_dtype)


@functools.lru_cache(maxsize=None)
def _measured_quantized_policy(threads: int, int8_activations: bool = False) -> QuantizedPolicy:
    start = time.perf_counter()
    policy = None
    if distributed.is_rank0():  # kept from an earlier process on this machine (stored), as the dtype policy
        timings, kept = stored.kept_or_measured(
            "quantized-kernels",
            {"threads": threads, "paths": list(QUANT_PATHS), "native": native.kernels() is not None,
             "int8_activations": int8_activations},
            measure_quantized,
            stored.encode_timings, lambda rows: stored.checked_timings(rows, choose_quantized),
        )
        policy = choose_quantized(timings, reason=cpu.measured_here(threads) + stored.kept_note(kept))
    return cpu.rank0s(policy, "Quantized kernels", start, lambda p: format_quantized_timings(p.timings), logger)


def format_quantized_timings(timings: dict) -> str:
    """One line: milliseconds per mode, step, path and compute dtype."""
    parts = []
    for mode in QUANT_MODES:
        for step in QUANT_STEPS:
            cells = [
                f"{p}-{dtype_name(dt)} {timings[(mode, step, p, dtype_name(dt))] * 1e3:.2f}"
                for p in QUANT_PATHS
                for dt in QUANT_COMPUTES
                if (mode, step, p, dtype_name(dt)) in timings
            ]
            if cells:
                rows = QUANT_PROBE_ROWS[step]
                parts.append(f"{mode} {step} ({rows} row{'s' if rows > 1 else ''}, ms) " + ", ".join(cells))
    return "; ".join(parts)


