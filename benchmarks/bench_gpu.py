#!/usr/bin/env python
"""Batch-1 decode of one model shape in bfloat16, int8 and int4, each as a share of the memory
bandwidth it could use: the benchmark of scripts/gpu_check.sh (docs/benchmarks.md, "GPU").

    python benchmarks/bench_gpu.py --out docs/benchmarks/gpu.json      # 8B shape, CUDA, compile=True
    python benchmarks/bench_gpu.py --shape tiny --device cpu --nocompile --new_tokens 8   # smoke test

Random weights of the shape are written once as a Meta checkpoint; each precision is then built from
it with Llama.build (quantized on load) and decodes one prompt greedily. Reported per precision:
steady-state tokens/s (the first steps, which compile, left out), the bytes one step reads (every
weight but the embedding table, as held, plus the KV cache of the context), what that makes per
second and its share of the device's peak bandwidth (GPUs: the peak of the card named by
torch.cuda.get_device_name, PEAK_TB_S, or --peak_tb_s), the device's peak memory, and load time.
"""
import gc
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from bench_generate import model_bytes, write_tokenizer
from common import GB, N_SPECIAL, envelope, peak_rss, print_table, sync, write_json, write_random_checkpoint
from generate_impls import SKIP_STEPS, weight_bytes
from llama import cli, distributed, registry

# Peak HBM bandwidth, TB/s, by a substring of the device name, most specific first: NVIDIA's data sheets.
PEAK_TB_S = (("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35), ("H200", 4.8), ("A100-SXM4-80GB", 2.039),
             ("A100-PCIE-80GB", 1.935), ("A100", 1.555))
PRECISIONS = ("bfloat16", "int8", "int4")


def card_peak_tb_s(name: str) -> Optional[float]:
    """The data-sheet peak bandwidth of the GPU called `name` (torch.cuda.get_device_name) if PEAK_TB_S has it."""
    return next((tb for key, tb in PEAK_TB_S if key.lower() in name.lower()), None)


def reset_peak_rss() -> None:
    """Start this process's peak resident memory (VmHWM) afresh (Linux), so each precision's is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def decode_one(ckpt: Path, tokenizer: Path, precision: str, device: torch.device, compile: bool,
               prompt_len: int, new_tokens: int, params: dict) -> dict:
    """Build `precision` from the checkpoint and time a greedy batch-1 decode of `new_tokens`."""
    from llama import Llama

    quantize = None if precision == "bfloat16" else precision
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()
    start = time.perf_counter()
    llama = Llama.build(str(ckpt), str(tokenizer), max_seq_len=prompt_len + new_tokens, max_batch_size=1,
                        device=str(device), dtype="bfloat16", quantize=quantize, compile=compile)
    load_s = time.perf_counter() - start
    prompt = [[(7 * i) % (params["vocab_size"] - N_SPECIAL) for i in range(prompt_len)]]
    times = []
    for _ in llama.stream(prompt, new_tokens, temperature=0):
        sync(device)
        times.append(time.perf_counter())
    steady = times[SKIP_STEPS:]
    tok_s = (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 1 else None
    context = prompt_len + (SKIP_STEPS + new_tokens) / 2  # the mean context of the timed steps
    step_bytes = weight_bytes(llama.model) + model_bytes(params, torch.bfloat16)["kv_per_token"] * context
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()) / GB
    del llama
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"tokens_s": tok_s, "step_gb": step_bytes / GB, "peak_memory_gb": peak, "load_s": load_s}


def main(
    shape: str = "llama3-8b",
    n_layers: Optional[int] = None,
    device: Optional[str] = None,
    precisions: Union[str, Sequence[str]] = PRECISIONS,
    compile: bool = True,
    prompt_len: int = 64,
    new_tokens: int = 64,
    peak_tb_s: Optional[float] = None,
    out: Optional[str] = None,
) -> None:
    """Batch-1 decode per precision as a share of the device's peak bandwidth.

    Args:
        shape: a llama.registry name (llama3-8b, llama3.2-1b, tiny, ...).
        n_layers: fewer layers than the shape has, for quicker runs.
        device: cuda or cpu (default: cuda when available).
        precisions: comma-separated, from bfloat16, int8, int4.
        compile: Llama.build(compile=True) (torch.compile of the decode step).
        prompt_len, new_tokens: the prompt's length and the tokens decoded after it.
        peak_tb_s: the device's peak bandwidth in TB/s where its name is not in PEAK_TB_S.
        out: write the results as JSON here (docs/benchmarks/gpu.json for benchmarks/render.py).
    """
    if isinstance(precisions, str):
        precisions = precisions.split(",")
    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        raise ValueError(f"unknown precision(s) {sorted(unknown)}: choose from {', '.join(PRECISIONS)}")
    if new_tokens <= SKIP_STEPS + 1:
        raise ValueError(f"--new_tokens {new_tokens} leaves no steady steps: pass more than {SKIP_STEPS + 1}")
    dev = distributed.resolve_device(device)
    params = registry.get(shape)
    if n_layers:
        params["n_layers"] = int(n_layers)
    peak = peak_tb_s or (card_peak_tb_s(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None)
    header = {"shape": shape, "params": params, "device": str(dev), "compile": compile, "peak_tb_s": peak,
              "prompt_len": prompt_len, "new_tokens": new_tokens}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "meta"
        write_random_checkpoint(ckpt, params, torch.bfloat16, zero_special=True,
                                device=dev if dev.type == "cuda" else torch.device("cpu"))
        write_tokenizer(ckpt / "tokenizer.model", params["vocab_size"] - N_SPECIAL)
        for precision in precisions:
            r = decode_one(ckpt, ckpt / "tokenizer.model", precision, dev, compile, prompt_len, new_tokens, params)
            gb_s = r["step_gb"] * r["tokens_s"] if r["tokens_s"] else None
            rows.append({"precision": precision, "tokens/s": r["tokens_s"], "GB read per token": r["step_gb"],
                         "GB/s": gb_s, "share of peak bandwidth": gb_s / (1000 * peak) if gb_s and peak else None,
                         "peak memory GB": r["peak_memory_gb"], "load s": r["load_s"]})
            print_table(rows[-1:])
            # kept after each precision: a run cut short by its time limit still leaves what it measured
            write_json(out, envelope("gpu", {**header, "complete": False}, table=rows))
    base = next((r["tokens/s"] for r in rows if r["precision"] == "bfloat16"), None)
    for r in rows:
        r["x bfloat16"] = r["tokens/s"] / base if base and r["tokens/s"] else None
    print_table(rows)
    headline = [{"metric": f"{shape} batch-1 decode, {r['precision']}, tokens/s (share of peak bandwidth)",
                 "value": f"{r['tokens/s']:.1f}" + (f" ({r['share of peak bandwidth']:.0%})" if r["share of peak bandwidth"] else "")}
                for r in rows if r["tokens/s"]]
    write_json(out, envelope("gpu", {**header, "complete": True}, table=rows, headline=headline if dev.type == "cuda" else []))


if __name__ == "__main__":
    cli.run(main)
