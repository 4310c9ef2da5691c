"""Speculative decoding (llama.engine.speculative): greedy output token for token the model's own, on one
process and two; sampling that follows the model's (top-p filtered) distribution; bad input."""
import concurrent.futures
import json
import subprocess
import sys

import pytest
import torch

import helpers
from llama import Llama
from llama.weights.save import save_checkpoint
from llama.engine import Request, speculative
from llama.sampling import sampling_probs

MAX_SEQ_LEN = 64


@pytest.fixture(scope="module")
def draft_ckpt(tmp_path_factory):
    """The tiny model's weights with noise: a draft whose proposals are accepted about a third of
    the time, so that every step mixes acceptances and rejections."""
    sd = helpers.random_state_dict(helpers.TINY_PARAMS, seed=0)  # tiny_ckpt's weights
    g = torch.Generator().manual_seed(5)
    noisy = {k: v + 0.1 * v.std() * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    out = tmp_path_factory.mktemp("draft")
    save_checkpoint(noisy, helpers.TINY_PARAMS, out)
    return out


def build(ckpt, tokenizer, draft=None, k=4) -> Llama:
    kwargs = {} if draft is None else {"draft_ckpt_dir": str(draft), "speculate_k": k}
    return Llama.build(str(ckpt), str(tokenizer), max_seq_len=MAX_SEQ_LEN, max_batch_size=4, device="cpu", dtype="float32", **kwargs)


@pytest.fixture(scope="module")
def plain(tiny_ckpt, byte_tokenizer) -> Llama:
    return build(tiny_ckpt, byte_tokenizer)


@pytest.fixture(scope="module")
def spec(tiny_ckpt, byte_tokenizer, draft_ckpt) -> Llama:
    return build(tiny_ckpt, byte_tokenizer, draft_ckpt)


def encode(llama: Llama, texts):
    return [llama.tokenizer.encode(t, bos=True, eos=False) for t in texts]


MIXED = ["Hi", "A somewhat longer prompt here", "Medium prompt", "x" * 40]


@pytest.mark.parametrize("k", [1, 6])
def test_greedy_equals_plain_greedy_for_a_batch_of_mixed_lengths(plain, tiny_ckpt, byte_tokenizer, draft_ckpt, k):
    spec = build(tiny_ckpt, byte_tokenizer, draft_ckpt, k)
    prompts = encode(plain, MIXED)
    want, want_lps = plain.generate(prompts, max_gen_len=24, temperature=0, logprobs=True)
    got, got_lps = spec.generate(prompts, max_gen_len=24, temperature=0, logprobs=True)
    assert got == want
    assert len(got[3]) == MAX_SEQ_LEN - len(prompts[3])  # the long prompt runs into max_seq_len
    for g, w in zip(got_lps, want_lps):
        assert g == pytest.approx(w, abs=1e-4)
    assert 0 < spec.speculator.acceptance_rate < 1  # both accepted and rejected proposals were seen


@pytest.mark.parametrize("max_gen_len", [1, 2, 4, 5])
def test_greedy_max_gen_len_boundaries(plain, spec, max_gen_len):
    """Around k (4): the last step's proposals are cut to the budget, or run past it and are dropped."""
    prompts = encode(plain, MIXED[:3]) + [[1] * (MAX_SEQ_LEN - 3)]  # the last has room for 3 tokens only
    want, _ = plain.generate(prompts, max_gen_len=max_gen_len, temperature=0)
    assert spec.generate(prompts, max_gen_len=max_gen_len, temperature=0)[0] == want
    assert [len(t) for t in want] == [max_gen_len] * 3 + [min(3, max_gen_len)]


def test_greedy_with_all_proposals_accepted_and_stop_tokens_mid_proposal(plain, tiny_ckpt, byte_tokenizer, monkeypatch):
    """The model as its own draft: every proposal is accepted and each step emits k + 1 tokens; a
    stop token inside them ends the sequence there, the tokens after it are dropped."""
    self_draft = build(tiny_ckpt, byte_tokenizer, tiny_ckpt, k=4)
    prompts = encode(plain, MIXED[:3])
    full, _ = plain.generate(prompts, max_gen_len=16, temperature=0)
    assert self_draft.generate(prompts, max_gen_len=16, temperature=0)[0] == full
    assert self_draft.speculator.acceptance_rate == 1.0
    stops = list(plain.tokenizer.stop_tokens) + [full[0][2], full[1][7]]  # inside the first and second steps
    for llama in (plain, self_draft):
        monkeypatch.setattr(llama.tokenizer, "stop_tokens", stops)
    want, want_lps = plain.generate(prompts, max_gen_len=16, temperature=0, logprobs=True)
    got, got_lps = self_draft.generate(prompts, max_gen_len=16, temperature=0, logprobs=True)
    assert got == want and len(want[0]) <= 2 and len(want[1]) <= 7
    assert [len(x) for x in got_lps] == [len(x) for x in want_lps]


def test_adaptive_k_grows_on_acceptance_and_shrinks_on_rejection(plain, tiny_ckpt, byte_tokenizer, draft_ckpt, monkeypatch):
    """speculate_k="auto": greedy output stays the model's own while k moves: up to AUTO_MAX_K for
    the model as its own draft (all accepted), down to 1 for the noisy draft (a third accepted)."""
    ks = []
    step = speculative.Speculator.step
    monkeypatch.setattr(speculative.Speculator, "step", lambda self, *args: ks.append(self.k) or step(self, *args))
    prompts = encode(plain, MIXED)
    want, _ = plain.generate(prompts, max_gen_len=30, temperature=0)
    for draft, seen in ((tiny_ckpt, [4, 6, 8, 8]), (draft_ckpt, [4, 3, 2, 1])):
        ks.clear()
        auto = build(tiny_ckpt, byte_tokenizer, draft, k="auto")
        assert auto.speculator.adaptive
        assert auto.generate(prompts, max_gen_len=30, temperature=0)[0] == want
        assert ks[:4] == seen and max(ks) <= speculative.AUTO_MAX_K


def test_streaming_and_the_engine_with_staggered_requests(plain, spec):
    prompts = encode(plain, MIXED[:3])
    want, _ = plain.generate(prompts, max_gen_len=12, temperature=0)
    streamed = [[] for _ in prompts]
    steps = 0
    for step in spec.stream(prompts, max_gen_len=12, temperature=0):
        steps += 1
        for t in step:
            streamed[t.index].append(t.token)
    assert streamed == want and steps < 12  # several tokens a step
    # continuous batching: more requests than rows, each with its own limit and stop token
    requests = [Request(p, n, temperature=0, stop_tokens=stop) for p, n, stop in zip(
        encode(plain, MIXED + ["five", "six"]), [7, 20, 3, 15, 11, 9], [None, [want[1][4]], None, None, [want[0][1]], None])]
    results = {}
    for llama in (plain, spec):
        engine = llama.engine(2, MAX_SEQ_LEN)
        ids = [engine.add(r) for r in requests]
        for _ in engine.run():
            pass
        results[llama is spec] = [engine.pop(i).tokens for i in ids]
    assert results[True] == results[False]


def test_compiled_passes_give_the_eager_tokens(plain, tiny_ckpt, byte_tokenizer, draft_ckpt):
    """compile=True with a draft: the passes are compiled over all cache rows (4 rows here, rows
    finishing at different steps ride along as free rows): a greedy step's k draft steps, verify
    pass and acceptance in one call, a sampling step's passes one by one; the last steps verify k
    proposals too and drop those past the budget. Greedy and seeded sampling equal eager's."""
    compiled = Llama.build(str(tiny_ckpt), str(byte_tokenizer), max_seq_len=MAX_SEQ_LEN, max_batch_size=4,
                           device="cpu", dtype="float32", compile=True, draft_ckpt_dir=str(draft_ckpt), speculate_k=2)
    prompts = encode(plain, MIXED)
    lengths = [9, 4, 13, 6]
    want = [plain.generate([p], max_gen_len=n, temperature=0)[0][0] for p, n in zip(prompts, lengths)]
    passes = compiled.speculator.compiled
    fused_steps = []  # greedy steps of k proposals run every pass in one compiled call (greedy_pass)
    compiled.speculator.compiled = passes._replace(greedy=lambda *a: fused_steps.append(1) or passes.greedy(*a))
    engine = compiled.engine(4, MAX_SEQ_LEN)
    ids = [engine.add(Request(p, n, temperature=0)) for p, n in zip(prompts, lengths)]
    for _ in engine.run():
        pass
    assert [engine.pop(i).tokens for i in ids] == want
    assert all(f.fn is not None for f in (compiled._compiled, passes.draft, passes.greedy))  # no fallback
    assert fused_steps
    assert 0 < compiled.speculator.acceptance_rate < 1
    eager = build(tiny_ckpt, byte_tokenizer, draft_ckpt, k=2)
    sampled_steps = []  # sampling steps of k proposals too (sampling_pass)
    compiled.speculator.compiled = passes._replace(sampling=lambda *a: sampled_steps.append(1) or passes.sampling(*a))
    sampled = [llama.generate(prompts[:3], max_gen_len=8, temperature=1.0, top_p=0.9, seed=4)[0] for llama in (eager, compiled)]
    assert sampled[0] == sampled[1] and sampled_steps and passes.sampling.fn is not None
    # rows of mixed requests in one step: a greedy row among sampling ones keeps the model's own tokens
    engine, eager_engine = compiled.engine(4, MAX_SEQ_LEN), eager.engine(4, MAX_SEQ_LEN)
    runs = []
    for e in (eager_engine, engine):
        ids = [e.add(Request(prompts[0], 9, temperature=0)), e.add(Request(prompts[1], 9, temperature=0.9, top_p=0.95, seed=7))]
        for _ in e.run():
            pass
        runs.append([e.pop(i).tokens for i in ids])
    assert runs[0] == runs[1] and runs[1][0] == want[0][:9]
    # a nucleus wider than the candidates a compiled step looks in: the step is redone eagerly, to eager's tokens
    hot = [llama.generate(prompts[:2], max_gen_len=6, temperature=50.0, top_p=0.99, seed=1)[0] for llama in (eager, compiled)]
    assert hot[0] == hot[1] and compiled.speculator.redone > 0


def test_failed_compilation_runs_the_passes_eagerly(plain, tiny_ckpt, byte_tokenizer, draft_ckpt, monkeypatch):
    monkeypatch.setattr(torch, "compile", helpers.broken_compile)
    llama = Llama.build(str(tiny_ckpt), str(byte_tokenizer), max_seq_len=MAX_SEQ_LEN, max_batch_size=4,
                        device="cpu", dtype="float32", compile=True, draft_ckpt_dir=str(draft_ckpt), speculate_k=3)
    prompts = encode(plain, MIXED)
    assert llama.generate(prompts, max_gen_len=10, temperature=0)[0] == plain.generate(prompts, max_gen_len=10, temperature=0)[0]
    eager = build(tiny_ckpt, byte_tokenizer, draft_ckpt, k=3)
    sampled = [g.generate(prompts, max_gen_len=10, temperature=0.8, top_p=0.9, seed=2)[0] for g in (eager, llama)]
    assert sampled[0] == sampled[1]
    assert all(f.fn is None for f in (llama._compiled, *llama.speculator.compiled[1:]))


def test_seeded_sampling_is_reproducible_and_a_tiny_nucleus_is_greedy(plain, spec):
    prompts = encode(plain, MIXED[:3])
    a, _ = spec.generate(prompts, max_gen_len=10, temperature=1.0, top_p=0.95, seed=3)
    b, _ = spec.generate(prompts, max_gen_len=10, temperature=1.0, top_p=0.95, seed=3)
    assert a == b and all(len(t) == 10 for t in a)
    # top_p near 0 keeps only the top token of both models: sampling is greedy, exactly
    greedy, _ = plain.generate(prompts, max_gen_len=10, temperature=0)
    assert spec.generate(prompts, max_gen_len=10, temperature=0.7, top_p=1e-6, seed=1)[0] == greedy


# ---------------------------------------------------------------- the distribution of sampling

P = torch.tensor([[0.40, 0.25, 0.15, 0.10, 0.06, 0.04], [0.05, 0.05, 0.30, 0.30, 0.20, 0.10], [0.2] * 5 + [0.0]])
Q = torch.tensor([[0.10, 0.10, 0.20, 0.20, 0.20, 0.20], [0.30, 0.30, 0.10, 0.10, 0.10, 0.10]])
N = 200_000


def tv(samples: torch.Tensor, p: torch.Tensor) -> float:
    """Total-variation distance between the empirical distribution of `samples` and `p`."""
    return 0.5 * float((torch.bincount(samples, minlength=len(p)).float() / len(samples) - p).abs().sum())


def emitted(accept_reject, p: torch.Tensor, q: torch.Tensor, seed: int = 0):
    """Draw N rows of k = len(q) proposals from q and accept or reject them against p; return
    the first emitted token of every row, and the second of the rows that accepted the first."""
    g = torch.Generator().manual_seed(seed)
    k = q.shape[0]
    draft = torch.stack([torch.multinomial(q[j], N, replacement=True, generator=g) for j in range(k)], dim=1)
    n, nxt = accept_reject(p.expand(N, -1, -1), q.expand(N, -1, -1), draft, g)
    tokens = torch.cat([draft, nxt[:, None]], dim=1)
    seq = torch.where(torch.arange(k + 1) < n[:, None], tokens, -1)
    seq[torch.arange(N), n] = nxt  # each row: draft[:n], then next_token
    return seq[:, 0], seq[n >= 1, 1]


def always_accept(p, q, draft, generator=None):
    """Wrong: every proposal is kept (the draft's distribution, not the model's)."""
    n = torch.full((draft.shape[0],), draft.shape[1])
    return n, torch.multinomial(p[:, -1], 1, generator=generator)[:, 0]


def resample_from_p(p, q, draft, generator=None):
    """Wrong: the acceptance test is right but a rejected token is redrawn from p, not from
    max(0, p - q): tokens the draft favours too little come out too rarely."""
    n, _ = speculative.accept_reject(p, q, draft, generator)
    return n, torch.multinomial(p[torch.arange(len(n)), n], 1, generator=generator)[:, 0]


def test_rejection_sampling_follows_the_models_distribution():
    first, second = emitted(speculative.accept_reject, P, Q)
    assert tv(first, P[0]) < 0.01 and tv(second, P[1]) < 0.01
    # the bound is tight enough to catch wrong implementations
    for wrong in (always_accept, resample_from_p):
        bad_first, bad_second = emitted(wrong, P, Q)
        assert max(tv(bad_first, P[0]), tv(bad_second, P[1])) > 0.05, wrong.__name__
    # the draft's own distribution is far from the model's: its tokens are often rejected
    assert tv(torch.multinomial(Q[0], N, replacement=True), P[0]) > 0.2


def test_rejection_sampling_follows_the_top_p_filtered_distribution():
    """Top-p applies to both models: the output follows the model's nucleus, renormalised, even
    where the draft proposes tokens outside it."""
    logits_p = torch.tensor([[0.35, 0.25, 0.15, 0.12, 0.08, 0.05], [0.05, 0.1, 0.4, 0.3, 0.1, 0.05], [1 / 6] * 6]).log()
    logits_q = torch.tensor([[0.1, 0.1, 0.2, 0.3, 0.2, 0.1], [0.3, 0.3, 0.1, 0.1, 0.1, 0.1]]).log()
    p, q = sampling_probs(logits_p, 1.0, 0.7), sampling_probs(logits_q, 1.0, 0.95)
    assert ((p[0] == 0) & (q[0] > 0)).sum() >= 2  # the draft reaches outside the model's nucleus
    first, second = emitted(speculative.accept_reject, p, q, seed=2)
    assert tv(first, p[0]) < 0.01 and tv(second, p[1]) < 0.01
    assert tv(first, torch.softmax(logits_p[0], -1)) > 0.2  # not the unfiltered distribution
    assert not torch.isin(first, (p[0] == 0).nonzero()[:, 0]).any()  # nothing outside the nucleus


def test_greedy_pass_summary_is_the_separate_passes_acceptance(spec):
    """greedy_pass (what a compiled greedy step runs) returns the verify logits and, per row, the
    proposals, the number accepted and the next token, as accept_greedy finds them; and flags a row
    whose logits are not finite."""
    from llama import kv_cache

    model, draft, k = spec.model, spec.speculator.draft, 3
    tokens = torch.tensor([[5, 9], [7, 3]])  # each row's last two tokens
    start = torch.tensor([4, 10])
    with torch.inference_mode():
        for m in (model, draft):
            kv_cache.allocate(m, 2, MAX_SEQ_LEN)
        target, summary = speculative.greedy_pass(model, draft, k, tokens, start)
        proposals = summary[:, :k]
        n, nxt = speculative.accept_greedy(target, proposals)
        assert summary[:, k].tolist() == n.tolist() and summary[:, k + 1].tolist() == nxt.tolist()
        assert summary[:, k + 2].tolist() == [0, 0]
        again = model(torch.cat([tokens[:, -1:], proposals], dim=1), start + 1)  # the verify pass alone
        torch.testing.assert_close(target, again)
        weight = model.output.weight
        saved = weight.clone()
        weight[3] = float("nan")  # every row's logit of token 3
        try:
            assert speculative.greedy_pass(model, draft, k, tokens, start)[1][:, k + 2].tolist() == [1, 1]
        finally:
            weight.copy_(saved)


def test_sampling_pass_draws_what_the_separate_passes_draw_with_the_same_uniforms(spec):
    """sampling_pass (what a compiled sampling step runs) proposes with `propose` and accepts with
    `accept` from the uniforms it is given: the draft's steps and the verify pass run one by one
    with those uniforms give the same proposals, acceptances and next tokens; a row at temperature
    0 among them is greedy."""
    from llama import kv_cache

    model, draft, k = spec.model, spec.speculator.draft, 3
    tokens, start = torch.tensor([[5, 9], [7, 3], [2, 8]]), torch.tensor([4, 10, 6])
    temperature, top_p = torch.tensor([0.9, 0.0, 1.3]), torch.tensor([0.95, 1.0, 0.8])
    uniforms = torch.rand(3, 2 * k + 1, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for m in (model, draft):
            kv_cache.allocate(m, 3, MAX_SEQ_LEN)
        target, summary = speculative.sampling_pass(model, draft, k, tokens, start, temperature, top_p, uniforms)
        logits = draft(tokens, start)[:, -1]
        proposals, qs, argmax = [], [], []
        for j in range(k):
            if j:
                logits = draft(proposals[-1][:, None], start + 1 + j)[:, -1]
            token, q, _ = speculative.propose(logits, temperature, top_p, uniforms[:, j])
            proposals.append(token)
            qs.append(q)
            argmax.append(int(logits[1].argmax()))
        proposals = torch.stack(proposals, dim=1)
        again = model(torch.cat([tokens[:, -1:], proposals], dim=1), start + 1)
        n, nxt, _ = speculative.accept(again, proposals, torch.stack(qs, dim=1), temperature, top_p, uniforms)
        # a nucleus past the NUCLEUS_TOP candidates (nearly the whole vocabulary) is flagged for an eager redo
        hot = speculative.sampling_pass(model, draft, k, tokens, start, torch.tensor([50.0, 0.0, 0.9]),
                                        torch.tensor([0.99, 1.0, 0.95]), uniforms)[1]
    assert summary[:, :k].tolist() == proposals.tolist()
    assert summary[:, k].tolist() == n.tolist() and summary[:, k + 1].tolist() == nxt.tolist()
    assert summary[:, k + 2].tolist() == [0, 0, 0] and hot[:, k + 2].tolist() == [2, 0, 0]
    torch.testing.assert_close(target, again)
    greedy_n, greedy_next = speculative.accept_greedy(again[1:2], proposals[1:2])
    assert proposals[1].tolist() == argmax
    assert (int(n[1]), int(nxt[1])) == (int(greedy_n[0]), int(greedy_next[0]))


def test_draw_is_inverse_transform_sampling():
    """draw(probs, u): the first token whose cumulative mass exceeds u times the total; never a
    token of zero mass, at u = 0, at u just below 1, or on unnormalised rows; and its draws
    follow the distribution."""
    from llama.sampling import draw

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]])
    for u, want in ((0.0, 1), (0.49, 1), (0.51, 3), (0.79, 3), (0.81, 4), (1 - 1e-7, 4)):
        assert int(draw(probs, torch.tensor([u]))[0]) == want
        assert int(draw(probs * 7, torch.tensor([u]))[0]) == want  # unnormalised
    many = torch.rand(N, generator=torch.Generator().manual_seed(1))
    assert tv(draw(P[0].expand(N, -1), many), P[0]) < 0.01


def test_the_nucleus_among_the_top_candidates_is_the_sorted_nucleus_where_it_fits():
    """nucleus_probs (no sort of the vocabulary) gives sampling_probs's distribution on every row
    it calls covered, and calls a row uncovered where the nucleus is wider than its candidates;
    sampling_dist then gives the sorted one there."""
    from llama.sampling import nucleus_probs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 2000, generator=g) * torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.1])[:, None]
    temperature, top_p = torch.tensor([1.0, 0.7, 1.0, 1.0, 1.0, 2.0]), torch.tensor([0.9, 0.95, 0.5, 0.9, 0.99, 0.9])
    probs, covered = nucleus_probs(logits, temperature, top_p, 64)
    want = sampling_probs(logits, temperature, top_p)
    assert covered[:2].all() and not covered[-2:].any()
    torch.testing.assert_close(probs[covered], want[covered], rtol=1e-5, atol=1e-7)
    assert torch.equal(probs[covered] > 0, want[covered] > 0)  # the same tokens kept
    whole, all_covered = nucleus_probs(logits, temperature, top_p, 2000)  # candidates = the vocabulary
    assert torch.equal(whole, want) and all_covered.all()
    dist, exact = speculative.sampling_dist(logits, temperature, top_p)
    torch.testing.assert_close(dist, want, rtol=1e-5, atol=1e-7)
    assert exact.all()


def test_greedy_acceptance_is_the_argmax_rule():
    logits = torch.tensor([[[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]]])  # argmax 1, 0, 2
    for draft, n, nxt in (([1, 0], 2, 2), ([1, 2], 1, 0), ([2, 0], 0, 1)):
        got = speculative.accept_greedy(logits, torch.tensor([draft]))
        assert (int(got[0][0]), int(got[1][0])) == (n, nxt)


# ---------------------------------------------------------------- bad input


def test_bad_input_names_the_problem_and_the_fix(tmp_path, tiny_ckpt, byte_tokenizer, draft_ckpt):
    for k in (0, 17, 2.5, True, "adaptive"):
        with pytest.raises(ValueError, match=r"speculate_k .* is out of range: pass an integer from 1 to 16 .* or 'auto'"):
            build(tiny_ckpt, byte_tokenizer, draft_ckpt, k)
    other_vocab = helpers.make_checkpoint(tmp_path / "vocab", params={**helpers.TINY_PARAMS, "vocab_size": 768})
    with pytest.raises(ValueError, match=r"has vocab_size 768 but the model has 512: pass a draft trained with"):
        build(tiny_ckpt, byte_tokenizer, other_vocab)
    other_tok = helpers.make_checkpoint(tmp_path / "tok")
    (other_tok / "tokenizer.model").write_text(byte_tokenizer.read_text().replace(" 255\n", " 256\n"))
    with pytest.raises(ValueError, match=r"the draft's tokenizer .* differs from the model's .*: pass a draft"):
        build(tiny_ckpt, byte_tokenizer, other_tok)
    with pytest.raises(ValueError, match=r"draft_parallel 'split' is unknown: pass 'replicated' .* or 'sharded'"):
        Llama.build(str(tiny_ckpt), str(byte_tokenizer), max_seq_len=MAX_SEQ_LEN, max_batch_size=4, device="cpu",
                    draft_ckpt_dir=str(draft_ckpt), draft_parallel="split")
    (other_tok / "tokenizer.model").write_bytes(byte_tokenizer.read_bytes())  # its own copy, the same: fine
    assert build(tiny_ckpt, byte_tokenizer, other_tok).speculator is not None


# ---------------------------------------------------------------- two processes


VARIANTS = [("replicated", False), ("sharded", False), ("replicated", True)]  # (draft_parallel, compile)


def test_two_processes_accept_the_same_tokens_as_one(tmp_path, plain, tiny_ckpt_2shards, byte_tokenizer, draft_ckpt):
    """The model sharded over two ranks, the draft whole on each or split like the model, eager or
    compiled (the passes one by one, compiled on each rank): greedy output is the one-process
    model's own, and seeded sampling draws the same tokens on both ranks. The three variants run
    one after another in one torchrun launch (the worker's --variants)."""
    outs = [tmp_path / f"two-{parallel}-{int(compile)}.pt" for parallel, compile in VARIANTS]
    variants = [{"out": str(out), "draft_parallel": parallel, "compile": int(compile)}
                for out, (parallel, compile) in zip(outs, VARIANTS)]
    args = ["--ckpt_dir", tiny_ckpt_2shards, "--tokenizer_path", byte_tokenizer, "--draft_ckpt_dir", draft_ckpt,
            "--variants", json.dumps(variants)]
    r = helpers.run_torchrun("tests/workers/generate.py", args, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    from workers.generate import PROMPTS

    want, want_lps = plain.generate(encode(plain, PROMPTS), 12, temperature=0, logprobs=True)
    kv_rows = helpers.TINY_PARAMS["n_kv_heads"] * 16  # whole; split in two when sharded
    for out, (parallel, compile) in zip(outs, VARIANTS):
        two, variant = torch.load(out), (parallel, compile)
        if compile:
            assert two["compiled"] == [True, True, True], variant  # the model's steps, its verify passes, the draft's steps
        assert two["tokens"] == want, variant
        assert two["logprobs"] == [pytest.approx(lp, abs=1e-5) for lp in want_lps], variant
        assert two["draft_wk_rows"] == (kv_rows if parallel == "replicated" else kv_rows // 2), variant
        assert 0 < two["acceptance"] < 1, variant
        assert torch.load(f"{out}.rank1.sampled") == two["sampled"], variant


# ---------------------------------------------------------------- scripts


def test_scripts_take_a_draft_and_the_demo_ships_one(tmp_path, tiny_ckpt, byte_tokenizer, draft_ckpt):
    from llama import demo

    if (demo.DRAFT_DIR / "params.json").is_file():
        assert demo.resolve_draft(None, None, True) == str(demo.DRAFT_DIR)  # the demo model's own
        assert (demo.DRAFT_DIR / "consolidated.00.pth").is_file()
    else:  # a checkout without the draft's weights says what to do
        with pytest.raises(FileNotFoundError, match="the bundled draft model is missing .*: pass --draft_ckpt_dir"):
            demo.resolve_draft(None, None, True)
    assert demo.resolve_draft(None, None, False) is None and demo.resolve_draft("x", "d", False) == "d"
    with pytest.raises(ValueError, match="--speculate needs --draft_ckpt_dir for your own checkpoint"):
        demo.resolve_draft(str(tiny_ckpt), None, True)
    args = ["--ckpt_dir", tiny_ckpt, "--tokenizer_path", byte_tokenizer, "--draft_ckpt_dir", draft_ckpt,
            "--max_gen_len", 8, "--max_seq_len", 2048, "--device", "cpu", "--temperature", 0]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the refusal's process beside the run
        refused = pool.submit(subprocess.run, [sys.executable, "example_text_completion.py", *map(str, args[:-2]), "--speculate_k", "0"],
                              cwd=helpers.REPO, env=helpers.child_env(), capture_output=True, text=True, timeout=120)
        r = helpers.run_torchrun("example_text_completion.py", args, 1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("==================================") == 4 and "Speculative decoding: draft" in r.stderr
    r = refused.result()
    assert r.returncode == 1 and r.stderr.strip().startswith("error: speculate_k 0 is out of range")


def test_benchmark_reports_acceptance_and_decode_speed_with_and_without_the_draft(tmp_path, tiny_ckpt, byte_tokenizer, draft_ckpt):
    out = tmp_path / "spec.json"
    r = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--ckpt_dir", str(tiny_ckpt), "--tokenizer_path", str(byte_tokenizer),
         "--draft_ckpt_dir", str(draft_ckpt), "--quick", "--speculate_k", "2,4", "--threads", "1", "--out", str(out)],
        cwd=helpers.REPO, env=helpers.child_env(), capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "acceptance" in r.stdout and "decode tok/s, batch 1" in r.stdout
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"plain", "k=2", "k=4"} and report["runs"]["plain"]["tokens_per_s"] > 0
    for name in ("k=2", "k=4"):
        run = report["runs"][name]
        assert 0 < run["acceptance"] < 1 and run["tokens_per_s"] > 0 and run["speedup"] > 0
        assert run["same_tokens"] is True  # greedy: the model's own tokens


def test_the_server_with_a_draft_answers_what_the_model_gives_alone(tmp_path, plain, tiny_ckpt, byte_tokenizer, draft_ckpt):
    """scripts/serve.py --draft_ckpt_dir over HTTP: concurrent greedy requests, batched by the
    engine with speculation, each get the plain model's own completion (text, token count, finish
    reason); streamed, several tokens a step, the pieces join into the same text."""
    lengths = [12, 5, 9, 12]
    served = helpers.start_server(tmp_path, tiny_ckpt, byte_tokenizer, extra=("--draft_ckpt_dir", str(draft_ckpt)))
    try:
        helpers.check_against_generate(plain, helpers.concurrent_completions(served, MIXED, lengths), MIXED, lengths)
        client = served.client()
        for prompt, n in zip(MIXED, lengths):
            chunks = client.completions.create(model=served.model, prompt=prompt, max_tokens=n, temperature=0, stream=True)
            assert "".join(c.choices[0].text for c in chunks) == plain.tokenizer.decode(helpers.alone(plain, prompt, n))
        assert "Speculative decoding: draft" in served.output()
    finally:
        helpers.stop_server(served)
