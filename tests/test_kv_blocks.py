"""The block KV cache: sequences hold blocks of a pool through block tables; a small pool forces
preemptions, and every workload (cancellations included) gives each request the greedy tokens
Llama.generate gives it alone and leaves every block free."""
import pytest

import helpers
from llama import Llama, kv_cache
from llama.engine import Engine, Request
from llama.engine.blocks import BlockManager
from llama.engine.scheduler import chunk_tokens, prefill_cost

MAX_SEQ_LEN = 96
BLOCK = 16


@pytest.fixture(scope="module")
def llama(tiny_ckpt, byte_tokenizer) -> Llama:
    return Llama.build(str(tiny_ckpt), str(byte_tokenizer), max_seq_len=MAX_SEQ_LEN, max_batch_size=4, device="cpu",
                       dtype="float32")


@pytest.fixture(scope="module")
def self_draft(tiny_ckpt, byte_tokenizer) -> Llama:
    """The model as its own draft: every proposal accepted, steps of k + 1 tokens."""
    return Llama.build(str(tiny_ckpt), str(byte_tokenizer), max_seq_len=MAX_SEQ_LEN, max_batch_size=4, device="cpu",
                       dtype="float32", draft_ckpt_dir=str(tiny_ckpt), speculate_k=3)


PROMPTS = ["Hi", "A considerably longer prompt than the others, to be sure", "Medium-sized prompt", "x", "arrives last",
           "The end is near", "Batching"]
LENGTHS = [40, 12, 30, 45, 9, 25, 33]


def encode(llama: Llama, text: str) -> list:
    return llama.tokenizer.encode(text, bos=True, eos=False)


def alone(llama: Llama, prompt: list, n: int) -> list:
    return llama.generate([prompt], max_gen_len=n, temperature=0)[0][0]


def block_engine(llama: Llama, blocks: int, rows: int = 4, **options) -> Engine:
    kv_cache.allocate_blocks(llama.model, blocks, BLOCK, rows, MAX_SEQ_LEN)
    return Engine(llama.model, llama.tokenizer, speculator=llama.speculator, **options)


def run(engine: Engine, arrivals: dict, cancel: dict = ()) -> dict:
    """Step the engine, adding arrivals[step] (lists of (name, Request)) and cancelling cancel[step]
    (names) at each step; each finished name's state."""
    ids, step = {}, 0
    while engine.busy or any(s >= step for s in arrivals):
        for name in dict(cancel).get(step, []):
            engine.cancel(next(i for i, n in ids.items() if n == name))
        for name, req in arrivals.get(step, []):
            ids[engine.add(req)] = name
        engine.step()
        step += 1
    return {ids[i]: s for i, s in list(engine.results.items())}


def mixed(llama: Llama) -> dict:
    """Staggered arrivals of mixed lengths: 7 requests, more than the 4 rows."""
    reqs = [(p, Request(encode(llama, p), n, temperature=0)) for p, n in zip(PROMPTS, LENGTHS)]
    return {0: reqs[:3], 2: reqs[3:5], 6: reqs[5:]}


def generated(seq) -> list:
    """A finished sequence's tokens as Llama.generate returns them: without the stop token."""
    return seq.tokens[: len(seq.tokens) - (seq.stop_token is not None)]


def check_tokens(llama: Llama, results: dict, names=PROMPTS) -> None:
    for name in names:
        n = LENGTHS[PROMPTS.index(name)]
        assert generated(results[name]) == alone(llama, encode(llama, name), n), name


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_a_small_pool_preempts_and_every_request_gets_its_tokens_alone(llama, prefix_cache):
    # 10 usable blocks of 16 tokens for up to 4 sequences of up to ~60 tokens: the pool runs out mid-decode
    engine = block_engine(llama, blocks=11, prefix_cache=prefix_cache)
    results = run(engine, mixed(llama))
    assert engine.scheduler.preemptions > 0
    check_tokens(llama, results)
    engine.blocks.check()
    assert engine.blocks.n_used == 0
    # a preempted sequence finds its own blocks again where they were not reused
    assert (engine.blocks.hits > 0) == prefix_cache


def test_cancellations_leave_every_block_free(llama):
    engine = block_engine(llama, blocks=11)
    results = run(engine, mixed(llama), cancel={4: [PROMPTS[0], PROMPTS[3]], 7: [PROMPTS[6]]})
    assert PROMPTS[0] not in results and PROMPTS[6] not in results
    check_tokens(llama, results, [n for n in PROMPTS if n in results])
    engine.blocks.check()
    assert engine.blocks.n_used == 0


def test_speculative_steps_through_block_tables(llama, self_draft):
    engine = block_engine(self_draft, blocks=8)
    results = run(engine, mixed(self_draft))
    assert engine.scheduler.preemptions > 0 and self_draft.speculator.acceptance_rate == 1.0
    check_tokens(llama, results)
    assert engine.blocks.n_used == 0


@pytest.mark.parametrize("draft", [False, True])
def test_chunked_prefill_changes_no_token(llama, self_draft, draft):
    model = self_draft if draft else llama
    engine = block_engine(model, blocks=8, max_prefill_tokens=7)  # and preemptions
    results = run(engine, mixed(model))
    assert engine.scheduler.preemptions > 0
    check_tokens(llama, results)
    engine.blocks.check()


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(llama):
    engine = block_engine(llama, blocks=40, max_prefill_tokens=8)
    short = engine.add(Request(encode(llama, "Hi"), 30, temperature=0))
    engine.step()
    long_prompt = encode(llama, PROMPTS[1])
    late = engine.add(Request(long_prompt, 5, temperature=0))
    steps = []
    while not steps or late not in [e.seq_id for e in steps[-1]]:
        steps.append(engine.step())
    # 8 prompt tokens a step at first, fewer as the context grows (their attention over it costs)
    ends = [0]
    while ends[-1] < len(long_prompt):
        ends.append(ends[-1] + max(1, chunk_tokens(ends[-1], 8, engine.span)))
    assert len(steps) == len(ends) - 1 >= -(-len(long_prompt) // 8)
    assert all(short in [e.seq_id for e in events] for events in steps)  # a token every step meanwhile
    while engine.busy:
        engine.step()
    assert generated(engine.pop(late)) == alone(llama, long_prompt, 5)


def test_prompt_logprobs_beside_cached_prompts_with_chunked_prefill(llama):
    import torch

    prompt = encode(llama, SYSTEM + "Log-probs")
    engine = block_engine(llama, blocks=40, max_prefill_tokens=9)
    results = run(engine, {0: [("first", Request(prompt, 3, temperature=0))],
                           4: [("lp", Request(prompt, 4, temperature=0, top_logprobs=2, prompt_logprobs=True))]})
    lp = results["lp"]
    assert generated(lp) == alone(llama, prompt, 4)
    assert lp.cached_tokens == 0  # every position's logits computed, none taken from the cache
    engine.blocks.check()
    llama.model.free_cache()
    lsm = torch.log_softmax(llama.model(torch.tensor([prompt]), 0)[0], dim=-1)
    want = lsm[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0].tolist()
    assert lp.prompt_logprobs[0] is None and len(lp.prompt_logprobs) == len(prompt)
    assert lp.prompt_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert [[t for t, _ in top] for top in lp.prompt_top_logprobs[1:]] == lsm[:-1].topk(2).indices.tolist()


SYSTEM = "You are a helpful assistant. Answer briefly and politely, in English. "  # 3 blocks and more


def test_prefix_cache_shares_a_system_prompt_and_changes_no_token(llama):
    prompts = [SYSTEM + q for q in ("Hi", "What is up?", "Tell me more", "x")]
    arrivals = {0: [(p, Request(encode(llama, p), 20, temperature=0)) for p in prompts[:1]],
                3: [(p, Request(encode(llama, p), 20, temperature=0)) for p in prompts[1:]]}
    for prefix_cache in (True, False):
        engine = block_engine(llama, blocks=40, prefix_cache=prefix_cache)
        results = run(engine, arrivals)
        for p in prompts:
            assert generated(results[p]) == alone(llama, encode(llama, p), 20), p
        engine.blocks.check()
        cached = [results[p].cached_tokens for p in prompts]
        assert cached == ([0] + [len(encode(llama, SYSTEM)) // BLOCK * BLOCK] * 3 if prefix_cache else [0] * 4)


def test_cached_blocks_are_evicted_least_recently_used_first():
    m = BlockManager(5, 2)  # blocks 1..4 of 2 tokens
    a, a_keys = [], []
    assert m.grow(a, 5)  # 3 blocks: 2 full
    m.register([1, 2, 3, 4, 5], a, 4, a_keys)
    m.release(a)
    assert len(m.cached) == 2 and m.n_free == 4 and m.n_used == 0
    b, b_keys = [], []
    assert m.match([1, 2, 3, 4, 5, 6], b, b_keys) == 4 and m.n_used == 2  # both full blocks found
    m.release(b)
    c = []
    assert m.grow(c, 6)  # 3 blocks: the free one, then the cached ones, the chain's last first
    assert len(m.cached) == 1 and m.match([1, 2, 9], [], []) == 2
    m.release(c)
    m.check()


def test_a_request_the_pool_can_never_hold_is_refused(llama):
    engine = block_engine(llama, blocks=3)  # 32 tokens
    with pytest.raises(ValueError, match="cannot fit the KV cache's 2 blocks of 16 tokens"):
        engine.add(Request(encode(llama, "Hi"), 40, temperature=0))
    engine.add(Request(encode(llama, "Hi"), 20, temperature=0))  # 23 tokens fit


def test_a_chunk_costs_its_tokens_and_their_attention_over_the_context_before_it():
    assert prefill_cost(0, 64, 2000) == 64 and prefill_cost(2000, 64, 2000) == 128
    assert [chunk_tokens(start, 64, 2000) for start in (0, 2000, 6000, 10**6)] == [64, 32, 16, 0]
    assert chunk_tokens(0, 0, 2000) == 0 and chunk_tokens(0, -3, 2000) == 0


def test_the_block_books():
    m = BlockManager(5, 4)  # blocks 1..4 of 4 tokens
    a, b = [], []
    assert m.grow(a, 9) and a == [1, 2, 3] and m.n_free == 1
    assert not m.grow(b, 8) and b == [] and m.n_free == 1  # all or nothing
    assert m.grow(b, 3) and m.n_used == 4
    m.release(a)
    assert a == [] and m.n_free == 3
    m.check()


def test_the_default_pool_on_cuda_takes_a_fraction_of_the_free_memory(llama, self_draft, monkeypatch, caplog):
    import torch

    from llama.engine import budget

    a = llama.model.layers[0].attention
    per_token = 2 * len(llama.model.layers) * a.n_local_kv_heads * a.head_dim * 4  # keys and values, float32
    assert budget.bytes_per_token([llama.model]) == per_token
    assert budget.bytes_per_token([self_draft.model, self_draft.speculator.draft]) == 2 * per_token  # same shapes
    assert budget.default_kv_tokens([llama.model], 4, MAX_SEQ_LEN) == 4 * MAX_SEQ_LEN  # on the CPU: rows x seq_len
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 80 * gib))
    cuda = torch.device("cuda", 0)
    with caplog.at_level("INFO", logger="llama.engine.budget"):
        tokens = budget.default_kv_tokens([llama.model], 4, MAX_SEQ_LEN, device=cuda)
    assert tokens == int(10 * gib * 0.9) // per_token
    assert len(caplog.records) == 1 and f"{tokens} tokens" in caplog.records[0].getMessage()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (per_token * MAX_SEQ_LEN, 80 * gib))
    with pytest.raises(ValueError, match="lower --max_seq_len"):
        budget.default_kv_tokens([llama.model], 4, MAX_SEQ_LEN, device=cuda)
