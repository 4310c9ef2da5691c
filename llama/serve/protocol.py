"""The OpenAI request schema: every field of a request body is checked here, once, and bounded.

What passes `check_request` can be formatted, tokenized and admitted without another check: each
string is free of lone surrogates, each nesting is at most MAX_DEPTH deep, each number is in the
range its consumer accepts (the seed included: choice i samples with seed + i). What fails is an
APIError 400 (404 for an unknown model) whose `param` names the field, answered as OpenAI does.
"""
import hmac
import json
import re
from typing import Any, List, Optional

from llama import structured, validation
from llama.chat_format import ROLES

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256  # each stop string; every generated token is compared with their ends
MAX_NAME_CHARS = 256  # the model, names, ids and other short strings
MAX_TOOLS = 128  # OpenAI's limit
MAX_DEPTH = 64  # nesting of the body, and of a tool call's arguments
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
TOOL_CHOICES = ("auto", "none", "required")  # or a named function: {"type": "function", "function": {"name"}}
# OpenAI fields that change nothing an answer holds (ids, tags, hints to a cache or tier this server does not
# have): accepted with any value, listed in docs/serving.md
NO_BEHAVIOUR = frozenset({"user", "metadata", "parallel_tool_calls", "service_tier", "safety_identifier",
                          "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options"})
NEUTRAL = {"store": False, "modalities": ["text"]}  # accepted at this value (or null) only
# the fields each endpoint reads; any other is refused as OpenAI's API refuses it, not dropped
COMMON_FIELDS = frozenset({"model", "temperature", "top_p", "n", "seed", "stream", "stream_options", "stop",
                           "presence_penalty", "frequency_penalty", "logit_bias", "top_k", "min_p",
                           "response_format"}) | NO_BEHAVIOUR | set(NEUTRAL)
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "tools",
                               "tool_choice"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "max_tokens", "logprobs", "echo", "best_of", "suffix"}

_SURROGATE = re.compile("[\ud800-\udfff]")


class APIError(Exception):
    """An error answered as OpenAI answers it: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(where: str, what: str, code: str = "invalid_value") -> APIError:
    return APIError(400, what, param=where, code=code)


def show(value: Any) -> str:
    """A value for an error message: short, and ASCII (a lone surrogate stays escaped)."""
    if isinstance(value, list):
        return f"an array of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return json.dumps(value[:60] if isinstance(value, str) else value)[:80]


def check_key(api_key: Optional[str], authorization: Optional[str]) -> None:
    """401 unless the Authorization header carries the key (compared in constant time)."""
    if api_key is None:
        return
    sent = (authorization or "").encode("latin-1", "replace")  # the header's own bytes
    if not hmac.compare_digest(sent, f"Bearer {api_key}".encode()):
        raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                       "server's --api_key", code="invalid_api_key")


# ---------------------------------------------------------------- the body as a whole


def parse_body(raw: bytes) -> Any:
    """The body's JSON, with every string and nesting level checked (`check_tree`)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise APIError(400, f"the request body is not valid JSON ({str(e)[:200]})", code="invalid_json") from None
    check_tree(body, "")
    return body


def _path(parent: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


def check_tree(value: Any, root: str) -> None:
    """400 for a string (or object key) holding a lone surrogate, or nesting deeper than MAX_DEPTH,
    naming where (`root`: the path of `value`). Iterative: a deep value cannot exhaust the stack."""
    stack = [(value, root, 0)]
    while stack:
        node, where, depth = stack.pop()
        if isinstance(node, str):
            if _SURROGATE.search(node):
                raise bad(where or "body", f"'{where or 'body'}' holds a lone surrogate (not valid Unicode text): "
                          f"{show(node)}")
            continue
        if not isinstance(node, (list, dict)):
            continue
        if depth >= MAX_DEPTH:
            raise bad(where or "body", f"'{where or 'body'}' nests more than {MAX_DEPTH} levels deep")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, v in items:
            if isinstance(key, str) and _SURROGATE.search(key):
                raise bad(where or "body", f"'{where or 'body'}' has a key with a lone surrogate: {show(key)}")
            if isinstance(v, (str, list, dict)):
                stack.append((v, _path(where, key), depth + 1))


def field(body: dict, name: str, kinds: tuple, default: Any = None, check=None, why: str = "") -> Any:
    """body[name] if it is of `kinds` (JSON true is no number) and passes `check`; 400 otherwise."""
    value = body.get(name, default)
    if value is None:
        return default
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join({str: "a string", int: "an integer", float: "a number", bool: "a boolean",
                             list: "an array", dict: "an object"}[k] for k in kinds)
        raise bad(name, f"'{name}' must be {names}, got {show(value)}", code="invalid_type")
    if check is not None and not check(value):
        raise bad(name, f"'{name}' {why}, got {show(value)}")
    return value


def short_string(value: Any, where: str, limit: int = MAX_NAME_CHARS, required: bool = True) -> None:
    if value is None and not required:
        return
    if not (isinstance(value, str) and 0 < len(value) <= limit):
        raise bad(where, f"'{where}' must be a string of 1 to {limit} characters, got {show(value)}")


# ---------------------------------------------------------------- a request


def check_request(body: Any, chat: bool, model_name: str, vocab_size: int, max_sequences: int) -> dict:
    """The sampling fields of a checked request as plain values (messages, tools or prompts
    included), or APIError naming the field and what it accepts."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise bad("model", "'model' is required: a string (GET /v1/models lists them)", code="invalid_type")
    if model != model_name:
        raise APIError(404, f"the model {show(model)} does not exist: this server serves {show(model_name)}",
                       param="model", code="model_not_found")
    check_known_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    out = _sampling(body)
    if not 1 <= out["n"] <= max_sequences:
        raise bad("n", f"'n' must be between 1 and {max_sequences}, got {show(out['n'])}")
    if chat:
        _chat_fields(body, out)
        count = out["n"]
    else:
        _completion_fields(body, out, vocab_size)
        count = len(out["prompt"]) * out["n"]
        if count > max_sequences:  # never admitted, however long the client waits: not a 429
            raise bad("prompt", f"the request asks for {count} sequences ({len(out['prompt'])} prompts, n {out['n']}), "
                      f"more than the server queues (--max_queue {max_sequences}): send fewer prompts per request")
    seed = out["seed"]
    if seed is not None and not SEED_MIN <= seed <= SEED_MAX - (count - 1):
        raise bad("seed", f"'seed' must be between -2**63 and 2**64 - {count} (choice i samples with seed + i), "
                  f"got {show(seed)}")
    try:  # the library's own checks of what reaches the engine (llama/validation.py), as a 400
        validation.check_sampling(out["temperature"], out["top_p"], out["max_tokens"], out["seed"])
    except (TypeError, ValueError) as e:
        raise APIError(400, str(e)) from None
    return out


def check_known_fields(body: dict, known: frozenset) -> None:
    """400 naming the first field this endpoint does not read: a field the server would drop
    (top_k, min_p, a typo) must not change nothing silently."""
    unknown = sorted(str(k) for k in body if k not in known)
    if unknown:
        raise bad(unknown[0], f"unrecognized request argument supplied: {show(unknown[0])}"
                  + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                  + f"; this endpoint reads {', '.join(sorted(known))}", code="unknown_parameter")


def _sampling(body: dict) -> dict:
    out = {
        "temperature": float(field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "must be between 0 and 2")),
        "top_p": float(field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "must be above 0 and at most 1")),
        "n": field(body, "n", (int,), 1),
        "seed": field(body, "seed", (int,), None),
        "stream": field(body, "stream", (bool,), False),
    }
    stop = field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP_STRINGS or not all(isinstance(x, str) and 0 < len(x) <= MAX_STOP_CHARS for x in stop):
        raise bad("stop", f"'stop' must be a string of 1 to {MAX_STOP_CHARS} characters or up to {MAX_STOP_STRINGS} of them")
    out["stop"] = stop
    for name in ("presence_penalty", "frequency_penalty"):
        field(body, name, (int, float), 0, lambda v: v == 0, "is not supported (only 0)")
    field(body, "logit_bias", (dict,), {}, lambda v: not v, "is not supported (only empty)")
    short_string(body.get("user"), "user", required=False)
    for name, neutral in NEUTRAL.items():
        if body.get(name) not in (None, neutral):
            raise bad(name, f"'{name}' is supported only as {json.dumps(neutral)}, got {show(body[name])}",
                      code="unsupported_value")
    top_k = field(body, "top_k", (int,), 0, lambda v: v >= -1, "must be -1 or 0 (off) or a positive integer")
    out["top_k"] = max(top_k, 0)
    out["min_p"] = float(field(body, "min_p", (int, float), 0.0, lambda v: 0 <= v <= 1, "must be between 0 and 1"))
    out["response_format"] = check_response_format(body.get("response_format"))
    options = field(body, "stream_options", (dict,), {})
    out["include_usage"] = field(options, "include_usage", (bool,), False) if options else False
    return out


def _chat_fields(body: dict, out: dict) -> None:
    out["max_tokens"] = field(body, "max_completion_tokens", (int,), None, lambda v: v >= 1, "must be at least 1")
    if out["max_tokens"] is None:
        out["max_tokens"] = field(body, "max_tokens", (int,), None, lambda v: v >= 1, "must be at least 1")
    out["logprobs"] = field(body, "logprobs", (bool,), False)
    out["top_logprobs"] = field(body, "top_logprobs", (int,), 0, lambda v: 0 <= v <= MAX_TOP_LOGPROBS,
                                f"must be between 0 and {MAX_TOP_LOGPROBS}")
    messages = field(body, "messages", (list,), None, lambda v: len(v) > 0, "must not be empty")
    if messages is None:
        raise bad("messages", "'messages' is required: an array of {role, content} objects")
    check_messages(messages)
    out["messages"] = messages
    out["tools"] = check_tools(field(body, "tools", (list,), []))
    choice = body.get("tool_choice", "auto")
    if choice is None:
        choice = "auto"
    named = _is_named_function(choice)
    if not named and choice not in TOOL_CHOICES:
        raise bad("tool_choice", "'tool_choice' must be 'auto', 'none', 'required' or {\"type\": \"function\", "
                  "\"function\": {\"name\": ...}}")
    if named or choice == "required":  # the answer is held to a call of one of the tools (or the named one)
        if out["response_format"] is not None:
            raise bad("tool_choice", f"'tool_choice' {show(choice)} and 'response_format' both constrain the answer: "
                      "pass one of them", code="unsupported_value")
        try:
            out["response_format"] = structured.tool_call_format(out["tools"], choice["function"]["name"] if named else None)
        except ValueError as e:
            raise bad("tool_choice", f"'tool_choice' {show(choice)} needs the function among 'tools': {e}") from None
        out["response_format"] = check_response_format(out["response_format"], "tools")
    out["tool_choice"] = choice


def check_response_format(value: Any, where: str = "response_format") -> Optional[dict]:
    """The answer's constraint (None: plain text): {"type": "text" | "json_object" | "json_schema"}, its schema
    compiled (llama.structured); what cannot be followed is a 400 naming the part."""
    try:
        structured.check_response_format(value)
    except ValueError as e:
        raise bad(where, f"'{where}' cannot be followed: {e}") from None
    except ImportError as e:
        raise bad(where, f"this server cannot constrain answers to JSON ({e})", code="unsupported_value") from None
    return None if value is None or value.get("type") == "text" else value


def _is_named_function(choice: Any) -> bool:
    f = choice.get("function") if isinstance(choice, dict) else None
    return (isinstance(f, dict) and choice.get("type", "function") == "function" and isinstance(f.get("name"), str)
            and 0 < len(f["name"]) <= MAX_NAME_CHARS)


def _completion_fields(body: dict, out: dict, vocab_size: int) -> None:
    out["max_tokens"] = field(body, "max_tokens", (int,), 16, lambda v: v >= 0, "must be at least 0")
    lp = field(body, "logprobs", (int,), None, lambda v: 0 <= v <= MAX_TOP_LOGPROBS, f"must be between 0 and {MAX_TOP_LOGPROBS}")
    out["logprobs"], out["top_logprobs"] = lp is not None, lp or 0
    out["echo"] = field(body, "echo", (bool,), False)
    field(body, "best_of", (int,), 1, lambda v: v == 1, "is not supported (only 1)")
    field(body, "suffix", (str,), None, lambda v: False, "is not supported")
    out["prompt"] = check_prompts(body.get("prompt"), vocab_size)


def check_prompts(prompt: Any, vocab_size: int) -> list:
    """A completion's prompts: strings, or token-id lists (ints below the vocabulary size)."""
    def is_ids(x):
        return isinstance(x, list) and x and all(type(t) is int for t in x)

    if isinstance(prompt, str) or is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise bad("prompt", "'prompt' must be a string, an array of strings, an array of token ids, or an "
                  "array of token-id arrays (none empty)")
    for p in prompts:
        if isinstance(p, list) and not all(0 <= t < vocab_size for t in p):
            raise bad("prompt", f"'prompt' holds a token id outside the vocabulary (0..{vocab_size - 1})")
    return prompts


# ---------------------------------------------------------------- chat messages and tools


def check_messages(messages: list) -> None:
    """Each message: an object with a known role (a string), text content, and for a tool message
    its tool_call_id; an assistant's tool_calls each a function call with JSON-object arguments."""
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"{where} must be an object with 'role' and 'content'")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad(where, f"{where}.role must be one of {', '.join(ROLES)}, got {show(role)}")
        _check_content(m.get("content"), where, allow_none=role == "assistant")
        short_string(m.get("name"), f"{where}.name", required=False)
        if role == "tool":
            short_string(m.get("tool_call_id"), f"{where}.tool_call_id")
        calls = m.get("tool_calls")
        if role == "assistant" and calls is not None:
            if not isinstance(calls, list) or len(calls) > MAX_TOOLS:
                raise bad(f"{where}.tool_calls", f"{where}.tool_calls must be an array of at most {MAX_TOOLS} calls")
            for j, c in enumerate(calls):
                check_tool_call(c, f"{where}.tool_calls[{j}]")


def _check_content(content: Any, where: str, allow_none: bool) -> None:
    if (content is None and allow_none) or isinstance(content, str):
        return
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return
    raise bad(where, f"{where}.content must be a string or an array of text parts")


def check_tool_call(call: Any, where: str) -> None:
    """{"id", "type": "function", "function": {"name", "arguments": a JSON object string}}; the
    arguments are parsed and held to the body's bounds (depth, surrogates)."""
    shape = (f"{where} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", \"arguments\": a JSON "
             "object string}}}}")
    f = call.get("function") if isinstance(call, dict) else None
    if not isinstance(f, dict) or call.get("type", "function") != "function":
        raise bad(where, shape)
    short_string(f.get("name"), f"{where}.function.name")
    short_string(call.get("id"), f"{where}.id", required=False)
    arguments = f.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            raise bad(where, f"{where}.function.arguments is not valid JSON (or nests too deep)") from None
        check_tree(arguments, f"{where}.function.arguments")
    if not isinstance(arguments, dict):
        raise bad(where, shape)


def check_tools(tools: list) -> list:
    """Each tool: {"type": "function", "function": {"name", "description"?, "parameters"?}}."""
    if len(tools) > MAX_TOOLS:
        raise bad("tools", f"'tools' holds {len(tools)} tools, more than {MAX_TOOLS}")
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not (isinstance(f, dict) and t.get("type", "function") == "function" and isinstance(f.get("name"), str)
                and 0 < len(f["name"]) <= MAX_NAME_CHARS and isinstance(f.get("description", ""), str)
                and isinstance(f.get("parameters", {}), dict)):
            raise bad(f"tools[{i}]", f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": a string "
                      f"of 1 to {MAX_NAME_CHARS} characters, \"description\"?, \"parameters\"?: an object}}}}")
    return tools


def check_lengths(prompts: List[List[int]], max_tokens: Optional[int], max_seq_len: int, param: str) -> None:
    """400 for a prompt longer than the context, or one that leaves no room for max_tokens (the
    library's one length check, its errors as the API's)."""
    for p in prompts:
        try:
            validation.check_prompt_length(len(p), max_seq_len, max_tokens, limit="the context (--max_seq_len)",
                                           fix="raise --max_seq_len")
        except validation.ContextLengthError as e:
            raise APIError(400, str(e), param=param if e.param == "prompt" else e.param,
                           code="context_length_exceeded") from e
        except ValueError as e:
            raise APIError(400, str(e), param=param) from e


def check_kv_budget(prompts: List[List[int]], max_tokens: Optional[int], kv_tokens: Optional[int], param: str) -> None:
    """400 at once for a sequence the whole KV cache could never hold (--kv_cache_tokens), rather
    than a failure when its turn comes (None: no such bound)."""
    if kv_tokens is None:
        return
    for p in prompts:
        total = len(p) + (max_tokens or 0)
        if total > kv_tokens:
            raise APIError(400, f"{total} tokens (prompt and max_tokens) exceed the KV cache's {kv_tokens} tokens "
                           "(--kv_cache_tokens): ask fewer tokens", param=param, code="context_length_exceeded")
