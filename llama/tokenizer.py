"""Llama 3 tokenizer (tiktoken BPE + 256 special tokens) and the Llama 3 / 3.1 chat format."""
import ast
import hashlib
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import AbstractSet, Any, Collection, Iterator, Literal, Optional, Sequence, TypedDict, Union

import tiktoken
from tiktoken.load import load_tiktoken_bpe

logger = logging.getLogger(__name__)

Role = Literal["system", "user", "assistant", "ipython"]
StopReason = Literal["end_of_turn", "end_of_message", "out_of_tokens"]
ROLES = ("system", "user", "assistant", "ipython")
STOP_REASONS = ("end_of_turn", "end_of_message", "out_of_tokens")

# tiktoken's regex engine panics on very long runs, so encode() feeds it bounded pieces.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000
# A run (whitespace or not) longer than the limit, matched from its first character only: the
# lookbehinds keep the scan linear instead of retrying at every position inside a run.
_LONG_RUN = re.compile(rf"(?<!\s)\s{{{MAX_NO_WHITESPACES_CHARS + 1},}}|(?<!\S)\S{{{MAX_NO_WHITESPACES_CHARS + 1},}}")

# Tools that Llama 3.1 calls as `<|python_tag|>name.call(arg=value, ...)` (Meta's 3.1 prompt format).
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen")
CODE_INTERPRETER = "code_interpreter"


def _special_token_names(num_reserved: int) -> list[str]:
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
        "<|image|>",
    ]
    # Meta's numbering: the reserved tokens after <|image|> continue at reserved_special_token_2.
    return named + [f"<|reserved_special_token_{k}|>" for k in range(2, 2 + num_reserved - len(named))]


class Tokenizer:
    """Tokenizes and detokenizes text with a tiktoken BPE file plus the 256 Llama 3 special tokens."""

    num_reserved_special_tokens = 256
    pat_str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501

    def __init__(self, model_path: str):
        """Load a tiktoken BPE file (`base64(token) rank` per line), e.g. Llama 3's tokenizer.model.

        The special tokens take the ids right after the file's base tokens (128000.. for Llama 3).
        """
        model_path = os.path.abspath(os.fspath(model_path))
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"tokenizer file not found: {model_path}; pass the path of the tokenizer.model file "
                "(a tiktoken BPE file) that comes with the Llama 3 checkpoint"
            )
        # tiktoken caches files by path name: the content hash makes it reload a file changed in place.
        with open(model_path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        try:
            mergeable_ranks = load_tiktoken_bpe(model_path, expected_hash=digest)
        except ValueError as e:
            raise ValueError(
                f"{model_path} is not a tiktoken BPE file (lines of `base64(token) rank`); "
                "note that a Llama 2 (sentencepiece) tokenizer.model does not work with Llama 3"
            ) from e
        num_base_tokens = len(mergeable_ranks)
        names = _special_token_names(self.num_reserved_special_tokens)
        self.special_tokens: dict[str, int] = {name: num_base_tokens + i for i, name in enumerate(names)}
        self.model = tiktoken.Encoding(
            name=os.path.basename(model_path),
            pat_str=self.pat_str,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.n_words: int = self.model.n_vocab
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]
        self.python_tag_id: int = self.special_tokens["<|python_tag|>"]
        self.pad_id: int = -1  # as in the original Llama 3 release: no padding token
        self.stop_tokens: list[int] = [self.eos_id, self.eot_id, self.eom_id]
        # debug: every rank loads it; Llama.build reports it once, on rank 0
        logger.debug(
            "loaded tokenizer %s: %d words, bos %d, eos %d", model_path, self.n_words, self.bos_id, self.eos_id
        )

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: Union[Literal["all"], AbstractSet[str]] = frozenset(),
        disallowed_special: Union[Literal["all"], Collection[str]] = (),
    ) -> list[int]:
        """Encode a string into token ids, optionally with <|begin_of_text|> / <|end_of_text|>.

        By default text that spells a special token (e.g. "<|eot_id|>" typed by a user) is encoded
        as plain text; pass allowed_special="all" (or a set of names) to map it to the special ids,
        or disallowed_special="all" to raise on it instead.
        """
        if not isinstance(s, str):
            raise TypeError(f"encode() takes a str, got {type(s).__name__}")
        tokens = [self.bos_id] if bos else []
        for piece in self._pieces(s):
            tokens += self.model.encode(piece, allowed_special=allowed_special, disallowed_special=disallowed_special)
        if eos:
            tokens.append(self.eos_id)
        return tokens

    def decode(self, t: Sequence[int]) -> str:
        """Decode token ids to a string (invalid UTF-8, e.g. half a character, becomes U+FFFD)."""
        return self.model.decode(list(t))

    @staticmethod
    def _pieces(s: str) -> Iterator[str]:
        """Split s into chunks of at most 400,000 characters, and cut every run of more than 25,000
        consecutive whitespace or non-whitespace characters every 25,000 characters of the run."""
        for start in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            chunk = s[start : start + TIKTOKEN_MAX_ENCODE_CHARS]
            prev = 0
            for run in _LONG_RUN.finditer(chunk):
                for cut in range(run.start() + MAX_NO_WHITESPACES_CHARS, run.end(), MAX_NO_WHITESPACES_CHARS):
                    yield chunk[prev:cut]
                    prev = cut
            yield chunk[prev:]


@dataclass
class ToolCall:
    """A tool call made by the assistant (Llama 3.1).

    tool_name "code_interpreter" takes arguments {"code": str} and is written as
    `<|python_tag|>` + code; the other built-in tools (brave_search, wolfram_alpha, photogen) are
    written as `<|python_tag|>name.call(key="value", ...)`; any other name is a custom tool,
    written as the JSON `{"name": tool_name, "parameters": arguments}`.
    """

    call_id: str
    tool_name: str
    arguments: dict[str, Any] = field(default_factory=dict)


class _MessageRequired(TypedDict):
    role: Role
    content: str


class Message(_MessageRequired, total=False):
    """A chat message: {"role": ..., "content": ...}, plus optionally (Llama 3.1 tool calling):

    tool_calls: the assistant's tool calls, written after its content.
    stop_reason: how the assistant message ended. "end_of_message" writes <|eom_id|> (the model
        waits for a tool result); anything else writes <|eot_id|>. When absent, a message with
        tool_calls ends with <|eom_id|>, any other with <|eot_id|>.
    Tool results go back to the model as a message with role "ipython" and the result as content.
    """

    tool_calls: list[ToolCall]
    stop_reason: StopReason


Dialog = Sequence[Message]


def _new_call_id() -> str:
    return str(uuid.uuid4())


def _format_builtin_call(call: ToolCall) -> str:
    args = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in call.arguments.items())
    return f"{call.tool_name}.call({args})"


def _parse_builtin_call(code: str) -> Optional[ToolCall]:
    """`brave_search.call(query="...")` -> ToolCall, or None when the code is anything else."""
    try:
        expr = ast.parse(code.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # generated text may be anything
        return None
    if not (
        isinstance(expr, ast.Call)
        and isinstance(expr.func, ast.Attribute)
        and expr.func.attr == "call"
        and isinstance(expr.func.value, ast.Name)
        and expr.func.value.id in BUILTIN_TOOLS
        and not expr.args
        and all(kw.arg is not None for kw in expr.keywords)
    ):
        return None
    try:
        arguments = {kw.arg: ast.literal_eval(kw.value) for kw in expr.keywords}
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        return None
    return ToolCall(_new_call_id(), expr.func.value.id, arguments)


_FUNCTION_TAG = re.compile(r"<function=(?P<name>[^>]+)>(?P<args>\{.*\})(?:</function>)?", re.DOTALL)


def _parse_custom_call(text: str) -> Optional[ToolCall]:
    """A custom tool call that is the whole message, or None when the text is anything else.

    Llama 3.1 models answer `{"name": str, "parameters": {...}}` (sometimes with "type": "function")
    or, in the alternative syntax of Meta's prompt guide, `<function=name>{...}</function>`.
    """
    tag = _FUNCTION_TAG.fullmatch(text)
    if tag:
        obj = {"name": tag["name"], "parameters": _json_object(tag["args"])}
    else:
        obj = _json_object(text)
        if obj is None or obj.get("type", "function") != "function" or not set(obj) <= {"type", "name", "parameters"}:
            return None
    if isinstance(obj.get("name"), str) and obj["name"] and isinstance(obj.get("parameters"), dict):
        return ToolCall(_new_call_id(), obj["name"], obj["parameters"])
    return None


def _json_object(text: str) -> Optional[dict]:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


class ChatFormat:
    """Turns dialogs into Llama 3 / 3.1 chat prompts and generated tokens back into messages.

    Layout: <|begin_of_text|>, then per message
    <|start_header_id|>role<|end_header_id|>"\\n\\n" content.strip() <|eot_id|>, then an open
    assistant header for the model to complete.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode_header(self, message: Message) -> list[int]:
        """<|start_header_id|>role<|end_header_id|>"\\n\\n"."""
        role = message["role"]
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}: a message role is one of {', '.join(ROLES)}")
        tok = self.tokenizer
        tokens = [tok.special_tokens["<|start_header_id|>"]]
        tokens += tok.encode(role, bos=False, eos=False)
        tokens.append(tok.special_tokens["<|end_header_id|>"])
        return tokens + tok.encode("\n\n", bos=False, eos=False)

    def encode_message(self, message: Message) -> list[int]:
        """Header, stripped content, tool calls if any, then <|eom_id|> or <|eot_id|> (see Message)."""
        tok = self.tokenizer
        tokens = self.encode_header(message)
        tokens += tok.encode(message["content"].strip(), bos=False, eos=False)
        tool_calls = message.get("tool_calls") or []
        for call in tool_calls:
            tokens += self._encode_tool_call(call)
        stop_reason = message.get("stop_reason", "end_of_message" if tool_calls else "end_of_turn")
        tokens.append(tok.eom_id if stop_reason == "end_of_message" else tok.eot_id)
        return tokens

    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]:
        """The prompt for the assistant's next message: bos, every message, an open assistant header."""
        tokens = [self.tokenizer.bos_id]
        for message in dialog:
            tokens += self.encode_message(message)
        return tokens + self.encode_header({"role": "assistant", "content": ""})

    def decode_assistant_message(self, tokens: Sequence[int], stop_reason: str) -> Message:
        """Turn the tokens the model generated after the assistant header back into a message.

        stop_reason: "end_of_turn" (stopped on <|eot_id|> or <|end_of_text|>), "end_of_message"
        (stopped on <|eom_id|>: it waits for a tool result) or "out_of_tokens". A trailing stop
        token in `tokens` is ignored. Text after <|python_tag|> becomes a built-in tool call
        (code_interpreter unless it is `brave_search.call(...)` and the like), text that is exactly a
        `{"name": ..., "parameters": {...}}` JSON object (or `<function=name>{...}</function>`) a custom
        tool call; anything else, including malformed calls, stays plain content.
        """
        if stop_reason not in STOP_REASONS:
            raise ValueError(f"unknown stop_reason {stop_reason!r}: use one of {', '.join(STOP_REASONS)}")
        tok = self.tokenizer
        tokens = list(tokens)
        if tokens and tokens[-1] in tok.stop_tokens:
            tokens = tokens[:-1]
        message: Message = {"role": "assistant", "content": "", "stop_reason": stop_reason}
        if tok.python_tag_id in tokens:
            i = tokens.index(tok.python_tag_id)
            code = tok.decode(tokens[i + 1 :])
            call = _parse_builtin_call(code) or ToolCall(_new_call_id(), CODE_INTERPRETER, {"code": code})
            message["content"] = tok.decode(tokens[:i]).strip()
            message["tool_calls"] = [call]
            return message
        text = tok.decode(tokens)
        call = _parse_custom_call(text.strip())
        if call is None:
            message["content"] = text
        else:
            message["tool_calls"] = [call]
        return message

    def _encode_tool_call(self, call: ToolCall) -> list[int]:
        tok = self.tokenizer
        if call.tool_name == CODE_INTERPRETER:
            return [tok.python_tag_id] + tok.encode(call.arguments["code"], bos=False, eos=False)
        if call.tool_name in BUILTIN_TOOLS:
            return [tok.python_tag_id] + tok.encode(_format_builtin_call(call), bos=False, eos=False)
        text = json.dumps({"name": call.tool_name, "parameters": call.arguments}, ensure_ascii=False)
        return tok.encode(text, bos=False, eos=False)
