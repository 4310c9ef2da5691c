"""Continuous batching: requests in, events out (types), the books (scheduler), the model's steps
(runner), speculative decoding over the runner (speculative), and the Engine that composes them."""
from llama.engine.core import Engine
from llama.engine.runner import Runner, step_positions
from llama.engine.scheduler import Scheduler
from llama.engine.speculative import Speculator
from llama.engine.types import Event, Plan, Request, SequenceState
from llama.sampling import NonFiniteLogitsError

__all__ = [
    "Engine", "Event", "NonFiniteLogitsError", "Plan", "Request", "Runner", "Scheduler", "SequenceState", "Speculator",
    "step_positions",
]
