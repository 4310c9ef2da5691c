# Speculative decoding beside the engine: a draft model proposes, the model verifies in one pass.
"""Speculative decoding beside the engine (llama.engine).

Each step, for every running sequence, the draft model proposes k tokens one at a time; the model
then scores the sequence's last token and all k proposals in one forward pass of k + 1 positions.
A sequence keeps the longest accepted prefix of the proposals plus one token of the model's own
(the correction at the first rejection, or a bonus token when all k are accepted):

- greedy (temperature 0): a proposal is accepted when it is the model's argmax, so the output is
  token for token what the model gives alone;
- sampling: rejection sampling (`accept_reject`) that keeps the model's distribution exactly.

Both models' KV caches are indexed by position, so rejected positions need no undoing: the
sequence's position moves back, the attention masks hide every slot past it, and the next step
overwrites them. The engine's stop rule (`Engine._emit`) sees the emitted tokens one by one.
"""
import contextlib
import logging
from typing import TYPE_CHECKING, Callable, List, NamedTuple, Optional, Tuple, Union

import torch

from llama import kv_cache
from llama.engine import Event, check_finite, draw, nonfinite_rows, nucleus_probs, sampling_probs, step_positions
from llama.model import Transformer

if TYPE_CHECKING:
    from llama.engine import Engine, _Sequence

logger = logging.getLogger(__name__)

# a compiled forward pass (llama.generation.CompiledStep): (rows, t) tokens at (rows,) positions ->
# (rows, t, vocab) logits over the whole KV cache, or None once compilation has failed
StepFn = Callable[[torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


class CompiledPasses(NamedTuple):
    """compile=True: the compiled functions a speculative step runs (each over all cache rows)."""

    model: StepFn  # the model's forward pass: verify passes of k + 1 tokens
    draft: StepFn  # the draft's: its steps of one token (two when it lags)
    # `greedy_pass` of both models (k draft steps and the verify pass in one graph) for steps whose
    # rows all decode greedily, or None (a sharded model: the replicated draft's group switch,
    # llama.distributed.replicated, cannot enter a graph)
    greedy: Optional[Callable[..., Optional[Tuple[torch.Tensor, torch.Tensor]]]]
    # `sampling_pass` of both models, for the other steps (any row sampling), or None as `greedy`
    sampling: Optional[Callable[..., Optional[Tuple[torch.Tensor, torch.Tensor]]]] = None


MAX_K = 16
# sampling steps find each row's nucleus among its most probable tokens (llama.engine.nucleus_probs)
NUCLEUS_TOP = 256
DEFAULT_K = 4
# speculate_k="auto": k moves after each step between 1 and AUTO_MAX_K, starting at DEFAULT_K
AUTO = "auto"
AUTO_MAX_K = 8
# how a draft is held under torchrun (Llama.build's draft_parallel)
REPLICATED, SHARDED = "replicated", "sharded"


def check_k(k: Union[int, str]) -> None:
    """Raise a one-line ValueError unless `k` (tokens proposed per step) is an int in 1..MAX_K or "auto"."""
    if k == AUTO:
        return
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(
            f"speculate_k {k!r} is out of range: pass an integer from 1 to {MAX_K} "
            f"(the number of draft tokens proposed per step; {DEFAULT_K} is a good start) or {AUTO!r} (adaptive)"
        )


def check_draft_parallel(parallel: str) -> None:
    """Raise a one-line ValueError unless `parallel` names a way to hold the draft under torchrun."""
    if parallel not in (REPLICATED, SHARDED):
        raise ValueError(
            f"draft_parallel {parallel!r} is unknown: pass {REPLICATED!r} (the draft whole on every rank) "
            f"or {SHARDED!r} (split over the model-parallel ranks like the model)"
        )


def accept_reject(
    p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, generator: Optional[torch.Generator] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Speculative rejection sampling on probability tensors (Leviathan et al.; Chen et al., 2023).

    p: (bsz, k+1, vocab), the model's distributions at each proposal and one past the last;
    q: (bsz, k, vocab), the draft's distributions the proposals were drawn from; draft: (bsz, k).
    Proposal j is accepted with probability min(1, p_j(d_j) / q_j(d_j)); the first rejected one is
    replaced by a draw from max(0, p_j - q_j) renormalised, and when all k are accepted one more
    token is drawn from p_k. Every emitted token then follows p exactly, whatever q is.

    Returns (n_accepted (bsz,), next_token (bsz,)): each row emits draft[:n] and then next_token.
    Its uniforms, k acceptance tests and one draw per row, come from `generator` (`accept_drawn`).
    """
    bsz, k = draft.shape
    u = torch.rand(bsz, k + 1, generator=generator, device=p.device)
    return accept_drawn(p, q, draft, u[:, :k], u[:, k])


def accept_drawn(
    p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, u_accept: torch.Tensor, u_next: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`accept_reject` with its uniforms given: u_accept (bsz, k) for the acceptance tests, u_next
    (bsz,) for the draw of the next token. A function of its inputs only (`llama.engine.draw`), so
    a compiled step (`sampling_pass`) and an eager one accept and draw the same tokens."""
    bsz, k = draft.shape
    rows = torch.arange(bsz, device=p.device)
    p_d = p[:, :k].gather(-1, draft[..., None])[..., 0]  # (bsz, k)
    q_d = q.gather(-1, draft[..., None])[..., 0]
    accepted = u_accept * q_d < p_d  # u < p/q without dividing (q_d > 0: d was drawn from q)
    n = torch.cumprod(accepted.long(), dim=1).sum(dim=1)  # (bsz,) leading acceptances
    # what the next token is drawn from: the residual at the first rejection, else p_k
    residual = torch.cat([(p[:, :k] - q).clamp(min=0), p[:, k:]], dim=1)[rows, n]  # (bsz, vocab)
    mass = residual.sum(dim=-1, keepdim=True)
    # p_j == q_j leaves no residual, but then nothing is rejected: only rounding gets here
    residual = torch.where(mass > 0, residual, p[rows, n])
    return n, draw(residual, u_next)


def sampling_dist(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, in_graph: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The distributions (..., vocab) that rows of logits with per-row temperature and top_p (...)
    sample from, as `sampling_probs` gives them, and (...) True where they are exact. Found among
    each row's NUCLEUS_TOP most probable tokens (`nucleus_probs`: no sort of the vocabulary); a row
    whose nucleus may reach past them gets the whole sort, eagerly, or in a graph (`in_graph`,
    which cannot branch on values) is flagged False for its caller to redo the step eagerly. Rows
    at temperature 0 are flagged True (their callers take the argmax)."""
    probs, exact = nucleus_probs(logits, temperature, top_p, NUCLEUS_TOP)
    exact = exact | (temperature <= 0)
    if not in_graph and not bool(exact.all()):
        probs = torch.where(exact[..., None], probs, sampling_probs(logits, temperature, top_p))
        exact = torch.ones_like(exact)
    return probs, exact


def propose(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor, in_graph: bool = False
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The draft's token per row from its logits (rows, vocab): a draw with uniform u (rows,) from
    its sampling distribution q (rows at temperature > 0), else its argmax. Returns (tokens, q,
    exact (rows,): see `sampling_dist`)."""
    q, exact = sampling_dist(logits, temperature, top_p, in_graph)
    return torch.where(temperature > 0, draw(q, u), logits.argmax(dim=-1)), q, exact


def accept(
    target: torch.Tensor, draft: torch.Tensor, qs: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
    uniforms: torch.Tensor, in_graph: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's number of accepted proposals and next token: `accept_greedy` for rows at
    temperature 0, `accept_drawn` for the others, against the model's sampling distributions of
    `target` (rows, k + 1, vocab) and the draft's, qs (rows, k, vocab), with the uniforms of
    `Speculator._sampling` (rows, 2k + 1). Returns (n, next_token, exact (rows,): `sampling_dist`)."""
    k = draft.shape[1]
    n_greedy, next_greedy = accept_greedy(target, draft)
    p, exact = sampling_dist(target, temperature[:, None].expand(-1, k + 1), top_p[:, None].expand(-1, k + 1), in_graph)
    n, next_token = accept_drawn(p, qs, draft, uniforms[:, k : 2 * k], uniforms[:, 2 * k])
    sampled = temperature > 0
    return torch.where(sampled, n, n_greedy), torch.where(sampled, next_token, next_greedy), exact.all(dim=1)


def accept_greedy(logits: torch.Tensor, draft: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The greedy case of `accept_reject`: logits (bsz, k+1, vocab) of the model, draft (bsz, k).
    A proposal is accepted while it is the model's argmax; the next token is the model's argmax
    after the accepted prefix. Returns (n_accepted (bsz,), next_token (bsz,))."""
    best = logits.argmax(dim=-1)  # (bsz, k+1)
    n = torch.cumprod((draft == best[:, : draft.shape[1]]).long(), dim=1).sum(dim=1)
    return n, best[torch.arange(len(n), device=n.device), n]


def greedy_pass(
    model: Transformer, draft: Transformer, k: int, tokens: torch.Tensor, start_pos: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One greedy step as one function, for torch.compile to make one graph of: the draft's k
    steps, each proposing its argmax, the model's verify pass of the last token and the k
    proposals, and the acceptance (`accept_greedy`). Compiled, a step costs one call instead of
    k + 1, each with its own Python, guard checks and wrapper (on the demo pair, more than the
    draft's own kernels), and one read of its results.

    tokens (rows, t): each row's last token, after the one before it when t = 2 (a draft that
    lags); start_pos (rows,): the position of tokens[:, 0]. Both models' KV caches get the slots
    the separate passes write. Returns (the model's logits (rows, k + 1, vocab), a summary (rows,
    k + 3): each row's k proposals, its number accepted, its next token, and 1 where its logits
    hold a NaN or infinity (`llama.engine.nonfinite_rows`), else 0).
    """
    pos = start_pos + tokens.shape[1] - 1  # (rows,) the last token's position
    last = torch.full_like(start_pos, tokens.shape[1] - 1)  # the draft's logits at the last token only
    logits = draft._forward(tokens, start_pos, last, use_cache=True)[:, -1]  # (rows, vocab)
    proposals = [logits.argmax(dim=-1)]
    for j in range(1, k):
        logits = draft._forward(proposals[-1][:, None], pos + j, None, use_cache=True)[:, -1]
        proposals.append(logits.argmax(dim=-1))
    draft_tokens = torch.stack(proposals, dim=1)  # (rows, k)
    verify = torch.cat([tokens[:, -1:], draft_tokens], dim=1)  # (rows, k + 1)
    target = model._forward(verify, pos, None, use_cache=True)  # (rows, k + 1, vocab)
    n, next_token = accept_greedy(target, draft_tokens)
    return target, _summary(target, draft_tokens, n, next_token)


def sampling_pass(
    model: Transformer, draft: Transformer, k: int, tokens: torch.Tensor, start_pos: torch.Tensor,
    temperature: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`greedy_pass` for steps with rows that sample: each row's temperature and top_p (rows,)
    and its uniforms (rows, 2k + 1, `Speculator._sampling`) are inputs, so the draws and the
    rejection sampling (`propose`, `accept`) run in the graph, to the tokens an eager step given
    the same uniforms gives. Rows at temperature 0 propose and accept greedily. Same returns."""
    pos = start_pos + tokens.shape[1] - 1
    last = torch.full_like(start_pos, tokens.shape[1] - 1)
    logits = draft._forward(tokens, start_pos, last, use_cache=True)[:, -1]  # (rows, vocab)
    proposals, qs, exact = [], [], []
    for j in range(k):
        if j:
            logits = draft._forward(proposals[-1][:, None], pos + j, None, use_cache=True)[:, -1]
        token, q, exact_q = propose(logits, temperature, top_p, uniforms[:, j], in_graph=True)
        proposals.append(token)
        qs.append(q)
        exact.append(exact_q)
    draft_tokens = torch.stack(proposals, dim=1)  # (rows, k)
    verify = torch.cat([tokens[:, -1:], draft_tokens], dim=1)  # (rows, k + 1)
    target = model._forward(verify, pos, None, use_cache=True)  # (rows, k + 1, vocab)
    n, next_token, exact_p = accept(target, draft_tokens, torch.stack(qs, dim=1), temperature, top_p, uniforms, in_graph=True)
    inexact = ~(torch.stack(exact, dim=1).all(dim=1) & exact_p)
    return target, _summary(target, draft_tokens, n, next_token, inexact)


def _summary(
    target: torch.Tensor, draft_tokens: torch.Tensor, n: torch.Tensor, next_token: torch.Tensor, inexact: Optional[torch.Tensor] = None
) -> torch.Tensor:
    # (rows, k + 3): the proposals, the number accepted, the next token, and 1 where target is not
    # finite, 2 where a row's nucleus reached past the candidates (`sampling_dist`), else 0
    flags = nonfinite_rows(target).any(dim=1).long()
    if inexact is not None:
        flags = flags + 2 * inexact.long()
    return torch.cat([draft_tokens, n[:, None], next_token[:, None], flags[:, None]], dim=1)


class Speculator:
    """A draft model that proposes `k` tokens per step for the engine's model to verify.

    The draft has a KV cache of the engine's shape, rows in step with the model's: the engine
    prefills, moves and retires both. After a step whose k proposals were all accepted the draft
    lags one position behind (it never saw the last proposal); the next step then feeds it the
    sequence's last two tokens instead of one.
    `k` "auto" adapts it after each step, as transformers' assisted generation does with its
    "heuristic" schedule: two more when every row accepted all k proposals, else one fewer, within
    1..AUTO_MAX_K (from DEFAULT_K; every rank sees the same acceptances, so all move alike).
    `context` wraps every draft forward pass (llama.distributed.replicated for a draft held whole
    on every rank under torchrun; a no-op for one split like the model). `compiled`, set by `Llama` with compile=True: the compiled
    passes (`CompiledPasses`), which the step uses over all cache rows when the engine decodes with
    static shapes: for a step of k proposals, `greedy_pass` when its rows all decode greedily,
    else `sampling_pass` (every pass of the step, the draws and the acceptance in one call, always
    fed each row's last two tokens, so that one graph serves lagging and level drafts); for a
    shorter step, the draft's steps and verify passes one by one. Steps propose k tokens up to a
    sequence's end (those past its budget are dropped), so a shorter pass, which would compile
    anew or run eagerly, comes only where the KV cache runs out. Sampling rows draw their step's
    uniforms from their own generators first (`_sampling`), so a seed gives the same tokens
    compiled and eager.
    """

    def __init__(self, draft: Transformer, k: Union[int, str] = DEFAULT_K, context: Callable = contextlib.nullcontext):
        self.draft, self.context = draft, context
        self.set_k(k)
        self.proposed = 0  # draft tokens proposed, and of them accepted, since the start
        self.accepted = 0
        self._behind: set = set()  # ids of the sequences whose draft cache lags one position
        self.fused_sampled = 0  # compiled sampling steps (sampling_pass) run, and of them
        self.redone = 0  # those run again eagerly (a nucleus past NUCLEUS_TOP tokens)
        self.compiled: Optional[CompiledPasses] = None

    def set_k(self, k: Union[int, str]) -> None:
        """Propose `k` tokens per step from now on (1..MAX_K), or adapt it from DEFAULT_K ("auto")."""
        check_k(k)
        self.adaptive = k == AUTO
        self.k = DEFAULT_K if self.adaptive else k

    @property
    def acceptance_rate(self) -> float:
        """Accepted proposals over proposed, since the start (0 before any proposal)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    def fit(self, rows: int, seq_len: int) -> None:
        """Give the draft a KV cache of the engine's shape (kept when it already has it)."""
        if kv_cache.shape(self.draft) != (rows, seq_len):
            kv_cache.allocate(self.draft, rows, seq_len)

    def _forward(self, tokens: torch.Tensor, positions: List[int], rows: Optional[int] = None) -> torch.Tensor:
        """The draft's logits (bsz, vocab) at the last of `tokens` (bsz, n), placed at `positions`;
        compiled over `rows` cache rows when given (see `_compiled`)."""
        with self.context():
            logits = self._compiled(self.compiled and self.compiled.draft, tokens, positions, rows)
            if logits is not None:
                return logits[:, -1]
            start_pos, kv_len = step_positions(positions, tokens.shape[1], tokens.device)
            last = torch.full((tokens.shape[0],), tokens.shape[1] - 1, device=tokens.device)
            return self.draft(tokens, start_pos, output_index=last, kv_len=kv_len)[:, 0]

    def _verify(self, engine: "Engine", tokens: torch.Tensor, positions: List[int], rows: Optional[int]) -> torch.Tensor:
        """The model's logits (bsz, k + 1, vocab) of the last tokens and the proposals, `tokens`."""
        full = rows if tokens.shape[1] == self.k + 1 else None
        logits = self._compiled(self.compiled and self.compiled.model, tokens, positions, full)
        if logits is None:
            start_pos, kv_len = step_positions(positions, tokens.shape[1], tokens.device)
            logits = engine.model(tokens, start_pos, kv_len=kv_len)
        return logits

    @staticmethod
    def _compiled(
        fn: Optional[Callable], tokens: torch.Tensor, positions: List[int], rows: Optional[int], extra: Tuple[torch.Tensor, ...] = ()
    ) -> Union[None, torch.Tensor, tuple]:
        """The compiled pass `fn` of `tokens` (bsz, n) at `positions` (and `extra` tensors of bsz
        rows), padded to `rows` rows (free rows ride along at position 0, as in the engine's
        static-shape decode steps, with zeros for `extra`), its output (a tensor or a tuple of
        them) cut back to bsz rows; None when there is no `fn`, `rows` is None, or compilation failed."""
        if not fn or rows is None:
            return None
        bsz, device = tokens.shape[0], tokens.device

        def pad(t: torch.Tensor) -> torch.Tensor:
            padded = torch.zeros(rows, *t.shape[1:], dtype=t.dtype, device=device)
            padded[:bsz] = t
            return padded

        out = fn(pad(tokens), torch.tensor(positions + [0] * (rows - bsz), device=device), *map(pad, extra))
        if isinstance(out, tuple):
            return tuple(t[:bsz] for t in out)
        return None if out is None else out[:bsz]

    def prefill(self, engine: "Engine", staged: List["_Sequence"], single: List["_Sequence"]) -> None:
        """Fill the draft's rows of newly admitted sequences with their prompts, as the engine did
        the model's: `staged` in one staged prefill (consecutive rows, longest first), `single` one by one."""
        with self.context():
            for group in ([staged] if staged else []) + [[s] for s in single]:
                engine._prefill(group, self.draft)

    def step(self, engine: "Engine") -> List[Event]:
        """One decode step of every running sequence: propose, verify, accept; the events of every
        emitted token, in order, up to each sequence's end."""
        seqs, device = engine.running, engine.device
        rows = engine.rows if engine.static_shapes else None  # compiled passes: all cache rows
        pos = [s.pos for s in seqs]  # where each row's last token goes: both caches hold what is before
        last = [s.tokens[-1] for s in seqs]
        # stay inside the KV cache; proposals past a sequence's budget are verified and dropped
        # (a shorter step would be a pass of another shape: compiled, a new graph or an eager pass)
        k = min(self.k, engine.seq_len - 1 - max(pos))
        greedy = all(s.request.temperature == 0 for s in seqs)
        sampling = None if greedy else self._sampling(seqs, k)  # (temperature, top_p, uniforms) per row
        fused = None  # every pass of the step in one call
        if k == self.k and self.compiled is not None:
            fused = self.compiled.greedy if greedy else self._fused_sampling(seqs)
        # all rows rewrite the token before the last too: where a draft lags, and always in a fused
        # step (one shape, one graph: rewriting a slot the draft holds already changes nothing)
        if fused or any(s.id in self._behind for s in seqs):
            prev = [s.tokens[-2] if len(s.tokens) > 1 else s.request.prompt[-1] for s in seqs]
            first, first_pos = torch.tensor([prev, last], device=device).T, [p - 1 for p in pos]
        else:
            first, first_pos = torch.tensor(last, device=device)[:, None], pos
        self._behind.difference_update(s.id for s in seqs)
        passes = None
        if fused:
            passes = self._compiled(fused, first, first_pos, rows, sampling or ())
        if passes is not None:
            target, summary = passes
            rows_out = summary.tolist()  # the step's one read of its results
            if any(r[-1] & 1 for r in rows_out):
                check_finite(target.flatten(0, 1))
            if any(r[-1] & 2 for r in rows_out):  # a nucleus past the candidates: the step again, eagerly
                self.redone += 1
                passes = None
            if not greedy:
                self.fused_sampled += 1
        if passes is not None:
            proposals = [r[:k] for r in rows_out]
            n_accepted, next_tokens = [r[k] for r in rows_out], [r[k + 1] for r in rows_out]
        else:
            logits = self._forward(first, first_pos, rows)
            if k <= 0:  # room for one token only: a plain step (the draft's cache kept in step above)
                return engine._decode_running()
            draft, qs = self._propose_all(logits, k, pos, rows, sampling)
            verify = torch.cat([torch.tensor(last, device=device)[:, None], draft], dim=1)  # (n, k+1)
            target = self._verify(engine, verify, pos, rows)  # (n, k+1, vocab)
            check_finite(target.flatten(0, 1))
            if sampling is None:
                n, nxt = accept_greedy(target, draft)
            else:
                n, nxt, _ = accept(target, draft, qs, *sampling)
            n_accepted, next_tokens, proposals = n.tolist(), nxt.tolist(), draft.tolist()
        emitted = [d[:n] + [t] for d, n, t in zip(proposals, n_accepted, next_tokens)]
        for s, n in zip(seqs, n_accepted):
            if n == k:  # the draft never saw its last proposal
                self._behind.add(s.id)
        self.proposed += k * len(seqs)
        self.accepted += sum(n_accepted)
        if self.adaptive and k == self.k:  # a step shortened near the cache's end says nothing of k
            self.k = min(k + 2, AUTO_MAX_K) if all(n == k for n in n_accepted) else max(k - 1, 1)
        want_lp = any(s.request.wants_logprobs for s in seqs)
        events = []
        for j in range(k + 1):  # the engine's stop rule sees each row's tokens in order
            live = [i for i, s in enumerate(seqs) if not s.finished and j < len(emitted[i])]
            if not live:
                break
            logits = target[torch.tensor(live, device=device), j] if want_lp else None
            events += engine._emit([seqs[i] for i in live], logits, [emitted[i][j] for i in live])
            for i in live:  # the token before this one is in both caches now (or is the last fed)
                seqs[i].pos = pos[i] + j + 1
        self._behind.difference_update(s.id for s in seqs if s.finished)
        return events

    def _fused_sampling(self, seqs: List["_Sequence"]) -> Optional[Callable]:
        """The compiled sampling step, unless a row's nucleus is sure to reach past NUCLEUS_TOP
        tokens (top_p 1: the whole vocabulary) or it has had to be redone for a quarter of its
        steps (each redo costs a step): then the passes go one by one."""
        if any(s.request.temperature > 0 and s.request.top_p >= 1 for s in seqs):
            return None
        if self.redone >= 8 and self.redone * 4 > self.fused_sampled:
            return None
        return self.compiled.sampling

    def _sampling(self, seqs: List["_Sequence"], k: int) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The step's per-row temperature and top_p (n,), and its uniforms (n, 2k + 1): k for the
        draft's draws, k for the acceptance tests and one for the next token (`propose`, `accept`),
        from each sampling row's own generator (zeros for greedy rows); None when k < 1 (a plain
        step, which draws its own)."""
        if k < 1:
            return None
        device = self.draft.tok_embeddings.weight.device
        uniforms = torch.zeros(len(seqs), 2 * k + 1, device=device)
        for i, s in enumerate(seqs):
            if s.request.temperature > 0:
                uniforms[i] = torch.rand(2 * k + 1, generator=s.generator, device=device)
        temperature = torch.tensor([float(s.request.temperature) for s in seqs], device=device)
        top_p = torch.tensor([float(s.request.top_p) for s in seqs], device=device)
        return temperature, top_p, uniforms

    def _propose_all(
        self, logits: torch.Tensor, k: int, pos: List[int], rows: Optional[int],
        sampling: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The draft's k proposals (n, k) from its first logits (n, vocab), a draft step after each
        but the last (`propose`; argmax only when no row samples); and the distributions they were
        drawn from (n, k, vocab), None when no row samples."""
        proposals, qs = [], []
        for j in range(k):
            if j:
                logits = self._forward(proposals[-1][:, None], [p + j for p in pos], rows)
            if sampling is None:
                proposals.append(logits.argmax(dim=-1))
            else:
                temperature, top_p, uniforms = sampling
                token, q, _ = propose(logits, temperature, top_p, uniforms[:, j])
                proposals.append(token)
                qs.append(q)
        return torch.stack(proposals, dim=1), torch.stack(qs, dim=1) if qs else None
