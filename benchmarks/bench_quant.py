#!/usr/bin/env python
"""Quantized kernels and models on this machine: which kernel to use for which step, and what it gives.

  python benchmarks/bench_quant.py kernels [--n 8192] [--k 2048] [--rows 1,256] [--repeat 20]
  python benchmarks/bench_quant.py model [--shape llama3.2-1b] [--modes none,int8,int4]

For one (n, k) weight and each row count (1: a decode step; 256: a prefill-size product) it times
every way we can run an int8 or int4 weight-only product, beside the plain bfloat16 and float32
products, and prints ms per product and the weight bytes read per second:
- pytorch int8/int4 kernels (torch._weight_int8pack_mm, torch._weight_int4pack_mm_for_cpu) with
  bfloat16 and with float32 activations;
- dequantize-then-F.linear (the weight converted to the activation dtype at every product);
- torch._int_mm with dynamically quantized int8 activations, and quantize="w8a8"'s fbgemm product
  (not weight-only: for comparison).
llama.runtime.quant_choice makes the same choice at start-up (quantized_kernel), timing these paths on small probes.

`model` writes a random-weight checkpoint of a published shape (tied embedding, as the 3.2 1B ships)
in bfloat16, then, each in a fresh process, loads it with llama.weights.loader.load_model as
Llama.build(dtype="bfloat16", quantize=MODE) does, and reports the peak resident memory the load
added, the bytes the model holds, and batch-1 greedy decode and prefill tokens/s.
"""
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from common import GIB, best_time, current_rss, envelope, peak_rss, warm_page_cache, write_json, write_random_checkpoint
from llama import cli, distributed, registry
from llama.runtime import w8a8 as w8a8_kernels
from llama.weights import checkpoint, loader, quant_formats, quant_modules
from llama.model import ModelArgs


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
    q8, s8 = quant_formats.quantize_int8(w)
    q4, s4, z4 = quant_formats.quantize_int4(w, group_size)
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
        for path in quant_modules.CPU_PATHS:
            for mode, (qw, s, z) in (("int8", (q8, s8, None)), ("int4", (q4, s4, z4))):
                if mode not in quant_modules.PATH_MODES[path]:
                    continue
                lin = quant_modules.QuantizedLinear.from_quantized(mode, qw, s, z, group_size, act, path=path)
                out[f"{mode} {path}, {name} activations"] = lambda lin=lin, x=x: lin.matmul(x)
    out["int8 torch._int_mm, dynamic int8 activations"] = lambda: _int_mm_dynamic(x32, q8, s8)
    if w8a8_kernels.w8a8_available():  # quantize="w8a8": fbgemm, each row rounded to int8
        w8a8 = quant_modules.QuantizedLinear.from_quantized("int8", q8, s8, None, group_size, torch.float32, path="dynamic")
        out["w8a8 fbgemm, int8 activations per row"] = lambda: w8a8.matmul(x32)
    return out


def kernels(n: int = 8192, k: int = 2048, rows: str = "1,256", repeat: int = 20, group_size: int = 32, threads: int = 0) -> None:
    """Print a table of ms per product and weight bytes read per second, per kernel and row count."""
    if threads:
        torch.set_num_threads(threads)
    row_counts = cli.int_list(rows)
    print(f"weight {n}x{k}, group size {group_size}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    bytes_of = {"float32": 4, "bfloat16": 2, "int8": 1, "w8a8": 1, "int4": 0.5 + 4 / group_size}
    for r in row_counts:
        print(f"\nrows={r}")
        print(f"  {'product':<52} {'ms':>9} {'GB/s (weights)':>15}")
        for name, fn in cases(n, k, r, group_size).items():
            with torch.inference_mode():
                sec = best_time(fn, repeats=repeat, median=True)
            per = bytes_of[name.split()[0]]
            print(f"  {name:<52} {sec * 1e3:9.3f} {n * k * per / sec / 1e9:15.1f}")


def make_checkpoint(out_dir: Path, shape: str, n_layers: int = 0) -> dict:
    """Random bfloat16 weights of registry shape `shape`, tied (no output.weight, as the 3.2 1B ships)."""
    params = {**registry.get(shape), **({"n_layers": n_layers} if n_layers else {})}
    write_random_checkpoint(out_dir, params, torch.bfloat16, tied=True)
    return params


def measure(ckpt_dir: str, mode: str, prompt_len: int = 16, new_tokens: int = 32, prefill_len: int = 128) -> dict:
    """In this process: load as Llama.build(dtype="bfloat16", quantize=mode) does, then time decode."""
    base = current_rss() / GIB
    distributed.setup(torch.device("cpu"))
    params = checkpoint.read_params(ckpt_dir)
    args = ModelArgs(**params, max_seq_len=max(prompt_len + new_tokens, prefill_len) + 8, max_batch_size=1)
    quant = quant_formats.resolve(None if mode == "none" else mode)
    start = time.perf_counter()
    model = loader.load_model(ckpt_dir, args, 0, 1, torch.device("cpu"), torch.bfloat16, quant, compute_dtype=torch.bfloat16)
    load_s = time.perf_counter() - start
    peak = peak_rss() / GIB
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 128000, (1, prompt_len), generator=gen)
    with torch.inference_mode():
        model.setup_cache(1, args.max_seq_len)
        token = model(prompt, 0)[:, -1].argmax(-1, keepdim=True)
        times = []
        for i in range(new_tokens):
            t0 = time.perf_counter()
            token = model(token, prompt_len + i)[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t0)
        steady = sorted(times[2:])[: max(1, (len(times) - 2) // 2)]  # the faster half: less noise from neighbours
        long = torch.randint(0, 128000, (1, prefill_len), generator=gen)
        t0 = time.perf_counter()
        model(long, 0)
        prefill_s = time.perf_counter() - t0
    return {
        "mode": mode, "load_s": load_s, "base_rss_gb": base, "peak_rss_gb": peak,
        "model_gb": quant_modules.quantized_bytes(model) / 2**30,
        "decode_tok_s": 1 / (sum(times[2:]) / len(times[2:])), "decode_tok_s_best_half": len(steady) / sum(steady),
        "prefill_tok_s": prefill_len / prefill_s,
    }


def model(shape: str = "llama3.2-1b", modes: str = "none,int8,int4", n_layers: int = 0, ckpt_dir: str = "", out: str = "") -> None:
    """Load memory and batch-1 decode speed of bfloat16 against int8/int4, each in a fresh process."""
    modes = [m.strip() for m in (modes.split(",") if isinstance(modes, str) else modes)]
    tmp = None
    if not ckpt_dir:
        tmp = tempfile.mkdtemp(prefix="bench_quant_")
        ckpt_dir = str(Path(tmp) / "ckpt")
        make_checkpoint(Path(ckpt_dir), shape, n_layers)
    warm_page_cache(checkpoint.shard_paths(ckpt_dir))  # no run pays for the disk
    print(f"{shape}{f' ({n_layers} layers)' if n_layers else ''}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'mode':<6} {'load s':>7} {'peak RSS GiB':>13} {'added GiB':>10} {'vs bf16':>8} {'weights GiB':>12} "
          f"{'decode tok/s':>13} {'vs bf16':>8} {'prefill tok/s':>14}")
    results = []
    try:
        for mode in modes:
            cmd = [sys.executable, __file__, "measure", ckpt_dir, mode]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"{mode}: {proc.stderr.strip()[-2000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            ref = results[0]
            added, ref_added = r["peak_rss_gb"] - r["base_rss_gb"], ref["peak_rss_gb"] - ref["base_rss_gb"]
            print(f"{mode:<6} {r['load_s']:7.2f} {r['peak_rss_gb']:13.2f} {added:10.2f} {added / ref_added:7.2f}x "
                  f"{r['model_gb']:12.2f} {r['decode_tok_s']:13.2f} {r['decode_tok_s'] / ref['decode_tok_s']:7.2f}x "
                  f"{r['prefill_tok_s']:14.1f}")
    finally:
        if tmp:
            import shutil

            shutil.rmtree(tmp)
    rows = [{"metric": r["mode"], "load s": r["load_s"], "added GiB": r["peak_rss_gb"] - r["base_rss_gb"],
             "weights GiB": r["model_gb"], "decode tok/s": r["decode_tok_s"], "prefill tok/s": r["prefill_tok_s"]}
            for r in results]
    write_json(out, envelope("quant", {"shape": shape, "n_layers": n_layers, "modes": results}, rows))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "measure":  # internal: one measurement in this process
        print(json.dumps(measure(*sys.argv[2:4])))
    else:
        cli.run({"kernels": kernels, "model": model})
