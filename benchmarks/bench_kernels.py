#!/usr/bin/env python
"""Matrix-product speed of this machine per dtype and kernel: the measurements behind the dtype
and kernel policy of llama/runtime/ (docs/usage.md, "Choosing a dtype").

    python benchmarks/bench_kernels.py                         # 8192x2048 weight, 1..256 rows
    python benchmarks/bench_kernels.py --rows 1,8 --shape 2048,8192 --threads 1
    python benchmarks/bench_kernels.py --out kernels.json
    python benchmarks/bench_kernels.py --rows 1 --threads 1 --clock thread   # on a busy machine

For each number of rows (1: one-row decode, a few: a small batch, many: prefill) it times
`F.linear(x, w)` in bfloat16 and in float32, and in float32 over a bfloat16 weight upcast block by
block for each product (`compute.upcast_linear`: how the policy prefills in float32 without a
second copy of any weight), each through oneDNN and through
PyTorch's own kernels; PyTorch's int8 and int4 weight-only kernels (`torch._weight_int8pack_mm`,
`torch._weight_int4pack_mm_for_cpu`) with bfloat16 and float32 activations; and this package's own
bfloat16, int8 and int4 products (llama.runtime.native) at each instruction set the CPU has, where
they build, with float32 activations (the bfloat16 one also with bfloat16 activations and results, "bf16 act.") and with activations rounded to int8 per block ("int8 act.",
the policy's native_a8). Each case cycles through copies of its weight twice the last-level cache, so every call
reads its weight from memory as decode does (`--from_memory False`: one weight, again and again).
The weights are allocated as the loader allocates them (on huge pages where Linux gives them;
LLAMA_NO_HUGE_PAGES=1: 4 KB pages). Reported: milliseconds (median of --repeats rounds), the weight's bytes read per second and their
share of this machine's read bandwidth measured in the same run, GFLOP/s; then, per row count, how
many times faster than PyTorch's bfloat16 product (its faster kernel) the fastest int8 and int4 ones
are (decode's tokens per second go as that), and what the policy picks. `--clock thread` times the
CPU time of the calling thread instead of the wall clock (with `--threads 1` only): on a machine
other processes load, a kernel's own time, not its share of the cores.
"""
import itertools
import time
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F

from common import GB, envelope, read_bandwidth, write_json
from llama import cli
from llama.runtime import compute, cpu, native, pages, probes, quant_kernels
from llama.weights import quant_formats
from llama.runtime import policy as kernel_policy

MAX_COPIES = 64  # a weight of less than a 32nd of the cache is not what decode reads anyway


def quantized_cases(w: torch.Tensor, x32: torch.Tensor, copies: int) -> dict:
    """Weight-only int8 (per-channel scales) and int4 (groups of 32) products of `w` in the stored
    forms of llama.weights.quant_formats: PyTorch's kernels with bfloat16 and float32 activations,
    and this package's own (llama.runtime.native, float32 activations) at each instruction set the
    CPU has, where they build. name -> (calls, each over its own copy of the weight; weight bytes)."""
    cases = {}
    n, k = w.shape
    q8, s8 = quant_formats.quantize_int8(w)
    q8s = [copy(q8) for _ in range(copies)]
    for name, dt in (("int8, PyTorch, bfloat16 act.", torch.bfloat16), ("int8, PyTorch, float32 act.", torch.float32)):
        x, s = x32.to(dt), s8.to(dt)
        cases[name] = ([lambda q=q, x=x, s=s: quant_kernels.int8_pack_mm(x, q, s) for q in q8s], q8.nbytes + s.nbytes)
    q4, s4, z4 = quant_formats.quantize_int4(w, 32)
    q4s = [copy(q4) for _ in range(copies)]
    packed = [quant_kernels.int4_kernel_layout(q) for q in q4s]
    int4_bytes = q4.nbytes + s4.nbytes + z4.nbytes
    for name, dt in (("int4, PyTorch, bfloat16 act.", torch.bfloat16), ("int4, PyTorch, float32 act.", torch.float32)):
        x, sz = x32.to(dt), quant_kernels.scales_and_zeros(s4, z4, dt)
        cases[name] = ([lambda p=p, x=x, sz=sz: quant_kernels.int4_pack_mm(x, p, 32, sz) for p in packed], int4_bytes)
    if native.kernels() is not None:
        s32 = s8.float()
        for isa in reversed(native.available_isas()):
            cases[f"int8, native {isa}"] = ([lambda q=q, isa=isa: native.int8_mm(x32, q, s32, isa) for q in q8s],
                                            q8.nbytes + s32.nbytes)
            cases[f"int4, native {isa}"] = ([lambda q=q, isa=isa: native.int4_mm(x32, q, s4, z4, 32, isa) for q in q4s],
                                            int4_bytes)
        for isa in reversed(native.available_isas(int8_activations=True)):
            cases[f"int8, native int8 act. {isa}"] = (
                [lambda q=q, isa=isa: native.int8a_mm(x32, q, s32, isa) for q in q8s], q8.nbytes + s32.nbytes)
            cases[f"int4, native int8 act. {isa}"] = (
                [lambda q=q, isa=isa: native.int4a_mm(x32, q, s4, z4, 32, isa) for q in q4s], int4_bytes)
    return cases


def copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of weight `t` in memory like the loader's (llama.runtime.pages: on huge pages where
    Linux gives them, unless LLAMA_NO_HUGE_PAGES is set)."""
    out = torch.empty_like(t)
    pages.advise_huge_pages(out)
    return out.copy_(t)


def cpu_flags() -> str:
    """The CPU's vector-extension flags (Linux /proc/cpuinfo), the ones the kernels can use."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return ""
    return " ".join(f for f in flags if f.startswith(("avx", "fma", "f16c", "amx")))


def copies_for(n_bytes: int, from_memory: bool) -> int:
    """How many copies of a weight of `n_bytes` to cycle through: enough to miss the last-level cache
    at every call (from memory, as decode reads a model larger than the cache), else one."""
    return min(MAX_COPIES, cpu.streamed_copies(n_bytes)) if from_memory else 1


def timed_cycle(fns: list, repeats: int, from_memory: bool, clock: str = "wall") -> float:
    """Seconds of one call, the calls cycling through `fns` (each over its own weight): the median
    of `repeats` rounds from memory (a call that finds its bytes cached is an outlier), else the fastest;
    `clock` "thread": the calling thread's CPU seconds (one thread: the kernel's own time on a busy machine)."""
    calls = itertools.cycle(fns)
    if clock == "wall":
        return cpu.best_time(lambda: next(calls)(), repeats * len(fns), median=from_memory)
    for _ in fns:  # a warm-up call of each
        next(calls)()
    times = []
    for _ in range(repeats * len(fns)):
        start = time.thread_time()
        next(calls)()
        times.append(time.thread_time() - start)
    return sorted(times)[len(times) // 2] if from_memory else min(times)


def bandwidth(n_bytes: int, clock: str) -> float:
    """This machine's read bandwidth, GB/s (common.read_bandwidth), in the calling thread's CPU time
    with `clock` "thread"."""
    if clock == "wall":
        return read_bandwidth(torch.device("cpu"), n_bytes)
    ones = torch.ones(n_bytes // 4)
    return ones.nbytes / timed_cycle([ones.sum], 5, False, clock) / GB


def speedups(results: list) -> dict:
    """Per row count: how many times faster than PyTorch's bfloat16 product (the faster of its two
    kernels) the fastest int8 and int4 cases, and the fastest of each family, are."""
    out = {}
    for m in sorted({r["rows"] for r in results}):
        ms = {r["case"]: r["ms"] for r in results if r["rows"] == m}
        bf16 = min(ms.get("bfloat16, oneDNN", float("inf")), ms.get("bfloat16, own", float("inf")))
        best = {}
        for case, t in ms.items():
            family = case.split(",")[0] + (", int8 act." if "int8 act." in case else "")
            if family in ("int8", "int4", "int8, int8 act.", "int4, int8 act.") and t < best.get(family, (float("inf"),))[0]:
                best[family] = (t, case)
        out[m] = {family: {"case": case, "times_bfloat16": bf16 / t} for family, (t, case) in best.items()}
    return out


def float_cases(x32: torch.Tensor, w16s: list, w32s: list, scratch: torch.Tensor) -> list:
    """(name, calls over each copy of the weight, weight bytes, oneDNN on/off or None) of the float
    products: F.linear in bfloat16 and float32 and float32 over upcast bfloat16, each through oneDNN
    and PyTorch's own kernels, and this package's bfloat16 product at each instruction set."""
    x16 = x32.bfloat16()
    cases = []
    for name, fns, n_bytes in (
        ("bfloat16", [lambda w=w: F.linear(x16, w) for w in w16s], w16s[0].nbytes),
        ("float32", [lambda w=w: F.linear(x32, w) for w in w32s], w32s[0].nbytes),
        ("float32 over upcast bfloat16", [lambda w=w: compute.upcast_linear(x32, w, scratch) for w in w16s], w16s[0].nbytes),
    ):
        cases += [(f"{name}, {'oneDNN' if onednn else 'own'}", fns, n_bytes, onednn) for onednn in (True, False)]
    if native.kernels() is not None:
        for isa in reversed(native.available_isas()):
            cases.append((f"bfloat16, native {isa}", [lambda w=w, isa=isa: native.bf16_mm(x32, w, isa) for w in w16s],
                          w16s[0].nbytes, None))
        for isa in reversed(native.available_isas(bf16_activations=True)):  # as the bfloat16 model calls it
            cases.append((f"bfloat16, native bf16 act. {isa}",
                          [lambda w=w, isa=isa: native.bf16_mm(x16, w, isa, torch.bfloat16) for w in w16s],
                          w16s[0].nbytes, None))
    return cases


def time_cases(cases: list, repeats: int, from_memory: bool, clock: str, rounds: int) -> list:
    """(name, seconds, bytes) of each case of `cases` (float_cases' tuples): timed_cycle, in `rounds`
    rounds that take every case in turn, each case keeping its fastest round (on a machine others
    load, each case gets the same chances of a quiet moment)."""
    best = {}
    was = torch.backends.mkldnn.enabled
    try:
        for _ in range(rounds):
            for name, fns, n_bytes, onednn in cases:
                torch.backends.mkldnn.enabled = was if onednn is None else onednn
                best[name] = min(best.get(name, float("inf")), timed_cycle(fns, repeats, from_memory, clock))
    finally:
        torch.backends.mkldnn.enabled = was
    return [(name, best[name], n_bytes) for name, _, n_bytes, _ in cases]


def main(
    rows: Union[str, int, tuple] = (1, 8, 64, 256),
    shape: Union[str, tuple] = (8192, 2048),
    repeats: int = 5,
    threads: Optional[int] = None,
    quantized: bool = True,
    bandwidth_mb: int = 1024,
    from_memory: bool = True,
    clock: str = "wall",
    rounds: int = 1,
    out: Optional[str] = None,
) -> dict:
    """Time one linear layer's product per dtype and kernel on this machine's CPU.

    Args:
        rows: token rows of the activations, comma-separated (1 is one-row decode).
        shape: the weight, out_features,in_features (default: the Llama 3.2 1B's feed-forward w1).
        repeats: timed rounds per case after one warm-up (their median from memory, else the fastest).
        threads: CPU threads (default: torch's default).
        quantized: also time the int8 and int4 weight-only kernels (PyTorch's and this package's).
        bandwidth_mb: size of the buffer the read bandwidth is measured on.
        from_memory: cycle each case through copies of its weight twice the last-level cache, so
            that every call reads it from memory, as decode of a model larger than the cache does
            (`--from_memory False`: one weight, read again and again, from the cache where it fits).
        clock: "wall" (elapsed time), or "thread": the calling thread's CPU time, with --threads 1 only
            (a machine that other processes load: the kernels' own time; the read bandwidth alike).
        rounds: time every case this many times in turn, each keeping its fastest round (and the
            read bandwidth its best), so that cases compare fairly on a machine others load.
        out: write every measurement as JSON here.
    """
    if threads:
        torch.set_num_threads(int(threads))
    if clock not in ("wall", "thread") or clock == "thread" and torch.get_num_threads() != 1:
        raise ValueError(f"clock {clock!r} must be 'wall', or 'thread' with --threads 1 (one thread's CPU time)")
    row_list = cli.int_list(rows)
    n, k = cli.int_list(shape)
    if any(r < 1 for r in row_list) or n < 1 or k < 1:
        raise ValueError(f"rows {row_list} and shape {n}x{k} must be positive")
    torch.manual_seed(0)
    w32 = torch.randn(n, k) / k**0.5
    w16 = w32.bfloat16()
    w32s = [copy(w32) for _ in range(copies_for(w32.nbytes, from_memory))]
    w16s = [copy(w16) for _ in range(copies_for(w16.nbytes, from_memory))]
    bw = max(bandwidth(int(bandwidth_mb) * 2**20, clock) for _ in range(max(1, int(rounds))))
    scratch = torch.empty(compute.UPCAST_CHUNK)
    print(f"CPU {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"weight {n}x{k}; read bandwidth {bw:.1f} GB/s", flush=True)
    print(f"{'rows':>4} | {'case':<28} | {'ms':>8} | {'weight GB/s':>11} | {'GFLOP/s':>8}  (weights read from "
          f"{'memory' if from_memory else 'the cache where they fit'})")
    results = []
    for m in row_list:
        x32 = torch.randn(m, k)
        cases = float_cases(x32, w16s, w32s, scratch)
        if quantized:
            cases += [(name, fns, n_bytes, None) for name, (fns, n_bytes) in
                      quantized_cases(w32, x32, copies_for(n * k // 2, from_memory)).items()]
        for name, seconds, n_bytes in time_cases(cases, repeats, from_memory, clock, rounds):
            entry = {"rows": m, "case": name, "ms": seconds * 1e3, "weight_gb_s": n_bytes / seconds / GB,
                     "share_of_read": n_bytes / seconds / GB / bw, "gflop_s": 2 * m * n * k / seconds / GB}
            results.append(entry)
            print(f"{m:>4} | {name:<28} | {entry['ms']:>8.3f} | {entry['weight_gb_s']:>11.1f} | {entry['gflop_s']:>8.1f}",
                  flush=True)
    faster = speedups(results)
    for m, families in faster.items():
        print(f"{m} rows, times PyTorch's bfloat16: " + "; ".join(f"{f} {v['times_bfloat16']:.2f}x ({v['case']})" for f, v in families.items()))
    policy = kernel_policy.choose(probes.measure(), reason="measured now")
    print(f"policy: {policy.describe()}")
    summary = {"cpu": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(), "from_memory": from_memory,
               "cpu_flags": cpu_flags(), "native_isa": native.best_isa() if native.kernels() is not None else None,
               "shape": [n, k], "read_gb_s": bw, "clock": clock, "rounds": rounds, "results": results,
               "times_bfloat16": {str(m): v for m, v in faster.items()}, "policy": policy.describe()}
    rows = [{"metric": f"{r['rows']} rows, {r['case']}", "ms": r["ms"], "weight GB/s": r["weight_gb_s"],
             "share of read bandwidth": r["share_of_read"], "GFLOP/s": r["gflop_s"]} for r in results]
    if out:
        write_json(out, envelope("kernels", summary, rows))
        print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    cli.run(main)
