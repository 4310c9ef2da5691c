# The products of quantized weights, as plain functions of tensors: what llama.weights'
# QuantizedLinear runs and what the start-up probes (quant_choice) time, on random tensors of the
# right shapes and dtypes. Each takes x2, the activations as (rows, in) in the compute dtype.
#
# The tensors they read (llama.weights.quant_formats describes the stored forms):
#   int8: q int8 (out, in), scales (out,) in the compute dtype: W ~ q * scales[:, None]
#   int4: stored q uint8 (out, in / 2), two 4-bit values in [0, 15] per byte (column 2j in the low
#         nibble, 2j + 1 in the high one), scales and zeros (out, in / group):
#         W[:, j] ~ (q[:, j] - 8) * scales[:, j // group] + zeros[:, j // group];
#         or the same values in PyTorch's int4 kernel layout with its (in / group, out, 2) scales_and_zeros
#   fp8:  q float8_e4m3fn (out, in), scales float32 (1, out)
# Paths a product can take on CPU: "pack", PyTorch's packed kernels (torch._weight_int8pack_mm,
# torch._weight_int4pack_mm_for_cpu), and "dequant", the weight dequantized to the compute dtype,
# then F.linear (int8 on CPU, eager: a block of rows at a time, compute.upcast_linear, its scales
# multiplying the product's columns). CUDA runs tinygemm for int4, int8 dequantized inside the
# product (torch.compile fuses it) and torch._scaled_mm for fp8.
import functools
from typing import Optional

import torch
import torch.nn.functional as F

from llama.runtime.compute import upcast_linear, upcast_scratch

INT4_INNER_K_TILES = {"cpu": 2, "cuda": 8}
FP8_MAX = 448.0  # largest float8_e4m3fn


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Stored int4 (out, in / 2) uint8 -> its values (out, in) uint8 in [0, 15]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(1)


def dequantize_int4(values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 weight (rows, in) of int4 `values` (rows, in) in [0, 15] and their (rows, in /
    group_size) scales and zero points."""
    s = scales.float().repeat_interleave(group_size, dim=1)
    z = zeros.float().repeat_interleave(group_size, dim=1)
    return (values.float() - 8) * s + z


def int8_pack_mm(x2: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x2 @ (q * scales)^T through PyTorch's packed int8 kernel; `scales` in x2's dtype."""
    return torch._weight_int8pack_mm(x2, q, scales)


def int8_dequant_mm(x2: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x2 @ (q * scales)^T as q converted to x2's dtype, then F.linear, its columns scaled after."""
    if x2.device.type == "cpu" and not torch.compiler.is_compiling():
        # a block of rows at a time into one reused buffer: a whole-weight temporary would be
        # page-faulted in at every product
        return upcast_linear(x2, q, upcast_scratch(x2.dtype, x2.device)) * scales
    # CUDA's caching allocator reuses the temporary; compiled, inductor fuses it into the product
    return F.linear(x2, q.to(x2.dtype)) * scales


def int4_pack_mm(x2: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x2 @ W^T through PyTorch's int4 kernel, `packed` in its layout (int4_kernel_layout)."""
    if x2.device.type == "cuda":
        return torch._weight_int4pack_mm(x2, packed, group_size, scales_and_zeros)
    return torch._weight_int4pack_mm_for_cpu(x2, packed, group_size, scales_and_zeros)


def int4_dequant_mm(
    x2: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """x2 @ W^T with the stored int4 weight dequantized whole to x2's dtype first."""
    return F.linear(x2, dequantize_int4(unpack_int4(q), scales, zeros, group_size).to(x2.dtype))


def fp8_mm(x2: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x2 @ W^T in bfloat16 from float8 weights, x2 rounded to float8 row by row (as Meta's own
    fp8 path rounds its activations), through torch._scaled_mm (CUDA sm89+)."""
    x_scale = x2.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX  # (rows, 1)
    xq = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return torch._scaled_mm(xq, q.t(), scale_a=x_scale, scale_b=scales, out_dtype=torch.bfloat16)


def int4_kernel_layout(q: torch.Tensor) -> torch.Tensor:
    """Stored int4 rows (rows, in / 2) uint8 -> the layout of PyTorch's int4 kernel on q's device.
    On CPU each block of 64 rows keeps its own bytes, so a weight may be converted block by block."""
    if q.device.type == "cuda":  # tinygemm takes the even column in the HIGH nibble
        values = unpack_int4(q)
        swapped = (values[:, ::2] << 4) | values[:, 1::2]
        return torch._convert_weight_to_int4pack(swapped.contiguous(), INT4_INNER_K_TILES["cuda"])
    return torch._convert_weight_to_int4pack_for_cpu(unpack_int4(q).to(torch.int32), INT4_INNER_K_TILES["cpu"])


def scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The int4 kernel's (in / group, out, 2) table of (out, in / group) scales and zeros, in `dtype`."""
    return torch.stack((scales.t(), zeros.t()), dim=-1).to(dtype).contiguous()


def kernel_layout_rows(packed: torch.Tensor, rows: torch.Tensor, block: int) -> torch.Tensor:
    """Rows `rows` (n,) of the int4 values (n, in) in [0, 15] held in the CPU kernel's layout
    `packed` (out, in / 2), where each block of `block` rows is stored column by column, a byte
    holding row r of the block in its low nibble and row r + block / 2 in its high one."""
    half = block // 2
    by_block = packed.view(-1, packed.shape[1] * 2, half)  # (out / block, in, block / 2)
    picked = by_block[rows // block, :, rows % half]  # (n, in)
    return torch.where((rows % block >= half)[:, None], picked >> 4, picked & 15)


@functools.cache
def int4_kernel_block() -> Optional[int]:
    """The rows per block of the CPU int4 kernel's layout when kernel_layout_rows reads it, else
    None. The layout is PyTorch's own (not documented, and it may differ by build and CPU), so it is
    probed once, on a small tensor, before a tied embedding is made to read from it."""
    values = torch.randint(0, 16, (128, 128), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = torch._convert_weight_to_int4pack_for_cpu(values.to(torch.int32), INT4_INNER_K_TILES["cpu"])
    if packed.shape != (128, 64) or packed.dtype != torch.uint8:
        return None
    rows = torch.arange(128)
    return next((b for b in (64, 32, 16) if torch.equal(kernel_layout_rows(packed, rows, b), values)), None)
