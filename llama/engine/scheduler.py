"""The engine's books: which sequences wait, which run in which KV cache row, which have finished.
Nothing here touches the model or a tensor: the scheduler says what a step must do (which
sequences to prefill into which rows, which rows to move when some retire) and the runner does it."""
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional

from llama.engine.blocks import BlockManager
from llama.engine.types import SequenceState


def prefill_cost(start: int, n: int, span: float) -> float:
    """What prefilling `n` positions after `start` filled ones costs, in tokens prefilled at no
    context: each token's projections, plus its attention over the `start` positions before the
    chunk, which costs as much as the projections at `span` positions (`attention_span`)."""
    return n * (1 + start / span)


def chunk_tokens(start: int, budget: float, span: float) -> int:
    """The most positions after `start` whose `prefill_cost` stays within `budget` (0 when none)."""
    return max(0, int(budget / (1 + start / span) + 1e-9))


# how much more a flop of attention costs than a flop of the matrix products, by device: on the CPU
# SDPA over a long context runs at about 0.4x the rate of the projections' products (docs/serving.md)
ATTENTION_WEIGHT = {"cpu": 2.5}


def attention_span(params, device_type: str = "cpu") -> float:
    """Positions of context at which a token's attention costs as much as its projections (the
    matrix products of every layer and the output): weights x 2 flops against 4 x dim per position
    and layer (scores and weighted values), each of those weighted by ATTENTION_WEIGHT on the
    device. From the shape alone about 2,000 for the demo model and 27,000 for the 8B."""
    return params.decode_weights / (2 * params.dim * params.n_layers) / ATTENTION_WEIGHT.get(device_type, 1.0)


@dataclass
class Admission:
    """Sequences taken off the queue for this step."""

    # rows assigned, in this order: the staged prefill's (consecutive rows, longest prompt first),
    # then those that need their prompt's full logits, one by one
    prefill: List[SequenceState] = field(default_factory=list)
    # nothing to compute: no row, and a result at once (the runner says why it finished)
    done: List[SequenceState] = field(default_factory=list)


@dataclass
class RowMoves:
    """KV cache rows to copy when sequences retire: row dst[i] takes row src[i]'s contents."""

    dst: List[int] = field(default_factory=list)
    src: List[int] = field(default_factory=list)


class Scheduler:
    """Continuous batching over `rows` KV cache rows. Running sequences hold rows 0..n-1 (running[i]
    holds row i): a retiring sequence's row takes the last running row's contents, so the running
    rows stay a prefix and a decode step is one batch of consecutive rows."""

    def __init__(self, rows: int):
        self.rows = rows
        self.waiting: Deque[SequenceState] = deque()
        self.running: List[SequenceState] = []  # running[i].row == i
        self.results: Dict[int, SequenceState] = {}  # finished, until `pop`ped
        self._next_id = 0

    def new_id(self, seq_id: Optional[int] = None) -> int:
        """The given id (the server's, under torchrun) or the next free number."""
        if seq_id is None:
            seq_id = self._next_id
        self._next_id = max(self._next_id, seq_id + 1)
        return seq_id

    def add(self, seq: SequenceState) -> None:
        self.waiting.append(seq)

    def cancel(self, seq_id: int) -> None:
        """Drop a sequence: off the queue, or marked for `retire` (its row freed there), and its
        result forgotten."""
        self.waiting = deque(s for s in self.waiting if s.id != seq_id)
        for s in self.running:
            if s.id == seq_id:
                s.finish_reason = "cancelled"
        self.results.pop(seq_id, None)

    def pop(self, seq_id: int) -> SequenceState:
        return self.results.pop(seq_id)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> Admission:
        """Take waiting sequences into the free rows, in arrival order; one with nothing to compute
        (`SequenceState.needs_row`) takes no row."""
        out = Admission()
        while self.waiting and len(self.running) + len(out.prefill) < self.rows:
            s = self.waiting.popleft()
            if s.needs_row:
                out.prefill.append(s)
            else:
                self.results[s.id] = s
                out.done.append(s)
        out.prefill.sort(key=lambda s: (s.request.prompt_logprobs, -len(s.request.prompt)))
        for s in out.prefill:
            s.row = len(self.running)
            self.running.append(s)
        return out

    def retire(self) -> RowMoves:
        """Free the rows of finished sequences: the last running rows move into the holes (the
        caller copies their KV cache contents, `RowMoves`). Finished, not cancelled, sequences
        wait in `results`."""
        done = [s for s in self.running if s.finished]
        if not done:
            return RowMoves()
        keep = [s for s in self.running if not s.finished]
        n = len(keep)
        holes = sorted(s.row for s in done if s.row < n)
        movers = sorted((s for s in keep if s.row >= n), key=lambda s: s.row)
        moves = RowMoves(holes, [s.row for s in movers])
        for hole, s in zip(holes, movers):
            s.row = hole
        self.running = sorted(keep, key=lambda s: s.row)
        for s in done:
            s.row = -1
            if s.finish_reason != "cancelled":
                self.results[s.id] = s
        return moves


class BlockScheduler(Scheduler):
    """Continuous batching over a block KV cache: at most `rows` sequences decoded together, their
    tokens bounded by the blocks of `blocks` (the manager of the pool). A sequence is admitted when
    its prompt's blocks are free; it takes a block as it grows into one (`reserve`); when none is
    free, the newest running sequence is preempted: its blocks freed, it waits at the head of the
    queue and is prefilled again from its tokens (`SequenceState.context`). Rows are only the order
    of the running sequences: a finished one frees its blocks and nothing moves."""

    def __init__(self, rows: int, blocks: BlockManager):
        super().__init__(rows)
        self.blocks = blocks
        self.preemptions = 0

    def admit(self, budget: Optional[float] = None, span: float = math.inf) -> Admission:
        """Take waiting sequences, in arrival order, while a row and their context's blocks are free
        (the longest cached prefix of a context taken from the prefix cache: `pos` starts past it;
        not for a prompt whose log-probs are asked, which needs every position's logits), and
        until the `prefill_cost` of their contexts left to compute reaches `budget` (None: no bound)."""
        out = Admission()
        while self.waiting and len(self.running) + len(out.prefill) < self.rows and (budget is None or budget > 0):
            s = self.waiting[0]
            if s.needs_row and not self._take_blocks(s):
                break
            self.waiting.popleft()
            if s.needs_row:
                out.prefill.append(s)
                budget = None if budget is None else budget - prefill_cost(s.pos, s.context_len - s.pos, span)
            else:
                self.results[s.id] = s
                out.done.append(s)
        for s in out.prefill:
            s.row = len(self.running)
            self.running.append(s)
        return out

    def _take_blocks(self, s: SequenceState) -> bool:
        """Blocks for the context of `s`, cached ones first; False (none taken) when too few are free."""
        context = s.context()
        if not s.needs_prompt_logits:
            s.pos = self.blocks.match(context, s.blocks, s.block_keys)
            if not s.tokens:
                s.cached_tokens = s.pos
        if self.blocks.grow(s.blocks, len(context)):
            if self.blocks.prefix_cache and not s.needs_prompt_logits:
                self.blocks.queries += len(context)
                self.blocks.hits += s.pos
            return True
        self.blocks.release(s.blocks)
        s.pos, s.block_keys = 0, []
        return False

    def register(self) -> None:
        """Key the running sequences' full blocks for the prefix cache: those of positions before
        the last one in the cache (a draft may not have written that one yet)."""
        for s in self.running:
            self.blocks.register(s.request.prompt + s.tokens, s.blocks, s.pos - 1, s.block_keys)

    def reserve(self, seqs: List[SequenceState], lookahead: int) -> List[SequenceState]:
        """Blocks for the next `lookahead` tokens of each of `seqs` (running, oldest first; cut at
        its last token), preempting the newest running sequence while none are free; returns those
        preempted."""
        preempted = []
        for s in seqs:
            if s not in self.running:  # preempted for an older one
                continue
            need = min(s.pos + lookahead, len(s.request.prompt) + s.limit)
            while not self.blocks.grow(s.blocks, need):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is s:
                    break
        return preempted

    def _preempt(self, s: SequenceState) -> None:
        self.blocks.release(s.blocks)
        s.pos, s.row, s.block_keys = 0, -1, []
        self.running.remove(s)
        self.waiting.appendleft(s)
        for i, r in enumerate(self.running):
            r.row = i
        self.preemptions += 1

    def retire(self) -> RowMoves:
        """Free the blocks of finished sequences; the others keep theirs (nothing to move)."""
        for s in self.running:
            if s.finished:
                self.blocks.release(s.blocks)
        super().retire()
        for i, s in enumerate(self.running):
            s.row = i
        return RowMoves()
