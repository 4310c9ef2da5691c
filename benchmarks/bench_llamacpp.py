#!/usr/bin/env python
"""Batch-1 decode and prefill of ours against llama.cpp (through llama-cpp-python) at each precision,
on the same random weights of the Llama 3.2 1B shape, in one run, alternating:

    python benchmarks/bench_llamacpp.py                        # the 1B shape: 16 layers
    python benchmarks/bench_llamacpp.py --layers 2 --new_tokens 16 --rounds 2
    python benchmarks/bench_llamacpp.py --out docs/benchmarks/llamacpp.json

The weights are written once as a Meta checkpoint (ours: bfloat16 with dtype="bfloat16", and
quantize="int8" / "int4" with the policy's default kernels) and as GGUF files (the `gguf` package:
BF16, Q8_0 and Q4_0, the tied vocabulary matrix in the file's type as ours quantizes it too, the
Llama 3.2 RoPE scaling as a rope_freqs tensor). Both are fed the same random token ids and decode
greedily; llama.cpp runs on as many threads as ours. Reported per precision: tokens/s of each, their
ratio, the prefill tokens/s of a --prefill_len prompt, and the weight bytes a decode step reads times tokens/s beside the read bandwidth of this
machine measured in the same run (common.read_bandwidth) and its CPU's vector flags. Needs
`pip install gguf llama-cpp-python` (not dependencies of the package); without them it says so in
one line and stops.
"""
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from bench_generate import write_tokenizer
from bench_kernels import cpu_flags
from common import GB, N_SPECIAL, envelope, print_table, read_bandwidth, write_json, write_random_checkpoint
from generate_impls import SKIP_STEPS, weight_bytes
from llama import cli, registry
from llama.model import ModelArgs, apply_scaling

SHAPE = "llama3.2-1b"
# ours (Llama.build keyword arguments) beside the llama.cpp type of the same precision
PRECISIONS = {"bfloat16": ({"dtype": "bfloat16"}, "BF16"), "int8": ({"quantize": "int8"}, "Q8_0"),
              "int4": ({"quantize": "int4"}, "Q4_0")}
# Meta's names -> llama.cpp's for the llama architecture (its tensor names, as convert_hf_to_gguf writes them)
LAYER_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
               "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
               "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
TOP_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}


def gguf_name(key: str) -> str:
    """A Meta checkpoint key ("layers.3.attention.wq.weight") as llama.cpp names it ("blk.3.attn_q.weight")."""
    module = key.removesuffix(".weight")
    if module.startswith("layers."):
        _, i, rest = module.split(".", 2)
        return f"blk.{i}.{LAYER_NAMES[rest]}.weight"
    return f"{TOP_NAMES[module]}.weight"


def rope_factors(args: ModelArgs) -> np.ndarray:
    """The per-frequency divisors of llama.cpp's rope_freqs tensor that give Llama 3.1+ scaled RoPE."""
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
    return (freqs / apply_scaling(freqs, scale_factor=args.rope_scale_factor)).numpy().astype(np.float32)


def write_gguf(path: Path, state: dict, params: dict, args: ModelArgs, kind: str, n_ctx: int) -> int:
    """The state dict as a GGUF file of llama.cpp type `kind` (BF16, Q8_0, Q4_0: every matrix; norms
    in float32), with a vocabulary of placeholder tokens (the benchmark feeds token ids). Returns the
    bytes of the matrices a decode step reads (all but the embedding, which the tied output reads)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(max(n_ctx, args.max_seq_len, 131072))  # the 3.2 models' context
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.ffn_hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_dimension_count(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    w.add_file_type({"BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind])
    # a sentencepiece-style vocabulary: the 256 byte tokens it looks up, placeholders, then Llama 3's specials
    n = args.vocab_size
    tokens = [f"<0x{b:02X}>" for b in range(256)] + [f"t{i}" for i in range(256, n - N_SPECIAL)]
    tokens += [f"<|special_{i}|>" for i in range(N_SPECIAL)]
    types = [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (n - N_SPECIAL - 256) + [gguf.TokenType.CONTROL] * N_SPECIAL
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores([0.0] * n)
    w.add_bos_token_id(n - N_SPECIAL)
    w.add_eos_token_id(n - N_SPECIAL + 1)
    if params.get("use_scaled_rope"):
        w.add_tensor("rope_freqs.weight", rope_factors(args))
    read = 0
    for key, t in state.items():
        values = t.float().numpy()
        if t.dim() == 1:
            w.add_tensor(gguf_name(key), values)
            continue
        data = gguf.quants.quantize(values, qtype)
        w.add_tensor(gguf_name(key), data, raw_dtype=qtype)
        read += data.nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return read


def decode_ours(llama, prompt: list, n_new: int) -> tuple[float, list]:
    """(steady decode tokens/s, greedy tokens) of Llama.stream on one prompt."""
    times, out = [], []
    for step in llama.stream([prompt], n_new, temperature=0):
        times.append(time.perf_counter())
        out += [t.token for t in step]
    return (len(times) - 1 - SKIP_STEPS) / (times[-1] - times[SKIP_STEPS]), out


def prefill_ours(llama, prompt: list) -> float:
    """Prompt tokens/s of Llama.stream up to its first token (the prompt's one forward pass)."""
    start = time.perf_counter()
    for _ in llama.stream([prompt], 1, temperature=0):
        pass
    return len(prompt) / (time.perf_counter() - start)


def last_logits(llm) -> np.ndarray:
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def prefill_llama_cpp(llm, prompt: list) -> float:
    """Prompt tokens/s of llama-cpp-python's eval of the prompt (logits of its last token only, as ours)."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    return len(prompt) / (time.perf_counter() - start)


def decode_llama_cpp(llm, prompt: list, n_new: int) -> tuple[float, list]:
    """(steady decode tokens/s, greedy tokens) of llama-cpp-python's eval, one token at a time."""
    llm.reset()
    llm.eval(prompt)
    times, out = [], []
    for _ in range(n_new):
        token = int(np.argmax(last_logits(llm)))
        out.append(token)
        llm.eval([token])
        times.append(time.perf_counter())
    return (len(times) - 1 - SKIP_STEPS) / (times[-1] - times[SKIP_STEPS]), out


def timed_rounds(ours: dict, cpp: dict, prompt: list, long: list, new_tokens: int, rounds: int) -> tuple[dict, dict]:
    """Per (who, precision): the best round's (decode tokens/s, greedy tokens), and the best prefill
    tokens/s of `long` (none when empty); each round runs every precision, ours then llama.cpp."""
    best = {(who, p): (0.0, []) for p in ours for who in ("ours", "llama.cpp")}
    prefill = {(who, p): 0.0 for p in ours for who in ("ours", "llama.cpp")}
    for r in range(rounds):
        for p in ours:
            for who, run, fill in (
                ("ours", lambda: decode_ours(ours[p], prompt, new_tokens), lambda: prefill_ours(ours[p], long)),
                ("llama.cpp", lambda: decode_llama_cpp(cpp[p], prompt, new_tokens), lambda: prefill_llama_cpp(cpp[p], long)),
            ):
                tok_s, tokens = run()
                best[who, p] = max(best[who, p], (tok_s, tokens), key=lambda b: b[0])
                if long:
                    prefill[who, p] = max(prefill[who, p], fill())
                print(f"round {r + 1}: {who} {p} decode {tok_s:.2f} tok/s, prefill {prefill[who, p]:.1f} tok/s", flush=True)
    return best, prefill


def leading_agreement(a: list, b: list) -> int:
    """How many greedy tokens agree before the first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(
    layers: int = 0,
    precisions: str = "bfloat16,int8,int4",
    prompt_len: int = 16,
    new_tokens: int = 32,
    prefill_len: int = 512,
    rounds: int = 3,
    threads: Optional[int] = None,
    bandwidth_mb: int = 1024,
    out: Optional[str] = None,
) -> Optional[dict]:
    """Decode tokens/s of ours and llama.cpp per precision on the Llama 3.2 1B shape.

    Args:
        layers: transformer layers (0: the 1B's 16; fewer for a quick run).
        precisions: comma-separated, of bfloat16, int8, int4.
        prompt_len: random prompt tokens before decoding.
        new_tokens: greedy tokens per timed decode (the first SKIP_STEPS left out of the rate).
        prefill_len: tokens of the timed prefill (0: none).
        rounds: timed rounds; each round decodes every precision with ours, then llama.cpp; the best round counts.
        threads: CPU threads of both (default: torch's).
        bandwidth_mb: buffer of the read-bandwidth probe.
        out: write the results as JSON here.
    """
    try:
        import gguf  # noqa: F401
        import llama_cpp
    except ImportError as e:
        print(f"bench_llamacpp skipped: {e.name} is not installed (pip install gguf llama-cpp-python)")
        return None
    from llama import Llama

    if threads:
        torch.set_num_threads(int(threads))
    threads = torch.get_num_threads()
    chosen = [p.strip() for p in (precisions.split(",") if isinstance(precisions, str) else precisions)]
    unknown = [p for p in chosen if p not in PRECISIONS]
    if unknown:
        raise ValueError(f"unknown precision(s) {unknown}: use some of {', '.join(PRECISIONS)}")
    base = registry.get(SHAPE)
    params = {**base, **({"n_layers": int(layers)} if layers else {})}
    scale = registry.default_rope_scale_factor(base)  # the 1B's, whatever the layer count
    n_ctx = max(prompt_len + new_tokens, prefill_len) + 8
    args = ModelArgs(**params, max_seq_len=n_ctx, rope_scale_factor=scale)
    gen = torch.Generator().manual_seed(0)
    prompt, long = (torch.randint(0, args.vocab_size - N_SPECIAL, (n,), generator=gen).tolist() for n in (prompt_len, prefill_len))
    with tempfile.TemporaryDirectory(prefix="bench_llamacpp_") as tmp:
        meta = Path(tmp) / "meta"
        state = write_random_checkpoint(meta, params, torch.bfloat16, tied=True)
        write_tokenizer(meta / "tokenizer.model", args.vocab_size - N_SPECIAL)
        ours, cpp, read = {}, {}, {}
        for p in chosen:
            kwargs, kind = PRECISIONS[p]
            path = Path(tmp) / f"model-{kind}.gguf"
            read[kind] = write_gguf(path, state, params, args, kind, n_ctx)
            print(f"wrote {path.name} ({path.stat().st_size / GB:.2f} GB)", flush=True)
            ours[p] = Llama.build(str(meta), str(meta / "tokenizer.model"), max_seq_len=n_ctx, max_batch_size=1,
                                  device="cpu", rope_scale_factor=scale, **kwargs)
            cpp[p] = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=max(prompt_len, prefill_len), n_threads=threads,
                                     n_threads_batch=threads, verbose=False)
        del state
        bw = read_bandwidth(torch.device("cpu"), int(bandwidth_mb) * 2**20)
        best, prefill = timed_rounds(ours, cpp, prompt, long, new_tokens, rounds)
        rows, results = [], []
        for p in chosen:
            kind = PRECISIONS[p][1]
            (t_ours, tok_ours), (t_cpp, tok_cpp) = best["ours", p], best["llama.cpp", p]
            b_ours, b_cpp = weight_bytes(ours[p].model), read[kind]
            res = {"precision": p, "llama_cpp_type": kind, "ours_tok_s": t_ours, "llama_cpp_tok_s": t_cpp,
                   "ratio": t_ours / t_cpp, "ours_weight_bytes": b_ours, "llama_cpp_weight_bytes": b_cpp,
                   "ours_gb_s": b_ours * t_ours / GB, "llama_cpp_gb_s": b_cpp * t_cpp / GB,
                   "ours_prefill_tok_s": prefill["ours", p], "llama_cpp_prefill_tok_s": prefill["llama.cpp", p],
                   "greedy_agree": leading_agreement(tok_ours, tok_cpp), "policy": ours[p].policy.describe()
                   if ours[p].policy is not None else None}
            results.append(res)
            rows.append({"metric": f"{p} (llama.cpp {kind})", "ours tok/s": t_ours, "llama.cpp tok/s": t_cpp,
                         "ratio": res["ratio"], "ours GB/s": res["ours_gb_s"], "llama.cpp GB/s": res["llama_cpp_gb_s"],
                         "read bandwidth GB/s": bw, f"ours prefill tok/s ({prefill_len})": prefill["ours", p],
                         f"llama.cpp prefill tok/s ({prefill_len})": prefill["llama.cpp", p], "greedy tokens agreeing": f"{res['greedy_agree']}/{new_tokens}"})
    print(f"{SHAPE}, {args.n_layers} layers, {threads} threads, llama-cpp-python {llama_cpp.__version__}, "
          f"read bandwidth {bw:.1f} GB/s, CPU flags: {cpu_flags()}")
    print_table(rows)
    summary = {"shape": SHAPE, "n_layers": args.n_layers, "threads": threads, "llama_cpp_python": llama_cpp.__version__,
               "read_gb_s": bw, "cpu_flags": cpu_flags(), "prompt_len": prompt_len, "new_tokens": new_tokens,
               "prefill_len": prefill_len, "rounds": rounds, "results": results}
    write_json(out, envelope("llamacpp", summary, rows))
    return summary


if __name__ == "__main__":
    cli.run(main)
