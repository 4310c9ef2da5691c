"""The engine's thread: HTTP handlers submit and cancel sequences, rank 0 gathers them into each
step's Plan and broadcasts it under torchrun, and every rank applies it and steps alike.

A failure is kept as small as it can be: a sequence that cannot be admitted (or that the engine
ends with finish_reason "error") fails its own request and nothing else; only a failure of the
step itself (the model, or a collective: a rank that died) ends the process, with status 1, since
a server that cannot step must not hang its clients or its launcher.
"""
import asyncio
import logging
import os
import queue
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from llama import distributed
from llama.engine import Engine, Event, Plan, Request
from llama.serve.protocol import APIError

logger = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # an idle rank 0 still broadcasts an empty plan this often (collectives time out)
ERROR = "error"  # the finish_reason of a sequence that failed on its own


class Handle:
    """One HTTP request's sequences: their events arrive on an asyncio queue; `error` says why one
    failed (finish_reason "error")."""

    def __init__(self, ids: List[int], loop: asyncio.AbstractEventLoop):
        self.ids, self.loop = ids, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.error: Optional[str] = None
        self.submitted_at = time.monotonic()  # the metrics' latencies count from here

    async def stream(self, on_exit) -> Any:
        """The events until every sequence has finished (later events of a finished one are
        dropped); a consumer that stops early calls `on_exit(self)` (the client went away)."""
        remaining = set(self.ids)
        try:
            while remaining:
                e = await self.events.get()
                if e.seq_id not in remaining:
                    continue
                if e.finished:
                    remaining.discard(e.seq_id)
                yield e
        finally:
            if remaining:
                on_exit(self)


class EngineLoop:
    """Runs the engine in one background thread (rank 0) or in the calling thread (other ranks)."""

    def __init__(self, engine: Engine, max_queue: int, metrics: Optional[Any] = None):
        """metrics: where requests' tokens and latencies are counted (llama.serve.metrics.Metrics), or None."""
        self.engine, self.max_queue, self.metrics = engine, max_queue, metrics
        self.inbox: "queue.Queue[Tuple[str, Any]]" = queue.Queue()
        self.handles: Dict[int, Handle] = {}  # live sequences (rank 0)
        self.lock = threading.Lock()
        self.next_id = 0
        self.closed = False  # draining: nothing new is admitted
        self.thread: Optional[threading.Thread] = None
        self.multi = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1

    # ---- called from HTTP handlers (the event loop's thread)

    def submit(self, requests: List[Request]) -> Handle:
        """Queue one HTTP request's sequences; APIError 429 when the queue is full, 503 when the
        server is shutting down."""
        with self.lock:
            if self.closed:
                raise shutting_down()
            if len(self.handles) + len(requests) > self.max_queue:
                raise APIError(
                    429, f"the server is busy ({len(self.handles)} sequences queued or running, --max_queue "
                    f"{self.max_queue}): retry shortly", code="rate_limit_exceeded", type="rate_limit_error",
                    headers={"Retry-After": "1"},
                )
            ids = list(range(self.next_id, self.next_id + len(requests)))
            self.next_id += len(requests)
            handle = Handle(ids, asyncio.get_running_loop())
            for i in ids:
                self.handles[i] = handle
        if self.metrics is not None:
            self.metrics.submitted([len(r.prompt) for r in requests])
        for i, r in zip(ids, requests):
            self.inbox.put(("add", (i, r)))
        return handle

    def cancel(self, handle: Handle) -> None:
        """Drop a request's sequences (a client that went away); their rows free before the next step."""
        with self.lock:
            live = [i for i in handle.ids if self.handles.pop(i, None) is not None]
        if self.metrics is not None:
            self.metrics.forget(live)
        for i in live:
            self.inbox.put(("cancel", i))

    def stats(self) -> dict:
        with self.lock:
            live = len(self.handles)
        return {"running": self.engine.n_running, "waiting": len(self.engine.waiting), "sequences": live}

    def live(self) -> int:
        with self.lock:
            return len(self.handles)

    def close(self) -> None:
        """Admit nothing more (503); what is queued or running goes on."""
        with self.lock:
            self.closed = True

    def end_all(self) -> int:
        """End every live sequence now: each gets a last event (finish_reason "length") and is
        cancelled in the engine. Returns how many there were."""
        with self.lock:
            live = list(self.handles.items())
            self.handles.clear()
        for seq_id, handle in live:
            self.inbox.put(("cancel", seq_id))
            handle.events.put_nowait(Event(seq_id, None, "", finished=True, finish_reason="length"))
        return len(live)

    # ---- the engine's side

    def start(self) -> None:
        self.thread = threading.Thread(target=self._lead, name="engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop stepping (every rank); returns once the engine's thread has ended."""
        self.inbox.put(("stop", None))
        if self.thread is not None:
            self.thread.join(timeout=30)

    def _lead(self) -> None:
        try:
            while True:
                plan = self._next_plan()
                if self.multi:
                    distributed.broadcast_object(plan)
                if not self._step(plan):
                    return
        except Exception as e:  # noqa: BLE001 -- the step itself failed: the server cannot go on
            _fatal(e)

    def follow(self) -> None:
        """Other ranks: step with rank 0's plans until it stops."""
        try:
            while self._step(distributed.broadcast_object(None)):
                pass
        except Exception as e:  # noqa: BLE001
            _fatal(e)

    def _next_plan(self) -> Plan:
        """What arrived since the last step; waits (up to a heartbeat) only when there is no work."""
        plan, block = Plan(), not self.engine.busy
        while True:
            try:
                kind, item = self.inbox.get(timeout=HEARTBEAT_S) if block else self.inbox.get_nowait()
            except queue.Empty:
                return plan
            block = False
            if kind == "add":
                plan.admit.append(item)
            elif kind == "cancel":
                plan.cancel.append(item)
            else:
                plan.stop = True
                return plan

    def _step(self, plan: Plan) -> bool:
        if plan.stop:
            return False
        self._apply(plan)
        if self.engine.busy:
            for e in self.engine.step():
                if e.finished:
                    seq = self.engine.pop(e.seq_id)
                    if e.finish_reason == ERROR:  # it failed alone (the engine kept why)
                        self._report(e.seq_id, "failed", getattr(seq, "error", None))
                self._deliver(e)
        return True

    def _apply(self, plan: Plan) -> None:
        """The plan's cancellations, then its admissions one by one: a request the engine refuses
        fails alone (on every rank alike: the same request fails the same way)."""
        cancelled = set(plan.cancel)
        for seq_id in plan.cancel:
            self.engine.cancel(seq_id)
        for seq_id, request in plan.admit:
            if seq_id in cancelled:  # gone before admission
                continue
            try:
                self.engine.add(request, seq_id)
            except Exception as e:  # noqa: BLE001 -- this request's failure, not the engine's
                self._report(seq_id, "could not be admitted", e)
                self._deliver(Event(seq_id, None, "", finished=True, finish_reason=ERROR))

    def _report(self, seq_id: int, what: str, e: Optional[BaseException]) -> None:
        """Log a sequence's own failure once (rank 0, where its request is), and keep its cause for
        the answer."""
        with self.lock:
            handle = self.handles.get(seq_id)
        if handle is None:  # another rank, or a client that went away
            return
        cause = type(e).__name__ if e is not None else "unknown cause"
        logger.error("a request failed alone: sequence %d %s (%s: %s); the server goes on", seq_id, what, cause, e,
                     exc_info=e)
        handle.error = cause

    def _deliver(self, e: Event) -> None:
        with self.lock:
            handle = self.handles.get(e.seq_id)
            if handle is not None and e.finished:
                del self.handles[e.seq_id]
        if handle is None:  # another rank, or a client that went away
            return
        if self.metrics is not None:
            self.metrics.event(e.seq_id, e.token, e.finished, handle.submitted_at)
        if e.finish_reason == ERROR and handle.error is None:
            handle.error = "the engine ended the sequence"
        try:
            handle.loop.call_soon_threadsafe(handle.events.put_nowait, e)
        except RuntimeError:  # its event loop has closed (the server stopped): nobody waits for it
            pass


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down: retry on another replica or later", type="server_error",
                    code="service_unavailable", headers={"Retry-After": "1"})


def _fatal(e: BaseException) -> None:
    logger.error("error: the engine stopped (%s: %s); the server exits", type(e).__name__, e)
    logging.shutdown()
    os._exit(1)
