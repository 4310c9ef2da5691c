"""No request can stop, stall or crash the server: requests that once did, bodies past the size
limit, idle and slow connections, too many connections, clients that leave mid-body, and a
graceful shutdown on SIGTERM (one process, and under torchrun)."""
import concurrent.futures
import json
import signal
import socket
import threading
import time

import httpx
import psutil
import pytest

import helpers

KEY = helpers.SERVER_KEY
LIMIT = 200_000  # --max_request_bytes of the test server
TIMEOUT = 2  # --request_timeout
KEEP_ALIVE = 1  # --keep_alive_timeout
MAX_CONNECTIONS = 12
HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tiny_ckpt, byte_tokenizer, tmp_path_factory):
    extra = ("--max_request_bytes", str(LIMIT), "--request_timeout", str(TIMEOUT), "--keep_alive_timeout",
             str(KEEP_ALIVE), "--max_connections", str(MAX_CONNECTIONS))
    served = helpers.start_server(tmp_path_factory.mktemp("limits"), tiny_ckpt, byte_tokenizer, extra=extra)
    yield served
    helpers.stop_server(served)  # SIGINT: the same drain as SIGTERM
    assert served.proc.returncode == 0, served.output()[-3000:]


def post(served, path: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(served.base + path, content=content, headers={**HEADERS, **kwargs.pop("headers", {})}, timeout=30,
                      **kwargs)


def assert_openai_error(r: httpx.Response, status: int, param=None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def greedy(served, prompt: str = "same answer", n: int = 6) -> str:
    r = post(served, "/v1/completions", {"model": served.model, "prompt": prompt, "max_tokens": n, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_requests_that_stopped_or_crashed_the_server_are_400s_naming_the_field(server):
    before = greedy(server)
    m = server.model
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": ' + "[" * 5000 + "]" * 5000 + "}"}}
    cases = [
        ("/v1/completions", {"model": m, "prompt": "x", "seed": 2**80}, "seed"),
        ("/v1/completions", {"model": m, "prompt": "x", "seed": -(2**63) - 1}, "seed"),
        ("/v1/chat/completions", {"model": m, "messages": [{"role": "user", "content": "x"}], "seed": 2**64 - 1, "n": 2}, "seed"),
        ("/v1/chat/completions", {"model": m, "messages": [{"role": ["user"], "content": "x"}]}, "messages[0]"),
        ("/v1/chat/completions", {"model": m, "messages": [{"role": {"a": 1}, "content": "x"}]}, "messages[0]"),
        ("/v1/chat/completions", {"model": m, "messages": [{"role": "assistant", "tool_calls": [call]}]},
         "messages[0].tool_calls[0]"),
        ("/v1/chat/completions", {"model": m, "messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id"),
    ]
    for path, body, param in cases:
        assert_openai_error(post(server, path, body), 400, param)
    r = post(server, "/v1/completions", b'{"model": "\\ud800", "prompt": "x"}')
    assert_openai_error(r, 400, "model")
    r = post(server, "/v1/completions", {"model": m, "prompt": "x", "seed": 2**64 - 1, "max_tokens": 2})
    assert r.status_code == 200  # the generator's top seed itself is fine
    assert greedy(server) == before
    assert server.health()["sequences"] == 0


def test_a_wrong_key_is_openais_401(server):
    error = assert_openai_error(post(server, "/v1/completions", {}, headers={"Authorization": "Bearer nope"}), 401)
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"


def raw_request(served, head: str, body_chunks, read: bool = True) -> bytes:
    """Send a request over a plain socket (the body as given, stopping when the server closes);
    returns what the server answered."""
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as s:
        s.sendall(head.encode())
        try:
            for chunk in body_chunks:
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it answered and closed without reading the rest: what we want
        answer = b""
        while read:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            answer += data
        return answer


def health_times(served, stop: threading.Event) -> list:
    times = []
    with httpx.Client(timeout=10) as http:
        while not (stop.is_set() and times):
            start = time.perf_counter()
            assert http.get(served.base + "/health").status_code == 200
            times.append(time.perf_counter() - start)
            time.sleep(0.02)
    return times


def test_bodies_past_the_limit_are_413_unread_while_health_answers(server):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\n")
    big = 20_000_000
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        timer = pool.submit(health_times, server, stop)
        sent = (b"x" * 65536 for _ in range(big // 65536))
        declared = raw_request(server, head + f"Content-Length: {big}\r\n\r\n", sent)
        chunked = raw_request(server, head + "Transfer-Encoding: chunked\r\n\r\n",
                              (b"10000\r\n" + b"y" * 65536 + b"\r\n" for _ in range(big // 65536)))
        # just under the limit: read, parsed and tokenized off the event loop, then refused as too long
        near = post(server, "/v1/completions", {"model": server.model, "prompt": "z" * (LIMIT - 100), "max_tokens": 1})
        stop.set()
        times = timer.result()
    for answer in (declared, chunked):
        status, _, rest = answer.partition(b"\r\n")
        assert status.startswith(b"HTTP/1.1 413"), answer[:200]
        body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["code"] == "request_too_large"
    assert_openai_error(near, 400, "prompt")
    assert times and max(times) < 0.5, times
    assert greedy(server)


def closed_after(served, send: bytes = b"", trickle: float = 0) -> float:
    """Seconds until the server closes a connection that sent `send` (a byte every `trickle` s)."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", served.port), timeout=TIMEOUT + 10) as s:
        try:
            if trickle:
                for byte in send:
                    s.sendall(bytes([byte]))
                    time.sleep(trickle)
            else:
                s.sendall(send)
            while s.recv(65536):
                pass
        except (BrokenPipeError, ConnectionResetError):
            pass
    return time.perf_counter() - start


def test_idle_and_slow_connections_are_closed(server):
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        silent = pool.submit(closed_after, server)
        slow = pool.submit(closed_after, server, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100, 0.1)
        kept_alive = pool.submit(closed_after, server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert TIMEOUT - 0.5 < silent.result() < TIMEOUT + 3
        assert TIMEOUT - 0.5 < slow.result() < TIMEOUT + 3
        assert KEEP_ALIVE - 0.5 < kept_alive.result() < KEEP_ALIVE + 3


def test_connections_past_the_maximum_get_503(server):
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        answer = raw_request(server, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n", [])
        assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "service_unavailable"
    finally:
        for s in idle:
            s.close()
    time.sleep(0.2)
    assert server.health()["status"] == "ok"


def test_a_client_leaving_mid_body_is_no_internal_error(server):
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
    for _ in range(3):
        raw_request(server, head, [b'{"model": '], read=False)
    time.sleep(0.5)
    assert server.health()["sequences"] == 0
    out = server.output()
    assert "Traceback" not in out and "internal error" not in out, out[-2000:]


def stream_lines(served, body: dict) -> list:
    lines = []
    with httpx.stream("POST", served.base + "/v1/completions", json={**body, "stream": True}, headers=HEADERS,
                      timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line:
                lines.append(line)
    return lines


def check_stream_ended(lines: list) -> None:
    """A stream that ends with [DONE] after a last chunk that says why it finished."""
    assert lines[-1] == "data: [DONE]", lines[-3:]
    last = json.loads(lines[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] in ("length", "stop"), last


def drain_and_check(served, n_streams: int, signal_to, max_tokens: int, status=0) -> None:
    """SIGTERM to `signal_to` while `n_streams` streams run: new requests get 503, every stream
    ends with a last chunk and [DONE], and the server (`served.proc`) exits with `status`."""
    body = {"model": served.model, "prompt": "drain me", "max_tokens": max_tokens, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(n_streams) as pool:
        streams = [pool.submit(stream_lines, served, body) for _ in range(n_streams)]
        deadline = time.time() + 30
        while served.health()["sequences"] < n_streams and time.time() < deadline:
            time.sleep(0.02)
        signal_to.send_signal(signal.SIGTERM)
        refused = None
        for _ in range(100):
            r = post(served, "/v1/completions", {"model": served.model, "prompt": "late", "max_tokens": 1})
            if r.status_code == 503:
                refused = r
                break
            time.sleep(0.02)
        assert refused is not None and refused.json()["error"]["code"] == "service_unavailable"
        for f in streams:
            check_stream_ended(f.result(timeout=60))
    assert served.proc.wait(timeout=60) == status, served.output()[-3000:]


def test_sigterm_drains_every_stream_and_exits_0(tmp_path, tiny_ckpt, byte_tokenizer):
    served = helpers.start_server(tmp_path, tiny_ckpt, byte_tokenizer, max_seq_len=1024, extra=("--drain_timeout", "1"))
    try:
        drain_and_check(served, 6, served.proc, max_tokens=1000)  # 4 rows: two wait; none finishes in 1 s
        out = served.output()
        assert "ended" in out and "unfinished" in out and "Traceback" not in out, out[-3000:]
    finally:
        helpers.stop_server(served)


def test_sigterm_under_torchrun_stops_every_rank(tmp_path, tiny_ckpt_2shards, byte_tokenizer):
    """SIGTERM to rank 0 (the one serving HTTP): it drains and tells the other rank to stop, so the
    launcher sees every rank exit 0. SIGTERM to the launcher: it forwards it to every rank; rank 0
    drains the same way, rank 1 waits for its stop, and the launcher exits 1, as torchrun does when
    it is signalled."""
    for target in ("rank 0", "launcher"):
        served = helpers.start_server(tmp_path, tiny_ckpt_2shards, byte_tokenizer, nproc=2, max_seq_len=512,
                                      extra=("--drain_timeout", "1"))
        try:
            ranks = [p for p in psutil.Process(served.proc.pid).children(recursive=True) if "RANK" in p.environ()]
            assert len(ranks) == 2
            if target == "rank 0":
                rank0 = next(p for p in ranks if p.environ()["RANK"] == "0")
                drain_and_check(served, 3, rank0, max_tokens=500)
            else:
                drain_and_check(served, 3, served.proc, max_tokens=500, status=1)
            assert not psutil.wait_procs(ranks, timeout=30)[1]
            assert "error: the engine stopped" not in served.output(), served.output()[-3000:]
        finally:
            helpers.stop_server(served)
