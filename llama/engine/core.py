"""The engine: continuous batching as a scheduler (the books) and a runner (the model's steps),
with a speculator in place of the runner's decode step when a draft model is given."""
from typing import Deque, Dict, Iterator, List, Optional, Tuple

import torch

from llama import kv_cache, validation
from llama.runtime import policy as kernel_policy
from llama.engine.blocks import BlockManager
from llama.engine.runner import Runner, StepFn
from llama.engine.scheduler import BlockScheduler, Scheduler, attention_span, chunk_tokens, prefill_cost
from llama.engine.speculative import Speculator
from llama.engine.types import Event, Plan, Request, SequenceState
from llama.model import Transformer
from llama.tokenizer import Tokenizer


class Engine:
    """Continuous batching over the model's KV cache (allocate it first: llama.kv_cache.allocate,
    or allocate_blocks for a block cache).

    Over a block cache (the library's and the server's, unless compiled) sequences hold blocks
    through block tables (`BlockScheduler`, llama.engine.blocks): admission by free blocks, the
    prefix cache, preemption of the newest sequence when the blocks run out, chunked prefill
    (`_step_blocks`). Over rows (compiled passes with static shapes):
    running sequences occupy cache rows 0..n-1. Each `step` decodes every running row, retires the
    finished (moving the last rows into the holes, so the running rows stay a prefix), then prefills
    waiting sequences into the free rows, longest prompt first in stages (no padding computed), and
    samples their first tokens. Sampling, stop tokens, stop strings and the length limit are per
    sequence. The engine is deterministic given the same requests at the same steps: under torchrun
    every rank runs one, fed the same `Plan`s.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        compiled: Optional[StepFn] = None,
        static_shapes: bool = False,
        speculator: Optional[Speculator] = None,
        policy: Optional[kernel_policy.Policy] = None,
        prefix_cache: bool = True,
        max_prefill_tokens: Optional[int] = None,
    ):
        """compiled: a compiled decode pass over all cache rows (llama.runtime.compiled.CompiledStep).
        static_shapes: decode all cache rows every step with per-row positions (one shape for a
        compiled decode step). speculator: a draft model that proposes tokens for the model to
        verify (llama.engine.speculative); its KV cache rows are prefilled and moved with the
        model's. policy: the kernel policy every model call runs under (llama.runtime).
        prefix_cache: with a block KV cache, reuse cached blocks of equal context prefixes
        (llama.engine.blocks). max_prefill_tokens: with a block KV cache, prompt tokens prefilled
        per step at most (a longer prompt over several steps, while the running sequences go on
        decoding; None: every admitted prompt whole)."""
        self.runner = Runner(model, tokenizer, policy, compiled, static_shapes)
        self.speculator = speculator
        pool = kv_cache.pool(model)  # (blocks, block_size) of a block cache, else None
        self.blocks = BlockManager(*pool, prefix_cache=prefix_cache) if pool else None
        if max_prefill_tokens is not None and max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be a positive number of tokens, got {max_prefill_tokens}")
        self.max_prefill_tokens = max_prefill_tokens
        self.span = attention_span(model.params, self.runner.device.type)  # prefill chunks' cost: see _prefill_chunks
        if self.blocks is not None:
            self.scheduler: Scheduler = BlockScheduler(self.runner.rows, self.blocks)
        else:
            self.scheduler = Scheduler(self.runner.rows)
        if speculator:
            speculator.fit(self.runner.rows, self.runner.seq_len, pool)
        self.models = [model] + ([speculator.draft] if speculator else [])  # those whose caches the tables index

    @property
    def waiting(self) -> Deque[SequenceState]:
        return self.scheduler.waiting

    @property
    def running(self) -> List[SequenceState]:
        return self.scheduler.running

    @property
    def results(self) -> Dict[int, SequenceState]:
        """Finished sequences by id, until `pop`ped."""
        return self.scheduler.results

    # ---------------------------------------------------------------- requests in, results out

    def add(self, request: Request, seq_id: Optional[int] = None) -> int:
        """Queue a sequence; returns its id (the given one, or the next free number)."""
        validation.check_prompt_length(
            len(request.prompt), self.runner.seq_len, limit="the KV cache's length", fix="allocate a longer KV cache"
        )
        seq = self.runner.new_sequence(-1 if seq_id is None else seq_id, request)
        total = len(request.prompt) + seq.limit
        if self.blocks is not None and not self.blocks.fits(total):
            raise ValueError(
                f"{total} tokens (prompt and new tokens) cannot fit the KV cache's {self.blocks.capacity} blocks of "
                f"{self.blocks.block_size} tokens: ask fewer new tokens or give the cache more (--kv_cache_tokens)"
            )
        seq.id = self.scheduler.new_id(seq_id)
        self.scheduler.add(seq)
        return seq.id

    def cancel(self, seq_id: int) -> None:
        """Drop a sequence, waiting or running; its row is free for the next admission."""
        self.scheduler.cancel(seq_id)
        self._retire()

    def apply(self, plan: Plan) -> None:
        """Carry out rank 0's decisions for this step (the server's torchrun broadcast)."""
        for seq_id in plan.cancel:
            self.cancel(seq_id)
        for seq_id, request in plan.admit:
            self.add(request, seq_id)

    def pop(self, seq_id: int) -> SequenceState:
        """A finished sequence's state: tokens (the stop token included), logprobs, text, finish_reason."""
        return self.scheduler.pop(seq_id)

    @property
    def busy(self) -> bool:
        return self.scheduler.busy

    @property
    def n_running(self) -> int:
        return len(self.scheduler.running)

    def stats(self) -> Dict[str, int]:
        """The engine's gauges and counters (the server's /metrics): running and waiting sequences."""
        out = {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting)}
        if self.blocks is not None:
            b = self.blocks
            out.update(kv_blocks_used=b.n_used, kv_blocks_free=b.n_free, kv_blocks_cached=len(b.key_of),
                       prefix_cache_queries=b.queries, prefix_cache_hits=b.hits, preemptions=self.scheduler.preemptions)
        return out

    def run(self) -> Iterator[List[Event]]:
        """Step until every sequence has finished; yield each step's events."""
        while self.busy:
            yield self.step()

    # ---------------------------------------------------------------- the step

    @torch.inference_mode()
    def step(self) -> List[Event]:
        """Decode the running sequences, then admit waiting ones; the events of this step."""
        if self.blocks is not None:
            return self._step_blocks()
        events: List[Event] = []
        running = self.scheduler.running
        if running:
            events += self.speculator.step(self.runner, running) if self.speculator else self.runner.decode(running)
            self._retire()
        admitted = self.scheduler.admit()
        events += self.runner.finish_unrun(admitted.done)
        if admitted.prefill:
            events += self.runner.prefill(admitted.prefill)
            if self.speculator:  # the draft's cache rows hold the same prompts
                self.speculator.prefill(admitted.prefill)
        self._retire()
        return events

    def _step_blocks(self) -> List[Event]:
        """`step` over a block KV cache: blocks for the decoding sequences' next tokens first (the
        newest running sequence preempted while none are free), a decode step through their block
        tables, then a prefill of at most max_prefill_tokens: the contexts under way first, then
        those of newly admitted sequences."""
        events: List[Event] = []
        decoding = [s for s in self.scheduler.running if s.pos >= s.context_len]
        if decoding:
            lookahead = self.speculator.k + 1 if self.speculator else 1  # a verify pass writes k + 1
            for s in self.scheduler.reserve(decoding, lookahead):
                if self.speculator:
                    self.speculator.forget(s.id)
            decoding = [s for s in decoding if s.row >= 0]  # not preempted
        if not self.speculator:
            return self._step_together(decoding)
        if decoding:
            with kv_cache.using_tables(self.models, [s.blocks for s in decoding]):
                events += self.speculator.step(self.runner, decoding)
            self.scheduler.register()
            self._retire()
        events += self._prefill_chunks()
        self._retire()
        return events

    def _step_together(self, decoding: List[SequenceState]) -> List[Event]:
        """`_step_blocks` without a draft, once the decoding sequences have their blocks: this step's
        prefill chunks chosen as `_prefill_chunks` does, then one pass for both where there are both
        (Runner.step_blocks)."""
        chunks, done = self._chunks()
        events = self.runner.finish_unrun(done)
        if decoding and chunks:
            events += self.runner.step_blocks(decoding, chunks)
        elif decoding:
            with kv_cache.using_tables(self.models, [s.blocks for s in decoding]):
                events += self.runner.decode(decoding)
        elif chunks:
            events += self.runner.prefill_blocks(chunks)
        self.scheduler.register()
        self._retire()
        return events

    def _prefill_chunks(self) -> List[Event]:
        """With a draft, this step's prefill in both models: chunks of contexts costing at most max_prefill_tokens in all, the cost counting each chunk's attention over
        the context before it (`prefill_cost`), so that a step with a chunk late in a long prompt
        costs about as much as one with a chunk early in it and the decoding sequences' inter-token
        latency stays bounded. A step prefills at least one token, whatever its cost."""
        chunks, done = self._chunks()
        events = self.runner.finish_unrun(done)
        if chunks:
            starts = [s.pos for s, _ in chunks]
            events += self.runner.prefill_blocks(chunks)
            self.speculator.prefill_blocks(chunks, starts)  # the draft's blocks hold the same contexts
            self.scheduler.register()
        return events

    def _chunks(self) -> Tuple[List[Tuple[SequenceState, int]], List[SequenceState]]:
        """This step's prefill chunks (sequence, end) within the budget, the contexts under way first,
        then those of newly admitted sequences; and the admitted ones with nothing to compute."""
        budget = self.max_prefill_tokens
        chunks = []
        for s in self.scheduler.running:  # contexts under way first, oldest first
            if s.pos < s.context_len and (budget is None or budget > 0):
                end, budget = _chunk(s, budget, self.span, first=not chunks)
                chunks.append((s, end))
        admitted = self.scheduler.admit(budget, self.span)
        for s in admitted.prefill:
            end, budget = _chunk(s, budget, self.span, first=not chunks)
            chunks.append((s, end))
        return [(s, end) for s, end in chunks if end > s.pos], admitted.done

    def _retire(self) -> None:
        """Free the rows of finished sequences, in the books and in both models' caches."""
        moves = self.scheduler.retire()
        self.runner.move_rows(moves.dst, moves.src)
        if self.speculator:
            self.speculator.move_rows(moves.dst, moves.src)


def _chunk(s: SequenceState, budget: Optional[float], span: float, first: bool) -> Tuple[int, Optional[float]]:
    """Where this step's prefill of `s` ends, and the budget left after it (None: no bound): as far
    as the budget reaches (`chunk_tokens`; at least one token for a step's `first` chunk), or the
    whole context when its prompt's log-probs are still to compute (the runner computes them in one
    pass over the whole prompt)."""
    if budget is None or s.needs_prompt_logits:
        end = s.context_len
    else:
        n = chunk_tokens(s.pos, budget, span)
        end = min(s.context_len, s.pos + (max(n, 1) if first else n))
    return end, None if budget is None else budget - prefill_cost(s.pos, end - s.pos, span)
