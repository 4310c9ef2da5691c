#!/usr/bin/env python
"""Grammar engines for structured outputs, measured on the real 128K Llama 3 vocabulary: the time to
build each one's tokenizer, to compile a JSON schema, and per token of a valid answer the time to
compute the next-token mask and to consume the token.

    python benchmarks/bench_grammar.py --out docs/benchmarks/grammar.json

The tokenizer is the real Llama 3 tokenizer.model shipped in the `llama-models` package (the test
extra); the engines (llguidance, xgrammar, outlines-core) are measured where installed. Every engine
walks the same tokens: a valid instance of the schema, tokenized by llama.tokenizer.Tokenizer, then
<|eot_id|>.
"""
import json
import os
import statistics
import time
from importlib import metadata
from typing import Callable, List, Optional

import torch

from common import envelope, print_table, write_json
from llama import cli
from llama.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "user", "guest"]},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.[a-z]{2,3}$"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "email", "tags", "address"],
    "additionalProperties": False,
}
INSTANCE = {"name": "Ada Lovelace", "age": 36, "role": "admin", "email": "ada@math.org",
            "tags": ["analyst", "poet", "engine"], "address": {"city": "London", "zip": "W1 4AB"}}


def real_tokenizer_path() -> str:
    import llama_models

    return os.path.join(os.path.dirname(llama_models.__file__), "llama3", "tokenizer.model")


def walk(mask: Callable[[], None], consume: Callable[[int], None], reset: Callable[[], None], tokens: List[int],
         repeats: int = 5) -> dict:
    """Time mask() then consume(token) for each token, `repeats` walks from the start (reset()); each
    token's fastest walk (the machine is shared: the others' noise only adds), in microseconds."""
    masks, consumes = [float("inf")] * len(tokens), [float("inf")] * len(tokens)
    for _ in range(repeats):
        reset()
        for i, t in enumerate(tokens):
            t0 = time.perf_counter()
            mask()
            t1 = time.perf_counter()
            consume(t)
            masks[i], consumes[i] = min(masks[i], t1 - t0), min(consumes[i], time.perf_counter() - t1)
    us = lambda x: round(1e6 * x, 1)  # noqa: E731
    return {"walk_ms": round(1e3 * (sum(masks) + sum(consumes)), 2), "mask_us_median": us(statistics.median(masks)),
            "mask_us_mean": us(statistics.mean(masks)), "mask_us_max": us(max(masks)),
            "consume_us_mean": us(statistics.mean(consumes))}


def bench_llguidance(tok: Tokenizer, schema: str, tokens: List[int]) -> dict:
    import llguidance
    import llguidance.torch as lt
    from llguidance.tiktoken import lltokenizer_from_encoding

    t0 = time.perf_counter()
    lltok = lltokenizer_from_encoding(tok.model, n_vocab=tok.n_words, eos_token=tok.eot_id)
    t1 = time.perf_counter()
    m = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(schema))
    assert not m.is_error(), m.get_error()
    t2 = time.perf_counter()
    bitmask = lt.allocate_token_bitmask(1, tok.n_words)

    def consume(t: int) -> None:
        assert m.consume_token(t), m.get_error()

    return {"tokenizer_s": t1 - t0, "compile_ms": 1e3 * (t2 - t1),
            **walk(lambda: lt.fill_next_token_bitmask(m, bitmask), consume, m.reset, tokens)}


def bench_xgrammar(tok: Tokenizer, schema: str, tokens: List[int]) -> dict:
    import xgrammar as xgr

    t0 = time.perf_counter()
    vocab = [tok.model.decode_single_token_bytes(i) for i in range(tok.n_words)]
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=tok.n_words, stop_token_ids=[tok.eot_id])
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    t1 = time.perf_counter()
    m = xgr.GrammarMatcher(compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":")))
    t2 = time.perf_counter()
    bitmask = xgr.allocate_token_bitmask(1, tok.n_words)

    def consume(t: int) -> None:
        assert m.accept_token(t)

    return {"tokenizer_s": t1 - t0, "compile_ms": 1e3 * (t2 - t1),
            **walk(lambda: m.fill_next_token_bitmask(bitmask), consume, m.reset, tokens)}


def bench_outlines(tok: Tokenizer, schema: str, tokens: List[int]) -> dict:
    import outlines_core as oc

    t0 = time.perf_counter()
    words, special = {}, set(tok.special_tokens.values())
    for i in range(tok.n_words):
        if i not in special:
            words.setdefault(tok.model.decode_single_token_bytes(i), []).append(i)
    vocab = oc.Vocabulary(tok.eot_id, words)
    t1 = time.perf_counter()
    guide = oc.Guide(oc.Index(oc.json_schema.build_regex_from_schema(schema), vocab))
    t2 = time.perf_counter()
    bitmask = torch.zeros((tok.n_words + 31) // 32, dtype=torch.int32)

    def consume(t: int) -> None:
        if t != tok.eot_id:  # its guide ends in a final state, where the stop token is the mask's only token
            guide.advance(t)

    return {"tokenizer_s": t1 - t0, "compile_ms": 1e3 * (t2 - t1),
            **walk(lambda: guide.write_mask_into(bitmask.data_ptr(), bitmask.numel(), 4), consume, guide.reset, tokens)}


def bench_ours(tok: Tokenizer, schema: str, tokens: List[int]) -> dict:
    """llguidance as the engine runs it (llama.structured): the mask computed in the worker thread,
    unpacked to the vocabulary and applied to a row of logits as -inf (nothing overlaps it here)."""
    from llama import structured

    t0 = time.perf_counter()
    structured._ll_tokenizer(tok)
    t1 = time.perf_counter()
    fmt = {"type": "json_schema", "json_schema": {"name": "bench", "schema": json.loads(schema)}}
    m = structured.matcher(tok, fmt, tok.stop_tokens)
    t2 = time.perf_counter()
    logits = torch.zeros(1, tok.n_words)
    state = {"m": m}

    def reset() -> None:
        state["m"] = structured.matcher(tok, fmt, tok.stop_tokens)

    return {"tokenizer_s": t1 - t0, "compile_ms": 1e3 * (t2 - t1),
            **walk(lambda: structured.apply(logits, [0], [state["m"]]), lambda t: state["m"].consume(t), reset, tokens)}


ENGINES = {"llguidance": bench_llguidance, "llguidance in llama.structured": bench_ours, "xgrammar": bench_xgrammar,
           "outlines-core": bench_outlines}


def install_weight(dist: str) -> dict:
    """An installed distribution's version, size on disk (MB) and required packages (extras left out)."""
    d = metadata.distribution(dist)
    size = sum(f.size or 0 for f in d.files or [])
    requires = [r.split(";")[0].strip() for r in d.requires or [] if "extra ==" not in r]
    return {"version": d.version, "installed_mb": round(size / 1e6, 1), "requires": ", ".join(requires) or "none"}


def engine_share(rows: int = 8, max_tokens: int = 64) -> dict:
    """The bundled demo model (4352-token vocabulary) decoding `rows` answers held to the JSON schema
    at once, greedy: the time the runner spends in masking (`constrain`: waiting for the worker
    thread's masks and applying them) per constrained token, and its share of the whole run."""
    from llama import Llama, demo
    from llama.engine import runner

    llama = Llama.build(str(demo.DEMO_DIR), str(demo.TOKENIZER_PATH), max_seq_len=256, max_batch_size=rows,
                        device="cpu", dtype="float32")
    prompts = [llama.formatter.encode_dialog_prompt([{"role": "user", "content": f"Person {i} as JSON."}]) for i in range(rows)]
    fmt = {"type": "json_schema", "json_schema": {"name": "bench", "schema": SCHEMA}}
    llama.generate(prompts, 4, temperature=0, response_format=fmt)  # warm-up: the grammar's tokenizer, compile
    spent, constrain = [0.0], runner.constrain

    def timed(seqs, logits) -> None:
        t0 = time.perf_counter()
        constrain(seqs, logits)
        spent[0] += time.perf_counter() - t0

    runner.constrain = timed
    try:
        t0 = time.perf_counter()
        tokens, _ = llama.generate(prompts, max_tokens, temperature=0, response_format=fmt)
        total = time.perf_counter() - t0
    finally:
        runner.constrain = constrain
    n = sum(len(t) + 1 for t in tokens)  # and each stop token
    return {"rows": rows, "tokens": n, "mask_us_per_token": round(1e6 * spent[0] / n, 1),
            "share_of_decode": round(spent[0] / total, 4), "decode_s": round(total, 3)}


def main(out: Optional[str] = None, tokenizer: Optional[str] = None) -> None:
    """Measure every installed engine on the JSON schema above; print a table, write JSON to `out`.

    Args:
        out: where to write the results' JSON (e.g. docs/benchmarks/grammar.json).
        tokenizer: a tiktoken tokenizer.model (default: the real Llama 3 one from llama-models).
    """
    tok = Tokenizer(tokenizer or real_tokenizer_path())
    schema = json.dumps(SCHEMA)
    tokens = tok.encode(json.dumps(INSTANCE, separators=(",", ":")), bos=False, eos=False) + [tok.eot_id]
    rows = []
    for name, fn in ENGINES.items():
        try:
            row = fn(tok, schema, tokens)
        except ImportError as e:
            print(f"{name}: not installed ({e})")
            continue
        row["request_ms"] = row["compile_ms"] + row["walk_ms"]  # a new schema's whole cost for this answer
        row.update(install_weight(name.split()[0]))
        rows.append({"engine": name, **{k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}})
    table = [{"metric": r["engine"], **{k: v for k, v in r.items() if k != "engine"}} for r in rows]
    print_table(table)
    share = engine_share()
    print(f"demo model, {share['rows']} JSON answers at once: masking {share['mask_us_per_token']} us per token, "
          f"{100 * share['share_of_decode']:.1f}% of the decode time")
    write_json(out, envelope("grammar", {"vocab": tok.n_words, "answer_tokens": len(tokens), "engines": rows,
                                         "engine_share": share},
                             table=[{k if k != "metric" else "engine": v for k, v in r.items()} for r in table]))


if __name__ == "__main__":
    cli.run(main)
