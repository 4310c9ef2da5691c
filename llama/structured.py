"""Structured outputs: an answer held to a JSON schema (or any JSON object, or one of the given tools'
calls) by masking, before each token is chosen, every token the schema does not allow.

`response_format` takes OpenAI's shapes: {"type": "text"} (no constraint), {"type": "json_object"}
(any JSON object), {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}.
`tool_call_format` turns tools into one: the Llama 3.1 custom tool call `{"name": ..., "parameters":
{...}}` (llama.tokenizer.ChatFormat reads it back as a ToolCall). `check_response_format` compiles
one (a ValueError naming the part it cannot follow); `matcher` gives a sequence its `Matcher`.

The grammar engine is llguidance (the `structured` extra; chosen by measurement, docs/serving.md): it
builds its tokenizer from our tiktoken encoding and computes each mask on the CPU, in a worker thread
started as soon as the previous token is consumed, so that it overlaps the next forward pass.
The JSON is compact (no whitespace between tokens: nothing for a model to loop on), and after it the
only token allowed is the sequence's stop token.
"""
import concurrent.futures
import functools
import json
import threading
import weakref
from typing import Any, List, Optional

import torch

from llama.tokenizer import Tokenizer

TYPES = ("text", "json_object", "json_schema")
# what the compiler is told beyond the schema: compact JSON, and no silent skipping of keywords it
# does not implement (`lenient` false: those are an error naming them)
_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":", "lenient": False}
_BYTE_BITS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
# row b: which of byte b's 8 bits are clear (blocked tokens), so a mask unpacks by one lookup per byte
_BLOCKED_BY_BYTE = (torch.arange(256, dtype=torch.uint8)[:, None] & _BYTE_BITS).eq(0)  # (256, 8)
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar-mask")
_LL_TOKENIZERS: "weakref.WeakKeyDictionary[Tokenizer, Any]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ImportError("structured outputs need the llguidance package: pip install 'llama3-ref[structured]'") from None
    return llguidance


def schema_of(response_format: Optional[dict]) -> Optional[dict]:
    """The JSON schema a response_format asks for (None: plain text), or a ValueError naming the
    part of its shape that is wrong."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or response_format.get("type") not in TYPES:
        raise ValueError(f"response_format.type must be one of {', '.join(TYPES)}")
    kind = response_format["type"]
    extra = set(response_format) - {"type", "json_schema"}
    if extra or (kind != "json_schema" and "json_schema" in response_format):
        field = sorted(extra or {"json_schema"})[0]
        raise ValueError(f"response_format holds {field!r}, which a {kind!r} response_format does not take")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise ValueError("response_format.json_schema is required: {\"name\", \"schema\", \"strict\"?, \"description\"?}")
    unknown = set(spec) - {"name", "schema", "strict", "description"}
    if unknown:
        raise ValueError(f"response_format.json_schema.{sorted(unknown)[0]} is not a field of json_schema "
                         "(it takes name, schema, strict, description)")
    name = spec.get("name")
    if not (isinstance(name, str) and 0 < len(name) <= 64):
        raise ValueError("response_format.json_schema.name is required: a string of 1 to 64 characters")
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise ValueError("response_format.json_schema.strict must be a boolean")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise ValueError("response_format.json_schema.schema must be a JSON schema (an object)")
    return schema


def tool_call_format(tools: List[dict], name: Optional[str] = None) -> dict:
    """The response_format of a call of one of `tools` (OpenAI tool definitions), or of the one
    named `name`: the Llama 3.1 custom tool call {"name": ..., "parameters": {...}}, its arguments
    valid under the tool's `parameters` schema. ValueError when `name` is not among the tools."""
    functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not functions:
        raise ValueError(f"tool_choice names the function {name!r}, which is not among the request's tools")
    calls = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                               "parameters": f.get("parameters") or {"type": "object"}},
              "required": ["name", "parameters"], "additionalProperties": False} for f in functions]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema, "strict": True}}


@functools.lru_cache(maxsize=256)  # the key keeps the order of properties: the answer follows it
def _grammar(schema_json: str) -> str:
    """The llguidance grammar of a schema (its JSON), checked: a ValueError naming what it cannot follow."""
    llg = _llguidance()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema_json, overrides=_OPTIONS)
    except ValueError as e:
        raise ValueError(f"the schema cannot be compiled: {e}") from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"the schema cannot be followed: {' '.join(messages)[:300]}")
    return grammar


def check_response_format(response_format: Optional[dict]) -> None:
    """Raise a ValueError naming the part of `response_format` (shape or schema) that cannot be followed."""
    schema = schema_of(response_format)
    if schema is not None:
        _grammar(json.dumps(schema))


def prepare(tokenizer: Tokenizer) -> bool:
    """Start building llguidance's view of `tokenizer` in a worker thread (it walks the whole
    vocabulary: about a second for Llama 3's), so that neither start-up nor the first JSON request's
    step waits for it (a request arriving sooner waits on the same lock); False where the
    `structured` extra is not installed (such requests are then refused, naming the extra)."""
    try:
        _llguidance()
    except ImportError:
        return False
    _POOL.submit(_ll_tokenizer, tokenizer)
    return True


def _ll_tokenizer(tokenizer: Tokenizer):
    """llguidance's view of our tokenizer (built once per tokenizer: it walks the whole vocabulary)."""
    with _LOCK:
        ll = _LL_TOKENIZERS.get(tokenizer)
        if ll is None:
            from llguidance.tiktoken import lltokenizer_from_encoding

            _llguidance()
            ll = lltokenizer_from_encoding(tokenizer.model, n_vocab=tokenizer.n_words, eos_token=tokenizer.eot_id)
            _LL_TOKENIZERS[tokenizer] = ll
        return ll


def _fill(m: Any, bitmask: torch.Tensor) -> torch.Tensor:
    """The next mask as (words * 32,) bool, True where blocked; the task holds the tensor it writes
    into, so a matcher dropped meanwhile cannot free it."""
    m.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)
    # bit i of int32 word w is bit i % 8 of byte 4w + i // 8 (little-endian): unpacked bytewise
    return _BLOCKED_BY_BYTE.index_select(0, bitmask.view(torch.uint8).int()).flatten()


class Matcher:
    """One sequence's place in its grammar: the tokens allowed next (`allowed`), `consume`,
    `rollback` (speculative proposals the model rejected) and whether the JSON is complete. Never
    raises on a token outside the grammar: it then allows only the stop token, which ends the answer."""

    def __init__(self, tokenizer: Tokenizer, grammar: str, stop_token: int):
        self._m = _llguidance().LLMatcher(_ll_tokenizer(tokenizer), grammar, log_level=0)
        if self._m.is_error():
            raise ValueError(f"the schema cannot be followed: {self._m.get_error()[:300]}")
        self.stop_token, self._eos, self._n_words = stop_token, tokenizer.eot_id, tokenizer.n_words
        # tokens consumed from the stop token on: kept out of llguidance (whose rollback of its end differs)
        self._past_end = 0
        self._bitmask = torch.zeros((self._n_words + 31) // 32, dtype=torch.int32)
        self._pending: Optional[concurrent.futures.Future] = None
        self._prefetch()

    def _prefetch(self) -> None:
        """Start computing the next mask in a worker thread (llguidance releases the GIL)."""
        self._mask = None  # (words * 32,) bool, True where blocked; None: only the stop token
        if not self._past_end and not self._m.is_error():
            self._pending = _POOL.submit(_fill, self._m, self._bitmask)

    def _wait(self) -> None:
        """Take the prefetched mask (`_fill`) once it is there."""
        if self._pending is not None:
            self._mask, self._pending = self._pending.result(), None

    @property
    def finished(self) -> bool:
        """The JSON is complete and cannot go on: only the stop token is allowed."""
        return bool(self._past_end) or self._m.is_stopped()

    def blocked(self, vocab: int) -> torch.Tensor:
        """(vocab,) bool: True for the tokens the grammar does not allow next (`vocab`: the logits' width)."""
        self._wait()
        out = self._mask
        if out is None:  # the JSON ended, or the matcher refused a token: only the stop token
            out = torch.ones(vocab, dtype=torch.bool)
            out[self.stop_token] = False
            return out
        if vocab > len(out):
            out = torch.cat([out, torch.ones(vocab - len(out), dtype=torch.bool)])
        out = out[:vocab]
        if self.stop_token != self._eos and not bool(out[self._eos]):  # the JSON may end here: with this sequence's stop
            out = out.clone()
            out[self._eos], out[self.stop_token] = True, False
        return out

    def allowed(self, vocab: int) -> torch.Tensor:
        """(vocab,) bool: the tokens the grammar allows next."""
        return ~self.blocked(vocab)

    def consume(self, token: int) -> bool:
        """Advance past `token`; False (and from then on only the stop token) when the grammar refuses it."""
        self._wait()
        if token == self.stop_token or self._past_end:
            self._past_end, self._mask = self._past_end + 1, None
            return self._past_end == 1 and bool(self._m.is_accepting())
        ok = self._m.consume_token(token)
        self._prefetch()
        return ok

    def rollback(self, n: int) -> None:
        """Undo the last `n` consumed tokens."""
        self._wait()
        past = min(n, self._past_end)
        self._past_end, n = self._past_end - past, n - past
        if n:
            self._m.rollback(n)
        self._prefetch()


def matcher(tokenizer: Tokenizer, response_format: Optional[dict], stop_tokens: List[int]) -> Optional[Matcher]:
    """A new sequence's Matcher for `response_format` (None: unconstrained); its stop token is
    <|eot_id|> where it is among `stop_tokens`, else the first of them."""
    schema = schema_of(response_format)
    if schema is None:
        return None
    stop = tokenizer.eot_id if tokenizer.eot_id in stop_tokens else list(stop_tokens)[0]
    return Matcher(tokenizer, _grammar(json.dumps(schema)), stop)


def apply(logits: torch.Tensor, rows: List[int], matchers: List[Matcher]) -> None:
    """Set to -inf, in place, the logits (n, vocab) of `rows` outside their matchers' masks."""
    for row, m in zip(rows, matchers):
        logits[row].masked_fill_(m.blocked(logits.shape[-1]).to(logits.device), float("-inf"))
