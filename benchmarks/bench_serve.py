"""Load benchmark of the OpenAI-compatible server: concurrent streaming clients against one server.

    python benchmarks/bench_serve.py                        # starts the demo model's server on a free loopback port
    python benchmarks/bench_serve.py --base_url http://127.0.0.1:8000/v1 --model llama3-demo
    python benchmarks/bench_serve.py --workload prefix --out docs/benchmarks/serve_prefix.json

--workload picks the KV cache's workloads instead (prefix, capacity, long_prompt, kv_layout: see
benchmarks/serve_workloads.py), each on the demo model, started by the benchmark itself.

For each concurrency level, the same `requests` streaming completions (greedy, max_tokens each) run
with that many clients at once; level 1 is the requests one after another. Reported per level:
throughput (generated tokens/s over the wall time), time to first token and inter-token latency
(p50, p99), and the throughput relative to level 1. Loopback only; bounded request counts.
With --structured each level runs twice, the second time with every answer held to SCHEMA
(response_format json_schema), so the constraint's cost shows beside the free run of the same level:

    python benchmarks/bench_serve.py --clients 8 --requests 16 --structured --repeats 3 --out docs/benchmarks/serve_structured.json
"""
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional


REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Once upon a time", "The history of the city", "In mathematics, a prime number", "def fibonacci(n):",
    "The weather today", "A short story about a robot", "How to cook rice:", "The list of rivers",
]
# --structured: answers that run to max_tokens (at least 12 short records), so both runs generate as many tokens
SCHEMA = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40}, "items": {"minItems": 12,
    "type": "array", "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                                                "count": {"type": "integer", "minimum": 0}},
                               "required": ["name", "count"], "additionalProperties": False}}},
          "required": ["title", "items"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "records", "schema": SCHEMA, "strict": True}}


def percentile(values: list, q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


_CLIENT = []
_CLIENT_LOCK = threading.Lock()


def client():
    """One HTTP client for every request of the run (thread-safe, its connections kept alive): a
    client made per request costs tens of milliseconds of the benchmark's own CPU (its TLS context),
    under the GIL of the clients' threads, which the time to first token of each request counted."""
    import httpx

    with _CLIENT_LOCK:
        if not _CLIENT:
            _CLIENT.append(httpx.Client(timeout=600, limits=httpx.Limits(max_connections=256, max_keepalive_connections=256)))
        return _CLIENT[0]


def one_request(base_url: str, model: str, prompt: str, max_tokens: int, api_key: str, schema: bool = False) -> dict:
    """Stream one completion (held to SCHEMA with `schema`); the time of each token's chunk."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            **({"response_format": FORMAT} if schema else {})}
    http = client()
    start, times, text = time.perf_counter(), [], ""
    with http.stream("POST", base_url + "/completions", json=body, headers={"Authorization": f"Bearer {api_key}"}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode()[:200]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            times.append(time.perf_counter())
            text += chunk["choices"][0]["text"]
    return {"start": start, "times": times, "text": text}


def level(base_url: str, model: str, clients: int, requests: int, max_tokens: int, api_key: str, schema: bool = False) -> dict:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: one_request(base_url, model, p, max_tokens, api_key, schema), prompts))
    wall = time.perf_counter() - t0
    tokens = sum(len(r["times"]) for r in results)
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    return {
        "clients": clients, "schema": schema, "requests": requests, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
        "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
        "itl_p50_ms": 1e3 * percentile(itl, 50), "itl_p99_ms": 1e3 * percentile(itl, 99),
        "texts": [r["text"] for r in results],
    }


def start_server(port: int, max_batch_size: int, max_seq_len: int, dtype: Optional[str], extra: str) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, str(REPO / "scripts" / "serve.py"), "--port", str(port), "--max_batch_size", str(max_batch_size),
           "--max_seq_len", str(max_seq_len), "--max_queue", "1024", *(["--dtype", dtype] if dtype else []), *str(extra).split()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise ValueError(f"the server exited with status {proc.returncode}: see its output above")
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).raise_for_status()
            return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise ValueError("the server did not come up within 300 s")


def main(
    base_url: Optional[str] = None,
    model: str = "llama3-demo",
    clients: str = "1,8,32",
    requests: int = 32,
    max_tokens: int = 64,
    api_key: str = "none",
    max_batch_size: int = 32,
    max_seq_len: int = 512,
    dtype: Optional[str] = "float32",
    server_args: str = "",
    structured: bool = False,
    repeats: int = 1,
    out: Optional[str] = None,
    workload: str = "levels",
):
    """Measure the server under concurrent streaming clients.

    Args:
        base_url: a running server's API root (http://host:port/v1); None starts the demo model's
            server (scripts/serve.py, with max_batch_size, max_seq_len, dtype and server_args) on a
            free loopback port for the run.
        dtype: the started server's dtype; float32 by default, where batching changes no greedy
            token, so every level's texts must equal the one-after-another texts; None: the
            device's measured policy (faster on some CPUs; bfloat16 rounds near-ties differently
            in different batches, so the texts may differ).
        model: the model id the server serves.
        clients: comma-separated concurrency levels; 1 is the requests one after another.
        requests: completions per level (bounded; the same prompts at every level).
        max_tokens: tokens each completion asks for (greedy).
        server_args: more flags for the started server, written with an equals sign so that fire
            keeps them a string: --server_args="--quantize int8".
        structured: run each level again with every answer held to a JSON schema (response_format).
        repeats: run each level (and its structured run, alternately) this many times; the fastest is kept.
        out: also write the results as JSON here.
        workload: levels (the concurrency levels above), or one of the KV cache's workloads: prefix,
            capacity, long_prompt, kv_layout (benchmarks/serve_workloads.py; the other flags unused).
    """
    if workload != "levels":
        from serve_workloads import run_workload

        return run_workload(workload, out)
    if not isinstance(server_args, str):  # fire read `--server_args --flag` as a bare boolean flag
        raise SystemExit('--server_args takes one string written with "=": --server_args="--quantize int8"')
    from common import envelope, write_json
    from llama.cli import int_list  # here: importing this module stays light

    levels = int_list(clients)
    if requests < 1 or max_tokens < 1 or repeats < 1 or min(levels) < 1:
        raise ValueError("--requests, --max_tokens, --repeats and every --clients level must be at least 1")
    proc = None
    if base_url is None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = start_server(port, max_batch_size, max_seq_len, dtype, server_args)
        base_url = f"http://127.0.0.1:{port}/v1"
    elif not base_url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        raise ValueError(f"--base_url {base_url} is not a loopback address: this benchmark only loads this machine")
    try:
        level(base_url, model, 1, 1, 4, api_key, structured)  # warm-up
        rows = []
        for c in levels:
            runs = [[level(base_url, model, c, requests, max_tokens, api_key, schema)
                     for schema in ((False, True) if structured else (False,))] for _ in range(repeats)]
            rows += [max(column, key=lambda r: r["tokens_per_s"]) for column in zip(*runs)]  # alternated, the fastest
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    base = next((r for r in rows if r["clients"] == 1), rows[0])
    free = {r["clients"]: r for r in rows if not r["schema"]}
    print(f"{requests} streaming completions of up to {max_tokens} tokens per level, greedy, against {base_url}")
    print(f"{'clients':>7} {'tokens':>7} {'wall s':>7} {'tok/s':>8} {'vs 1':>6} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8}")
    for r in rows:
        same = "" if r["texts"] == base["texts"] else "  (texts differ from level 1!)"
        if r["schema"]:
            json_ok = sum(_parses(t) for t in r["texts"])
            same = f"  JSON schema: {r['tokens_per_s'] / free[r['clients']]['tokens_per_s']:.2f}x the free run, {json_ok} of {len(r['texts'])} whole JSON"
        print(f"{r['clients']:>7} {r['tokens']:>7} {r['wall_s']:>7.2f} {r['tokens_per_s']:>8.1f} "
              f"{r['tokens_per_s'] / base['tokens_per_s']:>5.2f}x {r['ttft_p50_ms']:>7.0f}ms {r['ttft_p99_ms']:>7.0f}ms "
              f"{r['itl_p50_ms']:>6.1f}ms {r['itl_p99_ms']:>6.1f}ms{same}")
    levels_out = [{k: v for k, v in r.items() if k != "texts"} for r in rows]
    table = [{"metric": f"{r['clients']} clients" + (", JSON schema" if r["schema"] else ""), "tokens": r["tokens"], "tok/s": r["tokens_per_s"], "TTFT p50 ms": r["ttft_p50_ms"],
              "TTFT p99 ms": r["ttft_p99_ms"], "ITL p50 ms": r["itl_p50_ms"], "ITL p99 ms": r["itl_p99_ms"]} for r in rows]
    last = rows[-1]  # a --structured run compares two runs of one level: no headline of its own
    headline = [] if structured else [{"metric": f"server throughput, {last['clients']} streaming clients, tok/s",
                                       "value": last["tokens_per_s"]}]
    write_json(out, envelope("serve", {"base_url": base_url, "requests": requests, "max_tokens": max_tokens, "repeats": repeats,
                                       "levels": levels_out}, table, headline))


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    from llama.cli import run

    run(main)
