"""LoRA over a quantized frozen base (QLoRA-style, Dettmers et al. 2023): the base's projections are
int8 or int4 (llama.weights.quant_modules.QuantizedLinear, each product on the kernel the CPU's
measured policy picks, as at inference), only the adapters train.

The quantized kernels have no backward. The weights need none (they are frozen); the activations
do, to reach the adapters of earlier layers: the gradient of y = x W^T for x is grad_y W, computed
here from the dequantized weight a block of rows at a time (the weight is never held whole in
floating point, so the base stays at its quantized size in the backward pass too). The dequantized
rows are the values the kernel multiplies by: read from the form the module holds (int8 with its
scales; int4 stored form; int4 in the CPU kernel's own layout, or through the kernel itself where
that layout cannot be read), in the dtype the forward product ran in.

The merged checkpoint a QLoRA run writes is the adapter merged onto the ORIGINAL full-precision
base read again from --ckpt_dir (not onto the dequantized weights): a quantized base is how the
adapter was trained cheaply, not a loss of precision the result has to keep.
"""
import logging
from types import MethodType
from typing import Optional

import fairscale.nn.model_parallel.initialize as fs_init
import torch
from torch import nn

from llama.runtime import quant_kernels as qk
from llama.runtime.policy import dtype_name
from llama.runtime.quant_choice import step_for
from llama.weights import quant_formats
from llama.weights.checkpoint import read_params
from llama.weights.quant_modules import QuantizedLinear, check_device

logger = logging.getLogger(__name__)

MODES = ("int4", "int8")


def check(base_quantize: Optional[str], lora_rank: int, device: torch.device, ckpt_dir: Optional[str] = None) -> None:
    """Refuse a --base_quantize that cannot run: unknown mode, no adapters, no kernel on `device`, or
    a checkpoint already quantized (the merged result is written from the full-precision base)."""
    if base_quantize is None:
        return
    if base_quantize not in MODES:
        raise ValueError(f"--base_quantize {base_quantize!r}: pass int4 or int8")
    if lora_rank <= 0:
        raise ValueError("--base_quantize trains LoRA adapters over a frozen quantized base: pass --lora_rank R > 0 too")
    try:
        check_device(base_quantize, device)
    except ValueError as e:
        raise ValueError(f"--base_quantize {base_quantize}: {e}") from None
    if ckpt_dir is not None and read_params(ckpt_dir).get("quantization") is not None:
        raise ValueError(f"{ckpt_dir} is a quantized checkpoint: pass its full-precision original as --ckpt_dir "
                         "with --base_quantize (the merged model is written from it)")


def dequantized_rows(module: QuantizedLinear, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows start:stop of `module`'s weight (stop - start, in) as the values its products in `dtype`
    multiply by (int8 and the int4 kernel layout keep their scales in each compute dtype), in `dtype`."""
    if not rows_readable(module, dtype):
        return module.dequantize()[start:stop].to(dtype)  # read back through the kernel (whole)
    buffers = dict(module.named_buffers())
    if module.mode == "int8":
        scales = buffers.get(f"scales_{dtype_name(dtype)}", buffers.get("scales_float32"))
        return module.weight[start:stop].to(dtype) * scales[start:stop, None].to(dtype)
    if "zeros" in buffers:  # int4's stored form
        w = module.weight[start:stop]
        return quant_formats.dequantize("int4", w, module.scales[start:stop], module.zeros[start:stop], module.group_size).to(dtype)
    sz = buffers[f"scales_and_zeros_{dtype_name(dtype)}"][:, start:stop]  # int4 in the CPU kernel's layout
    values = qk.kernel_layout_rows(module.weight, torch.arange(start, stop, device=sz.device), qk.int4_kernel_block())
    return qk.dequantize_int4(values, sz[..., 0].t(), sz[..., 1].t(), module.group_size).to(dtype)


def rows_readable(module: QuantizedLinear, dtype: torch.dtype) -> bool:
    """Whether dequantized_rows reads a block of rows by itself: int8, int4's stored form, or the CPU
    int4 kernel's layout where it is known; else (CUDA's int4 layout) the weight is read back whole
    through the kernel, once per backward."""
    if module.mode == "int8" or hasattr(module, "zeros"):
        return True
    block = qk.int4_kernel_block() if module.weight.device.type == "cpu" else None
    return (block is not None and module.out_features % block == 0
            and hasattr(module, f"scales_and_zeros_{dtype_name(dtype)}"))


class _QuantizedProduct(torch.autograd.Function):
    """y = x W^T through the module's kernel; the backward gives x's gradient only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantizedLinear) -> torch.Tensor:
        ctx.module = module
        ctx.compute = module.kernels[step_for(x.numel() // x.shape[-1])][1] or x.dtype
        return module.matmul(x)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        m, dt = ctx.module, ctx.compute
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(dt)
        step = m.out_features
        if rows_readable(m, dt):  # a block of rows at a time: the weight is never whole in floating point
            step = quant_formats.chunk_rows(torch.empty(1, m.in_features, dtype=torch.float32), multiple=64)
        grad_x = None
        for start in range(0, m.out_features, step):
            stop = min(start + step, m.out_features)
            part = g[:, start:stop] @ dequantized_rows(m, start, stop, dt)
            grad_x = part.float() if grad_x is None else grad_x.add_(part.float())
        return grad_x.to(grad_y.dtype).reshape(*grad_y.shape[:-1], m.in_features), None


def _trainable_forward(self: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    return _QuantizedProduct.apply(x, self) if torch.is_grad_enabled() and x.requires_grad else self.matmul(x)


def make_trainable(model: nn.Module) -> int:
    """Give every quantized projection of `model` (one process, no tensor parallelism) an input
    gradient; returns how many. The quantized weights stay buffers: nothing of them trains."""
    if fs_init.get_model_parallel_world_size() != 1:  # the trainable forward leaves out the layers' communication
        raise ValueError("--base_quantize trains models held whole on each process (no tensor parallelism)")
    count = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            if not hasattr(module, "weight"):  # w8a8's packed product: not a --base_quantize mode
                raise ValueError(f"{module.mode} with int8 activations cannot train: pass --base_quantize int8 or int4")
            module.forward = MethodType(_trainable_forward, module)
            count += 1
    return count
