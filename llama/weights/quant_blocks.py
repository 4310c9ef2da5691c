# A prefill's product with quantized weights, block by block: blocks of output rows dequantized
# into one reused buffer of the compute dtype, each multiplied by F.linear into its slice of the
# output. At hundreds of rows PyTorch's packed kernels, and dequantizing in small blocks, are
# several times slower than a plain product; blocks as large as the buffer keep the product near
# the speed of a weight held in the compute dtype (QuantizedLinear runs it for its prefill steps).
import functools
from typing import Callable

import torch

from llama.runtime.compute import blocks_linear, new_scratch

PREFILL_BLOCK = 16 * 2**20  # values of the buffer a prefill dequantizes blocks of a weight into
BLOCK_ROWS = 64  # blocks of output rows are multiples of this


@functools.lru_cache(maxsize=None)
def prefill_scratch(dtype: torch.dtype) -> torch.Tensor:
    """The one reused buffer of `dtype` a prefill dequantizes into (allocated at the first prefill,
    not at load; a fresh one would be page-faulted in at every product)."""
    return new_scratch(PREFILL_BLOCK, dtype, torch.device("cpu"))


def blocks_mm(
    x2: torch.Tensor, out_features: int, rows_into: Callable[[int, int, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """x2 (rows, in) @ W^T -> (rows, out_features) in x2's dtype, where rows_into(start, stop, w)
    writes rows start:stop of W into `w` and returns it."""
    return blocks_linear(x2, out_features, rows_into, prefill_scratch(x2.dtype), align=BLOCK_ROWS)


def int4_into(w: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """int4 `values` (rows, in) in [0, 15] with their (rows, in / group) scales and zeros,
    dequantized into `w` (rows, in), in w's dtype."""
    g = w.view(w.shape[0], -1, group_size)
    return g.copy_(values.view_as(g)).sub_(8).mul_(scales[..., None].to(w.dtype)).add_(zeros[..., None].to(w.dtype)).view_as(w)
