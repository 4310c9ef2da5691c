#!/usr/bin/env python
"""Matrix-product speed of this machine per dtype and kernel: the measurements behind the dtype
and kernel policy of llama/runtime/ (docs/usage.md, "Choosing a dtype").

    python benchmarks/bench_kernels.py                         # 8192x2048 weight, 1..256 rows
    python benchmarks/bench_kernels.py --rows 1,8 --shape 2048,8192 --threads 1
    python benchmarks/bench_kernels.py --out kernels.json

For each number of rows (1: one-row decode, a few: a small batch, many: prefill) it times
`F.linear(x, w)` in bfloat16 and in float32, and in float32 over a bfloat16 weight upcast block by
block for each product (`compute.upcast_linear`: how the policy prefills in float32 without a
second copy of any weight), each through oneDNN and through
PyTorch's own kernels; where the PyTorch build has them, also its int8 and int4 weight-only kernels
(`torch._weight_int8pack_mm`, `torch._weight_int4pack_mm_for_cpu`) with bfloat16 and float32
activations. Reported: milliseconds (fastest of --repeats), the weight's bytes read per second, and
GFLOP/s, beside this machine's read bandwidth measured in the same run; then what the policy picks.
"""
from typing import Optional, Union

import torch
import torch.nn.functional as F

from common import GB, envelope, read_bandwidth, write_json
from llama import cli
from llama.runtime import compute, cpu, probes
from llama.runtime import policy as kernel_policy

def quantized_cases(w: torch.Tensor, x32: torch.Tensor) -> dict:
    """PyTorch's weight-only int8 (per-channel scales) and int4 (groups of 32) products of `w`,
    with bfloat16 and float32 activations, where this build has the kernels: name -> (fn, weight bytes)."""
    cases = {}
    n, k = w.shape
    if hasattr(torch, "_weight_int8pack_mm"):
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        q8 = (w / scale[:, None]).round().clamp(-128, 127).to(torch.int8)
        for name, dt in (("int8, bfloat16 act.", torch.bfloat16), ("int8, float32 act.", torch.float32)):
            x, s = x32.to(dt), scale.to(dt)
            cases[name] = ((lambda x=x, s=s: torch._weight_int8pack_mm(x, q8, s)), q8.nbytes + scale.nbytes)
    if hasattr(torch, "_weight_int4pack_mm_for_cpu") and k % 32 == 0:
        group = 32
        g = w.float().reshape(n, k // group, group)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q4 = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        try:
            packed = torch._convert_weight_to_int4pack_for_cpu(q4, 1)
        except (RuntimeError, AttributeError):
            return cases
        zero = lo + 8 * scale  # the kernel takes (q - 8) * scale + zero
        for name, dt in (("int4, bfloat16 act.", torch.bfloat16), ("int4, float32 act.", torch.float32)):
            x = x32.to(dt)
            sz = torch.stack([scale.t(), zero.t()], dim=-1).to(dt).contiguous()  # (k / group, n, 2)
            cases[name] = ((lambda x=x, sz=sz: torch._weight_int4pack_mm_for_cpu(x, packed, group, sz)), n * k // 2 + sz.nbytes)
    return cases


def main(
    rows: Union[str, int, tuple] = (1, 8, 64, 256),
    shape: Union[str, tuple] = (8192, 2048),
    repeats: int = 5,
    threads: Optional[int] = None,
    quantized: bool = True,
    bandwidth_mb: int = 1024,
    out: Optional[str] = None,
) -> dict:
    """Time one linear layer's product per dtype and kernel on this machine's CPU.

    Args:
        rows: token rows of the activations, comma-separated (1 is one-row decode).
        shape: the weight, out_features,in_features (default: the Llama 3.2 1B's feed-forward w1).
        repeats: timed calls per case (the fastest is kept), after one warm-up.
        threads: CPU threads (default: torch's default).
        quantized: also time PyTorch's int8 and int4 weight-only kernels.
        bandwidth_mb: size of the buffer the read bandwidth is measured on.
        out: write every measurement as JSON here.
    """
    if threads:
        torch.set_num_threads(int(threads))
    row_list = cli.int_list(rows)
    n, k = cli.int_list(shape)
    if any(r < 1 for r in row_list) or n < 1 or k < 1:
        raise ValueError(f"rows {row_list} and shape {n}x{k} must be positive")
    torch.manual_seed(0)
    w32 = torch.randn(n, k) / k**0.5
    w16 = w32.bfloat16()
    bw = read_bandwidth(torch.device("cpu"), int(bandwidth_mb) * 2**20)
    scratch = torch.empty(compute.UPCAST_CHUNK)
    print(f"CPU {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"weight {n}x{k}; read bandwidth {bw:.1f} GB/s", flush=True)
    print(f"{'rows':>4} | {'case':<28} | {'ms':>8} | {'weight GB/s':>11} | {'GFLOP/s':>8}")
    results = []
    was = torch.backends.mkldnn.enabled
    try:
        for m in row_list:
            x32 = torch.randn(m, k)
            x16 = x32.bfloat16()
            cases = {
                "bfloat16": ((lambda: F.linear(x16, w16)), w16.nbytes),
                "float32": ((lambda: F.linear(x32, w32)), w32.nbytes),
                "float32 over upcast bfloat16": ((lambda: compute.upcast_linear(x32, w16, scratch)), w16.nbytes),
            }
            timed = []
            for name, (fn, n_bytes) in cases.items():
                for onednn in (True, False):
                    torch.backends.mkldnn.enabled = onednn
                    timed.append((f"{name}, {'oneDNN' if onednn else 'own'}", cpu.best_time(fn, repeats), n_bytes))
            torch.backends.mkldnn.enabled = was
            if quantized:
                for name, (fn, n_bytes) in quantized_cases(w32, x32).items():
                    timed.append((name, cpu.best_time(fn, repeats), n_bytes))
            for name, seconds, n_bytes in timed:
                entry = {"rows": m, "case": name, "ms": seconds * 1e3, "weight_gb_s": n_bytes / seconds / GB,
                         "gflop_s": 2 * m * n * k / seconds / GB}
                results.append(entry)
                print(f"{m:>4} | {name:<28} | {entry['ms']:>8.3f} | {entry['weight_gb_s']:>11.1f} | {entry['gflop_s']:>8.1f}",
                      flush=True)
    finally:
        torch.backends.mkldnn.enabled = was
    policy = kernel_policy.choose(probes.measure(), reason="measured now")
    print(f"policy: {policy.describe()}")
    summary = {"cpu": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
               "shape": [n, k], "read_gb_s": bw, "results": results, "policy": policy.describe()}
    rows = [{"metric": f"{r['rows']} rows, {r['case']}", "ms": r["ms"], "weight GB/s": r["weight_gb_s"],
             "GFLOP/s": r["gflop_s"]} for r in results]
    if out:
        write_json(out, envelope("kernels", summary, rows))
        print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    cli.run(main)
