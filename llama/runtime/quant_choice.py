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
# inner loop). Decode and small batches read a model's weights from memory at every step: their
# probes multiply the 1B's feed-forward shape, cycling through copies of it that span twice the
# last-level cache (cpu.streamed_copies), each timed by the median of its calls (a weight timed from
# the cache favours the kernels that compute fastest, not those that read fastest: a probe of a
# cached megabyte had chosen a kernel that decodes a 1B at half the speed of another). The slow
# candidates (float32 activations into the packed kernels, int4 dequantized at every product) run
# 10-100x slower than the fast ones on some CPUs: a candidate whose first call is GIVE_UP times
# slower than the best so far is not timed again. (A small batch has its own probe: dequantizing a
# whole weight for 8 rows, which can win at 64, costs far more than the packed kernel there.)
# Prefill is bound by arithmetic: one weight of a megabyte, from the cache (below a few hundred
# kilobytes the fixed costs of dequantizing would set its time), times 256 rows, a prompt's length
# or a chunk of one: PyTorch's packed kernels cost the same per row at any count, dequantizing a
# block costs the same for any count of rows, and at 64 rows the packed kernels won where a
# 512-token prompt ran 3-4x slower through them. Each candidate is called once before it is
# timed: its first call of a shape (oneDNN building its kernel, a buffer allocated) is not its
# speed; one whose first call alone is WARM_UP_GIVE_UP times the best so far is not called again.
# The probes multiply random int8 and int4 tensors: a product's time does not depend on the values.
QUANT_PROBE_ROWS = {"decode": 1, "small": 8, "prefill": 256}
QUANT_PROBE_SHAPE = {"decode": (8192, 2048), "small": (8192, 2048), "prefill": (512, 2048)}
STREAMED = ("decode", "small")  # the steps whose probes read each call's weight from memory
# Not a candidate of STREAMED steps: dequantize-then-F.linear writes the whole weight in the compute
# dtype and reads it back at every product, 3-9x the bytes the kernels that read the stored form do
# (it lost those steps by 5-300x wherever it was timed), and its temporaries for the probe's weight
# would set a quantized load's peak memory.
NOT_STREAMED = ("dequant",)
QUANT_PROBE_GROUP = 32  # the default int4 group size
PROBE_ROUNDS = cpu.PROBE_ROUNDS  # each candidate timed in this many rounds, the fastest kept (measure_quantized)
GIVE_UP = 3.0
WARM_UP_GIVE_UP = 10.0  # a first call this many times the best so far is not timed again (_timed)


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
    saves): the stored one (STORED_FORM's paths) or PyTorch's packed one, whichever loses less over
    the steps, each step's loss its form's best time over the step's best (`_int4_stored`); every
    step then takes the fastest path of that form."""
    chosen = {}
    for mode in QUANT_MODES:
        for choice in (None, *QUANT_COMPUTES):
            stored = _int4_stored(timings, choice) if mode == "int4" else None
            for step in QUANT_STEPS:
                cells = _cells(timings, mode, step, choice)
                if stored is not None:
                    cells = [c for c in cells if (c[1] in STORED_FORM) == stored] or cells
                chosen[(mode, step, choice)] = min(cells, key=lambda c: c[0])[1:]
    return QuantizedPolicy(chosen, reason=reason, timings=dict(timings))


def _cells(timings: dict, mode: str, step: str, choice: Optional[torch.dtype]) -> list[tuple]:
    """(seconds, path, compute dtype) of each candidate of (mode, step) in dtype `choice` (None: any)."""
    return [
        (timings[(mode, step, p, dtype_name(dt))], p, dt)
        for p in QUANT_PATHS
        for dt in QUANT_COMPUTES
        if (mode, step, p, dtype_name(dt)) in timings and choice in (None, dt)
    ]


def _int4_stored(timings: dict, choice: Optional[torch.dtype]) -> bool:
    """Whether int4 weights keep their stored form: the sum over the steps of its best time over the
    step's best is at most the packed form's (decode alone would trade a prefill several times slower
    for a decode a few percent faster; a tie keeps the stored form, which loads without converting)."""
    def loss(stored: bool) -> float:
        total = 0.0
        for step in QUANT_STEPS:
            cells = _cells(timings, "int4", step, choice)
            mine = [c[0] for c in cells if (c[1] in STORED_FORM) == stored]
            if not mine:
                return float("inf")
            total += min(mine) / min(c[0] for c in cells)
        return total

    return loss(True) <= loss(False)


def step_for(rows: int) -> str:
    """The kind of quantized product (one of QUANT_STEPS) for `rows` token rows."""
    return "decode" if rows <= DECODE_ROWS else "small" if rows <= SMALL_ROWS else "prefill"


def int8_activations_allowed() -> bool:
    """Whether the kernels with int8 activations (native_a8) may be chosen: unless WEIGHT_ONLY_ENV is
    set (to anything but 0), and only where the native kernels built."""
    return os.environ.get(WEIGHT_ONLY_ENV, "0") in ("", "0") and native.kernels() is not None


def measure_quantized(repeats: int = 3, rounds: int = PROBE_ROUNDS) -> dict:
    """Seconds of one product per (mode, step, path, compute name) on this CPU, after a warm-up
    (more calls for the short decode products): QUANT_PROBE_ROWS rows times a QUANT_PROBE_SHAPE
    weight of random `mode` values, through each path in each compute dtype; the fastest call, or
    for STREAMED steps the median of calls each reading another copy of the weight from memory; the
    fastest of `rounds` such measurements (other work on the cores only ever adds time, and the choice
    is kept for every later process). A candidate slower than GIVE_UP times the best of its (mode,
    step) on its first call keeps that time."""
    gen = torch.Generator().manual_seed(0)
    timings: dict = {}
    with torch.no_grad():
        for _ in range(rounds):
            for step in QUANT_STEPS:
                x = torch.randn(QUANT_PROBE_ROWS[step], QUANT_PROBE_SHAPE[step][1], generator=gen)
                for mode in QUANT_MODES:
                    _measure_step(timings, mode, step, x, gen, repeats)
    return timings


def _measure_step(timings: dict, mode: str, step: str, x: torch.Tensor, gen: torch.Generator, repeats: int) -> None:
    """Times every candidate of (mode, step) into `timings`, keeping the faster of an earlier round's;
    a candidate that lost by more than GIVE_UP in an earlier round is not timed again."""
    earlier = [t for (m, s, _, _), t in timings.items() if (m, s) == (mode, step)]
    best = min(earlier, default=float("inf"))
    a8 = step in A8_STEPS and int8_activations_allowed()
    for group in _probe_groups(mode, QUANT_PROBE_SHAPE[step], x, gen, a8, step in STREAMED):
        for (path, dt), probe in group.items():
            key = (mode, step, path, dtype_name(dt))
            if timings.get(key, 0.0) > GIVE_UP * best:
                continue
            t = _timed(probe, repeats * (3 if step == "decode" else 1), best, step in STREAMED)
            timings[key] = min(t, timings.get(key, t))
            best = min(best, t)
        group.clear()  # its copies freed before the next group's are made


def _timed(probe: "Cycled", calls: int, best: float, median: bool) -> float:
    """Seconds of one call of `probe` (cpu.best_time) after a first call that is not timed (a first
    call of a shape builds kernels and buffers), unless that first call alone takes WARM_UP_GIVE_UP
    times `best`: whatever it paid once, it has lost (the slow candidates run 10-100x slower)."""
    start = time.perf_counter()
    probe()
    first = time.perf_counter() - start
    if first > WARM_UP_GIVE_UP * best:
        return first
    return cpu.best_time(probe, calls, give_up=GIVE_UP * best, median=median)


class Cycled:
    """A probe: `kernel(x, *args)` with each of `weights` (tuples of args) in turn, so that from
    several copies each call reads bytes the calls before it pushed out of the cache."""

    def __init__(self, kernel: Callable[..., torch.Tensor], x: torch.Tensor, weights: list[tuple]):
        self.kernel, self.x, self.weights, self.calls = kernel, x, weights, 0

    def __call__(self) -> torch.Tensor:
        args = self.weights[self.calls % len(self.weights)]
        self.calls += 1
        return self.kernel(self.x, *args)


def _probe_groups(mode: str, shape: tuple[int, int], x: torch.Tensor, gen: torch.Generator, a8: bool, streamed: bool):
    """Groups of probes, {(path, compute dtype): Cycled}, each group's weights made when it is
    reached and dropped after (int4's stored form, then PyTorch's packed form: never both copies held);
    `a8`: native_a8 among them; `streamed`: as many copies of each weight as reading from memory
    takes (cpu.streamed_copies), else one."""
    out_features, in_features = shape
    groups = (out_features, in_features // QUANT_PROBE_GROUP)
    if mode == "int8":
        q = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
        scales = torch.rand(out_features, generator=gen) / 127
        copies = [(c, scales) for c in _copies(q, streamed)]
        yield _ordered(_int8_probes(x, copies, a8), streamed)
        return
    q = torch.randint(0, 256, (out_features, in_features // 2), generator=gen, dtype=torch.uint8)
    scales, zeros = torch.rand(groups, generator=gen).bfloat16(), torch.randn(groups, generator=gen).bfloat16()
    stored_form = [(q, scales, zeros)] + [tuple(t.clone() for t in (q, scales, zeros)) for _ in range(_count(q, streamed) - 1)]
    yield _ordered(_int4_stored_probes(x, stored_form, a8), streamed)
    del stored_form
    packed = quant_kernels.int4_kernel_layout(q)
    tables = {dt: quant_kernels.scales_and_zeros(scales, zeros, dt) for dt in QUANT_COMPUTES}
    packed_copies = _copies(packed, streamed)
    yield _ordered({
        ("pack", dt): Cycled(quant_kernels.int4_pack_mm, x.to(dt), [(p, QUANT_PROBE_GROUP, tables[dt]) for p in packed_copies])
        for dt in QUANT_COMPUTES
    }, streamed)


def _count(t: torch.Tensor, streamed: bool) -> int:
    return cpu.streamed_copies(t.numel() * t.element_size()) if streamed else 1


def _copies(t: torch.Tensor, streamed: bool) -> list[torch.Tensor]:
    return [t] + [t.clone() for _ in range(_count(t, streamed) - 1)]


def _int8_probes(x: torch.Tensor, copies: list[tuple], a8: bool) -> dict:
    probes = {}
    if native.kernels() is not None:  # float32 activations; the stored form as it is
        x32, as32 = x.float(), [(q, s.float()) for q, s in copies]
        probes["native", torch.float32] = Cycled(native.int8_mm, x32, as32)
        if a8:
            probes["native_a8", torch.float32] = Cycled(native.int8a_mm, x32, as32)
    for dt in QUANT_COMPUTES:
        as_dt = [(q, s.to(dt)) for q, s in copies]
        probes["pack", dt] = Cycled(quant_kernels.int8_pack_mm, x.to(dt), as_dt)
        probes["dequant", dt] = Cycled(quant_kernels.int8_dequant_mm, x.to(dt), as_dt)
    return probes


def _int4_stored_probes(x: torch.Tensor, copies: list[tuple], a8: bool) -> dict:
    with_group = [(*c, QUANT_PROBE_GROUP) for c in copies]
    probes = {}
    if native.kernels() is not None:
        probes["native", torch.float32] = Cycled(native.int4_mm, x.float(), with_group)
        if a8:
            probes["native_a8", torch.float32] = Cycled(native.int4a_mm, x.float(), with_group)
    for dt in QUANT_COMPUTES:
        probes["dequant", dt] = Cycled(quant_kernels.int4_dequant_mm, x.to(dt), with_group)
    return probes


def _ordered(probes: dict, streamed: bool) -> dict:
    """`probes` in QUANT_PATHS order (the fast candidates first, so the slow ones give up after
    one call), less NOT_STREAMED where `streamed`."""
    paths = [p for p in QUANT_PATHS if not (streamed and p in NOT_STREAMED)]
    return {(path, dt): probes[path, dt] for path in paths for dt in QUANT_COMPUTES if (path, dt) in probes}


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
             "int8_activations": int8_activations, "streamed": list(STREAMED)},
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


