"""The step-level engine: requests admitted and retired while others decode get exactly what
Llama.generate gives each alone; per-sequence stop rules, sampling and cancellation."""
import pytest
import torch

from llama import Llama, kv_cache
from llama.engine import Engine, Request


@pytest.fixture(scope="module")
def llama(tiny_ckpt, byte_tokenizer) -> Llama:
    return Llama.build(str(tiny_ckpt), str(byte_tokenizer), max_seq_len=96, max_batch_size=4, device="cpu", dtype="float32")


def encode(llama: Llama, text: str) -> list:
    return llama.tokenizer.encode(text, bos=True, eos=False)


def engine_for(llama: Llama, rows: int = 3, seq_len: int = 96) -> Engine:
    kv_cache.allocate(llama.model, rows, seq_len)
    return Engine(llama.model, llama.tokenizer)


def drain(engine: Engine, arrivals: dict) -> dict:
    """Step the engine, adding arrivals[step] (a list of (name, Request)) at each step; return each
    name's generated tokens (stop token included) and its events."""
    ids, events, step = {}, {}, 0
    while engine.busy or any(s >= step for s in arrivals):
        for name, req in arrivals.get(step, []):
            ids[engine.add(req)] = name
        for e in engine.step():
            events.setdefault(ids[e.seq_id], []).append(e)
        step += 1
    return {ids[i]: s for i, s in list(engine.results.items())}, events


def test_staggered_arrivals_give_each_request_its_tokens_alone(llama):
    prompts = {
        "short": encode(llama, "Hi"),
        "long": encode(llama, "A considerably longer prompt than the others, to be sure"),
        "mid": encode(llama, "Medium-sized prompt"),
        "late": encode(llama, "arrives last"),
        "tiny": encode(llama, "x"),
    }
    lengths = {"short": 20, "long": 7, "mid": 12, "late": 9, "tiny": 15}
    # 3 rows for 5 requests: some wait for a row, some arrive while others decode
    arrivals = {0: [("short", None), ("long", None)], 3: [("mid", None), ("late", None)], 5: [("tiny", None)]}
    arrivals = {s: [(n, Request(prompts[n], lengths[n], temperature=0)) for n, _ in reqs] for s, reqs in arrivals.items()}
    results, _ = drain(engine_for(llama), arrivals)
    for name, prompt in prompts.items():
        alone, _ = llama.generate([prompt], max_gen_len=lengths[name], temperature=0)
        seq = results[name]
        assert seq.tokens[: len(seq.tokens) - (seq.stop_token is not None)] == alone[0], name
        assert seq.finish_reason == ("length" if seq.stop_token is None else "stop")
    assert sum(results[n].finish_reason == "length" for n in prompts) >= 3  # most run to their own limits


def test_seeded_sampling_does_not_depend_on_the_batch(llama):
    prompt = encode(llama, "Seeded sampling")
    req = dict(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=7)
    alone, _ = drain(engine_for(llama), {0: [("a", Request(prompt, **req))]})
    others = [("b", Request(encode(llama, "other"), 6, temperature=0.8, seed=1)), ("c", Request(prompt, 5, temperature=0))]
    mixed, _ = drain(engine_for(llama), {0: others, 2: [("a", Request(prompt, **req))]})
    assert mixed["a"].tokens == alone["a"].tokens


def test_stop_strings_cut_the_text_and_hold_back_what_may_start_one(llama):
    prompt = encode(llama, "Stop strings")
    full, _ = drain(engine_for(llama), {0: [("full", Request(prompt, 16, temperature=0))]})
    text = full["full"].text
    stop = text[5:8]  # a stop string that first appears in the middle
    first = text.index(stop)
    cut, events = drain(engine_for(llama), {0: [("cut", Request(prompt, 16, temperature=0, stop=[stop]))]})
    assert cut["cut"].text == text[:first] and cut["cut"].finish_reason == "stop"
    assert "".join(e.text for e in events["cut"]) == text[:first]
    assert events["cut"][-1].finished and events["cut"][-1].finish_reason == "stop"


def test_stop_tokens_end_a_sequence_with_reason_stop(llama):
    prompt = encode(llama, "Stop tokens")
    full, _ = drain(engine_for(llama), {0: [("f", Request(prompt, 8, temperature=0))]})
    stop_token = full["f"].tokens[3]
    first = full["f"].tokens.index(stop_token)
    got, events = drain(engine_for(llama), {0: [("s", Request(prompt, 8, temperature=0, stop_tokens=[stop_token]))]})
    assert got["s"].tokens == full["f"].tokens[: first + 1] and got["s"].stop_token == stop_token
    assert events["s"][-1].text == "" and events["s"][-1].finish_reason == "stop"


def test_cancelled_and_finished_sequences_free_their_rows(llama):
    engine = engine_for(llama, rows=2)
    a = engine.add(Request(encode(llama, "first"), 30, temperature=0))
    b = engine.add(Request(encode(llama, "second one"), 30, temperature=0))
    c = engine.add(Request(encode(llama, "third, waiting"), 4, temperature=0))
    engine.step()
    assert engine.n_running == 2 and len(engine.waiting) == 1
    engine.cancel(a)
    assert engine.n_running == 1 and engine.running[0].id == b and engine.running[0].row == 0
    engine.step()  # c takes the freed row
    assert engine.n_running == 2 and not engine.waiting
    engine.cancel(b)
    while engine.busy:
        engine.step()
    assert set(engine.results) == {c}
    alone, _ = llama.generate([encode(llama, "third, waiting")], max_gen_len=4, temperature=0)
    assert engine.pop(c).tokens == alone[0]


def test_logprobs_and_prompt_logprobs_equal_the_forward_pass(llama):
    prompt = encode(llama, "Log-probs")
    got, events = drain(engine_for(llama), {0: [("x", Request(prompt, 4, temperature=0, logprobs=True, top_logprobs=3, prompt_logprobs=True))]})
    seq = prompt + got["x"].tokens
    llama.model.free_cache()
    lsm = torch.log_softmax(llama.model(torch.tensor([seq]), 0)[0], dim=-1)
    want = lsm[:-1].gather(1, torch.tensor(seq[1:])[:, None])[:, 0].tolist()
    first = events["x"][0]
    assert first.prompt_logprobs[0] is None
    assert first.prompt_logprobs[1:] == pytest.approx(want[: len(prompt) - 1], abs=1e-4)
    assert got["x"].logprobs == pytest.approx(want[len(prompt) - 1 :], abs=1e-4)
    top = first.top_logprobs
    assert len(top) == 3 and top[0][0] == got["x"].tokens[0]  # greedy: the chosen token is the likeliest
    assert [t for t, _ in first.prompt_top_logprobs[1]] == lsm[0].topk(3).indices.tolist()


def test_the_kv_cache_is_no_part_of_the_state_dict_and_its_rows_move(llama):
    keys = set(llama.model.state_dict())
    kv_cache.allocate(llama.model, 3, 16)
    assert set(llama.model.state_dict()) == keys  # checkpoint keys stay exact
    c = llama.model.layers[0].attention.kv_cache
    c.k[0], c.k[1], c.k[2] = 1.0, 2.0, 3.0
    c.move_rows(torch.tensor([0, 2]), torch.tensor([2, 0]))  # both read before either is written
    assert c.k[0].eq(3).all() and c.k[1].eq(2).all() and c.k[2].eq(1).all()
    c.reset_rows(torch.tensor([1]))
    assert c.k[1].eq(0).all() and kv_cache.shape(llama.model) == (3, 16)


def test_prompt_logprob_requests_admitted_beside_others_change_no_tokens(llama):
    # longest first, the one asking for prompt log-probs in the middle
    prompts = [encode(llama, "short"), encode(llama, "a mid-sized one"), encode(llama, "the longest prompt of this batch, by far")]
    reqs = [("a", Request(prompts[0], 8, temperature=0)), ("b", Request(prompts[1], 8, temperature=0, prompt_logprobs=True)),
            ("c", Request(prompts[2], 8, temperature=0))]
    results, _ = drain(engine_for(llama), {0: reqs})
    for (name, _), prompt in zip(reqs, prompts):
        seq = results[name]
        assert seq.tokens[: len(seq.tokens) - (seq.stop_token is not None)] == alone_tokens(llama, prompt, 8), name


def alone_tokens(llama: Llama, prompt: list, n: int) -> list:
    return llama.generate([prompt], max_gen_len=n, temperature=0)[0][0]


def test_the_scheduler_keeps_the_books_without_a_model():
    """Rows are a prefix of the running sequences; a retiring sequence's row takes the last running
    row (the move the runner copies); cancelled sequences leave no result; a sequence with nothing to
    compute takes no row."""
    from llama.engine import Scheduler, SequenceState

    def seq(i: int, prompt_len: int, limit: int = 4) -> SequenceState:
        return SequenceState(i, Request([1] * prompt_len, limit), limit, [0], torch.device("cpu"))

    books = Scheduler(rows=2)
    seqs = [seq(books.new_id(), n) for n in (3, 7, 5)] + [seq(books.new_id(), 2, limit=0)]
    for s in seqs:
        books.add(s)
    taken = books.admit()
    assert [s.id for s in taken.prefill] == [1, 0] and [s.row for s in taken.prefill] == [0, 1]  # longest first
    assert not taken.done and [s.id for s in books.waiting] == [2, 3]
    seqs[1].finish_reason = "stop"  # row 0 finishes: row 1 moves into it
    moves = books.retire()
    assert (moves.dst, moves.src) == ([0], [1]) and seqs[0].row == 0 and set(books.results) == {1}
    taken = books.admit()
    assert [s.id for s in taken.prefill] == [2] and seqs[2].row == 1 and [s.id for s in books.waiting] == [3]
    books.cancel(0)
    assert (books.retire().dst, seqs[2].row) == ([0], 0) and 0 not in books.results
    taken = books.admit()
    assert [s.id for s in taken.done] == [3] and not taken.prefill and 3 in books.results  # no row
    assert books.running == [seqs[2]]
    assert books.pop(1) is seqs[1] and books.new_id(10) == 10 and books.new_id() == 11


def test_every_entry_checks_a_prompts_length_with_one_function(llama):
    """The engine and the Llama API refuse an empty or too long prompt through
    llama.validation.check_prompt_length, which the server's checks use too."""
    from llama import validation

    engine = engine_for(llama, rows=1, seq_len=16)
    with pytest.raises(validation.ContextLengthError, match="has 17 tokens, longer than the KV cache's length 16"):
        engine.add(Request([1] * 17, 1))
    with pytest.raises(ValueError, match="the prompt is empty"):
        engine.add(Request([], 1))
    with pytest.raises(validation.ContextLengthError, match="prompt 0 has 97 tokens, longer than max_seq_len 96"):
        llama.generate([[1] * 97], max_gen_len=1)
    with pytest.raises(validation.ContextLengthError, match=r"tokens plus max_tokens 9 exceed max_seq_len 12: ask for at most 2") as e:
        validation.check_prompt_length(10, 12, max_new_tokens=9)
    assert e.value.param == "max_tokens"


def test_the_engine_package_imports_one_way():
    """types < scheduler, runner < acceptance < speculative < core: the runner is handed a
    speculator's work by the engine and never imports it; nothing imports the engine that composes them."""
    import ast
    from pathlib import Path

    import llama.engine

    root = Path(llama.engine.__file__).parent
    order = ["types", "scheduler", "runner", "acceptance", "speculative", "core"]
    for i, name in enumerate(order):
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        above = {f"llama.engine.{m}" for m in order[i:]} | {"llama.engine"}
        assert not imported & above, (name, imported & above)
    assert "llama.engine.speculative" not in (root / "runner.py").read_text()
