"""The engine's books: which sequences wait, which run in which KV cache row, which have finished.
Nothing here touches the model or a tensor: the scheduler says what a step must do (which
sequences to prefill into which rows, which rows to move when some retire) and the runner does it."""
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional

from llama.engine.types import SequenceState


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
