"""The implementations the generation benchmark (bench_generate.py) compares, each run in its own
process: ours (Llama.build, under each dtype policy and quantization), Meta's one-token-per-step loop
on our model, transformers.LlamaForCausalLM, and llama.cpp when a built tree is given.

`worker` runs one of them on every scenario and writes its results as JSON."""
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from common import GB, N_SPECIAL, peak_rss, sync
from llama import distributed
from llama.runtime import policy as kernel_policy
from llama.engine.runner import call_model

# ours under each dtype policy and each weight quantization: the keyword arguments of Llama.build
# beside the run's own (--dtype, None by default: the measured policy of llama/runtime/)
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
# a llama.cpp source tree built with cmake (build/bin/llama-bench); see docs/benchmarks.md
LLAMA_CPP_TYPES = ("BF16", "Q8_0", "Q4_0")
LLAMA_CPP_ENV = "LLAMA_CPP_DIR"
SKIP_STEPS = 2  # decode steps left out of the steady-state rate (compilation, first-call set-up)


def prompts(n: int, length: Union[int, list], vocab_size: int, seed: int) -> list[list[int]]:
    """`n` prompts of random ordinary tokens (no special ids), the same in every process."""
    g = torch.Generator().manual_seed(seed)
    lens = length if isinstance(length, list) else [length] * n
    return [torch.randint(0, vocab_size - N_SPECIAL, (k,), generator=g).tolist() for k in lens]


# ---------------------------------------------------------------- the implementations under test


class Skip(Exception):
    """An implementation that cannot run here (not built, not on this branch): a note, not a failure."""


def weight_bytes(model: torch.nn.Module) -> int:
    """The bytes of weights a decode step of `model` reads: its parameters and buffers as held
    (quantized weights and scales are buffers), each tensor once, but the KV cache and the
    embedding table (one row is looked up)."""
    from llama.kv_cache import KVCache

    held = {}
    for name, module in model.named_modules():
        if not isinstance(module, KVCache) and not name.startswith("tok_embeddings"):
            for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                held[t.data_ptr()] = t.nbytes
    return sum(held.values()) + sum(getattr(m, "packed_bytes", 0) for m in model.modules())  # w8a8's prepacked


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
        policy = self.llama.policy
        wk = model.layers[0].attention.wk
        return {
            "weights_dtype": "int8" if hasattr(wk, "packed") else kernel_policy.dtype_name(wk.weight.dtype),
            "weight_bytes": weight_bytes(model),
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
        self.model, self.policy, self.stop = ours.llama.model, ours.llama.policy, ours.llama.tokenizer.stop_tokens

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
            logits = call_model(self.model, self.policy, tokens[:, prev:cur], prev)
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
    result["load_peak_rss_gb"] = peak_rss() / GB

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

    result["peak_rss_gb"] = peak_rss() / GB
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
