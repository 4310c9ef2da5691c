# A prefill's product with quantized weights, block by block: blocks of output rows dequantized
# into one reused buffer of the compute dtype, each multiplied by F.linear into its slice of the
# output. At hundreds of rows PyTorch's packed kernels, and dequantizing in small blocks, are
# several times slower than a plain product; blocks as large as the buffer keep the product near
# the speed of a weight held in the compute dtype (QuantizedLinear runs it for its prefill steps).
import functools
from typing import Callable

import torch
import torch.nn.functional as F

PREFILL_BLOCK = 16 * 2**20  # values of the buffer a prefill dequantizes blocks of a weight into
BLOCK_ROWS = 64  # blocks of output rows are multiples of this


@functools.lru_cache(maxsize=None)
def prefill_scratch(dtype: torch.dtype) -> torch.Tensor:
    """The one reused buffer of `dtype` a prefill dequantizes into (allocated at the first prefill,
    not at load; a fresh one would be page-faulted in at every product). A normal tensor even when
    the first prefill runs under inference mode, so products outside it can write into it too."""
    with torch.inference_mode(False):
        return torch.empty(PREFILL_BLOCK, dtype=dtype)


def blocks_mm(
    x2: torch.Tensor, out_features: int, rows_into: Callable[[int, int, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """x2 (rows, in) @ W^T -> (rows, out_features) in x2's dtype, where rows_into(start, stop, w)
    writes rows start:stop of W into `w` and returns it."""
    in_features = x2.shape[1]
    scratch = prefill_scratch(x2.dtype)
    step = max(BLOCK_ROWS, scratch.numel() // in_features // BLOCK_ROWS * BLOCK_ROWS)
    if step >= out_features:
        return F.linear(x2, rows_into(0, out_features, scratch[: out_features * in_features].view(out_features, -1)))
    out = torch.empty(x2.shape[0], out_features, dtype=x2.dtype)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        out[:, start:stop] = F.linear(x2, rows_into(start, stop, scratch[: (stop - start) * in_features].view(stop - start, -1)))
    return out


def int4_into(w: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """int4 `values` (rows, in) in [0, 15] with their (rows, in / group) scales and zeros,
    dequantized into `w` (rows, in), in w's dtype."""
    g = w.view(w.shape[0], -1, group_size)
    return g.copy_(values.view_as(g)).sub_(8).mul_(scales[..., None].to(w.dtype)).add_(zeros[..., None].to(w.dtype)).view_as(w)
