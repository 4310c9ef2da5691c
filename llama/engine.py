# The step loop: admit, prefill, decode, sample, retire. The one place that decides "finished".
import codecs
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from llama import kv_cache
from llama.model import Transformer
from llama.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llama.speculative import Speculator

logger = logging.getLogger(__name__)

# (tokens (bsz, 1), start_pos int or (bsz,), kv_len or None) -> logits (bsz, vocab)
DecodeFn = Callable[[torch.Tensor, Union[int, torch.Tensor], Optional[int]], torch.Tensor]


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


@dataclass
class Plan:
    """A step's decisions, made by rank 0 and broadcast, so that every rank steps alike."""

    admit: List[Tuple[int, Request]] = field(default_factory=list)  # (seq_id, request)
    cancel: List[int] = field(default_factory=list)
    stop: bool = False  # the server shuts down


class _Sequence:
    def __init__(self, seq_id: int, request: Request, limit: int, stop_tokens: Sequence[int], device: torch.device):
        self.id, self.request, self.limit = seq_id, request, limit
        self.stop_tokens = frozenset(stop_tokens)
        self.generator = None
        if request.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(request.seed)
        self.tokens: List[int] = []  # generated, the stop token included
        self.logprobs: List[float] = []
        self.stop_token: Optional[int] = None
        self.finish_reason: Optional[str] = None
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # generated text, cut before a stop string
        self.emitted = 0  # characters of `text` already given out in events
        self.prompt_logprobs: Optional[List[Optional[float]]] = None  # when the request asks
        self.prompt_top_logprobs: Optional[list] = None
        self.row = -1  # KV cache row while running
        self.error: Optional[Exception] = None  # why it ended with finish_reason "error"
        self.pos = 0  # tokens in its KV cache row

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """Continuous batching over the model's KV cache (allocate it first: llama.kv_cache.allocate).

    Running sequences occupy cache rows 0..n-1. Each `step` decodes every running row, retires the
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
        decode: Optional[DecodeFn] = None,
        static_shapes: bool = False,
        speculator: Optional["Speculator"] = None,
    ):
        """decode: the decode step (default: the model's eager forward). static_shapes: decode all
        cache rows every step with per-row positions (one shape for a compiled decode step).
        speculator: a draft model that proposes tokens for the model to verify (llama.speculative);
        its KV cache rows are prefilled, moved and rolled back with the model's."""
        shape = kv_cache.shape(model)
        if shape is None:
            raise ValueError("the model has no KV cache: allocate one with llama.kv_cache.allocate first")
        self.model, self.tokenizer = model, tokenizer
        self.rows, self.seq_len = shape
        self.decode = decode or (lambda tokens, start_pos, kv_len: model(tokens, start_pos, kv_len=kv_len)[:, -1])
        self.static_shapes = static_shapes
        self.speculator = speculator
        if speculator:
            speculator.fit(self.rows, self.seq_len)
        self.device = model.tok_embeddings.weight.device
        self.waiting: deque = deque()
        self.running: List[_Sequence] = []  # running[i].row == i
        self.results: Dict[int, _Sequence] = {}  # finished, until `pop`ped
        self._next_id = 0

    # ---------------------------------------------------------------- requests in, results out

    def add(self, request: Request, seq_id: Optional[int] = None) -> int:
        """Queue a sequence; returns its id (the given one, or the next free number)."""
        if not request.prompt:
            raise ValueError("the prompt is empty: every prompt needs at least one token")
        if len(request.prompt) > self.seq_len:
            raise ValueError(f"the prompt has {len(request.prompt)} tokens, more than the KV cache's {self.seq_len}")
        if seq_id is None:
            seq_id = self._next_id
        self._next_id = max(self._next_id, seq_id + 1)
        limit = max(0, min(request.max_new_tokens, self.model.params.max_seq_len - len(request.prompt)))
        stops = self.tokenizer.stop_tokens if request.stop_tokens is None else request.stop_tokens
        self.waiting.append(_Sequence(seq_id, request, limit, stops, self.device))
        return seq_id

    def cancel(self, seq_id: int) -> None:
        """Drop a sequence, waiting or running; its row is free for the next admission."""
        self.waiting = deque(s for s in self.waiting if s.id != seq_id)
        for s in self.running:
            if s.id == seq_id:
                s.finish_reason = "cancelled"
        self._retire()
        self.results.pop(seq_id, None)

    def apply(self, plan: Plan) -> None:
        for seq_id in plan.cancel:
            self.cancel(seq_id)
        for seq_id, request in plan.admit:
            self.add(request, seq_id)

    def pop(self, seq_id: int) -> _Sequence:
        """A finished sequence's state: tokens (the stop token included), logprobs, text, finish_reason."""
        return self.results.pop(seq_id)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def n_running(self) -> int:
        return len(self.running)

    def run(self) -> Iterator[List[Event]]:
        """Step until every sequence has finished; yield each step's events."""
        while self.busy:
            yield self.step()

    # ---------------------------------------------------------------- the step

    @torch.inference_mode()
    def step(self) -> List[Event]:
        events: List[Event] = []
        if self.running:
            events += self.speculator.step(self) if self.speculator else self._decode_running()
            self._retire()
        events += self._admit()
        self._retire()
        return events

    def _decode_running(self) -> List[Event]:
        seqs = self.running
        n = self.rows if self.static_shapes else len(seqs)
        tokens = [s.tokens[-1] for s in seqs] + [0] * (n - len(seqs))  # free rows ride along at 0
        positions = [s.pos for s in seqs] + [0] * (n - len(seqs))
        tokens_t = torch.tensor(tokens, device=self.device)[:, None]  # (n, 1)
        if self.static_shapes:  # every row at its own position, over the whole cache
            start_pos, kv_len = torch.tensor(positions, device=self.device), None
        else:
            start_pos, kv_len = step_positions(positions, 1, self.device)
        logits = self.decode(tokens_t, start_pos, kv_len)[: len(seqs)]  # (n_running, vocab)
        for s in seqs:
            s.pos += 1
        return self._sample(seqs, logits)

    def _admit(self) -> List[Event]:
        """Prefill waiting sequences into free rows; sample their first tokens."""
        events, batch = [], []
        while self.waiting and len(self.running) + len(batch) < self.rows:
            s = self.waiting.popleft()
            if s.limit == 0 and not s.request.prompt_logprobs:
                s.finish_reason = "length"
                self.results[s.id] = s
                events.append(Event(s.id, None, "", finished=True, finish_reason="length"))
            else:
                batch.append(s)
        if not batch:
            return events
        # rows in this order: the staged prefill's (consecutive rows, longest prompt first), then
        # those that need their prompt's full logits, one by one
        batch.sort(key=lambda s: (s.request.prompt_logprobs, -len(s.request.prompt)))
        for s in batch:
            s.row, s.pos = len(self.running), len(s.request.prompt)
            self.running.append(s)
        plain = [s for s in batch if not s.request.prompt_logprobs]
        logits = {}
        if plain:
            logits.update(zip((s.id for s in plain), self._prefill(plain)))
        first: Dict[int, dict] = {}
        for s in batch:
            if s.request.prompt_logprobs:
                logits[s.id], first[s.id] = self._prefill_with_logprobs(s)
        if self.speculator:  # the draft's cache rows hold the same prompts
            self.speculator.prefill(self, plain, [s for s in batch if s.request.prompt_logprobs])
        ready = [s for s in batch if s.limit > 0]
        for s in batch:
            if s.limit == 0:  # asked only for its prompt's log-probs
                s.finish_reason = "length"
                events.append(Event(s.id, None, "", finished=True, finish_reason="length", **first.get(s.id, {})))
        if ready:
            new = self._sample(ready, torch.stack([logits[s.id] for s in ready]))
            for e in new:
                for k, v in first.get(e.seq_id, {}).items():
                    setattr(e, k, v)
            events += new
        return events

    def _prefill(self, seqs: List[_Sequence], model: Optional[Transformer] = None) -> torch.Tensor:
        """Fill the KV cache rows of `seqs` (consecutive rows, longest prompt first) of `model`
        (default: the engine's) with their prompts; return each one's last-position logits
        (len(seqs), vocab).

        The prompts run in stages: each stage takes the positions up to the next prompt end, for the
        prompts that reach it (the first k), so no padding is computed; the original fed every
        prompt past the shortest one token per step.
        """
        model = model or self.model
        row0, lens = seqs[0].row, [len(s.request.prompt) for s in seqs]
        tokens = torch.zeros(len(seqs), lens[0], dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, : lens[i]] = torch.tensor(s.request.prompt, dtype=torch.long)
        tokens = tokens.to(self.device)  # (len(seqs), longest prompt)
        ends, start = [], 0
        for end in sorted(set(lens)):
            k = sum(n >= end for n in lens)
            last = torch.full((k,), end - start - 1, device=self.device)
            logits = model(tokens[:k, start:end], start, output_index=last, row0=row0)[:, 0]  # (k, vocab)
            ends.append(logits[k - lens.count(end) : k])  # the prompts that end here
            start = end
        return torch.cat(ends[::-1])  # longest first, as `seqs`

    def _prefill_with_logprobs(self, s: _Sequence) -> Tuple[torch.Tensor, dict]:
        """Prefill one row with the full logits of its prompt: (last logits (vocab,), event fields)."""
        prompt = torch.tensor(s.request.prompt, device=self.device)
        logits = self.model(prompt[None], 0, row0=s.row)[0]  # (len, vocab)
        lsm = torch.log_softmax(logits[:-1], dim=-1)  # position i predicts token i + 1
        lps = [None] + lsm.gather(1, prompt[1:, None])[:, 0].tolist()
        tops = None
        if s.request.top_logprobs:
            tops = [None] + _top(lsm, s.request.top_logprobs)
        s.prompt_logprobs, s.prompt_top_logprobs = lps, tops
        return logits[-1], {"prompt_logprobs": lps, "prompt_top_logprobs": tops}

    def _sample(self, seqs: List[_Sequence], logits: torch.Tensor) -> List[Event]:
        """Each sequence's next token from its logits row (len(seqs), vocab), with its own sampling
        parameters and generator; then the stop rule."""
        check_finite(logits)
        tokens = torch.argmax(logits, dim=-1)
        for i, s in enumerate(seqs):
            if s.request.temperature > 0:
                tokens[i] = _draw(logits[i : i + 1], s.request.temperature, s.request.top_p, s.generator)[0]
        return self._emit(seqs, logits, tokens)

    def _emit(self, seqs: List[_Sequence], logits: Optional[torch.Tensor], tokens: Union[torch.Tensor, List[int]]) -> List[Event]:
        """Append each sequence's chosen token (len(seqs),), with its log-probs from the logits it
        was chosen from (len(seqs), vocab) where asked (`logits` may be None when none asks); then
        the stop rule."""
        tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens
        want_lp = [i for i, s in enumerate(seqs) if s.request.wants_logprobs]
        lps: Dict[int, float] = {}
        tops: Dict[int, list] = {}
        if want_lp:
            index = torch.tensor(want_lp, device=logits.device)
            lsm = torch.log_softmax(logits[index], dim=-1)  # (len(want_lp), vocab)
            chosen = lsm.gather(1, torch.tensor([tokens[i] for i in want_lp], device=logits.device)[:, None])[:, 0].tolist()
            for j, i in enumerate(want_lp):
                lps[i] = chosen[j]
                k = seqs[i].request.top_logprobs
                if k:
                    tops[i] = _top(lsm[j : j + 1], k)[0]
        return [self._advance_alone(s, tok, lps.get(i), tops.get(i)) for i, (s, tok) in enumerate(zip(seqs, tokens))]

    def _advance_alone(self, s: _Sequence, token: int, logprob: Optional[float], top: Optional[list]) -> Event:
        """`_advance`, where a failure of this one sequence (its text, its stop rule) ends it alone:
        finish_reason "error", the exception kept in its `error` for the caller to report."""
        try:
            return self._advance(s, token, logprob, top)
        except Exception as e:  # noqa: BLE001 -- the other sequences and the engine go on
            s.finish_reason, s.error = "error", e
            return Event(s.id, token, "", finished=True, finish_reason="error")

    def _advance(self, s: _Sequence, token: int, logprob: Optional[float], top: Optional[list]) -> Event:
        """Append a sampled token; decide whether the sequence has finished, and why."""
        s.tokens.append(token)
        if logprob is not None:
            s.logprobs.append(logprob)
        stops = s.request.stop
        if token in s.stop_tokens:
            s.finish_reason, s.stop_token = "stop", token
        else:
            s.text += s.decoder.decode(self.tokenizer.model.decode_single_token_bytes(token), final=False)
            cut = _find_stop(s.text, stops, s.emitted)
            if cut is not None:
                s.text, s.finish_reason = s.text[:cut], "stop"
            elif len(s.tokens) >= s.limit:
                s.finish_reason = "length"
        if s.finish_reason is None:
            end = len(s.text) - _held_back(s.text[s.emitted :], stops)
        else:
            if s.stop_token is not None or s.finish_reason == "length":
                s.text += s.decoder.decode(b"", final=True)
            end = len(s.text)
        text, s.emitted = s.text[s.emitted : end], max(s.emitted, end)
        return Event(s.id, token, text, logprob, top, s.finished, s.finish_reason)

    def _retire(self) -> None:
        """Free the rows of finished sequences: the last running rows move into the holes."""
        done = [s for s in self.running if s.finished]
        if not done:
            return
        keep = [s for s in self.running if not s.finished]
        n = len(keep)
        holes = sorted(s.row for s in done if s.row < n)
        movers = sorted((s for s in keep if s.row >= n), key=lambda s: s.row)
        for model in (self.model, self.speculator and self.speculator.draft):
            if model is not None:
                kv_cache.move_rows(model, holes, [s.row for s in movers])
        for hole, s in zip(holes, movers):
            s.row = hole
        self.running = sorted(keep, key=lambda s: s.row)
        for s in done:
            s.row = -1
            if s.finish_reason != "cancelled":
                self.results[s.id] = s


def step_positions(positions: List[int], seqlen: int, device: torch.device) -> Tuple[Union[int, torch.Tensor], Optional[int]]:
    """`start_pos` and `kv_len` for a forward pass of `seqlen` tokens per row from these positions:
    an int when every row is at one position (the cheaper path), else each row's start, attending
    to the slots up to the furthest row's last new token (the mask hides the rest of each row)."""
    if min(positions) == max(positions):
        return positions[0], None
    return torch.tensor(positions, device=device), max(positions) + seqlen


def _top(lsm: torch.Tensor, k: int) -> List[List[Tuple[int, float]]]:
    """The k most likely tokens of each row of log-probs (rows, vocab): [(token, logprob), ...]."""
    values, indices = torch.topk(lsm, min(k, lsm.shape[-1]), dim=-1)
    return [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]


def _find_stop(text: str, stops: Sequence[str], emitted: int) -> Optional[int]:
    """Where the first stop string in `text` starts (None: none there). Text already given out
    holds none: held-back text covers every stop string's possible start."""
    found = [i for i in (text.find(s, max(0, emitted - len(s))) for s in stops if s) if i >= 0]
    return min(found) if found else None


def _held_back(tail: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `tail` that a stop string starts with: not given out yet."""
    for k in range(min(len(tail), max((len(s) for s in stops), default=0)), 0, -1):
        if any(s.startswith(tail[-k:]) for s in stops):
            return k
    return 0


def _top_p_sorted(probs: torch.Tensor, p: Union[float, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The nucleus of each row of `probs` (..., vocab): the smallest prefix of the sorted
    distribution whose mass reaches `p` (the top token always), renormalised; (probs, ids) sorted.
    `p`: one for all rows, or a tensor (..., 1) of one per row."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort.masked_fill_(mask, 0.0)
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    return probs_sort, probs_idx


def top_p_probs(probs: torch.Tensor, p: float) -> torch.Tensor:
    """The distribution nucleus sampling draws from, in vocabulary order (..., vocab)."""
    probs_sort, probs_idx = _top_p_sorted(probs, p)
    return torch.zeros_like(probs_sort).scatter_(-1, probs_idx, probs_sort)


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Nucleus sampling: keep the smallest prefix of the sorted distribution whose mass reaches `p`
    (the top token always), renormalise, draw one token per row. Returns (bsz, 1) token ids."""
    probs_sort, probs_idx = _top_p_sorted(probs, p)
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


class NonFiniteLogitsError(ValueError):
    """The model produced NaN or infinite logits: nothing can be sampled from them."""


def nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:
    """(..., vocab) logits -> (...) bool: the rows nothing can be sampled from (a NaN or +inf
    logit, or every logit -inf; a -inf mask on some tokens still samples)."""
    return (torch.isnan(logits) | torch.isposinf(logits)).any(-1) | torch.isneginf(logits).all(-1)


def check_finite(logits: torch.Tensor) -> None:
    """Raise NonFiniteLogitsError, naming the likely causes, for NaN or +inf logits or a row that is
    all -inf (`nonfinite_rows`); argmax would pick garbage, multinomial crash."""
    bad = nonfinite_rows(logits)
    if bool(bad.any()):
        rows = bad.nonzero()[:, 0].tolist()
        raise NonFiniteLogitsError(
            f"the model produced NaN or infinite logits (batch rows {rows[:8]}): the weights are likely corrupt "
            "(check them with scripts/verify.py), or the activations overflowed in float16 (run in bfloat16 or "
            "float32: --dtype bfloat16)"
        )


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """(bsz, vocab) logits -> (bsz,) tokens: greedy at temperature 0, else nucleus sampling."""
    check_finite(logits)
    return _draw(logits, temperature, top_p, generator)


def sampling_probs(
    logits: torch.Tensor, temperature: Union[float, torch.Tensor], top_p: Union[float, torch.Tensor]
) -> torch.Tensor:
    """The distribution (..., vocab) that sampling at `temperature` > 0 with nucleus `top_p` draws
    from. Both are floats, or tensors (...) of one per row (speculative steps over rows of mixed
    requests; a row at temperature 0 gets its distribution at temperature 1, for callers that take
    its argmax instead)."""
    if isinstance(temperature, torch.Tensor):
        temperature = torch.where(temperature > 0, temperature, 1.0)[..., None]
        top_p = top_p[..., None]
    return top_p_probs(torch.softmax(logits / temperature, dim=-1), top_p)


def nucleus_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`sampling_probs` with per-row tensors, from the `top` most probable tokens of each row
    instead of a sort of the whole vocabulary (which costs several times the rest on CPU): the
    same distribution wherever the nucleus lies within them. Returns (probs (..., vocab),
    covered (...)): covered is False for a row whose nucleus may reach past them (its first
    top - 1 tokens do not hold more than top_p), where the caller needs `sampling_probs`."""
    if top >= logits.shape[-1]:  # the candidates are the whole vocabulary
        return sampling_probs(logits, temperature, top_p), torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    temperature = torch.where(temperature > 0, temperature, 1.0)[..., None]
    probs = torch.softmax(logits / temperature, dim=-1)
    values, ids = torch.topk(probs, top, dim=-1)  # (..., top), descending
    mass = torch.cumsum(values, dim=-1)
    values = values.masked_fill(mass - values > top_p[..., None], 0.0)
    values = values / values.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, ids, values), mass[..., -2] > top_p


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` (..., vocab; not necessarily normalised) by inverse transform
    sampling with uniforms `u` (...) in [0, 1): the first token whose cumulative mass exceeds u
    times the row's mass. Never a token of zero mass. A function of its inputs only, so a compiled
    graph draws the tokens that an eager pass given the same uniforms draws."""
    cdf = probs.cumsum(dim=-1)
    token = (cdf <= (u * cdf[..., -1])[..., None]).sum(dim=-1)  # rounding may reach the end
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)  # the last token with mass
    return torch.minimum(token, last)


def _draw(logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    if temperature > 0:
        probs = torch.softmax(logits / temperature, dim=-1)
        return sample_top_p(probs, top_p, generator)[:, 0]
    return torch.argmax(logits, dim=-1)
