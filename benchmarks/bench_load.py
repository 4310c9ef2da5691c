#!/usr/bin/env python
"""Checkpoint load time and peak memory: llama.weights.loader.load_model beside the naive way.

  python benchmarks/bench_load.py                 # creates a ~1 GB float16 checkpoint in a temp dir
  python benchmarks/bench_load.py --ckpt_dir DIR  # or measures an existing one

Each method runs in a fresh process, so its peak resident memory (VmHWM) is its own:
- lean: llama.weights.loader.load_model (memory-mapped shards, model built without weights, assign=True);
- naive: what Meta's reference does, torch.load of the whole shard without mmap, a Transformer
  constructed with the default tensor type set to the device and dtype, then load_state_dict (the
  loaded dict stays alive until the end).
Peak RSS is host memory; on CUDA the weights themselves live on the GPU.
The files are read once beforehand, so both methods find them in the page cache.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from common import GIB, current_rss, envelope, llama_params, peak_rss, warm_page_cache, write_json, write_random_checkpoint
from llama import cli, distributed
from llama.runtime import probes
from llama.weights import checkpoint, loader
from llama.model import ModelArgs, Transformer

METHODS = ("lean", "naive")


def measure_method(method: str, ckpt_dir: str, dtype: str, device: str = "cpu") -> dict:
    """Load the checkpoint in this process with `method`; load time, memory and a logits checksum."""
    dev = distributed.resolve_device(device)
    torch_dtype = probes.resolve_dtype(dtype, dev)
    distributed.setup(dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.zeros(1, device=dev)  # CUDA context before the clock starts
    params = checkpoint.read_params(ckpt_dir)
    args = ModelArgs(**params, max_seq_len=16, max_batch_size=1)
    base = current_rss() / GIB
    start = time.perf_counter()
    if method == "lean":
        model = loader.load_model(ckpt_dir, args, 0, 1, dev, torch_dtype)
    elif method == "naive":
        paths = checkpoint.shard_paths(ckpt_dir)
        if len(paths) != 1:
            raise ValueError("the naive way loads one shard per process: use a one-shard checkpoint")
        state = torch.load(paths[0], map_location="cpu", weights_only=True)
        _set_default_tensor_type(dev, torch_dtype)
        model = Transformer(args)
        model.load_state_dict(state, strict=False)  # the reference's call; `state` lives on
    else:
        raise ValueError(f"unknown method {method!r}: use one of {METHODS}")
    if dev.type == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    peak = peak_rss() / GIB
    logits = model(torch.tensor([[1, 2, 3]], device=dev), 0)
    return {
        "method": method, "load_s": load_s, "base_rss_gb": base, "peak_rss_gb": peak,
        "dtype": str(model.layers[0].attention.wq.weight.dtype), "checksum": float(logits.double().sum()),
    }


def _set_default_tensor_type(device: torch.device, dtype: torch.dtype) -> None:
    """Where the reference's fairscale layers allocate (their torch.Tensor(sizes) follows only this)."""
    if device.type == "cuda":
        import warnings

        names = {torch.float16: "HalfTensor", torch.bfloat16: "BFloat16Tensor", torch.float32: "FloatTensor"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated, but it is what the reference calls
            torch.set_default_tensor_type(getattr(torch.cuda, names[dtype]))
    else:
        torch.set_default_dtype(dtype)


def run_method(method: str, ckpt_dir: Path, dtype: str, device: str = "cpu") -> dict:
    """Measure `method` in a fresh Python process (see measure_method)."""
    cmd = [sys.executable, __file__, "--measure", method, "--ckpt_dir", str(ckpt_dir)]
    cmd += ["--dtype", dtype, "--device", device]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if r.returncode:
        raise RuntimeError(f"{method} failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(
    ckpt_dir: Optional[str] = None,
    dim: int = 2048,
    n_layers: int = 8,
    vocab_size: int = 32000,
    shards: int = 1,
    dtype: str = "float16",
    device: str = "cpu",
    repeats: int = 2,
    keep: bool = False,
    measure: Optional[str] = None,
    out: Optional[str] = None,
) -> None:
    """Benchmark checkpoint loading: lean (llama.weights.loader) against naive (torch.load + load_state_dict).

    Args:
        ckpt_dir: checkpoint to load; default: create one of random weights in a temporary directory.
        dim, n_layers, vocab_size: shape of the created checkpoint (default ~504M params, 1.0 GB in float16).
        shards: shard count of the created checkpoint.
        dtype: dtype of the created checkpoint and of the loaded model.
        device: where the model is loaded: cpu or cuda.
        repeats: runs per method (fresh processes); the fastest time and the highest peak are reported.
        keep: keep the created checkpoint (its path is printed).
        measure: internal: measure this one method in this process and print JSON.
        out: write the results as JSON here (with the machine, date and command).
    """
    if measure:
        print(json.dumps(measure_method(measure, ckpt_dir, dtype, device)))
        return
    tmp = None
    if ckpt_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench_load_"))
        ckpt_dir = tmp / "ckpt"
        start = time.perf_counter()
        torch_dtype = probes.resolve_dtype(dtype, torch.device("cpu"))
        sd = write_random_checkpoint(ckpt_dir, llama_params(dim, n_layers, vocab_size), torch_dtype, shards)
        n = sum(t.numel() for t in sd.values())
        del sd
        print(f"created {ckpt_dir}: {n / 1e6:.1f}M params in {time.perf_counter() - start:.1f}s")
    ckpt_dir = Path(ckpt_dir)
    try:
        results = _report(ckpt_dir, dtype, device, repeats)
        rows = [{"metric": m, "load s": r["load_s"], "peak RSS GiB": r["peak_rss_gb"],
                 "added / size": r["added_over_size"]} for m, r in results["methods"].items()]
        write_json(out, envelope("load", results, rows))
    finally:
        if tmp is not None and not keep:
            shutil.rmtree(tmp)


def _report(ckpt_dir: Path, dtype: str, device: str, repeats: int) -> dict:
    paths = checkpoint.shard_paths(ckpt_dir)
    size_gb = sum(p.stat().st_size for p in paths) / GIB
    warm_page_cache(paths)  # so neither method pays for the disk
    print(f"{ckpt_dir}: {len(paths)} shard(s), {size_gb:.2f} GiB on disk; load as {dtype} on {device}, page cache warm")
    print(f"{'method':<8} {'load s':>7} {'peak RSS GiB':>13} {'before load':>12} {'added':>7} {'added / size':>13}")
    results = {"shards": len(paths), "size_gib": size_gb, "dtype": dtype, "device": device, "methods": {}}
    first = {}
    for method in METHODS if len(paths) == 1 else ("lean",):  # naive: one shard per process only
        runs = [run_method(method, ckpt_dir, dtype, device) for _ in range(repeats)]
        best = min(r["load_s"] for r in runs)
        peak = max(r["peak_rss_gb"] for r in runs)
        base = min(r["base_rss_gb"] for r in runs)
        first[method] = runs[0]
        added = peak - base
        results["methods"][method] = {"load_s": best, "peak_rss_gb": peak, "base_rss_gb": base, "added_over_size": added / size_gb,
                                     "checksum": runs[0]["checksum"]}
        print(f"{method:<8} {best:>7.2f} {peak:>13.2f} {base:>12.2f} {added:>7.2f} {added / size_gb:>12.2f}x")
    if "naive" not in first:
        print("naive: not run (it needs as many processes as shards)")
        return results
    results["same_logits"] = first["lean"]["checksum"] == first["naive"]["checksum"]
    print(f"same logits from both models: {'yes' if results['same_logits'] else 'NO'} ({first['lean']['dtype']})")
    return results


if __name__ == "__main__":
    cli.run(main)
