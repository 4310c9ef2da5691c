#!/usr/bin/env python
"""Microbenchmark of the quantized matrix products on this machine: which kernel to use for which step.

  python scripts/bench_quant.py [--n 8192] [--k 2048] [--rows 1,256] [--repeat 20]

For one (n, k) weight and each row count (1: a decode step; 256: a prefill-size product) it times
every way we can run an int8 or int4 weight-only product, beside the plain bfloat16 and float32
products, and prints ms per product and the weight bytes read per second:
- pytorch int8/int4 kernels (torch._weight_int8pack_mm, torch._weight_int4pack_mm_for_cpu) with
  bfloat16 and with float32 activations;
- dequantize-then-F.linear (the weight converted to the activation dtype at every product);
- torch._int_mm with dynamically quantized int8 activations (not weight-only: for comparison).
The choices llama.quantize makes (CPU_COMPUTE and CPU_PATH there) come from these numbers; the README has them.
"""
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama import cli, quantize  # noqa: E402


def _time(fn: Callable[[], torch.Tensor], repeat: int) -> float:
    """Median seconds of `fn` over `repeat` calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _gemv_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # PyTorch's own bfloat16 GEMV (oneDNN off), as the model runs a bfloat16 decode step
    with torch.backends.mkldnn.flags(enabled=False):
        return F.linear(x, w)


def _int_mm_dynamic(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per-row dynamic int8 activations times int8 weights through torch._int_mm (int32 accumulate)."""
    x_scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / 127
    xq = torch.round(x.float() / x_scale).to(torch.int8)
    rows = xq.shape[0]
    if rows <= 16:  # _int_mm wants more than 16 rows
        xq = F.pad(xq, (0, 0, 0, 17 - rows))
    out = torch._int_mm(xq, q.t())[:rows]
    return (out.float() * x_scale * scales.float()).to(x.dtype)


def cases(n: int, k: int, rows: int, group_size: int) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> a zero-argument product of `rows` activations with an (n, k) weight."""
    w = torch.randn(n, k) * 0.02
    q8, s8 = quantize.quantize_int8(w)
    q4, s4, z4 = quantize.quantize_int4(w, group_size)
    x32 = torch.randn(rows, k)
    xb = x32.bfloat16()
    wb = w.bfloat16()
    out = {
        "float32 F.linear": lambda: F.linear(x32, w),
        "bfloat16 F.linear": lambda: (_gemv_bf16 if rows == 1 else F.linear)(xb, wb),
    }
    for act in (torch.bfloat16, torch.float32):
        x = x32.to(act)
        name = str(act).removeprefix("torch.")
        for path in quantize.CPU_PATHS:
            for mode, (qw, s, z) in (("int8", (q8, s8, None)), ("int4", (q4, s4, z4))):
                if mode not in quantize.PATH_MODES[path]:
                    continue
                lin = quantize.QuantizedLinear.from_quantized(mode, qw, s, z, group_size, act, path=path)
                out[f"{mode} {path}, {name} activations"] = lambda lin=lin, x=x: lin.matmul(x)
    out["int8 torch._int_mm, dynamic int8 activations"] = lambda: _int_mm_dynamic(x32, q8, s8)
    return out


def main(n: int = 8192, k: int = 2048, rows: str = "1,256", repeat: int = 20, group_size: int = 32, threads: int = 0) -> None:
    """Print a table of ms per product and weight bytes read per second, per kernel and row count."""
    if threads:
        torch.set_num_threads(threads)
    row_counts = [int(r) for r in str(rows).replace("(", "").replace(")", "").split(",") if str(r).strip()]
    print(f"weight {n}x{k}, group size {group_size}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    bytes_of = {"float32": 4, "bfloat16": 2, "int8": 1, "int4": 0.5 + 4 / group_size}
    for r in row_counts:
        print(f"\nrows={r}")
        print(f"  {'product':<52} {'ms':>9} {'GB/s (weights)':>15}")
        for name, fn in cases(n, k, r, group_size).items():
            with torch.inference_mode():
                sec = _time(fn, repeat)
            per = bytes_of[name.split()[0]]
            print(f"  {name:<52} {sec * 1e3:9.3f} {n * k * per / sec / 1e9:15.1f}")


if __name__ == "__main__":
    cli.run(main)
