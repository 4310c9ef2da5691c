# The dtype and kernel policy: which dtype the weights are held in, and which dtype and
# matrix-product kernels each kind of step computes with (StepKernels). Built here from timings
# (choose) or forced (uniform); measured at start-up by llama.runtime.probes (policy_for); applied
# to a step by llama.runtime.compute.kernels_for. Nothing else in the package chooses kernels but
# llama.runtime.graphs, which rewrites compiled graphs of models held in the cache, and the
# quantized kernels' own choice (llama.runtime.quant_choice).
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

# Steps by the number of token rows in their matrix products: one-row decode, a small batch of
# decode rows, and everything larger (prefill).
KINDS = ("decode", "small", "prefill")
SMALL_ROWS = 16

# How a step's products may compute: in bfloat16 or float32 over weights of that dtype, or in float32
# over bfloat16 weights upcast one linear at a time ("upcast"); each with oneDNN on or off, and
# bfloat16 over bfloat16 weights also through this package's own product (NATIVE,
# llama.runtime.native.bf16_mm) where it builds. A timing's third key is the kernel: True (oneDNN),
# False (PyTorch's own) or NATIVE.
COMPUTES = ("bfloat16", "float32", "upcast")
NATIVE = "native"
KERNELS = (True, False, NATIVE)

DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


@dataclass(frozen=True)
class StepKernels:
    """How one kind of step computes: the dtype of its activations and products, whether CPU
    products go through oneDNN (True), PyTorch's own kernels (False) or whatever is set (None), and
    whether its bfloat16 linear layers go through this package's own product (`native`)."""

    dtype: torch.dtype
    onednn: Optional[bool] = None
    native: bool = False


@dataclass(frozen=True)
class Policy:
    """The weights' dtype and the StepKernels of each kind of step; `reason` says where it came from (logged),
    `timings` what it was chosen from (llama.runtime.probes.measure), if it was measured."""

    weights: torch.dtype
    decode: StepKernels
    small: StepKernels
    prefill: StepKernels
    reason: str = ""
    timings: Optional[dict] = field(default=None, compare=False, hash=False, repr=False)

    def plan(self, rows: int) -> StepKernels:
        """The plan for a step whose products have `rows` token rows (batch x sequence length)."""
        return self.decode if rows == 1 else self.small if rows <= SMALL_ROWS else self.prefill

    def describe(self) -> str:
        def one(p: StepKernels) -> str:
            kernel = "" if p.onednn is None else ", oneDNN" if p.onednn else ", PyTorch's own kernels"
            kernel += ", this package's bfloat16 product" if p.native else ""
            return dtype_name(p.dtype) + kernel

        plans = "; ".join(f"{k} {one(getattr(self, k))}" for k in KINDS)
        return f"weights in {dtype_name(self.weights)}; {plans}" + (f" ({self.reason})" if self.reason else "")


def dtype_name(dtype: torch.dtype) -> str:
    """The name of `dtype` without its "torch." prefix ("bfloat16")."""
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
    plan = StepKernels(dtype, onednn)
    return Policy(dtype, plan, plan, plan, reason)


# ---------------------------------------------------------------- choosing from timings


def choose(timings: dict, reason: str = "measured") -> Policy:
    """The policy the timings call for. `timings` maps (kind, compute, kernel) -> seconds for each
    kind in KINDS, compute in COMPUTES ("upcast" may be missing for decode) and kernel in (True, False)
    (oneDNN or not), and NATIVE where timed (bfloat16 decode and small batches).

    The weights go in bfloat16 when its one-row decode product is faster than float32's (half the
    memory, and decode reads every weight once per token), else in float32. Each kind of step then
    takes the fastest way the weights allow: bfloat16 weights compute in bfloat16 or, upcast, in
    float32; float32 weights compute in float32.
    """
    bf16, f32 = fastest(timings, "decode", "bfloat16"), fastest(timings, "decode", "float32")
    if bf16[0] < f32[0]:
        weights, allowed = torch.bfloat16, ("bfloat16", "upcast")
    else:
        weights, allowed = torch.float32, ("float32",)
    plans = {}
    for kind in KINDS:
        _, kernel, compute = min(((*fastest(timings, kind, c), c) for c in allowed if _has(timings, kind, c)),
                                 key=lambda t: t[0])
        plans[kind] = step_kernels(torch.bfloat16 if compute == "bfloat16" else torch.float32, kernel)
    return Policy(weights, reason=reason, timings=dict(timings), **plans)


def _has(timings: dict, kind: str, compute: str) -> bool:
    return any((kind, compute, o) in timings for o in KERNELS)


def fastest(timings: dict, kind: str, compute: str) -> tuple[float, Union[bool, str]]:
    """(seconds, kernel) of the fastest kernel timed for this kind and compute (KERNELS)."""
    return min(((timings[(kind, compute, o)], o) for o in KERNELS if (kind, compute, o) in timings), key=lambda t: t[0])


def step_kernels(dtype: torch.dtype, kernel: Union[bool, str]) -> StepKernels:
    """The StepKernels of a step computing in `dtype` with `kernel` (KERNELS): NATIVE leaves oneDNN as set."""
    return StepKernels(dtype, native=True) if kernel == NATIVE else StepKernels(dtype, kernel)
