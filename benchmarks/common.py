"""What the benchmarks share: a best-of timer, resident memory, the memory-bandwidth probe, random
checkpoints, and the JSON every benchmark writes with --out (machine, date, command, torch, results).

Imported as `common` by the benchmarks beside it (a script's own directory comes first on sys.path).
"""
import datetime
import json
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from llama.atomic import atomic_write_text
from llama.weights import checkpoint, save, sharding
from llama.runtime.cpu import best_time as _best_time
from llama.model import ModelArgs

GB = 1e9
GIB = 2**30
N_SPECIAL = 256  # Llama 3 special tokens: the last 256 ids of the vocabulary
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- time


def sync(device: Optional[torch.device]) -> None:
    """Wait for the device's queued work (CUDA); nothing on a CPU."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: Optional[torch.device] = None, repeats: int = 5, median: bool = False) -> float:
    """Fastest (or median) of `repeats` timed calls after one warm-up, seconds: llama.runtime.cpu'
    best_time, with the device synchronized inside each timed call."""

    def call() -> None:
        fn()
        sync(device)

    sync(device)
    return _best_time(call, repeats, median=median)


# ---------------------------------------------------------------- memory


def _status_bytes(field: str) -> Optional[int]:
    """A field of /proc/self/status (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> float:
    """Resident memory of this process now, bytes (nan off Linux)."""
    rss = _status_bytes("VmRSS")
    return float("nan") if rss is None else float(rss)


def peak_rss() -> float:
    """Peak resident memory of this process so far, bytes. Linux's VmHWM starts afresh at exec, while
    getrusage's maxrss keeps the parent's peak from before the fork (so it is only the fallback)."""
    hwm = _status_bytes("VmHWM")
    return float(hwm) if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def warm_page_cache(paths: Sequence[Path]) -> None:
    """Read each file once, so that no measured run pays for the disk."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


# ---------------------------------------------------------------- memory bandwidth


def read_bandwidth(device: torch.device, n_bytes: int, repeats: int = 5) -> float:
    """GB/s of summing a float32 buffer of `n_bytes` (far bigger than the caches, for a ceiling)."""
    x = torch.ones(n_bytes // 4, device=device)
    return n_bytes / best_time(lambda: x.sum(), device, repeats) / GB


def bandwidth(device: torch.device, dtype: torch.dtype, n_bytes: int) -> dict:
    """Memory-bandwidth ceiling of this machine, GB/s, on buffers far bigger than the caches:
    `read` sums a float32 buffer, `copy` counts bytes read plus written, `gemv` is a one-row matrix
    product over one `dtype` matrix (how batch-1 decode reads weights; on a CPU the faster of oneDNN
    and PyTorch's own kernel). The ceiling is the fastest way of reading seen: the better of read and gemv."""
    read = read_bandwidth(device, n_bytes)
    x = torch.ones(n_bytes // 4, device=device)
    y = torch.empty_like(x)
    copy = 2 * n_bytes / best_time(lambda: y.copy_(x), device)
    del x, y
    cols = 4096
    size = dtype.itemsize
    w = torch.ones(n_bytes // 2 // (cols * size), cols, device=device, dtype=dtype)
    v = torch.ones(1, cols, device=device, dtype=dtype)
    gemv_s = best_time(lambda: torch.nn.functional.linear(v, w), device)
    if device.type == "cpu" and torch.backends.mkldnn.enabled:
        with torch.backends.mkldnn.flags(enabled=False):  # PyTorch's own kernel
            gemv_s = min(gemv_s, best_time(lambda: torch.nn.functional.linear(v, w), device))
    gemv = w.numel() * size / gemv_s
    del w
    bw = {"read": read, "copy": copy / GB, "gemv": gemv / GB}
    return {**bw, "ceiling": max(bw["read"], bw["gemv"])}


# ---------------------------------------------------------------- random checkpoints


def llama_params(dim: int, n_layers: int, vocab_size: int) -> dict:
    """A Llama 3-proportioned shape (head_dim 128, 2 query heads per KV head)."""
    n_heads = max(dim // 128, 1)
    return {
        "dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": max(n_heads // 2, 1),
        "vocab_size": vocab_size, "multiple_of": 256, "ffn_dim_multiplier": None, "norm_eps": 1e-5,
        "rope_theta": 500000.0,
    }


def random_state_dict(
    params: dict, dtype: torch.dtype, seed: int = 0, tied: bool = False, zero_special: bool = False,
    device: torch.device = torch.device("cpu"),
) -> dict:
    """Every weight of `params`' model, random, on the CPU: matrices normal scaled 1/sqrt(fan-in)
    (the embedding unscaled), norms 1. Every value is one bfloat16 holds exactly, so implementations
    in any dtype multiply the same numbers. tied: no output.weight (the 3.2 1B's tied embedding).
    zero_special: the special tokens' output rows are zero, so their logits are 0 while the largest
    ordinary logit is positive: greedy decoding never stops early, in any implementation.
    `device` draws the numbers there (faster on a GPU for large shapes)."""
    args = ModelArgs(**params)
    g = torch.Generator(device=device).manual_seed(seed)
    keys = sorted(checkpoint.expected_keys(args.n_layers) - ({checkpoint.TIED_KEY} if tied else set()))
    sd = {}
    for key in keys:
        shape = sharding.full_shape(key, args)
        if len(shape) == 1:
            sd[key] = torch.ones(shape, dtype=dtype)
            continue
        scale = 1.0 if key == "tok_embeddings.weight" else shape[1] ** -0.5
        w = torch.randn(shape, generator=g, device=device, dtype=torch.float32).mul_(scale)
        sd[key] = w.to(torch.bfloat16).to(dtype).cpu()
    if zero_special and not tied:
        sd[checkpoint.TIED_KEY][-N_SPECIAL:] = 0
    return sd


def write_random_checkpoint(out_dir: Path, params: dict, dtype: torch.dtype, shards: int = 1, **kwargs) -> dict:
    """A Meta checkpoint of random_state_dict(params, dtype, **kwargs) in `shards` shards; returns the
    state dict (whole, on the CPU)."""
    sd = random_state_dict(params, dtype, **kwargs)
    save.save_checkpoint(sd, params, out_dir, n_shards=shards)
    return sd


# ---------------------------------------------------------------- results


def print_table(rows: list) -> None:
    """Rows (flat dicts, the first column "metric") as an aligned text table."""
    columns = ["metric"] + list(dict.fromkeys(k for r in rows for k in r if k != "metric"))

    def fmt(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    table = [columns] + [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for n, line in enumerate(table):
        print(" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            print("-+-".join("-" * w for w in widths))


def machine() -> dict:
    """What ran the benchmark: CPU model and cores, GPU if any, OS."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "gpu": gpu,
            "system": f"{platform.system()} {platform.release()}"}


def command() -> str:
    """This run's command line, the script named from the repository root."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    return " ".join(["python", str(shown), *sys.argv[1:]])


def envelope(benchmark: str, results: dict, table: Optional[list] = None, headline: Optional[list] = None) -> dict:
    """The JSON a benchmark writes: its name, machine, date, command and torch version beside its own
    results (their keys at the top level), with, for benchmarks/render.py, `table` (rows: flat dicts,
    column -> value; default: the results' own "table") and `headline` (rows for the README's table:
    {"metric", "value"})."""
    return {
        "benchmark": benchmark, "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command(), "torch": torch.__version__, **results,
        "table": table if table is not None else results.get("table", []), "headline": headline or [],
    }


def write_json(path: Optional[str], data: dict) -> None:
    """Write `data` to `path` (nothing when path is None or empty)."""
    if path:
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")  # a killed run leaves the last whole JSON
