"""Executes what the scheduler decided on the model: prefill in stages, decode, sample, and emit
each token through the stop rules, the one place that decides when a sequence has finished and why.
Every model call runs under the kernel policy it is handed (llama.runtime): the model itself holds none."""
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from llama import kv_cache, structured
from llama.runtime import compute
from llama.runtime import policy as kernel_policy
from llama.engine.types import Event, Request, SequenceState
from llama.model import Transformer
from llama.sampling import check_finite, draw_token, filter_logits, top_logprobs
from llama.tokenizer import Tokenizer

# a compiled forward pass (llama.runtime.compiled.CompiledStep): (rows, t) tokens at (rows,) positions ->
# (rows, t, vocab) logits over the whole KV cache, or None once compilation has failed
StepFn = Callable[..., Optional[torch.Tensor]]


def call_model(model: Transformer, policy: Optional[kernel_policy.Policy], tokens: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The model's forward pass of `tokens` (bsz, seqlen) as `policy` plans it for so many rows."""
    with compute.kernels_for(tokens, policy):
        return model(tokens, *args, **kwargs)


def step_positions(positions: List[int], seqlen: int, device: torch.device) -> Tuple[Union[int, torch.Tensor], Optional[int]]:
    """`start_pos` and `kv_len` for a forward pass of `seqlen` tokens per row from these positions:
    an int when every row is at one position (the cheaper path), else each row's start, attending
    to the slots up to the furthest row's last new token (the mask hides the rest of each row)."""
    if min(positions) == max(positions):
        return positions[0], None
    return torch.tensor(positions, device=device), max(positions) + seqlen


def prefill_rows(model: Transformer, policy: Optional[kernel_policy.Policy], seqs: List[SequenceState]) -> torch.Tensor:
    """Fill the KV cache rows of `seqs` (consecutive rows, longest prompt first) of `model` with
    their prompts; return each one's last-position logits (len(seqs), vocab).

    The prompts run in stages: each stage takes the positions up to the next prompt end, for the
    prompts that reach it (the first k), so no padding is computed; the original fed every
    prompt past the shortest one token per step.
    """
    device = model.tok_embeddings.weight.device
    row0, lens = seqs[0].row, [len(s.request.prompt) for s in seqs]
    tokens = torch.zeros(len(seqs), lens[0], dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : lens[i]] = torch.tensor(s.request.prompt, dtype=torch.long)
    tokens = tokens.to(device)  # (len(seqs), longest prompt)
    ends, start = [], 0
    for end in sorted(set(lens)):
        k = sum(n >= end for n in lens)
        last = torch.full((k,), end - start - 1, device=device)
        logits = call_model(model, policy, tokens[:k, start:end], start, output_index=last, row0=row0)[:, 0]  # (k, vocab)
        ends.append(logits[k - lens.count(end) : k])  # the prompts that end here
        start = end
    return torch.cat(ends[::-1])  # longest first, as `seqs`


def prefill_batch(model: Transformer, policy: Optional[kernel_policy.Policy],
                  chunks: Sequence[Tuple[SequenceState, int, int]]) -> torch.Tensor:
    """Fill a block cache with positions start..end-1 of each (s, start, end) context in one pass of
    len(chunks) rows (the block tables in effect, row i for chunks[i]), each row padded to the
    longest chunk: the padding's keys land past the row's chunk, in slots its later tokens overwrite
    (or block 0), and no real position attends to them. Returns each row's last logits (rows, vocab)."""
    tokens, start_pos, kv_len, last = chunk_inputs(chunks, model.tok_embeddings.weight.device)
    return call_model(model, policy, tokens, start_pos, output_index=last, kv_len=kv_len)[:, 0]


def chunk_inputs(chunks: Sequence[Tuple[SequenceState, int, int]], device: torch.device) -> tuple:
    """(tokens (rows, longest chunk), start_pos, kv_len, output_index) of a pass of `prefill_batch`."""
    width = max(end - start for _, start, end in chunks)
    tokens = torch.zeros(len(chunks), width, dtype=torch.long)
    for i, (s, start, end) in enumerate(chunks):
        tokens[i, : end - start] = torch.tensor(s.context()[start:end], dtype=torch.long)
    last = torch.tensor([end - start - 1 for _, start, end in chunks], device=device)
    start_pos, kv_len = step_positions([start for _, start, _ in chunks], width, device)
    return tokens.to(device), start_pos, kv_len, last


def batch_chunks(chunks: Sequence[Tuple[SequenceState, int, int]], max_seq_len: int) -> List[List[int]]:
    """Indices of `chunks` grouped into prefill passes (`prefill_batch`), longest chunk first: a chunk
    joins a pass while at most half the pass's tokens are padding and its padded positions stay
    below `max_seq_len` (the rotary table's length); one pass each otherwise."""
    order = sorted(range(len(chunks)), key=lambda i: chunks[i][1] - chunks[i][2])
    groups: List[List[int]] = []
    real = width = 0
    for i in order:
        _, start, end = chunks[i]
        n = end - start
        if groups and start + width <= max_seq_len and (len(groups[-1]) + 1) * width <= 2 * (real + n):
            groups[-1].append(i)
            real += n
        else:
            groups.append([i])
            real = width = n
    return groups


class Runner:
    """Runs steps of sequences on a model with an allocated KV cache (llama.kv_cache.allocate).

    `compiled`: a compiled decode pass over all cache rows (with `static_shapes`: every decode
    step runs all rows, free ones at position 0, so that one shape serves every step); where it
    returns None (compilation failed) the step runs eagerly."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        policy: Optional[kernel_policy.Policy] = None,
        compiled: Optional[StepFn] = None,
        static_shapes: bool = False,
    ):
        shape = kv_cache.shape(model)
        if shape is None:
            raise ValueError("the model has no KV cache: allocate one with llama.kv_cache.allocate first")
        self.model, self.tokenizer, self.policy = model, tokenizer, policy
        self.rows, self.seq_len = shape
        self.compiled, self.static_shapes = compiled, static_shapes
        self.device = model.tok_embeddings.weight.device

    def new_sequence(self, seq_id: int, request: Request) -> SequenceState:
        """The state of a new sequence: its limit is its request's, cut by the model's context."""
        limit = max(0, min(request.max_new_tokens, self.model.params.max_seq_len - len(request.prompt)))
        stops = self.tokenizer.stop_tokens if request.stop_tokens is None else request.stop_tokens
        s = SequenceState(seq_id, request, limit, stops, self.device)
        s.matcher = structured.matcher(self.tokenizer, request.response_format, list(stops))
        return s

    def forward(self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor], **kwargs) -> torch.Tensor:
        """The model's logits of `tokens` (bsz, seqlen) under this runner's policy (`Transformer.forward`)."""
        return call_model(self.model, self.policy, tokens, start_pos, **kwargs)

    def move_rows(self, dst: List[int], src: List[int]) -> None:
        """Row dst[i] of the KV cache takes row src[i]'s contents (sequences moved by the scheduler)."""
        kv_cache.move_rows(self.model, dst, src)

    # ---------------------------------------------------------------- prefill

    def prefill(self, seqs: List[SequenceState]) -> List[Event]:
        """Prefill newly admitted sequences into their rows (the scheduler's order: the staged ones,
        then those asking for prompt log-probs, one by one) and sample their first tokens."""
        staged = [s for s in seqs if not s.request.prompt_logprobs]
        logits: Dict[int, torch.Tensor] = {}
        if staged:
            logits.update(zip((s.id for s in staged), prefill_rows(self.model, self.policy, staged)))
        first: Dict[int, dict] = {}
        for s in seqs:
            if s.request.prompt_logprobs:
                logits[s.id], first[s.id] = self._prefill_with_logprobs(s, s.row)
        for s in seqs:
            s.pos = len(s.request.prompt)
        return self._first_events(seqs, logits, first)

    def prefill_blocks(self, chunks: List[Tuple[SequenceState, int]]) -> List[Event]:
        """With a block KV cache: prefill each sequence's context from its `pos` (what its blocks
        already hold) to `end` (a chunk: the whole context, or a part of it this step), the chunks
        batched into as few passes as padding allows (`batch_chunks`), and sample the first tokens of
        the new ones whose context is complete (a sequence resuming after a preemption has its next
        token already). A prompt whose log-probs are asked is prefilled whole, from its start."""
        logits: Dict[int, torch.Tensor] = {}
        first: Dict[int, dict] = {}
        plain = [(s, s.pos, end) for s, end in chunks if not s.needs_prompt_logits]
        for s, end in chunks:
            if s.needs_prompt_logits:
                with kv_cache.using_tables([self.model], [s.blocks]):
                    logits[s.id], first[s.id] = self._prefill_with_logprobs(s, 0)
        for group in batch_chunks(plain, self.model.params.max_seq_len):
            batch = [plain[i] for i in group]
            with kv_cache.using_tables([self.model], [s.blocks for s, _, _ in batch]):
                last = prefill_batch(self.model, self.policy, batch)
            for (s, _, end), row in zip(batch, last):
                if not s.tokens and end == s.context_len:
                    logits[s.id] = row
        for s, end in chunks:
            s.pos = end
            if s.id in logits:
                first.setdefault(s.id, {})["cached_tokens"] = s.cached_tokens
        return self._first_events([s for s, _ in chunks if s.id in logits], logits, first)

    def step_blocks(self, decoding: List[SequenceState], chunks: List[Tuple[SequenceState, int]]) -> List[Event]:
        """With a block KV cache: one pass for the decode rows and this step's prefill chunks
        (Transformer.forward_groups: the projections once over every token, attention group by
        group), which saves a pass's fixed cost on every step a prompt is prefilled beside decoding
        streams; the decoding sequences' next tokens, then the first tokens of the new ones whose
        context is complete. A prompt whose log-probs are asked has its own pass (`prefill_blocks`)."""
        apart = [(s, end) for s, end in chunks if s.needs_prompt_logits]
        plain = [(s, s.pos, end) for s, end in chunks if not s.needs_prompt_logits]
        batches = [[plain[i] for i in g] for g in batch_chunks(plain, self.model.params.max_seq_len)]
        start_pos, kv_len = step_positions([s.pos for s in decoding], 1, self.device)
        zeros = torch.zeros(len(decoding), dtype=torch.long, device=self.device)
        groups = [(torch.tensor([s.tokens[-1] for s in decoding], device=self.device)[:, None], start_pos, kv_len, zeros)]
        groups += [chunk_inputs(batch, self.device) for batch in batches]
        tables = [s.blocks for s in decoding] + [s.blocks for batch in batches for s, _, _ in batch]
        with kv_cache.using_tables([self.model], tables):
            with compute.kernels_for(torch.cat([g[0].reshape(-1) for g in groups])[None], self.policy):
                out = self.model.forward_groups(groups)
        for s in decoding:
            s.pos += 1
        events = self.sample(decoding, out[0])
        logits: Dict[int, torch.Tensor] = {}
        for batch, rows in zip(batches, out[1:]):
            for (s, _, end), row in zip(batch, rows):
                s.pos = end
                if not s.tokens and end == s.context_len:
                    logits[s.id] = row
        ready = [s for s, _, _ in plain if s.id in logits]
        events += self._first_events(ready, logits, {s.id: {"cached_tokens": s.cached_tokens} for s in ready})
        return events + (self.prefill_blocks(apart) if apart else [])

    def _first_events(self, seqs: List[SequenceState], logits: Dict[int, torch.Tensor], first: Dict[int, dict]) -> List[Event]:
        """The first events of newly prefilled sequences from their last logits: a first token
        sampled, or the end of one that asked only for its prompt's log-probs (`first`: fields of
        those events)."""
        events = []
        for s in seqs:
            if s.limit == 0:  # asked only for its prompt's log-probs
                s.finish_reason = "length"
                events.append(Event(s.id, None, "", finished=True, finish_reason="length", **first.get(s.id, {})))
        ready = [s for s in seqs if s.limit > 0]
        if ready:
            new = self.sample(ready, torch.stack([logits[s.id] for s in ready]))  # (len(ready), vocab)
            for e in new:
                for k, v in first.get(e.seq_id, {}).items():
                    setattr(e, k, v)
            events += new
        return events

    def _prefill_with_logprobs(self, s: SequenceState, row0: int) -> Tuple[torch.Tensor, dict]:
        """Prefill one row (row0) with the full logits of its prompt: (last logits (vocab,), event fields)."""
        prompt = torch.tensor(s.request.prompt, device=self.device)
        logits = self.forward(prompt[None], 0, row0=row0)[0]  # (len, vocab)
        lsm = torch.log_softmax(logits[:-1], dim=-1)  # position i predicts token i + 1
        lps = [None] + lsm.gather(1, prompt[1:, None])[:, 0].tolist()
        tops = None
        if s.request.top_logprobs:
            tops = [None] + top_logprobs(lsm, s.request.top_logprobs)
        s.prompt_logprobs, s.prompt_top_logprobs = lps, tops
        return logits[-1], {"prompt_logprobs": lps, "prompt_top_logprobs": tops}

    @staticmethod
    def finish_unrun(seqs: List[SequenceState]) -> List[Event]:
        """Finish sequences that had nothing to generate (the scheduler gave them no row)."""
        for s in seqs:
            s.finish_reason = "length"
        return [Event(s.id, None, "", finished=True, finish_reason="length") for s in seqs]

    # ---------------------------------------------------------------- decode

    def decode(self, seqs: List[SequenceState]) -> List[Event]:
        """One decode step of the running sequences `seqs` (rows 0..n-1): one token each."""
        n = self.rows if self.static_shapes else len(seqs)
        tokens = [s.tokens[-1] for s in seqs] + [0] * (n - len(seqs))  # free rows ride along at 0
        positions = [s.pos for s in seqs] + [0] * (n - len(seqs))
        tokens_t = torch.tensor(tokens, device=self.device)[:, None]  # (n, 1)
        logits = None
        if self.static_shapes:  # every row at its own position, over the whole cache
            start_pos, kv_len = torch.tensor(positions, device=self.device), None
            logits = self.compiled(tokens_t, start_pos) if self.compiled is not None else None
        else:
            start_pos, kv_len = step_positions(positions, 1, self.device)
        if logits is None:
            logits = self.forward(tokens_t, start_pos, kv_len=kv_len)
        logits = logits[: len(seqs), -1]  # (len(seqs), vocab)
        for s in seqs:
            s.pos += 1
        return self.sample(seqs, logits)

    def sample(self, seqs: List[SequenceState], logits: torch.Tensor) -> List[Event]:
        """Each sequence's next token from its logits row (len(seqs), vocab), with its own sampling
        parameters and generator; then the stop rule (`emit`). The rows of sequences held to JSON
        get -inf outside their grammar's mask first (`constrain`), so greedy and sampling alike
        choose among the tokens it allows."""
        check_finite(logits)
        constrain(seqs, logits)
        tokens = torch.argmax(logits, dim=-1)  # (len(seqs),)
        for i, s in enumerate(seqs):
            r = s.request
            if r.temperature > 0:
                tokens[i] = draw_token(logits[i : i + 1], r.temperature, r.top_p, s.generator, r.top_k, r.min_p)[0]
        return self.emit(seqs, logits, tokens)

    # ---------------------------------------------------------------- emit: the stop rules

    def emit(self, seqs: List[SequenceState], logits: Optional[torch.Tensor], tokens: Union[torch.Tensor, List[int]]) -> List[Event]:
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
                    tops[i] = top_logprobs(lsm[j : j + 1], k)[0]
        return [self._advance_alone(s, tok, lps.get(i), tops.get(i)) for i, (s, tok) in enumerate(zip(seqs, tokens))]

    def _advance_alone(self, s: SequenceState, token: int, logprob: Optional[float], top: Optional[list]) -> Event:
        """`_advance`, where a failure of this one sequence (its text, its stop rule) ends it alone:
        finish_reason "error", the exception kept in its `error` for the caller to report."""
        try:
            return self._advance(s, token, logprob, top)
        except Exception as e:  # noqa: BLE001 -- the other sequences and the engine go on
            s.finish_reason, s.error = "error", e
            return Event(s.id, token, "", finished=True, finish_reason="error")

    def _advance(self, s: SequenceState, token: int, logprob: Optional[float], top: Optional[list]) -> Event:
        """Append a sampled token; decide whether the sequence has finished, and why."""
        if s.matcher is not None:  # a JSON answer ends on the stop token its grammar allows once complete
            s.matcher.consume(token)
        s.tokens.append(token)
        if logprob is not None:
            s.logprobs.append(logprob)
        stops = s.request.stop
        if token in s.stop_tokens:
            s.finish_reason, s.stop_token = "stop", token
        else:
            s.text += s.decoder.decode(self.tokenizer.model.decode_single_token_bytes(token), final=False)
            cut = find_stop(s.text, stops, s.emitted)
            if cut is not None:
                s.text, s.finish_reason = s.text[:cut], "stop"
            elif len(s.tokens) >= s.limit:
                s.finish_reason = "length"
        if s.finish_reason is None:
            end = len(s.text) - held_back(s.text[s.emitted :], stops)
        else:
            if s.stop_token is not None or s.finish_reason == "length":
                s.text += s.decoder.decode(b"", final=True)
            end = len(s.text)
        text, s.emitted = s.text[s.emitted : end], max(s.emitted, end)
        return Event(s.id, token, text, logprob, top, s.finished, s.finish_reason)


def constrain(seqs: List[SequenceState], logits: torch.Tensor) -> None:
    """Set to -inf, in place, the logits (len(seqs), vocab) that the grammars of the sequences held
    to JSON do not allow next; the other rows are not touched."""
    rows = [i for i, s in enumerate(seqs) if s.matcher is not None]
    if rows:
        structured.apply(logits, rows, [seqs[i].matcher for i in rows])


def restrict(seqs: List[SequenceState], target: torch.Tensor, proposals: List[List[int]]) -> None:
    """Hold the model's logits of a verify pass (rows, k + 1, vocab) to what each row may choose, in
    place: at each position, for a row held to JSON, its grammar's mask after the proposals before
    it (its matcher walks them up to the first one it refuses, which is then rejected, and is rolled
    back: the stop rule consumes what is emitted); for a sampling row, top-k and min-p."""
    for i, s in enumerate(seqs):
        if s.matcher is not None:
            walked = 0
            for j in range(target.shape[1]):
                blocked = s.matcher.blocked(target.shape[-1])
                target[i, j].masked_fill_(blocked.to(target.device), float("-inf"))
                if j == len(proposals[i]) or bool(blocked[proposals[i][j]]):
                    break
                s.matcher.consume(proposals[i][j])
                walked += 1
            s.matcher.rollback(walked)
        r = s.request
        if r.temperature > 0 and (r.top_k or r.min_p):
            target[i] = filter_logits(target[i], r.temperature, r.top_k, r.min_p)


def find_stop(text: str, stops: Sequence[str], emitted: int) -> Optional[int]:
    """Where the first stop string in `text` starts (None: none there). Text already given out
    holds none: held-back text covers every stop string's possible start."""
    found = [i for i in (text.find(s, max(0, emitted - len(s))) for s in stops if s) if i >= 0]
    return min(found) if found else None


def held_back(tail: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `tail` that a stop string starts with: not given out yet."""
    for k in range(min(len(tail), max((len(s) for s in stops), default=0)), 0, -1):
        if any(s.startswith(tail[-k:]) for s in stops):
            return k
    return 0
