"""What goes into the engine and what comes out: requests, the events of each step, the plan rank 0
broadcasts under torchrun, and the state of one sequence as the scheduler and runner share it."""
import codecs
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch


@dataclass
class Request:
    """One sequence to generate, and how."""

    prompt: List[int]
    max_new_tokens: int  # cut further by the model's max_seq_len, as the original's total_len
    temperature: float = 0.6  # 0: greedy
    top_p: float = 0.9
    stop_tokens: Optional[Sequence[int]] = None  # None: the tokenizer's stop tokens
    stop: Sequence[str] = ()  # stop strings: the text ends before the first one generated
    seed: Optional[int] = None  # its own torch.Generator; None draws from the global RNG
    logprobs: bool = False  # log-prob of each new token
    top_logprobs: int = 0  # and the k most likely alternatives at each step
    prompt_logprobs: bool = False  # log-probs (and top_logprobs alternatives) of the prompt's tokens
    top_k: int = 0  # sampling: only the k most likely tokens (0: all)
    min_p: float = 0.0  # sampling: only tokens at least min_p times as likely as the most likely one
    # the answer held to JSON (llama.structured: {"type": "json_object"} or "json_schema"); None: free text
    response_format: Optional[dict] = None

    @property
    def wants_logprobs(self) -> bool:
        """Whether each new token's log-probs (or alternatives) are asked for."""
        return bool(self.logprobs or self.top_logprobs)


@dataclass
class Event:
    """What one step produced for one sequence."""

    seq_id: int
    token: Optional[int]  # None: it finished without a new token (nothing to generate)
    text: str  # printable text this token completes; held back while it may start a stop string
    logprob: Optional[float] = None
    top_logprobs: Optional[List[Tuple[int, float]]] = None
    finished: bool = False
    finish_reason: Optional[str] = None  # once finished: "stop" (token or string), "length" or "error"
    # on a sequence's first event when its request asked for prompt_logprobs: one per prompt token
    # (None for the first, which has no context), and the alternatives likewise
    prompt_logprobs: Optional[List[Optional[float]]] = None
    prompt_top_logprobs: Optional[List[Optional[List[Tuple[int, float]]]]] = None
    cached_tokens: Optional[int] = None  # on a sequence's first event: prompt tokens found in the prefix cache


@dataclass
class Plan:
    """A step's decisions, made by rank 0 and broadcast, so that every rank steps alike."""

    admit: List[Tuple[int, Request]] = field(default_factory=list)  # (seq_id, request)
    cancel: List[int] = field(default_factory=list)
    stop: bool = False  # the server shuts down


class SequenceState:
    """One sequence from admission to its result: what it generated, where it stands in the KV
    cache (the scheduler's books: `row`; the runner's: `pos`), and why it finished.

    `Engine.pop` hands it out once finished: tokens (the stop token included), logprobs, text,
    stop_token, finish_reason, and prompt_logprobs where asked."""

    def __init__(self, seq_id: int, request: Request, limit: int, stop_tokens: Sequence[int], device: torch.device):
        """limit: the most tokens it may generate (its request's, cut by the context)."""
        self.id, self.request, self.limit = seq_id, request, limit
        self.stop_tokens = frozenset(stop_tokens)
        self.generator = None
        if request.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(request.seed)
        self.tokens: List[int] = []  # generated, the stop token included
        self.logprobs: List[float] = []
        self.stop_token: Optional[int] = None
        self.finish_reason: Optional[str] = None  # "stop", "length" or "cancelled"
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # generated text, cut before a stop string
        self.emitted = 0  # characters of `text` already given out in events
        self.prompt_logprobs: Optional[List[Optional[float]]] = None  # when the request asks
        self.prompt_top_logprobs: Optional[list] = None
        self.row = -1  # KV cache row while running
        self.error: Optional[Exception] = None  # why it ended with finish_reason "error"
        self.pos = 0  # tokens in its KV cache row
        self.matcher = None  # its llama.structured.Matcher when its request asks for JSON
        self.blocks: List[int] = []  # with a block KV cache: its block table (llama.engine.blocks)
        self.block_keys: List[int] = []  # the prefix cache's keys of its full blocks so far
        self.cached_tokens = 0  # prompt tokens its first prefill found in the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


    @property
    def context_len(self) -> int:
        """len(self.context())."""
        return len(self.request.prompt) + max(0, len(self.tokens) - 1)

    def context(self) -> List[int]:
        """The tokens its KV cache holds once prefilled: the prompt, and when it resumes after a
        preemption every generated token but the last (which the next decode step feeds)."""
        return self.request.prompt + self.tokens[:-1] if self.tokens else self.request.prompt

    @property
    def needs_row(self) -> bool:
        """Whether it has anything to compute: tokens to generate, or its prompt's log-probs."""
        return self.limit > 0 or self.request.prompt_logprobs

    @property
    def needs_prompt_logits(self) -> bool:
        """Whether its prompt's log-probs are still to compute: every position's logits, in one pass
        over the whole prompt (Runner._prefill_with_logprobs), none taken from the prefix cache."""
        return bool(self.request.prompt_logprobs) and not self.tokens
