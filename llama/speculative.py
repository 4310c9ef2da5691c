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
from llama.engine import Event, check_finite, nonfinite_rows, sampling_probs, step_positions
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
    greedy: Optional[Callable[[torch.Tensor, torch.Tensor], Optional[Tuple[torch.Tensor, torch.Tensor]]]]


MAX_K = 16
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
    """
    bsz, k = draft.shape
    rows = torch.arange(bsz, device=p.device)
    p_d = p[:, :k].gather(-1, draft[..., None])[..., 0]  # (bsz, k)
    q_d = q.gather(-1, draft[..., None])[..., 0]
    u = torch.rand(bsz, k, generator=generator, device=p.device)
    accepted = u * q_d < p_d  # u < p/q without dividing (q_d > 0: d was drawn from q)
    n = torch.cumprod(accepted.long(), dim=1).sum(dim=1)  # (bsz,) leading acceptances
    # what the next token is drawn from: the residual at the first rejection, else p_k
    residual = torch.cat([(p[:, :k] - q).clamp(min=0), p[:, k:]], dim=1)[rows, n]  # (bsz, vocab)
    mass = residual.sum(dim=-1, keepdim=True)
    # p_j == q_j leaves no residual, but then nothing is rejected: only rounding gets here
    residual = torch.where(mass > 0, residual, p[rows, n])
    next_token = torch.multinomial(residual / residual.sum(dim=-1, keepdim=True), 1, generator=generator)[:, 0]
    return n, next_token


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
    bad = nonfinite_rows(target).any(dim=1)
    return target, torch.cat([draft_tokens, n[:, None], next_token[:, None], bad[:, None].long()], dim=1)


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
    static shapes: for a step of k proposals whose rows all decode greedily, `greedy_pass` (every
    pass of the step and the acceptance in one call, always fed each row's last two tokens, so that
    one graph serves lagging and level drafts); otherwise the draft's steps and verify passes of
    k + 1 tokens one by one. Steps propose k tokens up to a sequence's end (those past its budget
    are dropped), so a shorter pass, which would compile anew or run eagerly, comes only where the
    KV cache runs out.
    """

    def __init__(self, draft: Transformer, k: Union[int, str] = DEFAULT_K, context: Callable = contextlib.nullcontext):
        self.draft, self.context = draft, context
        self.set_k(k)
        self.proposed = 0  # draft tokens proposed, and of them accepted, since the start
        self.accepted = 0
        self._behind: set = set()  # ids of the sequences whose draft cache lags one position
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
    def _compiled(fn: Optional[Callable], tokens: torch.Tensor, positions: List[int], rows: Optional[int]) -> Union[None, torch.Tensor, tuple]:
        """The compiled pass `fn` of `tokens` (bsz, n) at `positions`, padded to `rows` rows (free
        rows ride along at position 0, as in the engine's static-shape decode steps), its output
        (a tensor or a tuple of them) cut back to bsz rows; None when there is no `fn`, `rows` is
        None, or compilation failed."""
        if not fn or rows is None:
            return None
        bsz, device = tokens.shape[0], tokens.device
        padded = torch.zeros(rows, tokens.shape[1], dtype=tokens.dtype, device=device)
        padded[:bsz] = tokens
        out = fn(padded, torch.tensor(positions + [0] * (rows - bsz), device=device))
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
        fused = k == self.k and greedy and self.compiled is not None and self.compiled.greedy is not None
        # all rows rewrite the token before the last too: where a draft lags, and always in a fused
        # step (one shape, one graph: rewriting a slot the draft holds already changes nothing)
        if fused or any(s.id in self._behind for s in seqs):
            prev = [s.tokens[-2] if len(s.tokens) > 1 else s.request.prompt[-1] for s in seqs]
            first, first_pos = torch.tensor([prev, last], device=device).T, [p - 1 for p in pos]
        else:
            first, first_pos = torch.tensor(last, device=device)[:, None], pos
        self._behind.difference_update(s.id for s in seqs)
        passes = None
        if fused:  # every pass of the step in one call
            passes = self._compiled(self.compiled.greedy, first, first_pos, rows)
        if passes is not None:
            target, summary = passes
            rows_out = summary.tolist()  # the step's one read of its results
            if any(r[-1] for r in rows_out):
                check_finite(target.flatten(0, 1))
            proposals = [r[:k] for r in rows_out]
            n_accepted, next_tokens = [r[k] for r in rows_out], [r[k + 1] for r in rows_out]
        else:
            logits = self._forward(first, first_pos, rows)
            if k <= 0:  # room for one token only: a plain step (the draft's cache kept in step above)
                return engine._decode_running()
            draft, qs = self._propose_all(seqs, logits, k, pos, rows)
            verify = torch.cat([torch.tensor(last, device=device)[:, None], draft], dim=1)  # (n, k+1)
            target = self._verify(engine, verify, pos, rows)  # (n, k+1, vocab)
            check_finite(target.flatten(0, 1))
            n_accepted, next_tokens = self._accept(seqs, target, draft, qs)
            proposals = draft.tolist()
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

    def _propose_all(
        self, seqs: List["_Sequence"], logits: torch.Tensor, k: int, pos: List[int], rows: Optional[int]
    ) -> Tuple[torch.Tensor, List[List[Optional[torch.Tensor]]]]:
        """The draft's k proposals (n, k) from its first logits (n, vocab), a draft step after each
        but the last; and the distributions they were drawn from ([proposal][row], None for greedy rows)."""
        proposals, qs = [], []
        for j in range(k):
            if j:
                logits = self._forward(proposals[-1][:, None], [p + j for p in pos], rows)
            token, q = self._propose(seqs, logits)
            proposals.append(token)
            qs.append(q)
        return torch.stack(proposals, dim=1), qs

    @staticmethod
    def _accept(
        seqs: List["_Sequence"], target: torch.Tensor, draft: torch.Tensor, qs: List[List[Optional[torch.Tensor]]]
    ) -> Tuple[List[int], List[int]]:
        """Each row's number of accepted proposals and its next token: greedy rows all at once
        (`accept_greedy`), sampling rows one by one with their own generators (`accept_reject`)."""
        n, nxt = [0] * len(seqs), [0] * len(seqs)
        greedy = [i for i, s in enumerate(seqs) if s.request.temperature == 0]
        if greedy:
            rows = slice(None) if len(greedy) == len(seqs) else torch.tensor(greedy, device=draft.device)
            counts, tokens = accept_greedy(target[rows], draft[rows])
            for i, c, t in zip(greedy, counts.tolist(), tokens.tolist()):
                n[i], nxt[i] = c, t
        for i, s in enumerate(seqs):
            if s.request.temperature > 0:
                p = sampling_probs(target[i], s.request.temperature, s.request.top_p)
                q = torch.stack([qj[i] for qj in qs])
                count, token = accept_reject(p[None], q[None], draft[i : i + 1], s.generator)
                n[i], nxt[i] = int(count[0]), int(token[0])
        return n, nxt

    @staticmethod
    def _propose(seqs: List["_Sequence"], logits: torch.Tensor) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
        """Each row's draft token from the draft's logits (n, vocab): its argmax for greedy rows,
        else a draw from the row's sampling distribution q (returned, None for greedy rows)."""
        tokens = logits.argmax(dim=-1)
        qs: List[Optional[torch.Tensor]] = []
        for i, s in enumerate(seqs):
            q = None
            if s.request.temperature > 0:
                q = sampling_probs(logits[i], s.request.temperature, s.request.top_p)
                tokens[i] = torch.multinomial(q, 1, generator=s.generator)[0]
            qs.append(q)
        return tokens, qs
