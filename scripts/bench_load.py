#!/usr/bin/env python
"""Checkpoint load time and peak memory: llama.checkpoint.load_model beside the naive way.

  python scripts/bench_load.py                 # creates a ~1 GB float16 checkpoint in a temp dir
  python scripts/bench_load.py --ckpt_dir DIR  # or measures an existing one

Each method runs in a fresh process, so its peak resident memory (VmHWM) is its own:
- lean: llama.checkpoint.load_model (memory-mapped shards, model built without weights, assign=True);
- naive: what Meta's reference does, torch.load of the whole shard without mmap, a Transformer
  constructed with the default tensor type set to the device and dtype, then load_state_dict (the
  loaded dict stays alive until the end).
Peak RSS is host memory; on CUDA the weights themselves live on the GPU.
The files are read once beforehand, so both methods find them in the page cache.
"""
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama import distributed  # noqa: E402
from llama.runtime import probes  # noqa: E402
from llama.weights import checkpoint, loader, save, sharding  # noqa: E402
from llama.model import ModelArgs, Transformer  # noqa: E402

METHODS = ("lean", "naive")


def make_params(dim: int, n_layers: int, vocab_size: int) -> dict:
    """A Llama 3-proportioned shape (head_dim 128, 2 query heads per KV head)."""
    n_heads = max(dim // 128, 1)
    return {
        "dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": max(n_heads // 2, 1),
        "vocab_size": vocab_size, "multiple_of": 256, "ffn_dim_multiplier": None, "norm_eps": 1e-5,
        "rope_theta": 500000.0,
    }


def create_checkpoint(out_dir: Path, params: dict, dtype: torch.dtype, shards: int) -> int:
    """Random weights for `params` as a Meta checkpoint; returns the number of parameters."""
    args = ModelArgs(**params)
    gen = torch.Generator().manual_seed(0)
    full = {}
    for key in sorted(checkpoint.expected_keys(args.n_layers)):
        shape = sharding.full_shape(key, args)
        scale = 1.0 if len(shape) == 1 else shape[1] ** -0.5
        full[key] = (torch.randn(shape, generator=gen) * scale).to(dtype)
    save.save_checkpoint(full, params, out_dir, n_shards=shards)
    return sum(t.numel() for t in full.values())


def _status_gb(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return None


def _current_rss_gb() -> float:
    return _status_gb("VmRSS") or float("nan")


def _peak_rss_gb() -> float:
    # VmHWM, the peak of this process's own memory map. ru_maxrss also counts the parent's RSS at
    # fork time (Linux keeps it across exec), so it would report the parent's size for small loads.
    hwm = _status_gb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


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
    base = _current_rss_gb()
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
    peak = _peak_rss_gb()
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
) -> None:
    """Benchmark checkpoint loading: lean (llama.checkpoint) against naive (torch.load + load_state_dict).

    Args:
        ckpt_dir: checkpoint to load; default: create one of random weights in a temporary directory.
        dim, n_layers, vocab_size: shape of the created checkpoint (default ~504M params, 1.0 GB in float16).
        shards: shard count of the created checkpoint.
        dtype: dtype of the created checkpoint and of the loaded model.
        device: where the model is loaded: cpu or cuda.
        repeats: runs per method (fresh processes); the fastest time and the highest peak are reported.
        keep: keep the created checkpoint (its path is printed).
        measure: internal: measure this one method in this process and print JSON.
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
        n = create_checkpoint(ckpt_dir, make_params(dim, n_layers, vocab_size), torch_dtype, shards)
        print(f"created {ckpt_dir}: {n / 1e6:.1f}M params in {time.perf_counter() - start:.1f}s")
    ckpt_dir = Path(ckpt_dir)
    try:
        _report(ckpt_dir, dtype, device, repeats)
    finally:
        if tmp is not None and not keep:
            shutil.rmtree(tmp)


def _report(ckpt_dir: Path, dtype: str, device: str, repeats: int) -> None:
    paths = checkpoint.shard_paths(ckpt_dir)
    size_gb = sum(p.stat().st_size for p in paths) / 2**30
    for p in paths:  # warm the page cache so neither method pays for the disk
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    print(f"{ckpt_dir}: {len(paths)} shard(s), {size_gb:.2f} GiB on disk; load as {dtype} on {device}, page cache warm")
    print(f"{'method':<8} {'load s':>7} {'peak RSS GiB':>13} {'before load':>12} {'added':>7} {'added / size':>13}")
    results = {}
    for method in METHODS if len(paths) == 1 else ("lean",):  # naive: one shard per process only
        runs = [run_method(method, ckpt_dir, dtype, device) for _ in range(repeats)]
        best = min(r["load_s"] for r in runs)
        peak = max(r["peak_rss_gb"] for r in runs)
        base = min(r["base_rss_gb"] for r in runs)
        results[method] = runs[0]
        added = peak - base
        print(f"{method:<8} {best:>7.2f} {peak:>13.2f} {base:>12.2f} {added:>7.2f} {added / size_gb:>12.2f}x")
    if "naive" not in results:
        print("naive: not run (it needs as many processes as shards)")
        return
    same = results["lean"]["checksum"] == results["naive"]["checksum"]
    print(f"same logits from both models: {'yes' if same else 'NO'} ({results['lean']['dtype']})")


if __name__ == "__main__":
    fire.Fire(main)
