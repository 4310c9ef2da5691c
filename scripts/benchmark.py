#!/usr/bin/env python
"""Inference speed of this implementation against transformers.LlamaForCausalLM, in one run.

    python scripts/benchmark.py                                   # Llama 3.2 1B shape, CPU or CUDA
    python scripts/benchmark.py --shape small --quick             # seconds, for a smoke test
    python scripts/benchmark.py --n_layers 4 --out bench.json     # 1B width, 4 layers
    python scripts/benchmark.py --device cuda --shape llama3-8b --compile
    python scripts/benchmark.py --speculate                       # the demo model with its draft

A model of a published shape (llama.registry) gets random weights, saved once as a Meta checkpoint
and once as a Hugging Face directory (converted with llama/hf.py). Each implementation then runs in
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

Speculative decoding (--speculate, or --draft_ckpt_dir) is measured apart, on a trained model and
its draft (default: the bundled demo model and its draft; random weights would accept nothing):
batch-1 decode tokens/s without the draft and with it at each --speculate_k (both compiled with
--compile), the draft's acceptance rate, and whether greedy output is the model's own. Under
torchrun (the model sharded), the draft both replicated and sharded (--draft_parallel), side by side:

    torchrun --nproc_per_node 2 scripts/benchmark.py --speculate --speculate_k 3
"""
import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

from llama import cli, distributed, registry  # noqa: E402
from llama.runtime import probes  # noqa: E402
from llama.weights import hf, save  # noqa: E402
from llama.model import ModelArgs  # noqa: E402

# ours under each dtype policy and each weight quantization: the keyword arguments of Llama.build
# beside the run's own (--dtype, None by default: the measured policy of llama/kernels.py)
OURS = {
    "ours": {},
    "ours-bf16": {"dtype": "bfloat16"},
    "ours-f32": {"dtype": "float32"},
    "ours-compile": {"compile": True},
    "ours-int8": {"quantize": "int8"},
    "ours-int4": {"quantize": "int4"},
    "ours-w8a8": {"quantize": "w8a8"},  # int8 weights and activations (x86 CPUs), as llama.cpp's Q8_0 computes
}
IMPLS = (*OURS, "hf-eager", "hf-sdpa", "llama.cpp")
DEFAULT_IMPLS = ("ours", "hf-eager", "hf-sdpa")  # and ours-compile with --compile
# llama.cpp: the precisions compared with ours (bfloat16 weights, int8, int4), and the directory of
# a llama.cpp source tree built with cmake (build/bin/llama-bench); see the README, "Speed"
LLAMA_CPP_TYPES = ("BF16", "Q8_0", "Q4_0")
LLAMA_CPP_ENV = "LLAMA_CPP_DIR"
N_SPECIAL = 256  # Llama 3 special tokens: the last 256 ids of the vocabulary
SKIP_STEPS = 2  # decode steps left out of the steady-state rate (compilation, first-call set-up)
GB = 1e9


# ---------------------------------------------------------------- settings and prompts


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


def prompts(n: int, length: Union[int, list], vocab_size: int, seed: int) -> list[list[int]]:
    """`n` prompts of random ordinary tokens (no special ids), the same in every process."""
    g = torch.Generator().manual_seed(seed)
    lens = length if isinstance(length, list) else [length] * n
    return [torch.randint(0, vocab_size - N_SPECIAL, (k,), generator=g).tolist() for k in lens]


# ---------------------------------------------------------------- model files


def random_weights(params: dict, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    """A full Meta state dict of random weights (normal, scaled 1/sqrt(fan-in); norms 1), on the CPU.

    Every value is one bfloat16 holds exactly. The special tokens' output rows are zero, so their logits are 0 while the largest ordinary logit
    is positive: greedy decoding never stops early, in any implementation."""
    args = ModelArgs(**params)
    g = torch.Generator(device=device).manual_seed(seed)
    kv_dim, hidden = (args.n_kv_heads or args.n_heads) * args.head_dim, args.ffn_hidden_dim

    def mat(rows: int, cols: int, scale: Optional[float] = None) -> torch.Tensor:
        w = torch.randn(rows, cols, generator=g, device=device, dtype=torch.float32)
        # values bfloat16 holds exactly: implementations in any dtype (ours forced to float32 or
        # bfloat16, llama.cpp's BF16) then multiply the same numbers
        return w.mul_(scale if scale is not None else cols**-0.5).to(torch.bfloat16).to(dtype).cpu()

    sd = {"tok_embeddings.weight": mat(args.vocab_size, args.dim, 1.0)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        for name, (rows, cols) in {
            "attention.wq": (args.dim, args.dim),
            "attention.wk": (kv_dim, args.dim),
            "attention.wv": (kv_dim, args.dim),
            "attention.wo": (args.dim, args.dim),
            "feed_forward.w1": (hidden, args.dim),
            "feed_forward.w2": (args.dim, hidden),
            "feed_forward.w3": (hidden, args.dim),
        }.items():
            sd[p + name + ".weight"] = mat(rows, cols)
        sd[p + "attention_norm.weight"] = torch.ones(args.dim, dtype=dtype)
        sd[p + "ffn_norm.weight"] = torch.ones(args.dim, dtype=dtype)
    sd["norm.weight"] = torch.ones(args.dim, dtype=dtype)
    sd["output.weight"] = mat(args.vocab_size, args.dim)
    sd["output.weight"][-N_SPECIAL:] = 0
    return sd


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
    """Meta checkpoint (root/meta) and Hugging Face directory (root/hf) of the same random weights."""
    from safetensors.torch import save_file

    meta, hf_dir = root / "meta", root / "hf"
    sd = random_weights(params, dtype, device, seed)
    save.save_checkpoint(sd, params, meta)
    write_tokenizer(meta / "tokenizer.model", params["vocab_size"] - N_SPECIAL)
    hf_dir.mkdir(parents=True, exist_ok=True)
    config = hf.config_from_params(params, torch_dtype=hf.dtype_name(dtype))
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


# ---------------------------------------------------------------- timing helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device, repeats: int = 5) -> float:
    """Fastest of `repeats` timed calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def bandwidth(device: torch.device, dtype: torch.dtype, n_bytes: int) -> dict:
    """Memory-bandwidth ceiling of this machine, GB/s, on buffers far bigger than the caches:
    `read` sums a float32 buffer, `copy` counts bytes read plus written, `gemv` is a one-row matrix
    product over one `dtype` matrix (how batch-1 decode reads weights; on a CPU the faster of oneDNN
    and PyTorch's own kernel). The ceiling is the fastest way of reading seen: the better of read and gemv."""
    x = torch.ones(n_bytes // 4, device=device)
    y = torch.empty_like(x)
    read = n_bytes / best_time(lambda: x.sum(), device)
    copy = 2 * n_bytes / best_time(lambda: y.copy_(x), device)
    del x, y
    cols = 4096
    size = dtype.itemsize
    w = torch.ones(n_bytes // 2 // (cols * size), cols, device=device, dtype=dtype)
    v = torch.ones(1, cols, device=device, dtype=dtype)
    gemv_s = best_time(lambda: torch.nn.functional.linear(v, w), device)
    if device.type == "cpu" and torch.backends.mkldnn.enabled:
        torch.backends.mkldnn.enabled = False  # PyTorch's own kernel
        gemv_s = min(gemv_s, best_time(lambda: torch.nn.functional.linear(v, w), device))
        torch.backends.mkldnn.enabled = True
    gemv = w.numel() * size / gemv_s
    del w
    bw = {"read": read / GB, "copy": copy / GB, "gemv": gemv / GB}
    return {**bw, "ceiling": max(bw["read"], bw["gemv"])}


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_rss() -> float:
    """Peak resident memory of this process so far, GB. Linux's VmHWM starts afresh at exec, while
    getrusage's maxrss keeps the parent's peak from before the fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


# ---------------------------------------------------------------- the implementations under test


class Skip(Exception):
    """An implementation that cannot run here (not built, not on this branch): a note, not a failure."""


class Ours:
    """Llama.build from the Meta checkpoint; greedy through its public generate/stream."""

    def __init__(self, spec: dict, impl: str):
        import inspect

        from llama import Llama

        kwargs = {"dtype": spec["dtype_arg"], **OURS[impl]}
        if "quantize" in kwargs and "quantize" not in inspect.signature(Llama.build).parameters:
            raise Skip("Llama.build takes no quantize= in this checkout (the quantization work adds it)")
        self.llama = Llama.build(
            spec["files"]["meta"], spec["files"]["tokenizer"], max_seq_len=spec["settings"]["max_seq_len"],
            max_batch_size=8, device=spec["device"], **kwargs,
        )

    def describe(self) -> dict:
        """The weights as loaded: their dtype, the bytes a decode step reads (all but the embedding
        table), and the kernel policy."""
        from llama.kv_cache import KVCache

        model = self.llama.model
        policy = getattr(model, "policy", None)
        held = {}  # parameters and buffers (quantized weights and scales are buffers), each tensor once
        for name, module in model.named_modules():
            if not isinstance(module, KVCache) and not name.startswith("tok_embeddings"):
                for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                    held[t.data_ptr()] = t.nbytes
        packed = sum(getattr(m, "packed_bytes", 0) for m in model.modules())  # w8a8's prepacked int8 weights
        wk = model.layers[0].attention.wk
        return {
            "weights_dtype": "int8" if hasattr(wk, "packed") else hf.dtype_name(wk.weight.dtype),
            "weight_bytes": sum(held.values()) + packed,
            "kv_itemsize": model.layers[0].attention.kv_cache.k.dtype.itemsize,
            **({"policy": policy.describe()} if policy is not None else {}),
        }

    def stream(self, prompts: list, n_new: int) -> tuple[list, list]:
        """(time after each step's token, new tokens per row)."""
        times, out = [], [[] for _ in prompts]
        for step in self.llama.stream(prompts, n_new, temperature=0):
            times.append(time.perf_counter())
            for t in step:
                out[t.index].append(t.token)
        return times, out

    def generate(self, prompts: list, n_new: int) -> list:
        return self.llama.generate(prompts, n_new, temperature=0)[0]


class Original:
    """Meta's original generation loop on our model: prompts of a batch are fed one token per step
    from the shortest prompt's end, with full float32 logits of every fed token (the baseline that
    mixed-length prefill replaces)."""

    def __init__(self, ours: Ours):
        self.model, self.stop = ours.llama.model, ours.llama.tokenizer.stop_tokens

    @torch.inference_mode()
    def generate(self, prompts: list, n_new: int) -> list:
        device = self.model.tok_embeddings.weight.device
        bsz, lens = len(prompts), [len(p) for p in prompts]
        total_len = max(lens) + n_new
        self.model.setup_cache(bsz, total_len)
        tokens = torch.full((bsz, total_len), -1, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p, device=device)
        is_prompt = tokens != -1
        stop = torch.tensor(self.stop, device=device)
        eos = torch.zeros(bsz, dtype=torch.bool, device=device)
        prev = 0
        for cur in range(min(lens), total_len):
            logits = self.model.forward(tokens[:, prev:cur], prev)
            next_token = torch.where(is_prompt[:, cur], tokens[:, cur], logits[:, -1].argmax(-1))
            tokens[:, cur] = next_token
            eos |= ~is_prompt[:, cur] & torch.isin(next_token, stop)
            prev = cur
            if bool(eos.all()):
                break
        return [tokens[i, n : n + n_new].tolist() for i, n in enumerate(lens)]


class HF:
    """transformers.LlamaForCausalLM.from_pretrained of the converted directory; greedy through
    model.generate with exactly n_new tokens, prompts left-padded as transformers expects."""

    def __init__(self, spec: dict, attn: str):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.device = torch.device(spec["device"])
        dtype = getattr(torch, spec["dtype"])
        self.model = transformers.LlamaForCausalLM.from_pretrained(
            spec["files"]["hf"], dtype=dtype, attn_implementation=attn
        ).to(self.device).eval()

    def _inputs(self, prompts: list) -> dict:
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    @torch.inference_mode()
    def _generate(self, prompts: list, n_new: int, streamer=None) -> list:
        inputs = self._inputs(prompts)
        out = self.model.generate(
            **inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0, streamer=streamer
        )
        return out[:, inputs["input_ids"].shape[1] :].tolist()

    def stream(self, prompts: list, n_new: int) -> tuple[list, list]:
        times = []

        class Clock:  # transformers calls put() with the prompt, then once per new token
            def put(self, value):
                times.append(time.perf_counter())

            def end(self):
                pass

        out = self._generate(prompts, n_new, Clock())
        return times[1:], out

    def generate(self, prompts: list, n_new: int) -> list:
        return self._generate(prompts, n_new)


# ---------------------------------------------------------------- one implementation, in its own process


def worker(spec_path: str, out_path: str) -> None:
    """Load one implementation and run every scenario; write {name: results} (or the note of a
    skipped implementation) as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    impl = spec["impl"]
    try:
        out = llama_cpp(spec) if impl == "llama.cpp" else {impl: run_impl(spec)}
    except Skip as e:
        out = {"skipped": str(e)}
    Path(out_path).write_text(json.dumps(out))
    distributed.shutdown()


def run_impl(spec: dict) -> dict:
    s, impl, device = spec["settings"], spec["impl"], torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if impl.startswith("ours"):
        distributed.setup(device)
    vocab = spec["params"]["vocab_size"]
    result = {"impl": impl}

    start = time.perf_counter()
    runner = Ours(spec, impl) if impl.startswith("ours") else HF(spec, impl[3:])
    sync(device)
    result["load_s"] = time.perf_counter() - start
    result["load_peak_rss_gb"] = peak_rss()

    # warm-up: first-call set-up of kernels (and, compiled, the batch-1 decode graph)
    runner.generate(prompts(1, 8, vocab, 0), 4)
    if impl.startswith("ours"):  # what it loaded, its KV cache now allocated
        result.update(runner.describe())

    def timed_stream(batch: int, length: int, n_new: int, seed: int) -> tuple[dict, list]:
        batch_prompts = prompts(batch, length, vocab, seed)
        sync(device)
        start = time.perf_counter()
        times, tokens = runner.stream(batch_prompts, n_new)
        sync(device)
        end = time.perf_counter()
        out = {"batch": batch, "prompt": length, "new": n_new, "ttft_s": times[0] - start, "total_s": end - start}
        if n_new > SKIP_STEPS + 1:
            steady = times[SKIP_STEPS:]
            out["step_s"] = (steady[-1] - steady[0]) / (len(steady) - 1)
            out["tokens_per_s"] = batch / out["step_s"]
            out["context"] = length + SKIP_STEPS + len(steady) / 2  # mean context of the timed steps
        return out, tokens

    decode = {}
    for name, length, n_new, batches in (
        ("short", s["short_prompt"], s["short_new"], s["short_batches"]),
        ("long", s["long_prompt"], s["long_new"], s["long_batches"]),
    ):
        for batch in batches:
            print(f"[{impl}] decode {name} context, batch {batch}", file=sys.stderr, flush=True)
            decode[f"{name}_b{batch}"], tokens = timed_stream(batch, length, n_new, seed=batch)
            if name == "short" and batch == 1:
                result["greedy_tokens"] = tokens[0]
    result["decode"] = decode

    print(f"[{impl}] prefill {s['prefill_len']} tokens", file=sys.stderr, flush=True)
    runs = [timed_stream(1, s["prefill_len"], 1, seed=11)[0] for _ in range(2)]  # the first may set up kernels
    ttft = min(r["ttft_s"] for r in runs)
    result["prefill"] = {"tokens": s["prefill_len"], "ttft_s": ttft, "tokens_per_s": s["prefill_len"] / ttft}

    def mixed(gen: Callable[[list, int], list], warm: bool) -> dict:
        batch_prompts = prompts(8, s["mixed_lens"], vocab, seed=12)
        if warm:  # compiled: the batch-8 graph for this cache size
            gen(batch_prompts, 3)
        sync(device)
        start = time.perf_counter()
        tokens = gen(batch_prompts, s["mixed_new"])
        sync(device)
        seconds = time.perf_counter() - start
        n = sum(len(t) for t in tokens)
        return {"lens": s["mixed_lens"], "new_tokens": n, "seconds": seconds, "tokens_per_s": n / seconds}, tokens

    print(f"[{impl}] mixed-length batch of 8", file=sys.stderr, flush=True)
    result["mixed"], tokens = mixed(runner.generate, warm=OURS.get(impl, {}).get("compile", False))
    if impl == "ours" and spec.get("baseline", True):
        print(f"[{impl}] mixed-length batch, one token per step (original loop)", file=sys.stderr, flush=True)
        result["original_loop"], base_tokens = mixed(Original(runner).generate, warm=False)
        same = sum(a == b for x, y in zip(tokens, base_tokens) for a, b in zip(x, y))
        result["original_loop"]["same_tokens"] = same / max(1, result["mixed"]["new_tokens"])

    result["peak_rss_gb"] = peak_rss()
    if device.type == "cuda":
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / GB
    return result


# ---------------------------------------------------------------- llama.cpp, when built


def llama_cpp_tools(root: Optional[str]) -> dict:
    """Paths of a built llama.cpp tree (convert_hf_to_gguf.py, llama-quantize, llama-bench), or Skip."""
    if not root:
        raise Skip(f"llama.cpp not given: set {LLAMA_CPP_ENV} or --llama_cpp to a built llama.cpp tree")
    root_path = Path(root)
    tools = {
        "root": root_path,
        "convert": root_path / "convert_hf_to_gguf.py",
        "quantize": root_path / "build" / "bin" / "llama-quantize",
        "bench": root_path / "build" / "bin" / "llama-bench",
    }
    missing = [str(p) for p in tools.values() if not p.exists()]
    if missing:
        raise Skip(f"llama.cpp at {root} is not built: missing {', '.join(missing)}")
    return tools


def quiet(cmd: list) -> str:
    """Run `cmd`; its stdout, or RuntimeError with the end of what it wrote when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}")
    return proc.stdout


def llama_cpp(spec: dict) -> dict:
    """llama.cpp on the same weights: our to_hf output read by its convert_hf_to_gguf.py (BF16),
    quantized by llama-quantize (Q8_0, Q4_0), all three timed by llama-bench in one call: decode
    of short_new tokens after a short_prompt context (-d, its depth) and prefill of prefill_len."""
    from llama.weights import convert

    tools = llama_cpp_tools(spec.get("llama_cpp"))
    if spec["device"] != "cpu":
        raise Skip("llama.cpp is built here for the CPU only")
    s, work = spec["settings"], Path(spec["work_dir"]) / "llama.cpp"
    hf_dir = work / "hf"
    with contextlib.redirect_stdout(sys.stderr):  # to_hf's progress
        convert.to_hf(spec["files"]["meta"], str(hf_dir))
    files = {"BF16": work / "model-bf16.gguf"}
    # Llama 3 has no sentencepiece model (its converter tries one first, and needs that package to
    # find out); and it recognises a tokenizer by hashing its ids for a test string: the benchmark's
    # random vocabulary has Llama 3's pre-tokenizer (to_hf writes it) but no known hash, so it is named.
    run_convert = """
import runpy, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
from conversion import base
def no_sentencepiece(self, *args, **kwargs):
    raise FileNotFoundError("Llama 3 has no sentencepiece model")
base.TextModel._set_vocab_sentencepiece = no_sentencepiece
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "llama-bpe"
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
    quiet(
        [sys.executable, "-c", run_convert, str(tools["root"]), str(tools["convert"]), str(hf_dir),
         "--outtype", "bf16", "--outfile", str(files["BF16"])]
    )
    for kind in LLAMA_CPP_TYPES[1:]:
        files[kind] = work / f"model-{kind.lower()}.gguf"
        quiet([str(tools["quantize"]), str(files["BF16"]), str(files[kind]), kind])
    threads = spec.get("threads") or torch.get_num_threads()
    cmd = [str(tools["bench"]), "-o", "json", "-t", str(threads), "-r", "3", "-p", str(s["prefill_len"]),
           "-n", str(s["short_new"]), "-d", f"0,{s['short_prompt']}"]
    results, failed = {}, {}
    for kind in LLAMA_CPP_TYPES:  # one call each: a precision whose kernels crash leaves the others
        print("[llama.cpp] " + " ".join(cmd + ["-m", str(files[kind])]), file=sys.stderr, flush=True)
        try:
            mine = json.loads(quiet(cmd + ["-m", str(files[kind])]))
        except RuntimeError as e:
            failed[kind] = str(e).split(":")[0]  # "llama-bench failed (exit code)"
            print(f"[llama.cpp] {kind} left out: {failed[kind]}", file=sys.stderr, flush=True)
            continue
        name = f"llama.cpp-{kind}"
        # decode after the short prompt's context, prefill from an empty one, as ours are timed
        tg = next(r for r in mine if r["n_gen"] > 0 and r.get("n_depth", 0) == s["short_prompt"])
        pp = next(r for r in mine if r["n_prompt"] > 0 and r.get("n_depth", 0) == 0)
        results[name] = {
            "impl": name, "file_gb": files[kind].stat().st_size / GB,
            "decode": {"short_b1": {"batch": 1, "prompt": s["short_prompt"], "new": s["short_new"],
                                    "context": s["short_prompt"] + s["short_new"] / 2, "tokens_per_s": tg["avg_ts"]}},
            "prefill": {"tokens": s["prefill_len"], "tokens_per_s": pp["avg_ts"], "ttft_s": s["prefill_len"] / pp["avg_ts"]},
        }
    if not results:
        raise RuntimeError(f"llama-bench failed at every precision: {failed}")
    return results


# ---------------------------------------------------------------- report


def decode_share(entry: dict, bytes_: dict, ceiling: float) -> float:
    """Measured tokens/s over what the bandwidth ceiling allows for this step's reads."""
    batch = entry["batch"]
    step_bytes = bytes_["weights"] + batch * entry["context"] * bytes_["kv_per_token"]
    return entry["tokens_per_s"] / (batch * ceiling * GB / step_bytes)


def impl_bytes(result: dict, bytes_: dict, itemsize: int) -> dict:
    """Bytes a decode step of this implementation reads: its own weights as loaded (quantized, or in
    the dtype its policy holds them in) where it reported them, else the run's dtype."""
    if "weight_bytes" not in result:
        return bytes_
    kv = bytes_["kv_per_token"] // itemsize * result["kv_itemsize"]
    return {"weights": result["weight_bytes"], "kv_per_token": kv}


# Ratios printed under the table: (name, numerator, denominator or a tuple whose best is taken)
POLICY_VS_FORCED = ("ours", ("ours-bf16", "ours-f32"))
SAME_PRECISION = (
    ("ours-bf16", "llama.cpp-BF16"), ("ours-int8", "llama.cpp-Q8_0"), ("ours-w8a8", "llama.cpp-Q8_0"),
    ("ours-int4", "llama.cpp-Q4_0"),
)
QUANT_VS_BF16 = (("ours-int8", "ours-bf16"), ("ours-w8a8", "ours-bf16"), ("ours-int4", "ours-bf16"))


def report(results: dict, bw: dict, bytes_: dict, itemsize: int = 2) -> tuple[list, dict]:
    """Table rows: each metric per implementation; for ours and ours compiled their ratio to the
    best transformers run; for decode each of ours' share of the bandwidth ceiling (and of the GEMV
    rate); the default policy over the better of forced bfloat16 and float32. Also the ratios by name:
    those, quantized over bfloat16, and ours beside llama.cpp at each precision."""
    impls = list(results)
    ours = [i for i in impls if i.startswith("ours")]
    main = [i for i in ours if i in ("ours", "ours-compile")]
    hf_impls = [i for i in impls if i.startswith("hf-")]
    policy, forced = POLICY_VS_FORCED[0], [i for i in POLICY_VS_FORCED[1] if i in results]
    rows, ratios = [], {}

    def add(
        metric: str, values: dict, higher_better: bool = True, share: Optional[Callable] = None, speed: bool = False
    ) -> None:
        row = {"metric": metric, **values}
        better = max if higher_better else min
        hf_values = [values[i] for i in hf_impls if i in values]
        if hf_values:
            ref = better(hf_values)
            for o in main:
                if o in values:
                    row[f"{o} / hf"] = ratios[f"{metric}: {o} / best hf"] = (
                        values[o] / ref if higher_better else ref / values[o]
                    )
        if speed and policy in values and len(forced) == 2 and all(f in values for f in forced):
            ref = better(values[f] for f in forced)
            row["ours / best forced"] = ratios[f"{metric}: ours / best of forced bf16, f32"] = (
                values[policy] / ref if higher_better else ref / values[policy]
            )
        for num, den in (*QUANT_VS_BF16, *SAME_PRECISION):
            if num in values and den in values:
                ratios[f"{metric}: {num} / {den}"] = values[num] / values[den]  # as measured: speed-up or fraction
        if share:  # of the ceiling, and of the best one-row GEMV seen (the kernel's own limit)
            for o in ours:
                if o in values:
                    row[f"{o} / ceiling"] = ratios[f"{metric}: {o} / ceiling"] = share(o, bw["ceiling"])
            if hf_values:
                row["hf / ceiling"] = max(share(i, bw["ceiling"]) for i in hf_impls if i in values)
            for o in main:
                if o in values:
                    row[f"{o} / gemv"] = ratios[f"{metric}: {o} / gemv"] = share(o, bw["gemv"])
        rows.append(row)

    def having(*keys: str) -> dict:
        out = {}
        for i, r in results.items():
            for k in keys:
                r = r.get(k) if isinstance(r, dict) else None
            if r is not None:
                out[i] = r
        return out

    decode_keys = list(dict.fromkeys(k for r in results.values() for k in r.get("decode", {})))
    for key in decode_keys:
        entries = having("decode", key)
        e = next(iter(entries.values()))
        add(
            f"decode tok/s, batch {e['batch']}, context {round(e['context'])}",
            {i: x["tokens_per_s"] for i, x in entries.items()},
            speed=True,
            share=lambda i, bw_gb_s, entries=entries: decode_share(
                entries[i], impl_bytes(results[i], bytes_, itemsize), bw_gb_s
            ),
        )
    prefill = having("prefill")
    n_prefill = next(iter(prefill.values()))["tokens"]
    add(f"prefill tok/s, {n_prefill}-token prompt", {i: r["tokens_per_s"] for i, r in prefill.items()}, speed=True)
    add("time to first token, s", {i: r["ttft_s"] for i, r in prefill.items()}, higher_better=False)
    mixed = having("mixed")
    if mixed:
        lens = next(iter(mixed.values()))["lens"]
        add(f"batch of 8, {lens[0]}..{lens[-1]} tokens, end-to-end tok/s", {i: r["tokens_per_s"] for i, r in mixed.items()})
    if "original_loop" in results.get("ours", {}):
        base = results["ours"]["original_loop"]["tokens_per_s"]
        rows.append({"metric": "  the same, original one-token-per-step feeding", "ours": base})
        ratios["batch of 8: ours / original loop"] = results["ours"]["mixed"]["tokens_per_s"] / base
    for metric, key in (("load time, s", "load_s"), ("peak resident memory after loading, GB", "load_peak_rss_gb"),
                        ("peak resident memory, GB", "peak_rss_gb"), ("model file, GB", "file_gb")):
        values = having(key)
        if values:
            add(metric, values, higher_better=False)
    gpu = having("peak_gpu_gb")
    if gpu and len(gpu) == len(having("load_s")):
        add("peak GPU memory, GB", gpu, higher_better=False)
    return rows, ratios


def print_table(rows: list) -> None:
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


# ---------------------------------------------------------------- speculative decoding

# what the demo model knows (Python's documentation), to continue
SPECULATE_TOP_P = 0.9  # sampling runs (--temperature > 0)
SPECULATE_PROMPTS = (
    "The list data type has some more methods. Here are all of the methods of list objects:",
    "A dictionary is",
    "The for statement in Python",
    "To open a file for reading,",
)


def speculative(
    ckpt_dir: Optional[str], tokenizer_path: Optional[str], draft_ckpt_dir: Optional[str], ks: list, quick: bool,
    device: torch.device, dtype: Optional[str], temperature: float, n_new: Optional[int], compile: bool = False,
    rounds: int = 3, parallels: Sequence[str] = ("replicated",),
) -> dict:
    """Batch-1 decode of each prompt without the draft, then with it at each k: tokens/s after the
    first token (so prefill is left out), the median of `rounds` rounds that each run every
    configuration once (so a slow spell of the machine falls on all of them alike), the acceptance
    rate, and (greedy) the tokens compared. `compile`: both models' forward passes compiled.
    Under torchrun, the draft held each way of `parallels` (Llama.build's draft_parallel), one
    model each, all in the same rounds; on one process only the first (the layouts are the same)."""
    from llama import Llama, speculative as spec_module
    from llama.demo import resolve_draft, resolve_paths

    for k in ks:
        spec_module.check_k(k)
    build = dict(max_seq_len=256, max_batch_size=1, device=device, dtype=dtype, compile=compile)
    draft_ckpt_dir = resolve_draft(ckpt_dir, draft_ckpt_dir, True)
    ckpt_dir, tokenizer_path = resolve_paths(ckpt_dir, tokenizer_path)
    plain = Llama.build(ckpt_dir, tokenizer_path, **build)
    if distributed.model_parallel_size() == 1:
        parallels = list(parallels)[:1]
    specs = {how: Llama.build(ckpt_dir, tokenizer_path, draft_ckpt_dir=draft_ckpt_dir, speculate_k=ks[0],
                              draft_parallel=how, **build) for how in parallels}
    configs = [(k, how) for how in specs for k in ks]

    def name(k: Union[int, str], how: str) -> str:
        return f"k={k}" if len(specs) == 1 else f"k={k}, {how} draft"

    spec = specs[parallels[0]]  # the one whose passes are profiled
    n_new = n_new or (16 if quick else 96)
    prompts = [plain.tokenizer.encode(p, bos=True, eos=False) for p in SPECULATE_PROMPTS[: 2 if quick else None]]

    def decode(llama) -> tuple[float, list]:
        """Decode tokens/s over all prompts (after each one's first token), and the tokens."""
        seconds, n, out = 0.0, 0, []
        for i, prompt in enumerate(prompts):
            times, tokens = [], []
            for step in llama.stream([prompt], n_new, temperature=temperature, top_p=SPECULATE_TOP_P, seed=i):
                times.append(time.perf_counter())
                tokens += [t.token for t in step]
            seconds += times[-1] - times[0]
            n += len(tokens) - 1  # the first token comes with the prefill
            out.append(tokens)
        return n / seconds, out

    def at_k(k: Union[int, str], how: str) -> tuple[float, list]:
        speculator = specs[how].speculator
        speculator.set_k(k)
        speculator.proposed, speculator.accepted = 0, 0
        return decode(specs[how])

    decode(plain)  # warm-up: first-call set-up of kernels (compiled: each k's verify pass)
    for config in configs:
        at_k(*config)
    rates: dict = {"plain": []}
    seen = {}  # (k, how) -> (acceptance, tokens): the same in every round
    for _ in range(rounds):
        rate, want = decode(plain)
        rates["plain"].append(rate)
        for config in configs:
            rate, got = at_k(*config)
            rates.setdefault(config, []).append(rate)
            seen[config] = specs[config[1]].speculator.acceptance_rate, got
    plain_rate = statistics.median(rates["plain"])
    runs = {"plain": {"tokens_per_s": plain_rate}}
    for k, how in configs:  # one draft per layout, loaded once: only k changes
        rate = statistics.median(rates[k, how])
        run = runs[name(k, how)] = {"k": k, "tokens_per_s": rate, "acceptance": seen[k, how][0], "speedup": rate / plain_rate}
        if len(specs) > 1:
            run["draft"] = how
        if temperature == 0:
            run["same_tokens"] = seen[k, how][1] == want

    def forward_ms(forward: Callable[[torch.Tensor], object], n: int) -> float:
        """One forward pass of n tokens at position 64 of cache row 0 (past every live position), ms;
        in inference mode, as the engine runs (compiled passes called with autograd on would
        recompile, and fail on the KV cache's in-place writes)."""
        tokens = torch.tensor([prompts[0][:n]], device=device)
        with torch.inference_mode():
            return 1e3 * best_time(lambda: forward(tokens), device, repeats=10)

    # where a step's time goes: k draft steps and one verify pass of k + 1 tokens, against one
    # decode step; compiled, the passes the engine ran (over the cache it has: a new one recompiles)
    rows = 1 if compile else None
    if not compile:
        spec.model.setup_cache(1, 256)
        spec.speculator.fit(1, 256)
    position = torch.tensor([64], device=device)

    def model_pass(tokens: torch.Tensor) -> object:
        logits = spec._compiled(tokens, position) if compile else None  # None: eager (or compilation failed)
        return spec.model(tokens, 64) if logits is None else logits

    profile = {"model, 1 token": forward_ms(model_pass, 1),
               "draft, 1 token": forward_ms(lambda t: spec.speculator._forward(t, [64], rows), 1)}
    fixed = [k for k in ks if k != spec_module.AUTO]
    for k in fixed:
        profile[f"model, {k + 1} tokens"] = forward_ms(model_pass, k + 1)
    compiled = spec.speculator.compiled
    if compiled and compiled.greedy and temperature == 0:  # compiled greedy steps: k draft steps and the verify pass in one call
        for k in fixed:
            spec.speculator.set_k(k)
            profile[f"greedy step of k={k} in one call"] = forward_ms(
                lambda t: spec.speculator._compiled(compiled.greedy, t, [64], rows), 1)
    if compiled and compiled.sampling and temperature > 0:  # the same with the draws and rejection sampling
        for k in fixed:
            spec.speculator.set_k(k)
            drawn = (torch.tensor([temperature], device=device), torch.tensor([SPECULATE_TOP_P], device=device),
                     torch.rand(1, 2 * k + 1, device=device))
            profile[f"sampling step of k={k} in one call"] = forward_ms(
                lambda t: spec.speculator._compiled(compiled.sampling, t, [64], rows, drawn), 1)
    return {"ckpt_dir": ckpt_dir, "draft_ckpt_dir": draft_ckpt_dir, "temperature": temperature, "new_tokens": n_new,
            "compiled": compile, "rounds": rounds, "prompts": len(prompts), "device": str(device), "threads": torch.get_num_threads(),
            "processes": distributed.model_parallel_size(), "runs": runs,
            "policy": plain.model.policy.describe() if plain.model.policy else None, "profile_ms": profile}


def print_speculative(result: dict) -> None:
    rows = [{"metric": name, "k": r.get("k"), "acceptance": r.get("acceptance"),
             "decode tok/s, batch 1": r["tokens_per_s"], "speed-up": r.get("speedup"),
             "same tokens": r.get("same_tokens")} for name, r in result["runs"].items()]
    print(f"{result['ckpt_dir']} with draft {result['draft_ckpt_dir']}, temperature {result['temperature']}, "
          f"{result['prompts']} prompts x {result['new_tokens']} new tokens, {result['device']}, {result['threads']} threads"
          f"{', %d processes' % result['processes'] if result.get('processes', 1) > 1 else ''}"
          f"{', compiled' if result.get('compiled') else ''}, median of {result.get('rounds', 1)} rounds")
    print_table(rows)
    print("forward pass, ms: " + ", ".join(f"{name} {ms:.2f}" for name, ms in result["profile_ms"].items()))
    if result["policy"]:
        print(f"kernel policy: {result['policy']}")


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
    speculate: bool = False,
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    draft_ckpt_dir: Optional[str] = None,
    speculate_k: Union[int, str, tuple] = "2,3,4,6",
    temperature: float = 0.0,
    new_tokens: Optional[int] = None,
    draft_parallel: Union[str, tuple] = "replicated,sharded",
) -> dict:
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
        compile: also run ours with compile=True (torch.compile of the decode step); with --speculate,
            both models compiled (plain decode steps, the draft's steps and the verify passes).
        impls: comma-separated, from ours (the dtype policy), ours-bf16 and ours-f32 (forced dtypes),
            ours-compile, ours-int8, ours-int4 and ours-w8a8 (quantized), hf-eager, hf-sdpa, llama.cpp
            (BF16, Q8_0 and Q4_0 of the same weights). Default: ours, hf-eager, hf-sdpa (and
            ours-compile with --compile).
        baseline: also time the original's one-token-per-step prompt feeding on our model.
        llama_cpp: a llama.cpp source tree built with cmake, for the llama.cpp implementation
            (default: $LLAMA_CPP_DIR); skipped with a note when absent or not built.
        threads: CPU threads for every implementation (default: torch's default).
        out: write all results as JSON here (also after each implementation, marked incomplete).
        seed: seed of the random weights and prompts.
        speculate: measure speculative decoding instead (see the top): the model of ckpt_dir and
            tokenizer_path (default: the bundled demo model) with draft_ckpt_dir (default: the demo's draft).
        ckpt_dir, tokenizer_path: with --speculate, a trained Meta checkpoint and its tokenizer.
        draft_ckpt_dir: its draft model; implies --speculate.
        speculate_k: with --speculate, the draft tokens per step to try, comma-separated; auto: adaptive.
        temperature: with --speculate, 0 (greedy) or sampling at this temperature (top_p 0.9).
        new_tokens: with --speculate, tokens generated per prompt (default 96; 16 with --quick).
        draft_parallel: with --speculate under torchrun, how the draft is held, comma-separated from
            replicated and sharded (each measured in the same rounds); on one process, replicated.
    """
    if speculate or draft_ckpt_dir is not None:
        from llama.speculative import AUTO, check_draft_parallel

        ks = [k if k == AUTO else int(k) for k in cli.split_list(speculate_k)]
        parallels = cli.split_list(draft_parallel)
        for how in parallels:
            check_draft_parallel(how)
        if threads:
            torch.set_num_threads(int(threads))
        distributed.setup(distributed.resolve_device(device))
        result = speculative(ckpt_dir, tokenizer_path, draft_ckpt_dir, ks, quick, distributed.resolve_device(device),
                             dtype, float(temperature), new_tokens, compile, 1 if quick else 3, parallels)
        if distributed.is_rank0():
            print_speculative(result)
            if out:
                Path(out).write_text(json.dumps(result, indent=2))
                print(f"wrote {out}")
        distributed.shutdown()
        return result
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
        f"{shape}{f' with {n_layers} layers' if n_layers else ''} on {dev} in {hf.dtype_name(dt)}: "
        f"{bytes_['weights'] / GB:.2f} GB of weights read per decode step, "
        f"{bytes_['kv_per_token'] / 1e3:.1f} KB of KV cache per token of context",
        flush=True,
    )
    # buffers far bigger than the last-level cache (32 MB here, 50 MB on an H100); smaller with --quick
    bw_bytes = (2**28 if quick else 2**30) * (4 if dev.type == "cuda" else 1)
    bw = bandwidth(dev, dt, bw_bytes)
    empty_cache(dev)
    print("memory bandwidth, GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in bw.items()), flush=True)

    header = {
        "shape": shape, "params": params, "device": str(dev), "dtype": hf.dtype_name(dt),
        "torch": torch.__version__, "threads": threads or torch.get_num_threads(), "settings": s, "bytes": bytes_,
    }
    results, skipped = {}, {}
    with tempfile.TemporaryDirectory(prefix="llama-bench-") as tmp:
        start = time.perf_counter()
        files = write_models(Path(tmp), params, dt, dev, seed)
        empty_cache(dev)  # the workers need the GPU memory
        print(f"wrote both checkpoints in {time.perf_counter() - start:.1f}s", flush=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
        for impl in impls:
            spec = {
                "impl": impl, "params": params, "settings": s, "files": files, "device": str(dev),
                "dtype": hf.dtype_name(dt), "dtype_arg": dtype, "threads": threads, "baseline": baseline,
                "llama_cpp": llama_cpp or os.environ.get(LLAMA_CPP_ENV), "work_dir": tmp,
            }
            spec_path, out_path = Path(tmp) / f"{impl}.json", Path(tmp) / f"{impl}.out.json"
            spec_path.write_text(json.dumps(spec))
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "_worker", str(spec_path), str(out_path)], env=env)
            if proc.returncode != 0 or not out_path.is_file():
                print(f"[{impl}] failed (exit code {proc.returncode}); left out of the table", flush=True)
                continue
            done = json.loads(out_path.read_text())
            if "skipped" in done:
                skipped[impl] = done["skipped"]
                print(f"[{impl}] skipped: {done['skipped']}", flush=True)
                continue
            results.update(done)
            print(f"[{impl}] done in {time.perf_counter() - start:.0f}s", flush=True)
            if out:  # what is done survives a run cut short (a time limit on a lent GPU, say)
                partial = {**header, "complete": False, "bandwidth_gb_s": bw, "results": results, "skipped": skipped}
                Path(out).write_text(json.dumps(partial, indent=2))
    if not results:
        raise SystemExit("no implementation ran")
    # measured again at the end: on a shared machine the better of the two is nearer the truth
    bw = {k: max(v, w) for (k, v), w in zip(bw.items(), bandwidth(dev, dt, bw_bytes).values())}
    print("memory bandwidth, GB/s, best of start and end: " + ", ".join(f"{k} {v:.1f}" for k, v in bw.items()))

    rows, ratios = report(results, bw, bytes_, dt.itemsize)
    print()
    print_table(rows)
    print()
    if "batch of 8: ours / original loop" in ratios:
        print(f"batch of 8 of mixed lengths: ours is {ratios['batch of 8: ours / original loop']:.2f}x the original's "
              "one-token-per-step prompt feeding on the same model")
    if "hf-eager" in results and "ours" in results:
        same = sum(a == b for a, b in zip(results["ours"]["greedy_tokens"], results["hf-eager"]["greedy_tokens"]))
        print(f"greedy tokens of ours and hf-eager agree on {same}/{len(results['ours']['greedy_tokens'])} (short decode, batch 1)")
    for name, value in ratios.items():
        if "best of forced" in name or any(f"{a} / {b}" in name for a, b in (*QUANT_VS_BF16, *SAME_PRECISION)):
            print(f"{name}: {value:.2f}")
    for impl, r in results.items():
        if "policy" in r:
            print(f"{impl}: {r['policy']}")
    for impl, why in skipped.items():
        print(f"{impl} skipped: {why}")
    summary = {
        **header, "complete": True, "bandwidth_gb_s": bw, "results": results, "skipped": skipped,
        "table": rows, "ratios": ratios,
    }
    if out:
        Path(out).write_text(json.dumps(summary, indent=2))
        print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    if sys.argv[1:2] == ["_worker"]:
        worker(*sys.argv[2:4])
    else:
        cli.run(main, serialize=lambda _: None)
