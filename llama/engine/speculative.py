"""Speculative decoding over the engine's runner (llama.engine.runner).

Each step, for every running sequence, the draft model proposes k tokens one at a time; the model
then scores the sequence's last token and all k proposals in one forward pass of k + 1 positions.
A sequence keeps the longest accepted prefix of the proposals plus one token of the model's own
(the correction at the first rejection, or a bonus token when all k are accepted):

- greedy (temperature 0): a proposal is accepted when it is the model's argmax, so the output is
  token for token what the model gives alone;
- sampling: rejection sampling (`accept_reject`) that keeps the model's distribution exactly.

Both models' KV caches are indexed by position, so rejected positions need no undoing: the
sequence's position moves back, the attention masks hide every slot past it, and the next step
overwrites them. The runner's stop rule (`Runner.emit`) sees the emitted tokens one by one.
The acceptance math and the fused passes live in llama.engine.acceptance (re-exported here).
"""
import contextlib
import logging
from typing import Callable, List, NamedTuple, Optional, Tuple, Union

import torch

from llama import distributed, kv_cache
from llama.runtime import policy as kernel_policy
from llama.runtime.compiled import CompiledStep
from llama.runtime.policy import Policy
from llama.engine.acceptance import (  # noqa: F401 (re-exported: the speculative API)
    NUCLEUS_TOP,
    accept,
    accept_drawn,
    accept_greedy,
    accept_reject,
    greedy_pass,
    propose,
    sampling_dist,
    sampling_pass,
)
from llama.engine.runner import Runner, StepFn, batch_chunks, call_model, prefill_batch, prefill_rows, restrict, step_positions
from llama.engine.types import Event, SequenceState
from llama.model import Transformer
from llama.sampling import check_finite

logger = logging.getLogger(__name__)


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


class StepResult(NamedTuple):
    """What a speculative step decided for each row: its proposals, how many the model accepted,
    its next token, and the model's logits of the verify pass (rows, k + 1, vocab)."""

    proposals: List[List[int]]
    n_accepted: List[int]
    next_tokens: List[int]
    target: torch.Tensor


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


class Speculator:
    """A draft model that proposes `k` tokens per step for the model to verify.

    The draft has a KV cache of the runner's shape, rows in step with the model's: the engine
    prefills and moves both (`prefill`, `move_rows`). After a step whose k proposals were all
    accepted the draft lags one position behind (it never saw the last proposal); the next step
    then feeds it the sequence's last two tokens instead of one.
    `k` "auto" adapts it after each step, as transformers' assisted generation does with its
    "heuristic" schedule: two more when every row accepted all k proposals, else one fewer, within
    1..AUTO_MAX_K (from DEFAULT_K; every rank sees the same acceptances, so all move alike).
    `context` wraps every draft forward pass (llama.distributed.replicated for a draft held whole
    on every rank under torchrun; a no-op for one split like the model); `policy`, the kernel
    policy its passes run under (llama.runtime). `compiled`, set by `Llama` with compile=True: the
    compiled passes (`CompiledPasses`), which the step uses over all cache rows when the runner
    decodes with static shapes: for a step of k proposals, `greedy_pass` when its rows all decode
    greedily, else `sampling_pass` (every pass of the step, the draws and the acceptance in one
    call, always fed each row's last two tokens, so that one graph serves lagging and level
    drafts); for a shorter step, the draft's steps and verify passes one by one. Steps propose k
    tokens up to a sequence's end (those past its budget are dropped), so a shorter pass, which
    would compile anew or run eagerly, comes only where the KV cache runs out. Sampling rows draw
    their step's uniforms from their own generators first (`_sampling`), so a seed gives the same
    tokens compiled and eager.
    """

    def __init__(
        self, draft: Transformer, k: Union[int, str] = DEFAULT_K, context: Callable = contextlib.nullcontext,
        policy: Optional[kernel_policy.Policy] = None,
    ):
        self.draft, self.context, self.policy = draft, context, policy
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

    def fit(self, rows: int, seq_len: int, pool: Optional[Tuple[int, int]] = None) -> None:
        """Give the draft a KV cache of the runner's shape (kept when it already has it): rows, or
        with `pool` (blocks, block_size) a block cache of as many blocks, indexed by the same tables."""
        if pool is not None:
            if kv_cache.pool(self.draft) != pool or kv_cache.shape(self.draft) != (rows, seq_len):
                kv_cache.allocate_blocks(self.draft, *pool, rows, seq_len)
        elif kv_cache.shape(self.draft) != (rows, seq_len) or kv_cache.pool(self.draft) is not None:
            kv_cache.allocate(self.draft, rows, seq_len)

    def prefill_blocks(self, chunks: List[Tuple[SequenceState, int]], starts: List[int]) -> None:
        """With block caches: fill the draft's blocks of the sequences prefilled this step with the
        same positions of their contexts, from `starts` to each chunk's end, as the runner did the model's."""
        batch = [(s, start, end) for (s, end), start in zip(chunks, starts)]
        with self.context():
            for group in batch_chunks(batch, self.draft.params.max_seq_len):
                with kv_cache.using_tables([self.draft], [batch[i][0].blocks for i in group]):
                    prefill_batch(self.draft, self.policy, [batch[i] for i in group])

    def forget(self, seq_id: int) -> None:
        """A sequence preempted: prefilled again from its tokens, its draft will not lag."""
        self._behind.discard(seq_id)

    def prefill(self, seqs: List[SequenceState]) -> None:
        """Fill the draft's rows of newly admitted sequences with their prompts, as the runner did
        the model's: those without prompt log-probs in one staged prefill (consecutive rows,
        longest first), the others one by one."""
        staged = [s for s in seqs if not s.request.prompt_logprobs]
        with self.context():
            for group in ([staged] if staged else []) + [[s] for s in seqs if s.request.prompt_logprobs]:
                prefill_rows(self.draft, self.policy, group)

    def move_rows(self, dst: List[int], src: List[int]) -> None:
        """Row dst[i] of the draft's KV cache takes row src[i]'s contents, as the model's."""
        kv_cache.move_rows(self.draft, dst, src)

    def _forward(self, tokens: torch.Tensor, positions: List[int], rows: Optional[int] = None) -> torch.Tensor:
        """The draft's logits (bsz, vocab) at the last of `tokens` (bsz, n), placed at `positions`;
        compiled over `rows` cache rows when given (see `_compiled`)."""
        with self.context():
            logits = self._compiled(self.compiled and self.compiled.draft, tokens, positions, rows)
            if logits is not None:
                return logits[:, -1]
            start_pos, kv_len = step_positions(positions, tokens.shape[1], tokens.device)
            last = torch.full((tokens.shape[0],), tokens.shape[1] - 1, device=tokens.device)
            return call_model(self.draft, self.policy, tokens, start_pos, output_index=last, kv_len=kv_len)[:, 0]

    def _verify(self, runner: Runner, tokens: torch.Tensor, positions: List[int], rows: Optional[int]) -> torch.Tensor:
        """The model's logits (bsz, k + 1, vocab) of the last tokens and the proposals, `tokens`."""
        full = rows if tokens.shape[1] == self.k + 1 else None
        logits = self._compiled(self.compiled and self.compiled.model, tokens, positions, full)
        if logits is None:
            start_pos, kv_len = step_positions(positions, tokens.shape[1], tokens.device)
            logits = runner.forward(tokens, start_pos, kv_len=kv_len)
        return logits

    @staticmethod
    def _compiled(
        fn: Optional[Callable], tokens: torch.Tensor, positions: List[int], rows: Optional[int], extra: Tuple[torch.Tensor, ...] = ()
    ) -> Union[None, torch.Tensor, tuple]:
        """The compiled pass `fn` of `tokens` (bsz, n) at `positions` (and `extra` tensors of bsz
        rows), padded to `rows` rows (free rows ride along at position 0, as in the runner's
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


    def step(self, runner: Runner, seqs: List[SequenceState]) -> List[Event]:
        """One decode step of the running sequences `seqs` (rows 0..n-1 of `runner`'s cache):
        propose, verify, accept; the events of every emitted token, in order, up to each
        sequence's end."""
        pos = [s.pos for s in seqs]  # where each row's last token goes: both caches hold what is before
        # stay inside the KV cache; proposals past a sequence's budget are verified and dropped
        # (a shorter step would be a pass of another shape: compiled, a new graph or an eager pass)
        k = min(self.k, runner.seq_len - 1 - max(pos))
        greedy = all(s.request.temperature == 0 for s in seqs)
        sampling = None if greedy else self._sampling(seqs, k)  # (temperature, top_p, uniforms) per row
        fused = None  # every pass of the step in one call
        # rows held to a grammar or sampling with top-k / min-p: the logits are restricted between passes
        restricted = any(s.matcher is not None or s.request.top_k or s.request.min_p for s in seqs)
        if k == self.k and self.compiled is not None and not restricted:
            fused = self.compiled.greedy if greedy else self._fused_sampling(seqs)
        first, first_pos = self._first_tokens(seqs, runner.device, both=bool(fused))
        rows = runner.rows if runner.static_shapes else None  # compiled passes: all cache rows
        result = self._run_fused(fused, first, first_pos, rows, k, sampling, greedy) if fused else None
        if result is None:
            logits = self._forward(first, first_pos, rows)
            if k <= 0:  # room for one token only: a plain step (the draft's cache kept in step above)
                return runner.decode(seqs)
            result = self._run_passes(runner, seqs, logits, k, pos, rows, sampling)
        self._count(seqs, k, result.n_accepted)
        return self._emit(runner, seqs, k, pos, result)

    def _first_tokens(self, seqs: List[SequenceState], device: torch.device, both: bool) -> Tuple[torch.Tensor, List[int]]:
        """What the draft is fed first, (n, 1) or (n, 2) tokens, and from which positions: each
        row's last token, after the one before it for every row where a draft lags, and always in
        a fused step (`both`: one shape, one graph; rewriting a slot the draft holds changes nothing)."""
        pos = [s.pos for s in seqs]
        last = [s.tokens[-1] for s in seqs]
        if both or any(s.id in self._behind for s in seqs):
            prev = [s.tokens[-2] if len(s.tokens) > 1 else s.request.prompt[-1] for s in seqs]
            first, first_pos = torch.tensor([prev, last], device=device).T, [p - 1 for p in pos]
        else:
            first, first_pos = torch.tensor(last, device=device)[:, None], pos
        self._behind.difference_update(s.id for s in seqs)
        return first, first_pos

    def _run_fused(
        self, fused: Callable, first: torch.Tensor, first_pos: List[int], rows: Optional[int], k: int,
        sampling: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]], greedy: bool,
    ) -> Optional[StepResult]:
        """The step in one compiled call; None where it does not stand (compilation failed, or a
        row's nucleus reached past the candidates: the caller runs the step pass by pass)."""
        passes = self._compiled(fused, first, first_pos, rows, sampling or ())
        if passes is None:
            return None
        target, summary = passes
        rows_out = summary.tolist()  # the step's one read of its results
        if any(r[-1] & 1 for r in rows_out):
            check_finite(target.flatten(0, 1))
        if not greedy:
            self.fused_sampled += 1
        if any(r[-1] & 2 for r in rows_out):  # a nucleus past the candidates: the step again, eagerly
            self.redone += 1
            return None
        return StepResult([r[:k] for r in rows_out], [r[k] for r in rows_out], [r[k + 1] for r in rows_out], target)

    def _run_passes(
        self, runner: Runner, seqs: List[SequenceState], logits: torch.Tensor, k: int, pos: List[int],
        rows: Optional[int], sampling: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    ) -> StepResult:
        """The step pass by pass, from the draft's first logits (n, vocab): its k proposals, the
        model's verify pass, the acceptance."""
        draft, qs = self._propose_all(logits, k, pos, rows, sampling)  # (n, k), (n, k, vocab) or None
        last = torch.tensor([s.tokens[-1] for s in seqs], device=runner.device)[:, None]
        verify = torch.cat([last, draft], dim=1)  # (n, k + 1)
        target = self._verify(runner, verify, pos, rows)  # (n, k + 1, vocab)
        check_finite(target.flatten(0, 1))
        restrict(seqs, target, draft.tolist())
        if sampling is None:
            n, nxt = accept_greedy(target, draft)
        else:
            n, nxt, _ = accept(target, draft, qs, *sampling)
        return StepResult(draft.tolist(), n.tolist(), nxt.tolist(), target)

    def _count(self, seqs: List[SequenceState], k: int, n_accepted: List[int]) -> None:
        """A step's books: which drafts lag, the acceptance counts, and k where it adapts."""
        for s, n in zip(seqs, n_accepted):
            if n == k:  # the draft never saw its last proposal
                self._behind.add(s.id)
        self.proposed += k * len(seqs)
        self.accepted += sum(n_accepted)
        if self.adaptive and k == self.k:  # a step shortened near the cache's end says nothing of k
            self.k = min(k + 2, AUTO_MAX_K) if all(n == k for n in n_accepted) else max(k - 1, 1)

    def _emit(self, runner: Runner, seqs: List[SequenceState], k: int, pos: List[int], result: StepResult) -> List[Event]:
        """Each row's accepted proposals and next token through the runner's stop rule, in order."""
        emitted = [d[:n] + [t] for d, n, t in zip(result.proposals, result.n_accepted, result.next_tokens)]
        want_lp = any(s.request.wants_logprobs for s in seqs)
        events = []
        for j in range(k + 1):  # the stop rule sees each row's tokens in order
            live = [i for i, s in enumerate(seqs) if not s.finished and j < len(emitted[i])]
            if not live:
                break
            logits = result.target[torch.tensor(live, device=runner.device), j] if want_lp else None
            events += runner.emit([seqs[i] for i in live], logits, [emitted[i][j] for i in live])
            for i in live:  # the token before this one is in both caches now (or is the last fed)
                seqs[i].pos = pos[i] + j + 1
        self._behind.difference_update(s.id for s in seqs if s.finished)
        return events

    def _fused_sampling(self, seqs: List[SequenceState]) -> Optional[Callable]:
        """The compiled sampling step, unless a row's nucleus is sure to reach past NUCLEUS_TOP
        tokens (top_p 1: the whole vocabulary) or it has had to be redone for a quarter of its
        steps (each redo costs a step): then the passes go one by one."""
        if any(s.request.temperature > 0 and s.request.top_p >= 1 for s in seqs):
            return None
        if self.redone >= 8 and self.redone * 4 > self.fused_sampled:
            return None
        return self.compiled.sampling

    def _sampling(self, seqs: List[SequenceState], k: int) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
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


def compiled_passes(
    model: Transformer, speculator: Speculator, compiled: CompiledStep, policy: Optional[Policy]
) -> CompiledPasses:
    """The compiled passes of a speculative step (Llama with compile=True): the model's
    (`compiled`), the draft's, and on one process each whole step in one call (a sharded model's
    step cannot hold the replicated draft's group switch)."""
    draft = speculator.draft
    greedy = sampling = None
    if distributed.model_parallel_size() == 1:
        greedy = CompiledStep(
            model, lambda tokens, start_pos: greedy_pass(model, draft, speculator.k, tokens, start_pos),
            also=[draft], policy=policy,
        )
        sampling = CompiledStep(
            model, lambda tokens, start_pos, *rows: sampling_pass(model, draft, speculator.k, tokens, start_pos, *rows),
            also=[draft], policy=policy,
        )
    return CompiledPasses(compiled, CompiledStep(draft, policy=speculator.policy), greedy, sampling)
