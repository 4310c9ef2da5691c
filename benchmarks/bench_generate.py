#!/usr/bin/env python
"""Inference speed of this implementation against transformers.LlamaForCausalLM, in one run.

    python benchmarks/bench_generate.py                            # Llama 3.2 1B shape, CPU or CUDA
    python benchmarks/bench_generate.py --shape small --quick      # seconds, for a smoke test
    python benchmarks/bench_generate.py --n_layers 4 --out bench.json
    python benchmarks/bench_generate.py --device cuda --shape llama3-8b --compile
    python benchmarks/bench_generate.py --report bench.json        # the table and ratios of a stored run

(`python scripts/benchmark.py ...` runs this, and bench_speculative.py with --speculate.)

A model of a published shape (llama.registry) gets random weights, saved once as a Meta checkpoint
and once as a Hugging Face directory (converted with llama/weights/hf.py). Each implementation then runs in
its own process (so load time and peak memory are its own) on the same prompts, device and dtype:
ours (Llama.build), ours compiled (--compile), and transformers with eager and sdpa attention. By
name (--impls): ours under forced bfloat16 and float32 beside its measured dtype policy, ours with
int8 and int4 weights and with w8a8 (int8 weights and activations), and llama.cpp at BF16, Q8_0 and
Q4_0 on the same weights (a tree built from source, given by --llama_cpp or $LLAMA_CPP_DIR; noted
as skipped otherwise). Every run is greedy with a fixed number of new tokens: the output rows of
the special tokens are zero, so no stop token is ever chosen.

Measured: decode tokens/s at batch 1 and 8, at short and long context (steady state: the first
steps, which may compile, are left out); prefill tokens/s and time to first token for one prompt;
end-to-end tokens/s of a batch of 8 prompts of mixed lengths, and for ours also of the original's
one-token-per-step prompt feeding; load time and peak memory. The machine's memory-bandwidth
ceiling is measured in the same run, and each decode figure is given as a share of what that
bandwidth allows for the bytes one step reads (weights once, plus each row's KV cache).
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from common import GB, N_SPECIAL, bandwidth, empty_cache, envelope, write_json, write_random_checkpoint
from generate_impls import DEFAULT_IMPLS, IMPLS, LLAMA_CPP_ENV, worker
from generate_report import summarize
from llama import cli, distributed, registry
from llama.runtime import probes
from llama.runtime import policy as kernel_policy
from llama.weights import hf
from llama.model import ModelArgs


# ---------------------------------------------------------------- settings and model files


def settings(quick: bool, long_context: Optional[int], prefill_len: Optional[int], device: torch.device) -> dict:
    """Sizes of every scenario. --quick shrinks them all; long context batch 8 is GPU-only by default
    (on a CPU it costs eight long prefills per implementation, and eager attention's score matrix
    alone would need ~17 GB at 4K)."""
    s = dict(short_prompt=64, short_new=64, long_context=4096, long_new=32, prefill_len=512, mixed_new=64)
    if quick:
        s = dict(short_prompt=16, short_new=12, long_context=256, long_new=8, prefill_len=64, mixed_new=8)
    if long_context:
        s["long_context"] = int(long_context)
    if prefill_len:
        s["prefill_len"] = int(prefill_len)
    s["short_batches"] = [1, 8]
    s["long_batches"] = [1, 8] if device.type == "cuda" else [1]
    # 8 prompts spread evenly from 16 tokens to the prefill length (16..512 by default)
    lo = min(16, s["prefill_len"])
    s["mixed_lens"] = [round(lo + (s["prefill_len"] - lo) * i / 7) for i in range(8)]
    # the long prompt leaves room for the new tokens inside long_context (a power of two by default)
    s["long_prompt"] = max(1, s["long_context"] - s["long_new"])
    s["max_seq_len"] = max(s["long_context"], s["short_prompt"] + s["short_new"], s["prefill_len"] + s["mixed_new"]) + 1
    return s


def write_tokenizer(path: Path, n_base: int) -> None:
    """A tiktoken file of `n_base` distinct byte strings (bytes, then pairs, then triples): the
    prompts are token ids, so any tokenizer of the right size does, and this one needs no download."""
    import base64
    import itertools

    def pieces():
        for n in (1, 2, 3):
            yield from (bytes(t) for t in itertools.product(range(256), repeat=n))

    with open(path, "w") as f:
        for rank, piece in enumerate(itertools.islice(pieces(), n_base)):
            f.write(f"{base64.b64encode(piece).decode()} {rank}\n")


def write_models(root: Path, params: dict, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    """Meta checkpoint (root/meta) and Hugging Face directory (root/hf) of the same random weights,
    whose special tokens are never chosen greedily (random_state_dict's zero_special)."""
    from safetensors.torch import save_file

    meta, hf_dir = root / "meta", root / "hf"
    sd = write_random_checkpoint(meta, params, dtype, seed=seed, zero_special=True, device=device)
    write_tokenizer(meta / "tokenizer.model", params["vocab_size"] - N_SPECIAL)
    hf_dir.mkdir(parents=True, exist_ok=True)
    config = hf.config_from_params(params, torch_dtype=kernel_policy.dtype_name(dtype))
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_file(dict(hf.tensor_to_hf(k, v, params) for k, v in sd.items()), str(hf_dir / "model.safetensors"))
    return {"meta": str(meta), "tokenizer": str(meta / "tokenizer.model"), "hf": str(hf_dir)}


def model_bytes(params: dict, dtype: torch.dtype) -> dict:
    """Bytes one decode step reads: every weight but the embedding table (one row is looked up),
    and per row of the batch, the KV cache of each token of context."""
    args = ModelArgs(**params)
    size = dtype.itemsize
    kv_dim = (args.n_kv_heads or args.n_heads) * args.head_dim
    return {"weights": args.decode_weights * size, "kv_per_token": 2 * args.n_layers * kv_dim * size}


# ---------------------------------------------------------------- the command


def main(
    shape: str = "llama3.2-1b",
    n_layers: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    quick: bool = False,
    long_context: Optional[int] = None,
    prefill_len: Optional[int] = None,
    compile: bool = False,
    impls: Optional[Union[str, tuple]] = None,
    baseline: bool = True,
    llama_cpp: Optional[str] = None,
    threads: Optional[int] = None,
    out: Optional[str] = None,
    seed: int = 0,
    report: Optional[str] = None,
) -> None:
    """Benchmark our Llama 3 against transformers on random weights of a published shape.

    Args:
        shape: a llama.registry name (llama3.2-1b, llama3-8b, small, tiny, ...).
        n_layers: fewer (or more) layers than the shape has, for quicker runs.
        device: cuda or cpu (default: cuda when available).
        dtype: bfloat16, float16 or float32 for every implementation (default: the checkpoints and
            transformers in the dtype ours' policy holds weights in, ours under its own policy).
        quick: small sizes everywhere (seconds on small shapes).
        long_context: context of the long decode runs, tokens (default 4096; 256 with --quick).
        prefill_len: prompt length of the prefill run; the mixed batch spans 16 to this (default 512).
        compile: also run ours with compile=True (torch.compile of the decode step).
        impls: comma-separated, from ours (the dtype policy), ours-bf16 and ours-f32 (forced dtypes),
            ours-compile, ours-int8, ours-int4 and ours-w8a8 (quantized), hf-eager, hf-sdpa, llama.cpp
            (BF16, Q8_0 and Q4_0 of the same weights). Default: ours, hf-eager, hf-sdpa (and
            ours-compile with --compile).
        baseline: also time the original's one-token-per-step prompt feeding on our model.
        llama_cpp: a llama.cpp source tree built with cmake, for the llama.cpp implementation
            (default: $LLAMA_CPP_DIR); skipped with a note when absent or not built.
        threads: CPU threads for every implementation (default: torch's default).
        out: write all results as JSON here (also after each implementation, marked incomplete),
            with the machine, date and command.
        seed: seed of the random weights and prompts.
        report: measure nothing: print the table and ratios of this stored --out file (of a complete
            or cut-short run), and with --out write them there.
    """
    if report is not None:
        stored = json.loads(Path(report).read_text())
        summarize(stored, out)
        return
    dev = distributed.resolve_device(device)
    params = registry.get(shape)
    if n_layers:
        params["n_layers"] = int(n_layers)
    dt = probes.resolve_dtype(dtype, dev, weight_bytes=model_bytes(params, torch.bfloat16)["weights"])
    s = settings(quick, long_context, prefill_len, dev)
    if isinstance(impls, str):
        impls = impls.split(",")
    impls = list(impls or [*DEFAULT_IMPLS[:1], *(["ours-compile"] if compile else []), *DEFAULT_IMPLS[1:]])
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise ValueError(f"unknown implementation(s) {sorted(unknown)}: choose from {', '.join(IMPLS)}")
    bytes_ = model_bytes(params, dt)
    print(
        f"{shape}{f' with {n_layers} layers' if n_layers else ''} on {dev} in {kernel_policy.dtype_name(dt)}: "
        f"{bytes_['weights'] / GB:.2f} GB of weights read per decode step, "
        f"{bytes_['kv_per_token'] / 1e3:.1f} KB of KV cache per token of context",
        flush=True,
    )
    # buffers far bigger than the last-level cache; smaller with --quick
    bw_bytes = (2**28 if quick else 2**30) * (4 if dev.type == "cuda" else 1)
    bw = bandwidth(dev, dt, bw_bytes)
    empty_cache(dev)
    print("memory bandwidth, GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in bw.items()), flush=True)

    header = {
        "shape": shape, "params": params, "device": str(dev), "dtype": kernel_policy.dtype_name(dt),
        "threads": threads or torch.get_num_threads(), "settings": s, "bytes": bytes_,
    }
    spec = {"params": params, "settings": s, "device": str(dev), "dtype": kernel_policy.dtype_name(dt), "dtype_arg": dtype,
            "threads": threads, "baseline": baseline, "llama_cpp": llama_cpp or os.environ.get(LLAMA_CPP_ENV)}
    results, skipped = measure_all(impls, spec, seed, lambda partial: write_json(out, envelope("generate", {
        **header, "complete": False, "bandwidth_gb_s": bw, **partial})))
    if not results:
        raise SystemExit("no implementation ran")
    # measured again at the end: on a shared machine the better of the two is nearer the truth
    bw = {k: max(v, w) for (k, v), w in zip(bw.items(), bandwidth(dev, dt, bw_bytes).values())}
    print("memory bandwidth, GB/s, best of start and end: " + ", ".join(f"{k} {v:.1f}" for k, v in bw.items()))
    summarize({**header, "complete": True, "bandwidth_gb_s": bw, "results": results, "skipped": skipped}, out,
              itemsize=dt.itemsize)


def measure_all(impls: list, spec: dict, seed: int, save: Callable[[dict], None]) -> tuple[dict, dict]:
    """Write the random checkpoints, then run each implementation in its own process on them:
    ({name: results}, {impl: why it was skipped}); `save` gets both after each implementation, so
    that what is done survives a run cut short (a time limit on a lent GPU, say)."""
    results, skipped = {}, {}
    dev = torch.device(spec["device"])
    with tempfile.TemporaryDirectory(prefix="llama-bench-") as tmp:
        start = time.perf_counter()
        files = write_models(Path(tmp), spec["params"], getattr(torch, spec["dtype"]), dev, seed)
        empty_cache(dev)  # the workers need the GPU memory
        print(f"wrote both checkpoints in {time.perf_counter() - start:.1f}s", flush=True)
        for impl in impls:
            done = run_worker(impl, {**spec, "impl": impl, "files": files, "work_dir": tmp}, Path(tmp))
            if done is None:
                continue
            if "skipped" in done:
                skipped[impl] = done["skipped"]
                print(f"[{impl}] skipped: {done['skipped']}", flush=True)
                continue
            results.update(done)
            save({"results": results, "skipped": skipped})
    return results, skipped


def run_worker(impl: str, spec: dict, tmp: Path) -> Optional[dict]:
    """One implementation in a fresh process (its load time and peak memory its own): what it wrote,
    or None when it failed."""
    spec_path, out_path = tmp / f"{impl}.json", tmp / f"{impl}.out.json"
    spec_path.write_text(json.dumps(spec))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "_worker", str(spec_path), str(out_path)])
    if proc.returncode != 0 or not out_path.is_file():
        print(f"[{impl}] failed (exit code {proc.returncode}); left out of the table", flush=True)
        return None
    print(f"[{impl}] done in {time.perf_counter() - start:.0f}s", flush=True)
    return json.loads(out_path.read_text())


if __name__ == "__main__":
    if sys.argv[1:2] == ["_worker"]:
        worker(*sys.argv[2:4])
    else:
        cli.run(main)
