"""The FastAPI application: one function per route.

Every route answers OpenAI's error body for anything that goes wrong: APIError as itself, a client
that left mid-body quietly (499, nothing logged as an error), anything else as a 500 logged once
with its cause. Reading a body is bounded (--max_request_bytes, 413 without reading the rest);
parsing, checking and tokenizing it, work that grows with the request, runs off the event loop.
"""
import asyncio
import functools
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, List, Optional, Tuple

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from llama.chat_format import to_dialog
from llama.serve import protocol
from llama.serve.loop import ERROR, EngineLoop, Handle, shutting_down
from llama.serve.protocol import APIError
from llama.serve.responses import DONE, Choice, Shaper, sse

logger = logging.getLogger(__name__)


@dataclass
class Service:
    """What the routes share: the engine loop, the answer shaper and the server's limits."""

    shaper: Shaper
    loop: EngineLoop
    api_key: Optional[str]
    max_seq_len: int
    max_queue: int
    max_request_bytes: int
    draining: bool = False  # shutting down: new requests get 503
    metrics: Optional[Any] = None  # llama.serve.metrics.Metrics: GET /metrics (None: no such route)
    metrics_key: Optional[str] = None  # the key GET /metrics asks for (None: none)
    kv_tokens: Optional[int] = None  # tokens the whole block KV cache holds (None: no bound but max_seq_len)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        return self.shaper.model_name


class SequenceFailed(Exception):
    """A sequence of this request failed in the engine (already logged there)."""


def create_app(service: Service) -> FastAPI:
    """The FastAPI application of `service`."""
    app = FastAPI(title="llama3-ref", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_exception_handler(HTTPException, http_error)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/models/{name:path}", model, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    if service.metrics is not None:
        app.add_api_route("/metrics", metrics, methods=["GET"])
        from llama.serve.metrics import CountRequests

        app.add_middleware(CountRequests, metrics=service.metrics)
    return app


# ---------------------------------------------------------------- errors


def error_response(e: APIError) -> Response:
    return Response(json.dumps(e.body()), status_code=e.status, headers=e.headers, media_type="application/json")


def internal(cause: str) -> APIError:
    return APIError(500, f"internal error ({cause}); the server goes on", type="server_error", code="internal_error")


async def http_error(request: HTTPRequest, e: HTTPException) -> Response:
    """No such route (404, 405) and the like, as OpenAI's error body."""
    message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
    return error_response(APIError(e.status_code, message, code="not_found" if e.status_code == 404 else None))


def guarded(route: Callable) -> Callable:
    """A route whose every failure is an OpenAI error body (see the module's docstring)."""
    @functools.wraps(route)
    async def run(request: HTTPRequest) -> Any:
        try:
            return await route(request)
        except APIError as e:
            return error_response(e)
        except ClientDisconnect:  # it left mid-body: nobody to answer, nothing wrong here
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001 -- this request fails alone
            logger.error("internal error in %s %s (%s: %s)", request.method, request.url.path, type(e).__name__, e,
                         exc_info=e)
            return error_response(internal(type(e).__name__))

    return run


async def guarded_stream(chunks: AsyncIterator[str], what: str) -> AsyncIterator[str]:
    """A stream that always ends with [DONE]; a failure on the way is an error event first."""
    try:
        async for chunk in chunks:
            yield chunk
    except SequenceFailed as e:
        yield sse(internal(str(e)).body())
    except Exception as e:  # noqa: BLE001
        logger.error("internal error in a %s stream (%s: %s)", what, type(e).__name__, e, exc_info=e)
        yield sse(internal(type(e).__name__).body())
    yield DONE


# ---------------------------------------------------------------- reading a request


def service_of(request: HTTPRequest) -> Service:
    return request.app.state.service


async def read_body(request: HTTPRequest, service: Service) -> bytes:
    """The body of an admitted request: 503 while shutting down, 401 without the key, 413 past
    --max_request_bytes (declared or read so far; the rest is never read: the connection closes)."""
    if service.draining:
        raise shutting_down()
    protocol.check_key(service.api_key, request.headers.get("authorization"))
    limit = service.max_request_bytes
    too_large = APIError(413, f"the request body is larger than {limit} bytes (--max_request_bytes)",
                         code="request_too_large", headers={"Connection": "close"})
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


INLINE_BYTES = 16 * 1024  # a body this small is handled at once: less work than a thread's round trip


async def off_loop(inputs: Callable, service: Service, raw: bytes) -> Any:
    """`inputs(service, raw)`, in a worker thread when the body is large enough to stall the
    other clients (parsing, checking and tokenizing grow with it)."""
    if len(raw) <= INLINE_BYTES:
        return inputs(service, raw)
    return await asyncio.to_thread(inputs, service, raw)


def completion_inputs(service: Service, raw: bytes) -> Tuple[dict, List[List[int]], List[str]]:
    """(fields, prompts as token ids, echo texts) of a /v1/completions body (off the event loop)."""
    tok = service.shaper.tokenizer
    f = protocol.check_request(protocol.parse_body(raw), False, service.model_name, tok.n_words, service.max_queue)
    prompts = [tok.encode(p, bos=True, eos=False) if isinstance(p, str) else p for p in f["prompt"]]
    protocol.check_lengths(prompts, f["max_tokens"], service.max_seq_len, "prompt")
    protocol.check_kv_budget(prompts, f["max_tokens"], service.kv_tokens, "prompt")
    echo = [tok.decode(p) if f["echo"] else "" for p in prompts]
    return f, prompts, echo


def chat_inputs(service: Service, raw: bytes) -> Tuple[dict, List[int], list]:
    """(fields, prompt, tools in effect) of a /v1/chat/completions body (off the event loop)."""
    tok = service.shaper.tokenizer
    f = protocol.check_request(protocol.parse_body(raw), True, service.model_name, tok.n_words, service.max_queue)
    tools = f["tools"] if f["tool_choice"] != "none" else []
    prompt = service.shaper.formatter.encode_dialog_prompt(to_dialog(f["messages"], tools))
    if f["max_tokens"] is None:  # the rest of the context, at least one token
        f["max_tokens"] = max(1, service.max_seq_len - len(prompt))
    protocol.check_lengths([prompt], f["max_tokens"], service.max_seq_len, "messages")
    protocol.check_kv_budget([prompt], f["max_tokens"], service.kv_tokens, "messages")
    f["logprobs"] = f["logprobs"] or f["top_logprobs"] > 0
    return f, prompt, tools


async def gather(service: Service, handle: Handle, request: HTTPRequest) -> Optional[List[Choice]]:
    """The whole answer; None when the client went away first (its sequences are cancelled)."""
    async def collect():
        choices = {i: Choice() for i in handle.ids}
        async for e in handle.stream(service.loop.cancel):
            choices[e.seq_id].add(e, service.shaper.stop_tokens)
        return [choices[i] for i in handle.ids]

    async def disconnected():  # the body is read: the next message is the client leaving
        while (await request.receive())["type"] != "http.disconnect":
            pass

    answer, gone = asyncio.create_task(collect()), asyncio.create_task(disconnected())
    await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    if answer.done():
        gone.cancel()
        choices = answer.result()
        if any(c.finish_reason == ERROR for c in choices):
            raise internal(handle.error or "a sequence failed")
        return choices
    answer.cancel()  # its stream's end cancels the sequences
    return None


# ---------------------------------------------------------------- routes


@guarded
async def health(request: HTTPRequest) -> Any:
    service = service_of(request)
    if service.draining:
        return Response(json.dumps({"status": "draining", **service.loop.stats()}), 503, media_type="application/json")
    return {"status": "ok", **service.loop.stats()}


def model_card(service: Service) -> dict:
    return {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "llama3-ref"}


@guarded
async def models(request: HTTPRequest) -> Any:
    service = service_of(request)
    protocol.check_key(service.api_key, request.headers.get("authorization"))
    return {"object": "list", "data": [model_card(service)]}


@guarded
async def model(request: HTTPRequest) -> Any:
    service = service_of(request)
    protocol.check_key(service.api_key, request.headers.get("authorization"))
    name = request.path_params["name"]
    if name != service.model_name:
        raise APIError(404, f"the model {protocol.show(name)} does not exist", param="model", code="model_not_found")
    return model_card(service)


@guarded
async def completions(request: HTTPRequest) -> Any:
    service = service_of(request)
    raw = await read_body(request, service)
    f, prompts, echo = await off_loop(completion_inputs, service, raw)
    shaper = service.shaper
    handle = service.loop.submit(shaper.requests(prompts, f, prompt_logprobs=f["echo"] and f["logprobs"]))
    head = functools.partial(_head, f"cmpl-{uuid.uuid4().hex}", "text_completion", int(time.time()), service.model_name)
    if f["stream"]:
        chunks = completion_chunks(service, handle, f, prompts, echo, head)
        return StreamingResponse(guarded_stream(chunks, "completion"), media_type="text/event-stream")
    choices = await gather(service, handle, request)
    if choices is None:
        return Response(status_code=499)
    n = f["n"]
    body = head([shaper.completion_choice(i, c, prompts[i // n], f, echo[i // n]) for i, c in enumerate(choices)])
    return {**body, "usage": shaper.usage(prompts, choices)}


async def completion_chunks(service: Service, handle: Handle, f: dict, prompts: list, echo: list, head) -> AsyncIterator[str]:
    shaper, n = service.shaper, f["n"]
    index = {seq_id: i for i, seq_id in enumerate(handle.ids)}
    started, acc, offsets = set(), {i: Choice() for i in handle.ids}, {}
    async for e in handle.stream(service.loop.cancel):
        if e.finish_reason == ERROR:
            raise SequenceFailed(handle.error or "a sequence failed")
        i = index[e.seq_id]
        c = Choice()
        c.add(e, shaper.stop_tokens)
        acc[e.seq_id].add(e, shaper.stop_tokens)
        first = i not in started
        text = echo[i // n] + c.text if first else c.text
        logprobs = None
        if f["logprobs"]:
            offset = offsets.get(i, 0)
            logprobs = shaper.completion_logprobs(c, prompts[i // n] if f["echo"] and first else None, offset)
            offsets[i] = offset + sum(len(t) for t in logprobs["tokens"])
        started.add(i)
        yield sse(head([{"index": i, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}]))
    if f["include_usage"]:
        yield sse({**head([]), "usage": shaper.usage(prompts, list(acc.values()))})


@guarded
async def chat_completions(request: HTTPRequest) -> Any:
    service = service_of(request)
    raw = await read_body(request, service)
    f, prompt, tools = await off_loop(chat_inputs, service, raw)
    shaper = service.shaper
    handle = service.loop.submit(shaper.requests([prompt], f))
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if f["stream"]:
        head = functools.partial(_head, rid, "chat.completion.chunk", created, service.model_name)
        chunks = chat_chunks(service, handle, f, prompt, bool(tools), head)
        return StreamingResponse(guarded_stream(chunks, "chat completion"), media_type="text/event-stream")
    choices = await gather(service, handle, request)
    if choices is None:
        return Response(status_code=499)
    body = _head(rid, "chat.completion", created, service.model_name, shaper.chat_choices(choices, bool(tools), f["logprobs"]))
    return {**body, "usage": shaper.usage([prompt], choices)}


async def chat_chunks(service: Service, handle: Handle, f: dict, prompt: List[int], tools: bool, head) -> AsyncIterator[str]:
    shaper = service.shaper
    index = {seq_id: i for i, seq_id in enumerate(handle.ids)}
    acc = {seq_id: Choice() for seq_id in handle.ids}
    for i in range(len(handle.ids)):
        yield sse(head([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]))
    async for e in handle.stream(service.loop.cancel):
        if e.finish_reason == ERROR:
            raise SequenceFailed(handle.error or "a sequence failed")
        acc[e.seq_id].add(e, shaper.stop_tokens)
        chunk = shaper.chat_delta(e, acc[e.seq_id], tools, f["logprobs"])
        if chunk is not None:
            yield sse(head([{"index": index[e.seq_id], **chunk}]))
    if f["include_usage"]:
        yield sse({**head([]), "usage": shaper.usage([prompt], list(acc.values()))})


def _head(rid: str, obj: str, created: int, model_name: str, choices: list) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": choices}


@guarded
async def metrics(request: HTTPRequest) -> Any:
    """The Prometheus metrics; behind --metrics_key when one is set, never behind --api_key."""
    service = service_of(request)
    protocol.check_key(service.metrics_key, request.headers.get("authorization"))
    from llama.serve.metrics import CONTENT_TYPE

    return Response(service.metrics.render(), media_type=CONTENT_TYPE)
