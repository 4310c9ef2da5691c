# How a step computes under the policy: kernels_for applies a policy's StepKernels to one forward
# pass (oneDNN on or off, attention backends, ComputeIn for a dtype other than the weights'), and
# the products of weights converted one block at a time (upcast_linear), which ComputeIn and the
# quantized kernels share.
import contextlib
import functools
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from llama.runtime import native
from llama.runtime.policy import Policy

# SDPA backends for CUDA: not cuDNN, which builds an execution plan for every new sequence length
# (every decode step, every prompt length), where flash and memory-efficient attention need none.
CUDA_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# Weights computed in another dtype are converted this many elements at a time into one reused
# buffer (16 MB in float32): it stays in the last-level cache, and no weight is ever held twice.
UPCAST_CHUNK = 4 * 2**20

@contextlib.contextmanager
def kernels_for(tokens: torch.Tensor, policy: Optional[Policy], compiled: bool = False) -> Iterator[None]:
    """Run a forward pass of `tokens` (bsz, seqlen) as `policy` plans for its number of rows.

    CUDA: attention from CUDA_ATTENTION. CPU: oneDNN on or off as planned, and a step planned in
    another dtype than the weights runs under `ComputeIn` (float32 activations and products over
    bfloat16 weights, no second copy of any weight kept), one planned `native` in bfloat16 under
    `NativeLinear`; a `compiled` step computes in the weights' dtype with PyTorch's products
    (torch.compile traces the model, not these modes). `policy` None leaves PyTorch's defaults.
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
        elif plan.native and plan.dtype == policy.weights == torch.bfloat16 and not compiled and native.kernels():
            with NativeLinear():
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
    out = blocks_linear(x, weight.shape[0], lambda start, stop, w: w.copy_(weight[start:stop]), scratch)
    return out if bias is None else out + bias.to(out.dtype)


def blocks_linear(
    x: torch.Tensor, out_features: int, rows_into: Callable[[int, int, torch.Tensor], torch.Tensor],
    scratch: torch.Tensor, align: int = 1,
) -> torch.Tensor:
    """x (..., in) @ W^T -> (..., out_features) in x's dtype for a weight W that is never whole in
    x's dtype: rows_into(start, stop, w) writes rows start:stop of W into `w` (a view of `scratch`,
    a 1-D buffer of x's dtype) and returns it; blocks are as many rows as the buffer holds, a
    multiple of `align`, each multiplied into its slice of the output."""
    in_features = x.shape[-1]
    step = max(align, scratch.numel() // in_features // align * align)

    def block(start: int, stop: int) -> torch.Tensor:
        return F.linear(x, rows_into(start, stop, scratch[: (stop - start) * in_features].view(stop - start, in_features)))

    if step >= out_features:
        return block(0, out_features)
    out = x.new_empty(*x.shape[:-1], out_features)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        out[..., start:stop] = block(start, stop)
    return out


def new_scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer to reuse across products: a normal tensor even when made under inference mode (the
    first product may run there), so that products outside it can write into it too."""
    with torch.inference_mode(False):
        return torch.empty(numel, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def upcast_scratch(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The one reused UPCAST_CHUNK buffer of `dtype` on `device` that `upcast_linear` converts
    weights into (allocated once: a fresh buffer of megabytes is page-faulted in at every product)."""
    return new_scratch(UPCAST_CHUNK, dtype, device)


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


class NativeLinear(TorchFunctionMode):
    """Run the bfloat16 linear layers of a forward pass through this package's bfloat16 product
    (llama.runtime.native.bf16_mm, bfloat16 results): the products of bfloat16 activations and
    weights summed in float32, as F.linear in bfloat16 computes them (in another order). Any other
    product (another dtype, a weight that is not a contiguous CPU matrix) and every other function
    runs as it would."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, *rest = args
            bias = rest[0] if rest else kwargs.get("bias")
            if (x.dtype == weight.dtype == torch.bfloat16 and x.device.type == "cpu" and weight.dim() == 2
                    and weight.is_contiguous() and weight.device.type == "cpu" and not x.requires_grad):
                out = native.bf16_linear(x, weight)
                return out if bias is None else out + bias
        return func(*args, **kwargs)
