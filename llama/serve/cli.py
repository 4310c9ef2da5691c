"""`llama-serve` (and scripts/serve.py): load the model, run the engine loop, serve HTTP, and shut
down gracefully on SIGTERM or SIGINT."""
import asyncio
import logging
import os
import signal
import time
from typing import Optional, Union

from llama import distributed, structured
from llama.engine import budget
from llama.serve.app import Service, create_app
from llama.serve.connections import bounded_protocol
from llama.serve.loop import EngineLoop
from llama.serve.responses import Shaper

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def warn_if_open(host: str, api_key: Optional[str]) -> None:
    """A warning when the server listens beyond this machine and asks no key."""
    if host not in LOOPBACK and api_key is None:
        logger.warning("serving on %s without an API key: anyone who can reach it can use it "
                       "(set --api_key or LLAMA_API_KEY)", host)


def _uvicorn_server(config, service: Service, drain_timeout: float):
    """A uvicorn.Server whose first SIGTERM or SIGINT drains instead of stopping: new requests get
    503, running sequences finish for up to `drain_timeout` seconds, the rest then end with a last
    chunk (finish_reason "length"), and only then does uvicorn stop. A second signal ends the
    drain at once."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        loop: Optional[asyncio.AbstractEventLoop] = None
        hurry = False

        async def serve(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame) -> None:  # no re-raise of the signal once stopped
            if self.loop is None:
                self.should_exit = True
            elif service.draining:
                self.hurry = True
            else:
                service.draining = True
                self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self.drain()))

        async def drain(self) -> None:
            service.loop.close()
            logger.info("shutting down: %d sequences to finish (up to %g s, --drain_timeout); new requests get 503",
                        service.loop.live(), drain_timeout)
            deadline = time.monotonic() + drain_timeout
            while service.loop.live() and time.monotonic() < deadline and not self.hurry:
                await asyncio.sleep(0.05)
            ended = service.loop.end_all()
            if ended:
                logger.warning("ended %d sequences unfinished at the drain's end", ended)
            await asyncio.sleep(0.1)  # their last chunks go out
            self.should_exit = True

    return DrainingServer(config)


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
    remeasure: bool = False,
    compile: bool = False,
    quantize: Optional[str] = None,
    group_size: int = 32,
    model_name: Optional[str] = None,
    draft_ckpt_dir: Optional[str] = None,
    speculate: bool = False,
    speculate_k: Union[int, str] = 4,
    adapter: Optional[str] = None,
    max_request_bytes: int = 4 * 2**20,
    max_connections: int = 512,
    request_timeout: float = 30.0,
    keep_alive_timeout: float = 5.0,
    drain_timeout: float = 20.0,
    metrics_key: Optional[str] = None,
    kv_cache_tokens: Optional[int] = None,
    prefix_cache: bool = True,
    max_prefill_tokens: Optional[int] = 512,
) -> None:
    """Serve a Llama 3 model over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models).

    Args:
        ckpt_dir, tokenizer_path: the checkpoint; neither: the bundled demo model.
        host, port: where to listen (127.0.0.1: this machine only).
        api_key: the key clients must send as 'Authorization: Bearer <key>'; default: the
            LLAMA_API_KEY environment variable; none: no key asked.
        max_batch_size: sequences decoded together.
        max_seq_len: the context: prompt plus answer, in tokens.
        max_queue: sequences queued or running at most; more are answered 429.
        device, dtype, compile: as Llama.build.
        remeasure: time this machine's kernels again instead of reading the choice an earlier run kept
            (also LLAMA_REMEASURE=1).
        quantize, group_size: int8 or int4 (fp8 on CUDA sm89+) weight-only quantization on load (or w8a8), as
            Llama.build (default: none; a checkpoint from scripts/quantize.py loads as stored).
        model_name: the model's id in the API (default: the checkpoint directory's name).
        draft_ckpt_dir, speculate, speculate_k: speculative decoding with a draft model, as the
            example scripts (docs/speculative.md).
        adapter: a LoRA adapter directory (llama-finetune's OUT_DIR/adapter), applied unmerged.
        max_request_bytes: the largest request body (default 4 MiB); a larger one is answered 413
            without being read.
        max_connections: open connections at most (default 512); more are answered 503 and closed.
        request_timeout: seconds a client has to send a whole request, headers and body, from the
            connection's start or the previous answer (default 30); then the connection closes.
            Headers are bounded too: 16 KiB at most (uvicorn's h11), else 400.
        keep_alive_timeout: seconds an idle keep-alive connection stays open (default 5).
        drain_timeout: on SIGTERM or SIGINT, seconds the running sequences have to finish (default
            20: within the 30 s that torchrun and Kubernetes wait before they kill; new requests get
            503 meanwhile); the rest then end with finish_reason "length", every stream with [DONE],
            and the process exits 0. A second signal ends them at once.
        kv_cache_tokens: tokens the KV cache holds, in blocks that sequences take as they grow and
            free when they finish (default: on CUDA, 90% of the GPU memory free once the weights
            are loaded, logged at start; elsewhere max_batch_size x max_seq_len). A request that could
            never fit is answered 400; when the blocks run out mid-decode the newest sequence is
            preempted and recomputed later. With --compile the cache is max_batch_size rows of
            max_seq_len tokens instead (the static shapes of its compiled passes).
        prefix_cache: reuse the KV cache blocks of a prompt's longest cached prefix (a shared system
            prompt is computed once; usage.prompt_tokens_details.cached_tokens says how many
            tokens came from the cache); False turns it off. Not with --compile.
        max_prefill_tokens: prompt tokens prefilled per step at most (default 512): a longer prompt
            is prefilled over several steps while the running sequences go on decoding, so that it
            does not stall them; fewer tokens a step as a prompt's context grows, so that a chunk's
            attention over it keeps the step's cost (llama.engine.scheduler.prefill_cost); None:
            every admitted prompt whole. Not with --compile.
        metrics_key: the key GET /metrics (Prometheus' text format; needs prometheus_client, in the
            serve extra) asks for as 'Authorization: Bearer <key>'; default: none (the metrics are
            not behind --api_key).

    Under torchrun, every rank loads its part; rank 0 serves HTTP and leads the steps (and the
    shutdown: the other ranks ignore the signals and stop when it does).
    """
    from llama.launch import build_generator

    _check_flags(max_batch_size=max_batch_size, max_seq_len=max_seq_len, max_queue=max_queue,
                 max_request_bytes=max_request_bytes, max_connections=max_connections, port=port,
                 request_timeout=request_timeout, keep_alive_timeout=keep_alive_timeout, drain_timeout=drain_timeout,
                 **{k: v for k, v in (("kv_cache_tokens", kv_cache_tokens), ("max_prefill_tokens", max_prefill_tokens))
                    if v is not None})
    api_key = api_key or os.environ.get("LLAMA_API_KEY") or None
    llama = build_generator(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                            device=device, dtype=dtype, remeasure=remeasure, compile=compile, quantize=quantize, group_size=group_size,
                            speculate=speculate, draft_ckpt_dir=draft_ckpt_dir, speculate_k=speculate_k,
                            adapter=adapter)
    structured.prepare(llama.tokenizer)  # in the background: the first JSON request would build it mid-step
    if kv_cache_tokens is None and not compile:  # on CUDA: from the memory left free by the weights
        models = [llama.model] + ([llama.speculator.draft] if llama.speculator else [])
        kv_cache_tokens = budget.default_kv_tokens(models, max_batch_size, max_seq_len)
    engine = llama.engine(max_batch_size, max_seq_len, kv_cache_tokens, prefix_cache=prefix_cache,
                          max_prefill_tokens=max_prefill_tokens)
    kv_tokens = engine.blocks.capacity * engine.blocks.block_size if engine.blocks is not None else None
    metrics = _metrics(engine, llama.tokenizer.stop_tokens) if distributed.is_rank0() else None
    loop = EngineLoop(engine, max_queue, metrics)
    if not distributed.is_rank0():
        _follow(loop)
        return
    if model_name is None:
        model_name = os.path.basename(os.path.normpath(ckpt_dir)) if ckpt_dir else "llama3-demo"
    warn_if_open(host, api_key)
    service = Service(Shaper(llama.tokenizer, llama.formatter, model_name), loop, api_key, max_seq_len, max_queue,
                      max_request_bytes, metrics=metrics, metrics_key=metrics_key, kv_tokens=kv_tokens)
    logger.info("Serving %s on http://%s:%d/v1 (%d sequences together, %d-token context, KV cache %s, queue %d)",
                model_name, host, port, max_batch_size, max_seq_len,
                f"{kv_tokens} tokens in blocks" if kv_tokens else "in rows", max_queue)
    _lead(service, host, port, max_connections, request_timeout, keep_alive_timeout, drain_timeout)


def _metrics(engine, stop_tokens):
    """The server's metrics over `engine`, or None (and a warning) without prometheus_client."""
    from llama.serve import metrics

    if not metrics.available():
        logger.warning("GET /metrics is off: install prometheus_client (pip install 'llama3-ref[serve]')")
        return None
    return metrics.Metrics(engine.stats, stop_tokens)


def _follow(loop: EngineLoop) -> None:
    """A rank other than 0: step with rank 0's plans until it says stop. Rank 0 leads the shutdown,
    so the signals a launcher forwards to every rank are ignored here."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    loop.follow()
    distributed.shutdown()


def _check_flags(port: int, **values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"--{name} must be a positive number, got {value!r}")
    for name in ("max_batch_size", "max_seq_len", "max_queue", "max_request_bytes", "max_connections", "kv_cache_tokens",
                 "max_prefill_tokens"):
        if name in values and not isinstance(values[name], int):
            raise ValueError(f"--{name} must be a positive integer, got {values[name]!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"--port must be a port number (1-65535), got {port!r}")


def _lead(service: Service, host: str, port: int, max_connections: int, request_timeout: float,
          keep_alive_timeout: float, drain_timeout: float) -> None:
    """Rank 0: the engine's thread and HTTP until the drain ends; then every rank stops."""
    import uvicorn

    config = uvicorn.Config(
        create_app(service), host=host, port=port, log_level="warning", http=bounded_protocol(request_timeout, max_connections),
        timeout_keep_alive=keep_alive_timeout, timeout_graceful_shutdown=5, lifespan="off",
    )
    service.loop.start()
    try:
        _uvicorn_server(config, service, drain_timeout).run()
    finally:
        service.loop.stop()  # the other ranks stop with it
        distributed.shutdown()


def main() -> None:
    from llama.cli import run

    run(serve)
