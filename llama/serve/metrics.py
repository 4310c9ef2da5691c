"""The server's Prometheus metrics (`GET /metrics`, in Prometheus' text format through the
`prometheus_client` library, an optional dependency of the serve extra).

Requests are counted by endpoint and status as they are answered; tokens and latencies as the
engine's events are delivered (time to first token and end-to-end latency from the request's
submission, inter-token latency between a sequence's consecutive tokens); the engine's own state
(running and waiting sequences, KV cache blocks, prefix-cache hits, preemptions) is read at each
scrape from `Engine.stats`, so the engine keeps no metrics code of its own.
"""
import time
from typing import Callable, Dict, Iterable, List, Optional

# endpoints counted under their own name; anything else (a 404's path) is "other"
ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
# seconds: from a few milliseconds (a small model's decode step) to minutes (a long answer)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def available() -> bool:
    """Whether prometheus_client is installed (`pip install llama3-ref[serve]`)."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def endpoint_of(path: str) -> str:
    """The endpoint label of a request path: its route, never the raw path of an unknown one."""
    if path.startswith("/v1/models/"):
        return "/v1/models/{name}"
    return path if path in ENDPOINTS else "other"


class Metrics:
    """The metrics of one server, in a registry of their own (two servers in one process, as in
    tests, do not share counters). `engine_stats`: a function returning the engine's gauges and
    counters (`Engine.stats`), read at each scrape."""

    def __init__(self, engine_stats: Callable[[], Dict[str, int]], stop_tokens: Iterable[int] = ()):
        """stop_tokens: a sequence's last token when it is one of these is not counted as generated
        (as in the answers' usage), only timed."""
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llama_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("llama_prompt_tokens", "Prompt tokens of the sequences submitted", registry=r)
        self.generation_tokens = Counter("llama_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("llama_time_to_first_token_seconds", "From a request's submission to its sequence's first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("llama_inter_token_latency_seconds", "Between consecutive tokens of a sequence",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("llama_e2e_request_latency_seconds", "From a request's submission to its sequence's end",
                             buckets=LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(engine_stats))
        self.stop_tokens = frozenset(stop_tokens)
        self._last: Dict[int, float] = {}  # seq_id -> when its last token came (the engine's thread)

    def request(self, path: str, status: int) -> None:
        self.requests.labels(endpoint_of(path), str(status)).inc()

    def submitted(self, prompt_lengths: List[int]) -> None:
        self.prompt_tokens.inc(sum(prompt_lengths))

    def event(self, seq_id: int, token: Optional[int], finished: bool, submitted_at: float) -> None:
        """One delivered engine event of a sequence submitted at `submitted_at` (time.monotonic)."""
        now = time.monotonic()
        if token is not None:
            if not (finished and token in self.stop_tokens):
                self.generation_tokens.inc()
            last = self._last.get(seq_id)
            if last is None:
                self.ttft.observe(now - submitted_at)
            else:
                self.itl.observe(now - last)
            self._last[seq_id] = now
        if finished:
            self._last.pop(seq_id, None)
            self.e2e.observe(now - submitted_at)

    def forget(self, seq_ids: Iterable[int]) -> None:
        """Sequences that ended without a last event (cancelled): their timing is dropped."""
        for i in seq_ids:
            self._last.pop(i, None)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware: each HTTP answer counted by endpoint and status as its head goes out (a
    stream by the status it starts with). Plain ASGI, so that streams and the disconnect messages
    the routes wait for pass through untouched."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.request(scope["path"], message["status"])
            await send(message)

        await self.app(scope, receive, counted)


# the engine's numbers: name -> (kind, help); a number the engine does not report is left out
ENGINE_METRICS = {
    "running": ("gauge", "Sequences decoding"),
    "waiting": ("gauge", "Sequences waiting for admission"),
    "kv_blocks_used": ("gauge", "KV cache blocks held by sequences"),
    "kv_blocks_free": ("gauge", "KV cache blocks free (cached prefix blocks included: they are evictable)"),
    "kv_blocks_cached": ("gauge", "KV cache blocks holding a cached prefix, held or not"),
    "prefix_cache_queries": ("counter", "Prompt tokens looked up in the prefix cache"),
    "prefix_cache_hits": ("counter", "Prompt tokens found in the prefix cache"),
    "preemptions": ("counter", "Sequences preempted (their blocks freed, recomputed later)"),
}


class _EngineCollector:
    """The engine's gauges and counters, read at each scrape."""

    def __init__(self, stats: Callable[[], Dict[str, int]]):
        self.stats = stats

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        values = self.stats()
        for name, (kind, doc) in ENGINE_METRICS.items():
            if name in values:
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                yield family(f"llama_{name}", doc, value=values[name])
