"""The KV cache's workloads of bench_serve.py (--workload), on the demo model:

- prefix: chat requests sharing a 1,000-token system prompt, time to first token and throughput
  with the prefix cache and without (two servers, one after the other);
- capacity: at a fixed KV budget, concurrent sequences of mixed lengths (16..512 tokens) in
  blocks and in today's rows (one engine each, in this process): how many run together, tokens/s;
- long_prompt: 8 streams decoding while a 4,000-token prompt arrives, their inter-token latency
  with chunked prefill (--max_prefill_tokens) and without, beside the same streams alone;
- kv_layout: prefill and decode steps over rows and over blocks of 16 and 32 tokens (gathered for
  SDPA), the same sequences, the same tokens (one engine each, in this process, CPU time).

Imported by bench_serve.py (a script's own directory comes first on sys.path).
"""
import random
import threading
import time
from typing import Callable, List

import bench_serve as bs


def token_prompt(n: int, seed: int) -> List[int]:
    """`n` ordinary token ids of the demo vocabulary (below its special tokens)."""
    rng = random.Random(seed)
    return [rng.randrange(300, 4000) for _ in range(n)]


def stream_tokens(base_url: str, model: str, prompt: List[int], max_tokens: int) -> dict:
    return bs.one_request(base_url, model, prompt, max_tokens, "none")


def timed(results: List[dict]) -> dict:
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    first, last = min(r["start"] for r in results), max(r["times"][-1] for r in results if r["times"])
    tokens = sum(len(r["times"]) for r in results)
    return {"ttft_p50_ms": 1e3 * bs.percentile(ttft, 50), "ttft_p99_ms": 1e3 * bs.percentile(ttft, 99),
            "itl_p50_ms": 1e3 * bs.percentile(itl, 50), "itl_p99_ms": 1e3 * bs.percentile(itl, 99),
            "tokens_per_s": tokens / (last - first)}


def with_server(max_batch_size: int, max_seq_len: int, args: str, fn: Callable[[str], dict]) -> dict:
    """fn(base_url) against a demo-model server started with these flags (float32)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = bs.start_server(port, max_batch_size, max_seq_len, "float32", args)
    try:
        return fn(f"http://127.0.0.1:{port}/v1")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def prefix(requests: int = 32, clients: int = 8, system_tokens: int = 1000, max_tokens: int = 16) -> dict:
    """TTFT and throughput of `requests` chat-like requests sharing a system prompt, prefix cache on and off."""
    system = token_prompt(system_tokens, 0)
    prompts = [system + token_prompt(24, 1 + i) for i in range(requests)]
    rows = []
    for on in (True, False):
        def run(base_url: str) -> dict:
            stream_tokens(base_url, "llama3-demo", system + token_prompt(24, 999), 2)  # an earlier request
            import concurrent.futures

            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                return timed(list(pool.map(lambda p: stream_tokens(base_url, "llama3-demo", p, max_tokens), prompts)))

        r = with_server(32, 2048, f"--prefix_cache {on}", run)
        rows.append({"metric": f"prefix cache {'on' if on else 'off'}", **r})
    return {"rows": rows, "ttft_p50_ratio_off_over_on": rows[1]["ttft_p50_ms"] / rows[0]["ttft_p50_ms"]}


def long_prompt(streams: int = 8, stream_tokens_n: int = 160, long_tokens: int = 4000, chunks: str = "32,64") -> dict:
    """The streams' ITL while a long prompt arrives (prefill chunked by each of `chunks`, and whole)
    beside the streams alone."""
    import concurrent.futures

    def run(base_url: str, with_long: bool) -> dict:
        prompts = [token_prompt(32, 10 + i) for i in range(streams)]
        stream_tokens(base_url, "llama3-demo", prompts[0], 2)  # warm-up
        with concurrent.futures.ThreadPoolExecutor(streams + 1) as pool:
            futures = [pool.submit(stream_tokens, base_url, "llama3-demo", p, stream_tokens_n) for p in prompts]
            window = None
            if with_long:
                time.sleep(1.0)
                start = time.perf_counter()
                stream_tokens(base_url, "llama3-demo", token_prompt(long_tokens, 7), 1)
                window = (start, time.perf_counter())
            results = [f.result() for f in futures]
        # the gaps that overlap the long prompt's time (one prefilled whole stalls the streams in a
        # gap that ends after its first token)
        itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])
               if window is None or (b >= window[0] and a <= window[1])]
        out = {"itl_p50_ms": 1e3 * bs.percentile(itl, 50), "itl_p99_ms": 1e3 * bs.percentile(itl, 99)}
        if window:
            out["long_prompt_ttft_ms"] = 1e3 * (window[1] - window[0])
        return out

    max_seq_len = long_tokens + 64
    rows = [{"metric": "8 streams alone", **with_server(16, max_seq_len, "", lambda u: run(u, False))}]
    for chunk in [int(c) for c in str(chunks).split(",")] + [None]:
        flag = f"--max_prefill_tokens {chunk}"
        name = f"with the long prompt, prefill chunks of {chunk}" if chunk else "with the long prompt, prefilled whole"
        rows.append({"metric": name, **with_server(16, max_seq_len, flag, lambda u: run(u, True))})
    return {"rows": rows}


def _engine_run(llama, kind, prompts: List[List[int]], new: List[int], rows: int, seq_len: int, budget: int) -> dict:
    """Run `prompts` to `new` tokens each on an engine over rows or blocks of `kind` tokens; its
    tokens/s, the most and the mean sequences decoded together, the decode steps' mean time."""
    from llama import kv_cache
    from llama.engine import Engine, Request

    if kind == "rows":
        kv_cache.allocate(llama.model, budget // seq_len, seq_len)
    else:
        kv_cache.allocate_blocks(llama.model, budget // kind + 1, kind, rows, seq_len)
    engine = Engine(llama.model, llama.tokenizer, prefix_cache=False)
    for p, n in zip(prompts, new):
        engine.add(Request(p, n, temperature=0, stop_tokens=[]))
    together, tokens, steps, t0 = [], 0, 0, time.perf_counter()
    while engine.busy:
        together.append(engine.n_running)
        tokens += sum(e.token is not None for e in engine.step())
        steps += 1
    wall = time.perf_counter() - t0
    out = [engine.pop(i).tokens for i in range(len(prompts))]
    return {"tokens_per_s": tokens / wall, "max_together": max(together), "mean_together": sum(together) / len(together),
            "ms_per_step": 1e3 * wall / steps, "tokens": out}


def capacity(budget: int = 4096, seq_len: int = 512, sequences: int = 32, seed: int = 0, default_context: int = 2048) -> dict:
    """At a fixed KV budget: sequences of mixed lengths (16..512 tokens, half prompt, half answer),
    in today's rows (budget / seq_len of them) and in blocks of 16 (as many together as the blocks
    allow: the prompts of all of them need more than the budget, so the budget is what bounds them).
    Also: the rows the budget makes at the server's default context, and the most of these
    sequences whose prompts alone fit the budget, shortest first (no scheme that keeps their keys
    and values runs more of them together)."""
    import torch

    from llama.engine.blocks import blocks_for
    from llama.launch import build_generator

    torch.set_num_threads(1)  # both layouts alike; one thread holds up better on cores other jobs share
    llama = build_generator(None, None, max_seq_len=seq_len, max_batch_size=sequences, device="cpu", dtype="float32")
    rng = random.Random(seed)
    lengths = [rng.randrange(16, seq_len + 1) for _ in range(sequences)]
    prompts = [token_prompt(n - n // 2, 100 + i) for i, n in enumerate(lengths)]
    new = [n // 2 for n in lengths]
    rows = {}
    for kind in ("rows", 16):
        rows[kind] = _engine_run(llama, kind, prompts, new, sequences, seq_len, budget)
    same = rows["rows"].pop("tokens") == rows[16].pop("tokens")
    held, bound = 0, 0
    for p in sorted(prompts, key=len):
        held += blocks_for(len(p), 16) * 16
        bound += held <= budget
    table = [{"metric": f"{budget} KV tokens in rows of {seq_len}", **rows["rows"]},
             {"metric": f"{budget} KV tokens in blocks of 16", **rows[16]}]
    return {"rows": table, "same_tokens": same, "together_ratio": rows[16]["max_together"] / rows["rows"]["max_together"],
            "rows_at_default_context": budget // default_context, "most_prompts_that_fit": bound}


def kv_layout(sequences: int = 8, prompts: str = "200,450", new: int = 17, repeats: int = 2) -> dict:
    """Decode over rows and over blocks of 16 and 32 tokens (gathered for SDPA): the same
    `sequences` sequences, prompts of each length in `prompts`, best of `repeats` interleaved runs.
    Timed in CPU time of one thread (time.process_time), which another process's load on a shared
    machine changes far less than wall time: the first step (prefill) and the mean decode step."""
    import torch

    from llama import kv_cache
    from llama.engine import Engine, Request
    from llama.launch import build_generator

    torch.set_num_threads(1)
    llama = build_generator(None, None, max_seq_len=512, max_batch_size=sequences, device="cpu", dtype="float32")
    table = []
    for plen in [int(p) for p in str(prompts).split(",")]:
        batch = [token_prompt(plen + i, 300 + i) for i in range(sequences)]
        best, tokens = {}, {}
        for _ in range(repeats):
            for kind in ("rows", 16, 32):
                if kind == "rows":
                    kv_cache.allocate(llama.model, sequences, 512)
                else:
                    kv_cache.allocate_blocks(llama.model, sequences * 512 // kind + 1, kind, sequences, 512)
                engine = Engine(llama.model, llama.tokenizer, prefix_cache=False)
                ids = [engine.add(Request(p, new, temperature=0, stop_tokens=[])) for p in batch]
                t = time.process_time()
                engine.step()
                prefill, t = time.process_time() - t, time.process_time()
                while engine.busy:
                    engine.step()
                decode = (time.process_time() - t) / (new - 1)
                tokens[kind] = [engine.pop(i).tokens for i in ids]
                b = best.setdefault(kind, [float("inf"), float("inf")])
                best[kind] = [min(b[0], prefill), min(b[1], decode)]
        for kind, (prefill, decode) in best.items():
            table.append({"metric": f"prompts of {plen}+, " + ("rows" if kind == "rows" else f"blocks of {kind}"),
                          "prefill CPU ms": 1e3 * prefill, "decode step CPU ms": 1e3 * decode,
                          "vs rows": decode / best["rows"][1], "same tokens as rows": tokens[kind] == tokens["rows"]})
    return {"rows": table}


WORKLOADS = {"prefix": prefix, "capacity": capacity, "long_prompt": long_prompt, "kv_layout": kv_layout}


def run_workload(name: str, out) -> None:
    """Run one workload, print its table and write its JSON (`out`)."""
    from common import envelope, write_json

    if name not in WORKLOADS:
        raise ValueError(f"--workload {name!r} is unknown: pass levels, {', '.join(WORKLOADS)}")
    result = WORKLOADS[name]()
    for row in result["rows"]:
        print("  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    extra = {k: v for k, v in result.items() if k != "rows"}
    if extra:
        print(extra)
    write_json(out, envelope(f"serve_{name}", {"workload": name, **extra}, result["rows"]))
