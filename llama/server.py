# An OpenAI-compatible HTTP server over the continuous-batching engine, on one process or under torchrun.
import asyncio
import json
import logging
import os
import queue
import random
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from llama import distributed, validation
from llama.engine import Engine, Event, Plan, Request
from llama.generation import Llama
from llama.tokenizer import ToolCall

logger = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # an idle rank 0 still broadcasts an empty plan this often (collectives time out)
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 4


class APIError(Exception):
    """An error answered as OpenAI answers it: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- the engine's thread


class _Handle:
    """One HTTP request's sequences: their events arrive on an asyncio queue."""

    def __init__(self, ids: List[int], loop: asyncio.AbstractEventLoop):
        self.ids, self.loop = ids, loop
        self.events: asyncio.Queue = asyncio.Queue()


class EngineLoop:
    """Runs the engine in one background thread (rank 0) or in the calling thread (other ranks).

    HTTP handlers `submit` requests and `cancel` them; rank 0 gathers them into each step's Plan
    (admissions with their sampling parameters, cancellations), broadcasts it, and every rank
    applies it and steps alike. A failed step (a rank that died) ends the process with status 1:
    a server that cannot step must not hang its clients or its launcher.
    """

    def __init__(self, engine: Engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self.inbox: "queue.Queue[Tuple[str, Any]]" = queue.Queue()
        self.handles: Dict[int, _Handle] = {}  # live sequences (rank 0)
        self.lock = threading.Lock()
        self.next_id = 0
        self.thread: Optional[threading.Thread] = None
        self.multi = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1

    # ---- called from HTTP handlers (the event loop's thread)

    def submit(self, requests: List[Request]) -> _Handle:
        """Queue one HTTP request's sequences; APIError 429 when the queue is full."""
        with self.lock:
            if len(self.handles) + len(requests) > self.max_queue:
                raise APIError(
                    429, f"the server is busy ({len(self.handles)} sequences queued or running, --max_queue "
                    f"{self.max_queue}): retry shortly", code="rate_limit_exceeded", type="rate_limit_error",
                    headers={"Retry-After": "1"},
                )
            ids = list(range(self.next_id, self.next_id + len(requests)))
            self.next_id += len(requests)
            handle = _Handle(ids, asyncio.get_running_loop())
            for i in ids:
                self.handles[i] = handle
        for i, r in zip(ids, requests):
            self.inbox.put(("add", (i, r)))
        return handle

    def cancel(self, handle: _Handle) -> None:
        """Drop a request's sequences (a client that went away); their rows free before the next step."""
        with self.lock:
            live = [i for i in handle.ids if self.handles.pop(i, None) is not None]
        for i in live:
            self.inbox.put(("cancel", i))

    def stats(self) -> dict:
        with self.lock:
            live = len(self.handles)
        return {"running": self.engine.n_running, "waiting": len(self.engine.waiting), "sequences": live}

    # ---- rank 0

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
        except Exception as e:  # noqa: BLE001 -- any failure of a step ends the server
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
        cancelled = set(plan.cancel)
        plan.admit = [(i, r) for i, r in plan.admit if i not in cancelled]  # gone before admission
        self.engine.apply(plan)
        if self.engine.busy:
            for e in self.engine.step():
                if e.finished:
                    self.engine.pop(e.seq_id)
                self._deliver(e)
        return True

    def _deliver(self, e: Event) -> None:
        with self.lock:
            handle = self.handles.get(e.seq_id)
            if handle is not None and e.finished:
                del self.handles[e.seq_id]
        if handle is not None:  # None: another rank, or a client that went away
            handle.loop.call_soon_threadsafe(handle.events.put_nowait, e)


def _fatal(e: BaseException) -> None:
    logger.error("error: the engine stopped (%s: %s); the server exits", type(e).__name__, e)
    logging.shutdown()
    os._exit(1)


# ---------------------------------------------------------------- request checks


def _field(body: dict, name: str, kinds: tuple, default: Any = None, check=None, why: str = "") -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):  # JSON true is no number
        names = " or ".join(k.__name__.replace("str", "string").replace("int", "integer").replace("float", "number")
                            .replace("bool", "boolean").replace("list", "array").replace("dict", "object") for k in kinds)
        raise APIError(400, f"'{name}' must be {names}, got {json.dumps(value)[:80]}", param=name, code="invalid_type")
    if check is not None and not check(value):
        raise APIError(400, f"'{name}' {why}, got {json.dumps(value)[:80]}", param=name, code="invalid_value")
    return value


def check_request(body: Any, chat: bool, model_name: str, max_seq_len: int, vocab_size: int, max_sequences: int) -> dict:
    """The server's checks of a request body, in one place: the sampling fields as plain values, or
    APIError 400 (404 for an unknown model) naming the field and what it accepts."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise APIError(400, "'model' is required: a string (GET /v1/models lists them)", param="model")
    if model != model_name:
        raise APIError(404, f"the model '{model}' does not exist: this server serves '{model_name}'",
                       param="model", code="model_not_found")
    out = {
        "temperature": float(_field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "must be between 0 and 2")),
        "top_p": float(_field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "must be above 0 and at most 1")),
        "n": _field(body, "n", (int,), 1, lambda v: 1 <= v <= max_sequences, f"must be between 1 and {max_sequences}"),
        "seed": _field(body, "seed", (int,), None),
        "stream": _field(body, "stream", (bool,), False),
    }
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP_STRINGS or not all(isinstance(x, str) and x for x in stop):
        raise APIError(400, f"'stop' must be a non-empty string or up to {MAX_STOP_STRINGS} of them", param="stop",
                       code="invalid_value")
    out["stop"] = stop
    for name in ("presence_penalty", "frequency_penalty"):
        _field(body, name, (int, float), 0, lambda v: v == 0, "is not supported (only 0)")
    _field(body, "logit_bias", (dict,), {}, lambda v: not v, "is not supported (only empty)")
    if chat:
        out["max_tokens"] = _field(body, "max_completion_tokens", (int,), None, lambda v: v >= 1, "must be at least 1")
        if out["max_tokens"] is None:
            out["max_tokens"] = _field(body, "max_tokens", (int,), None, lambda v: v >= 1, "must be at least 1")
        out["logprobs"] = _field(body, "logprobs", (bool,), False)
        out["top_logprobs"] = _field(body, "top_logprobs", (int,), 0, lambda v: 0 <= v <= MAX_TOP_LOGPROBS,
                                     f"must be between 0 and {MAX_TOP_LOGPROBS}")
        messages = _field(body, "messages", (list,), None, lambda v: len(v) > 0, "must not be empty")
        if messages is None:
            raise APIError(400, "'messages' is required: an array of {role, content} objects", param="messages")
        out["messages"] = messages
        out["tools"] = _field(body, "tools", (list,), [])
        choice = body.get("tool_choice", "auto")
        if choice not in ("auto", "none", "required") and not isinstance(choice, dict):
            raise APIError(400, "'tool_choice' must be 'auto', 'none', 'required' or a function", param="tool_choice")
        out["tool_choice"] = choice
    else:
        out["max_tokens"] = _field(body, "max_tokens", (int,), 16, lambda v: v >= 0, "must be at least 0")
        lp = _field(body, "logprobs", (int,), None, lambda v: 0 <= v <= MAX_TOP_LOGPROBS, f"must be between 0 and {MAX_TOP_LOGPROBS}")
        out["logprobs"], out["top_logprobs"] = lp is not None, lp or 0
        out["echo"] = _field(body, "echo", (bool,), False)
        _field(body, "best_of", (int,), 1, lambda v: v == 1, "is not supported (only 1)")
        _field(body, "suffix", (str,), None, lambda v: False, "is not supported")
        out["prompt"] = _prompts(body.get("prompt"), vocab_size)
        wanted = len(out["prompt"]) * out["n"]
        if wanted > max_sequences:  # never admitted, however long the client waits: not a 429
            raise APIError(400, f"the request asks for {wanted} sequences ({len(out['prompt'])} prompts, n {out['n']}), "
                           f"more than the server queues (--max_queue {max_sequences}): send fewer prompts per request",
                           param="prompt")
    try:  # the library's own checks of what reaches the engine (llama/validation.py), as a 400
        validation.check_sampling(out["temperature"], out["top_p"], out["max_tokens"], out["seed"])
    except (TypeError, ValueError) as e:
        raise APIError(400, str(e)) from None
    return out


def _prompts(prompt: Any, vocab_size: int) -> list:
    """A completion's prompts: strings, or token-id lists (ints below the vocabulary size)."""
    def is_ids(x):
        return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        prompts = [prompt]
    elif is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise APIError(400, "'prompt' must be a string, an array of strings, an array of token ids, or an "
                       "array of token-id arrays (none empty)", param="prompt")
    for p in prompts:
        if isinstance(p, list) and not all(0 <= t < vocab_size for t in p):
            raise APIError(400, f"'prompt' holds a token id outside the vocabulary (0..{vocab_size - 1})", param="prompt")
    return prompts


def check_lengths(prompts: List[List[int]], max_tokens: Optional[int], max_seq_len: int) -> None:
    for p in prompts:
        if len(p) > max_seq_len:
            raise APIError(400, f"the prompt has {len(p)} tokens, more than the context of {max_seq_len} "
                           "(--max_seq_len): shorten it", param="prompt" if max_tokens is not None else "messages",
                           code="context_length_exceeded")
        if max_tokens is not None and len(p) + max_tokens > max_seq_len:
            raise APIError(400, f"the prompt's {len(p)} tokens plus max_tokens {max_tokens} exceed the context of "
                           f"{max_seq_len} (--max_seq_len): ask for at most {max_seq_len - len(p)} tokens",
                           param="max_tokens", code="context_length_exceeded")


# ---------------------------------------------------------------- chat: messages, tools


def tool_prompt(tools: list) -> str:
    """The Llama 3.1 prompt for custom tools (JSON calls), from OpenAI `tools` definitions."""
    functions = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not (isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(f, dict)
                and isinstance(f.get("name"), str) and f["name"]):
            raise APIError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                           param=f"tools[{i}]")
        functions.append(json.dumps(f, ensure_ascii=False))
    return (
        "You have access to the following functions. To call a function, respond with only a JSON object "
        'in the format {"name": function name, "parameters": dictionary of argument name and its value}. '
        "Do not use variables.\n\n" + "\n\n".join(functions)
    )


def to_dialog(messages: list, tools: list) -> list:
    """OpenAI messages -> a Llama dialog: role "tool" is Llama 3.1's "ipython", "developer" is
    "system", assistant tool_calls become ToolCalls, and `tools` join the system message."""
    dialog = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object with 'role' and 'content'", param=where)
        role = {"tool": "ipython", "developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant", "ipython"):
            raise APIError(400, f"{where}.role must be system, user, assistant or tool, got {m.get('role')!r}", param=where)
        message = {"role": role, "content": _text(m.get("content"), where, allow_none=role == "assistant")}
        calls = m.get("tool_calls")
        if role == "assistant" and calls:
            if not isinstance(calls, list):
                raise APIError(400, f"{where}.tool_calls must be an array", param=where)
            message["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
        dialog.append(message)
    if tools:
        prompt = tool_prompt(tools)
        if dialog and dialog[0]["role"] == "system":
            dialog[0] = {**dialog[0], "content": dialog[0]["content"] + "\n\n" + prompt}
        else:
            dialog.insert(0, {"role": "system", "content": prompt})
    return dialog


def _text(content: Any, where: str, allow_none: bool) -> str:
    if content is None and allow_none:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"{where}.content must be a string or an array of text parts", param=where)


def _tool_call(c: Any, where: str) -> ToolCall:
    try:
        f = c["function"]
        args = json.loads(f["arguments"]) if isinstance(f["arguments"], str) else f["arguments"]
        if not isinstance(f["name"], str) or not isinstance(args, dict):
            raise TypeError
        return ToolCall(str(c.get("id") or uuid.uuid4()), f["name"], args)
    except (KeyError, TypeError, ValueError):
        raise APIError(400, f"{where} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                       f"\"arguments\": a JSON object string}}}}", param=where) from None


def openai_tool_calls(calls: List[ToolCall]) -> list:
    return [{"id": c.call_id, "type": "function",
             "function": {"name": c.tool_name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}} for c in calls]


# ---------------------------------------------------------------- answers


class _Choice:
    """One sequence's events, gathered into what an answer needs."""

    def __init__(self):
        self.text, self.tokens, self.logprobs, self.tops = "", [], [], []
        self.finish_reason: Optional[str] = None
        self.stop_token: Optional[int] = None
        self.prompt_logprobs = self.prompt_tops = None
        self.stop_logprob: Optional[float] = None  # the stop token's, when it ended the answer
        self.stop_top: Optional[list] = None

    def add(self, e: Event, stop_tokens: frozenset) -> None:
        self.text += e.text
        if e.prompt_logprobs is not None:
            self.prompt_logprobs, self.prompt_tops = e.prompt_logprobs, e.prompt_top_logprobs
        if e.finished:
            self.finish_reason = e.finish_reason
        if e.token is None:
            return
        if e.finished and e.finish_reason == "stop" and e.token in stop_tokens:
            self.stop_token = e.token  # ends the answer; not part of its text or tokens
            self.stop_logprob, self.stop_top = e.logprob, e.top_logprobs
            return
        self.tokens.append(e.token)
        self.logprobs.append(e.logprob)
        self.tops.append(e.top_logprobs)


class Server:
    """The HTTP side: turns OpenAI requests into engine Requests and engine events into answers."""

    def __init__(self, llama: Llama, loop: EngineLoop, model_name: str, api_key: Optional[str], max_seq_len: int, max_queue: int):
        self.llama, self.loop, self.model_name, self.api_key = llama, loop, model_name, api_key
        self.tokenizer = llama.tokenizer
        self.max_seq_len, self.max_queue = max_seq_len, max_queue
        self.stop_tokens = frozenset(self.tokenizer.stop_tokens)
        self.created = int(time.time())

    def check_key(self, authorization: Optional[str]) -> None:
        if self.api_key is None:
            return
        if authorization != f"Bearer {self.api_key}":
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                           "server's --api_key", type="authentication_error", code="invalid_api_key")

    def check(self, body: Any, chat: bool) -> dict:
        return check_request(body, chat, self.model_name, self.max_seq_len, self.tokenizer.n_words, self.max_queue)

    def requests(self, prompts: List[List[int]], f: dict, prompt_logprobs: bool = False) -> List[Request]:
        seed = f["seed"]
        if seed is None and f["temperature"] > 0:
            seed = random.randrange(2**62)  # chosen here (rank 0) so that every rank draws alike
        reqs = []
        for p in prompts:
            for _ in range(f["n"]):
                reqs.append(Request(
                    p, f["max_tokens"], f["temperature"], f["top_p"], stop=tuple(f["stop"]),
                    seed=None if seed is None else seed + len(reqs), logprobs=f["logprobs"],
                    top_logprobs=f["top_logprobs"], prompt_logprobs=prompt_logprobs,
                ))
        return reqs

    def token_text(self, t: int) -> str:
        return self.tokenizer.decode([t])

    # ---- /v1/completions

    def completion_logprobs(self, c: _Choice, prompt: Optional[List[int]], offset: int) -> dict:
        """OpenAI's legacy logprobs: one entry per generated token, the stop token that ended the
        answer included (its text is not in `text`): lm-eval's local-completions sends echo with
        max_tokens 1 and drops the last entry as the generated one, so a missing entry there would
        drop the continuation's last prompt token instead."""
        tokens, lps, tops = list(c.tokens), list(c.logprobs), list(c.tops)
        if c.stop_token is not None and c.stop_logprob is not None:
            tokens, lps, tops = tokens + [c.stop_token], lps + [c.stop_logprob], tops + [c.stop_top]
        if prompt is not None:  # echo: the prompt's own tokens first
            tokens = prompt + tokens
            lps = (c.prompt_logprobs or [None] * len(prompt)) + lps
            tops = (c.prompt_tops or [None] * len(prompt)) + tops
        strings = [self.token_text(t) for t in tokens]
        offsets = []
        for s in strings:
            offsets.append(offset)
            offset += len(s)
        return {
            "tokens": strings, "token_logprobs": lps, "text_offset": offsets,
            "top_logprobs": [None if top is None else {self.token_text(t): lp for t, lp in top} for top in tops],
        }

    def completion_choice(self, i: int, c: _Choice, prompt: List[int], f: dict, echo_text: str) -> dict:
        logprobs = None
        if f["logprobs"]:
            logprobs = self.completion_logprobs(c, prompt if f["echo"] else None, 0)
        return {"index": i, "text": echo_text + c.text, "logprobs": logprobs, "finish_reason": c.finish_reason}

    # ---- /v1/chat/completions

    def chat_logprobs(self, c: _Choice) -> dict:
        def entry(t: int, lp: float) -> dict:
            s = self.token_text(t)
            return {"token": s, "logprob": lp, "bytes": list(self.tokenizer.model.decode_single_token_bytes(t))}

        return {"content": [
            {**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in (top or [])]}
            for t, lp, top in zip(c.tokens, c.logprobs, c.tops)
        ]}

    def chat_message(self, c: _Choice, tools: bool) -> Tuple[dict, str]:
        """(message, finish_reason): with tools, a parsed Llama 3.1 tool call comes back as tool_calls."""
        if tools:
            reason = ("out_of_tokens" if c.stop_token is None else
                      "end_of_message" if c.stop_token == self.tokenizer.eom_id else "end_of_turn")
            parsed = self.llama.formatter.decode_assistant_message(c.tokens, reason)
            if parsed.get("tool_calls"):
                content = parsed["content"] or None
                return {"role": "assistant", "content": content, "tool_calls": openai_tool_calls(parsed["tool_calls"])}, "tool_calls"
        return {"role": "assistant", "content": c.text}, c.finish_reason

    def usage(self, prompts: List[List[int]], choices: List[_Choice]) -> dict:
        p = sum(len(x) for x in prompts)
        n = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(server: Server):
    """The FastAPI application of `server`."""
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="llama3-ref", docs_url=None, redoc_url=None, openapi_url=None)
    loop = server.loop

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(APIError(e.status_code, message, code="not_found" if e.status_code == 404 else None).body(),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        logger.exception("internal error")
        return JSONResponse(APIError(500, f"internal error ({type(e).__name__})", type="server_error").body(), status_code=500)

    async def read(request: HTTPRequest) -> Any:
        server.check_key(request.headers.get("authorization"))
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
        return body

    async def events(handle: _Handle):
        """The handle's events until all its sequences finish; a client that goes away (this
        generator closed or cancelled) cancels them."""
        remaining = set(handle.ids)
        try:
            while remaining:
                e = await handle.events.get()
                if e.finished:
                    remaining.discard(e.seq_id)
                yield e
        finally:
            if remaining:
                loop.cancel(handle)

    async def gather(handle: _Handle, request: HTTPRequest) -> Optional[List[_Choice]]:
        """The whole answer; None when the client went away first (its sequences are cancelled)."""
        async def collect():
            choices = {i: _Choice() for i in handle.ids}
            async for e in events(handle):
                choices[e.seq_id].add(e, server.stop_tokens)
            return [choices[i] for i in handle.ids]

        async def disconnected():  # the body is read: the next message is the client leaving
            while (await request.receive())["type"] != "http.disconnect":
                pass

        answer, gone = asyncio.create_task(collect()), asyncio.create_task(disconnected())
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        if answer.done():
            gone.cancel()
            return answer.result()
        answer.cancel()  # its events() generator cancels the sequences
        return None

    @app.get("/health")
    async def health():
        return {"status": "ok", **loop.stats()}

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        server.check_key(request.headers.get("authorization"))
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: HTTPRequest):
        server.check_key(request.headers.get("authorization"))
        if name != server.model_name:
            raise APIError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
        return model_card()

    def model_card() -> dict:
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "llama3-ref"}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await read(request)
        f = server.check(body, chat=False)
        tok = server.tokenizer
        prompts = [tok.encode(p, bos=True, eos=False) if isinstance(p, str) else p for p in f["prompt"]]
        check_lengths(prompts, f["max_tokens"], server.max_seq_len)
        handle = loop.submit(server.requests(prompts, f, prompt_logprobs=f["echo"] and f["logprobs"]))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        n = f["n"]
        echo = [tok.decode(p) if f["echo"] else "" for p in prompts]

        def head(choices: list) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": server.model_name, "choices": choices}

        if not f["stream"]:
            choices = await gather(handle, request)
            if choices is None:
                return JSONResponse({}, status_code=499)
            body = head([server.completion_choice(i, c, prompts[i // n], f, echo[i // n]) for i, c in enumerate(choices)])
            return {**body, "usage": server.usage(prompts, choices)}

        async def chunks():
            index = {seq_id: i for i, seq_id in enumerate(handle.ids)}
            started, acc, offsets = set(), {i: _Choice() for i in handle.ids}, {}
            async for e in events(handle):
                i = index[e.seq_id]
                c = _Choice()
                c.add(e, server.stop_tokens)
                acc[e.seq_id].add(e, server.stop_tokens)
                first = i not in started
                text = echo[i // n] + c.text if first else c.text
                logprobs = None
                if f["logprobs"]:
                    offset = offsets.get(i, 0)
                    logprobs = server.completion_logprobs(c, prompts[i // n] if f["echo"] and first else None, offset)
                    offsets[i] = offset + sum(len(t) for t in logprobs["tokens"])
                started.add(i)
                yield _sse(head([{"index": i, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}]))
            if _include_usage(body):
                yield _sse({**head([]), "usage": server.usage(prompts, list(acc.values()))})
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await read(request)
        f = server.check(body, chat=True)
        tools = f["tools"] if f["tool_choice"] != "none" else []
        dialog = to_dialog(f["messages"], tools)
        try:
            prompt = server.llama.formatter.encode_dialog_prompt(dialog)
        except (ValueError, KeyError, TypeError) as e:
            raise APIError(400, f"'messages' cannot be formatted: {e}", param="messages") from None
        if f["max_tokens"] is None:  # the rest of the context, at least one token
            f["max_tokens"] = max(1, server.max_seq_len - len(prompt))
        check_lengths([prompt], f["max_tokens"], server.max_seq_len)
        f["logprobs"] = f["logprobs"] or f["top_logprobs"] > 0
        handle = loop.submit(server.requests([prompt], f))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def head(choices: list, obj: str = "chat.completion") -> dict:
            return {"id": rid, "object": obj, "created": created, "model": server.model_name, "choices": choices}

        if not f["stream"]:
            choices = await gather(handle, request)
            if choices is None:
                return JSONResponse({}, status_code=499)
            out = []
            for i, c in enumerate(choices):
                message, reason = server.chat_message(c, bool(tools))
                out.append({"index": i, "message": message, "logprobs": server.chat_logprobs(c) if f["logprobs"] else None,
                            "finish_reason": reason})
            return {**head(out), "usage": server.usage([prompt], choices)}

        async def chunks():
            index = {seq_id: i for i, seq_id in enumerate(handle.ids)}
            acc = {seq_id: _Choice() for seq_id in handle.ids}
            for i in range(len(handle.ids)):
                yield _sse(head([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}], "chat.completion.chunk"))
            async for e in events(handle):
                i, c = index[e.seq_id], _Choice()
                c.add(e, server.stop_tokens)
                acc[e.seq_id].add(e, server.stop_tokens)
                logprobs = server.chat_logprobs(c) if f["logprobs"] else None
                if not tools:
                    yield _sse(head([{"index": i, "delta": {"content": c.text} if c.text or not e.finished else {},
                                      "logprobs": logprobs, "finish_reason": c.finish_reason}], "chat.completion.chunk"))
                elif e.finished:  # with tools the answer is known only whole: a call, or text
                    message, reason = server.chat_message(acc[e.seq_id], True)
                    delta = {k: v for k, v in message.items() if k != "role" and v is not None}
                    if "tool_calls" in delta:
                        delta["tool_calls"] = [{"index": j, **call} for j, call in enumerate(delta["tool_calls"])]
                    yield _sse(head([{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}],
                                    "chat.completion.chunk"))
            if _include_usage(body):
                yield _sse({**head([], "chat.completion.chunk"), "usage": server.usage([prompt], list(acc.values()))})
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return app


# ---------------------------------------------------------------- the command


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def warn_if_open(host: str, api_key: Optional[str]) -> None:
    """A warning when the server listens beyond this machine and asks no key."""
    if host not in LOOPBACK and api_key is None:
        logger.warning("serving on %s without an API key: anyone who can reach it can use it "
                       "(set --api_key or LLAMA_API_KEY)", host)


def serve(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    max_batch_size: int = 32,
    max_seq_len: int = 2048,
    max_queue: int = 256,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    compile: bool = False,
    quantize: Optional[str] = None,
    group_size: int = 32,
    model_name: Optional[str] = None,
    draft_ckpt_dir: Optional[str] = None,
    speculate: bool = False,
    speculate_k: Union[int, str] = 4,
) -> None:
    """Serve a Llama 3 model over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models).

    Args:
        ckpt_dir, tokenizer_path: the checkpoint; neither: the bundled demo model.
        host, port: where to listen (127.0.0.1: this machine only).
        api_key: the key clients must send as 'Authorization: Bearer <key>'; default: the
            LLAMA_API_KEY environment variable; none: no key asked.
        max_batch_size: sequences decoded together (KV cache rows).
        max_seq_len: the context: prompt plus answer, in tokens.
        max_queue: sequences queued or running at most; more are answered 429.
        device, dtype, compile: as Llama.build.
        quantize, group_size: int8 or int4 (fp8 on CUDA sm89+) weight-only quantization on load (or w8a8), as
            Llama.build (default: none; a checkpoint from scripts/quantize.py loads as stored).
        model_name: the model's id in the API (default: the checkpoint directory's name).
        draft_ckpt_dir, speculate, speculate_k: speculative decoding with a draft model, as the
            example scripts (the README, "Speculative decoding").

    Under torchrun, every rank loads its part; rank 0 serves HTTP and leads the steps.
    """
    import uvicorn

    from llama.launch import build_generator

    for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len), ("max_queue", max_queue)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value!r}")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"--port must be a port number (1-65535), got {port!r}")
    api_key = api_key or os.environ.get("LLAMA_API_KEY") or None
    llama = build_generator(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                            device=device, dtype=dtype, compile=compile, quantize=quantize, group_size=group_size,
                            speculate=speculate, draft_ckpt_dir=draft_ckpt_dir, speculate_k=speculate_k)
    engine = llama.engine(max_batch_size, max_seq_len)
    loop = EngineLoop(engine, max_queue)
    if not distributed.is_rank0():
        loop.follow()
        distributed.shutdown()
        return
    if model_name is None:
        model_name = os.path.basename(os.path.normpath(ckpt_dir)) if ckpt_dir else "llama3-demo"
    warn_if_open(host, api_key)
    app = create_app(Server(llama, loop, model_name, api_key, max_seq_len, max_queue))
    loop.start()
    logger.info("Serving %s on http://%s:%d/v1 (%d rows of %d tokens, queue %d)", model_name, host, port,
                max_batch_size, max_seq_len, max_queue)
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it has handled: a normal way to stop
        pass
    finally:
        loop.stop()  # the other ranks stop with it
        distributed.shutdown()


def main() -> None:
    from llama.cli import run

    run(serve)
