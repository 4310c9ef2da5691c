#!/usr/bin/env python
"""Speculative decoding on a trained model and its draft (default: the bundled demo model and its
draft; random weights would accept nothing): batch-1 decode tokens/s without the draft and with it
at each --speculate_k (both compiled with --compile), the draft's acceptance rate, whether greedy
output is the model's own, and where a step's time goes. Under torchrun (the model sharded), the
draft both replicated and sharded (--draft_parallel), side by side.

    python benchmarks/bench_speculative.py                        # the demo model with its draft
    python benchmarks/bench_speculative.py --speculate_k 2,3,4,6 --threads 1 --out spec.json
    torchrun --nproc_per_node 2 benchmarks/bench_speculative.py --speculate_k 3

(`python scripts/benchmark.py --speculate ...` runs this.)
"""
import statistics
import time
from typing import Callable, Optional, Sequence, Union

import torch

from common import best_time, envelope, print_table, write_json
from llama import cli, distributed
from llama.engine.runner import call_model

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
    from llama import Llama
    from llama.engine import speculative as spec_module
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

    profile = profile_passes(spec, prompts[0], ks, compile, temperature, device)
    return {"ckpt_dir": ckpt_dir, "draft_ckpt_dir": draft_ckpt_dir, "temperature": temperature, "new_tokens": n_new,
            "compiled": compile, "rounds": rounds, "prompts": len(prompts), "device": str(device), "threads": torch.get_num_threads(),
            "processes": distributed.model_parallel_size(), "runs": runs,
            "policy": plain.policy.describe() if plain.policy else None, "profile_ms": profile}


def profile_passes(spec, prompt: list, ks: list, compile: bool, temperature: float, device: torch.device) -> dict:
    """Where a speculative step's time goes, ms: k draft steps and one verify pass of k + 1 tokens,
    against one decode step; compiled, the passes the engine ran (over the cache it has: a new one
    recompiles). `spec`: the Llama with the draft; `prompt`: tokens to run the passes on."""
    from llama.engine import speculative as spec_module

    def forward_ms(forward: Callable[[torch.Tensor], object], n: int) -> float:
        """One forward pass of n tokens at position 64 of cache row 0 (past every live position), ms;
        in inference mode, as the engine runs (compiled passes called with autograd on would
        recompile, and fail on the KV cache's in-place writes)."""
        tokens = torch.tensor([prompt[:n]], device=device)
        with torch.inference_mode():
            return 1e3 * best_time(lambda: forward(tokens), device, repeats=10)

    rows = 1 if compile else None
    if not compile:
        spec.model.setup_cache(1, 256)
        spec.speculator.fit(1, 256)
    position = torch.tensor([64], device=device)

    def model_pass(tokens: torch.Tensor) -> object:
        logits = spec._compiled(tokens, position) if compile else None  # None: eager (or compilation failed)
        return call_model(spec.model, spec.policy, tokens, 64) if logits is None else logits

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
    return profile


def print_speculative(result: dict) -> list:
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
    return rows


# ---------------------------------------------------------------- the command


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    draft_ckpt_dir: Optional[str] = None,
    speculate_k: Union[int, str, tuple] = "2,3,4,6",
    temperature: float = 0.0,
    new_tokens: Optional[int] = None,
    draft_parallel: Union[str, tuple] = "replicated,sharded",
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    quick: bool = False,
    compile: bool = False,
    threads: Optional[int] = None,
    out: Optional[str] = None,
    speculate: bool = True,
) -> None:
    """Benchmark speculative decoding: batch-1 decode with and without the draft.

    Args:
        ckpt_dir, tokenizer_path: a trained Meta checkpoint and its tokenizer (default: the bundled demo model).
        draft_ckpt_dir: its draft model (default: the demo's draft).
        speculate_k: the draft tokens per step to try, comma-separated; auto: adaptive.
        temperature: 0 (greedy) or sampling at this temperature (top_p 0.9).
        new_tokens: tokens generated per prompt (default 96; 16 with --quick).
        draft_parallel: under torchrun, how the draft is held, comma-separated from replicated and
            sharded (each measured in the same rounds); on one process, replicated.
        device: cuda or cpu (default: cuda when available).
        dtype: bfloat16, float16 or float32 (default: the measured policy).
        quick: fewer prompts, tokens and rounds (seconds on small models).
        compile: both models compiled (plain decode steps, the draft's steps and the verify passes).
        threads: CPU threads (default: torch's default).
        out: write the results as JSON here (with machine, date and command).
        speculate: accepted for `scripts/benchmark.py --speculate`; always on here.
    """
    from llama.engine.speculative import AUTO, check_draft_parallel

    ks = [k if k == AUTO else int(k) for k in cli.split_list(speculate_k)]
    parallels = cli.split_list(draft_parallel)
    for how in parallels:
        check_draft_parallel(how)
    if threads:
        torch.set_num_threads(int(threads))
    dev = distributed.resolve_device(device)
    distributed.setup(dev)
    result = speculative(ckpt_dir, tokenizer_path, draft_ckpt_dir, ks, quick, dev, dtype, float(temperature),
                         new_tokens, compile, 1 if quick else 3, parallels)
    if distributed.is_rank0():
        rows = print_speculative(result)
        if out:
            headline = [{"metric": f"speculative decode tok/s, batch 1, {name}", "value": r["tokens_per_s"]}
                        for name, r in result["runs"].items()]
            write_json(out, envelope("speculative", result, rows, headline))
            print(f"wrote {out}")
    distributed.shutdown()


if __name__ == "__main__":
    cli.run(main)
