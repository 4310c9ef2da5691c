# w8a8: int8 activations too. fbgemm's product of uint8 inputs (the activations, rounded row by row
# at every product) and prepacked int8 weights, in float32 out (x86 CPUs).
import contextlib
import functools
import logging
import warnings
from typing import Iterator, Optional

import torch

from llama import distributed

logger = logging.getLogger(__name__)

# quantize="w8a8" is not a candidate of the quantized kernels' choice (quant_choice) (its results are not those of the
# weights: it rounds the activations too); it is its own mode, with one kernel: fbgemm's product of
# uint8 inputs (the activations, quantized as given) and prepacked int8 weights, in float32 out.
W8A8_OP = "linear_with_input_q_dq_qweight_dq_output_fp32"


def w8a8_available() -> bool:
    """Whether this PyTorch has fbgemm's int8 product (x86 CPUs) and it computes exactly here."""
    return w8a8_levels() > 0


def why_unavailable(device: torch.device) -> str:
    """Why quantize='w8a8' cannot run on `device`, in words (the start of a refusal)."""
    device = torch.device(device)
    if device.type != "cpu":
        return f"it runs on x86 CPUs (PyTorch's fbgemm), not on {device}"
    if "fbgemm" not in torch.backends.quantized.supported_engines or not hasattr(torch.ops.quantized, W8A8_OP):
        return "it runs on x86 CPUs through PyTorch's fbgemm, which this PyTorch on this CPU does not have"
    if w8a8_levels() == 0:
        return (
            "fbgemm's 8-bit product is not exact on this CPU (the start-up check found it wrong at 127 and at 63 "
            "input levels: its integer sums saturate)"
        )
    return "its kernel is unavailable here"


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
