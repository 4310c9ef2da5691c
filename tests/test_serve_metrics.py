"""GET /metrics: Prometheus' text format, read back with prometheus_client's own parser, its counters
matching the requests sent; and the serving engine's KV cache as the server reports it."""
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import helpers
from llama import Llama

METRICS_KEY = "metrics-key"
KV_TOKENS = 64  # 4 blocks of 16 for 4 sequences of up to 64 tokens: they preempt each other


@pytest.fixture(scope="module")
def server(tiny_ckpt, byte_tokenizer, tmp_path_factory):
    served = helpers.start_server(tmp_path_factory.mktemp("metrics"), tiny_ckpt, byte_tokenizer,
                                  extra=("--metrics_key", METRICS_KEY, "--kv_cache_tokens", str(KV_TOKENS)))
    yield served
    helpers.stop_server(served)


def scrape(served: helpers.Served) -> dict:
    """{(sample name, sorted labels): value} of the server's /metrics."""
    r = httpx.get(served.base + "/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_count_the_requests_sent(server):
    client = server.client()
    before = scrape(server)
    answers = [client.completions.create(model=server.model, prompt=p, max_tokens=n, temperature=0)
               for p, n in [("Hello", 7), ("Count me", 3), ("x", 5)]]
    answers.append(client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=4, temperature=0))
    stream = list(client.completions.create(model=server.model, prompt="Stream", max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    answers.append(stream[-1])
    reasons = [a.choices[0].finish_reason for a in answers[:4]] + [stream[-2].choices[0].finish_reason]
    assert httpx.post(server.base + "/v1/completions", json={"prompt": "x"}, timeout=10).status_code == 401  # no key
    after = scrape(server)

    def grew(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("llama_requests_total", endpoint="/v1/completions", status="200") == 4
    assert grew("llama_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert grew("llama_requests_total", endpoint="/v1/completions", status="401") == 1
    assert grew("llama_prompt_tokens_total") == sum(a.usage.prompt_tokens for a in answers)
    assert grew("llama_generation_tokens_total") == sum(a.usage.completion_tokens for a in answers)
    for name in ("llama_time_to_first_token_seconds_count", "llama_e2e_request_latency_seconds_count"):
        assert grew(name) == 5
    token_events = sum(a.usage.completion_tokens for a in answers) + reasons.count("stop")  # a stop token is timed
    assert grew("llama_inter_token_latency_seconds_count") == token_events - 5
    assert after[("llama_running", ())] == 0 and after[("llama_waiting", ())] == 0


def test_a_small_kv_cache_preempts_and_answers_what_generate_gives(server, tiny_ckpt, byte_tokenizer):
    llama = Llama.build(str(tiny_ckpt), str(byte_tokenizer), max_seq_len=96, max_batch_size=4, device="cpu",
                        dtype="float32")
    prompts, lengths = ["Hello there", "Preempt me", "Another one", "And the last"], [40, 45, 38, 42]
    before = scrape(server)
    results = helpers.concurrent_completions(server, prompts, lengths, stagger=0.02)
    helpers.check_against_generate(llama, results, prompts, lengths)
    after = scrape(server)
    assert after[("llama_preemptions_total", ())] > before.get(("llama_preemptions_total", ()), 0)
    assert after[("llama_kv_blocks_used", ())] == 0 and after[("llama_kv_blocks_free", ())] == KV_TOKENS // 16
    client = server.client()
    with pytest.raises(Exception, match="exceed the KV cache's 64 tokens") as e:  # never fits: 400 at once
        client.completions.create(model=server.model, prompt="Too long", max_tokens=60, temperature=0)
    assert e.value.status_code == 400


def test_clients_that_leave_free_their_blocks(server):
    body = {"model": server.model, "prompt": "Leave early", "max_tokens": 50, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {helpers.SERVER_KEY}"}
    for _ in range(3):  # each stream dropped after its first chunks, mid-decode
        with httpx.stream("POST", server.base + "/v1/completions", json=body, headers=headers, timeout=30) as r:
            next(r.iter_lines())
    deadline = time.time() + 30
    while time.time() < deadline and scrape(server)[("llama_running", ())] > 0:
        time.sleep(0.1)
    after = scrape(server)
    assert after[("llama_running", ())] == 0 and after[("llama_kv_blocks_used", ())] == 0
    assert after[("llama_kv_blocks_free", ())] == KV_TOKENS // 16


def test_usage_says_how_many_prompt_tokens_came_from_the_prefix_cache(server):
    client, prompt = server.client(), "A prompt of forty bytes, more or less..."  # 41 tokens: 2 full blocks
    before = scrape(server)
    first, second = [client.completions.create(model=server.model, prompt=prompt, max_tokens=5, temperature=0)
                     for _ in range(2)]
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 32
    assert second.choices[0].text == first.choices[0].text
    after = scrape(server)
    assert after[("llama_prefix_cache_hits_total", ())] - before[("llama_prefix_cache_hits_total", ())] == 32
    assert after[("llama_prefix_cache_queries_total", ())] - before[("llama_prefix_cache_queries_total", ())] == 82


def test_two_processes_keep_the_same_block_books_as_one(tmp_path, tiny_ckpt_2shards, byte_tokenizer, tiny_ckpt):
    """Under torchrun every rank runs the same scheduler on rank 0's plans: the same block tables,
    prefix-cache hits, chunks and preemptions, so two processes answer what one process generates."""
    llama = Llama.build(str(tiny_ckpt), str(byte_tokenizer), max_seq_len=96, max_batch_size=4, device="cpu",
                        dtype="float32")
    served = helpers.start_server(tmp_path, tiny_ckpt_2shards, byte_tokenizer, nproc=2,
                                  extra=("--kv_cache_tokens", str(KV_TOKENS), "--max_prefill_tokens", "8"))
    try:
        prompts = ["A shared beginning, then one", "A shared beginning, then two", "Something else", "A shared beginning"]
        results = helpers.concurrent_completions(served, prompts, [30, 25, 35, 28], stagger=0.02)
        helpers.check_against_generate(llama, results, prompts, [30, 25, 35, 28])
    finally:
        helpers.stop_server(served)


def test_metrics_ask_their_own_key_not_the_api_key(server):
    url = server.base + "/metrics"
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {helpers.SERVER_KEY}"}, timeout=10).status_code == 401


def test_metrics_are_open_without_a_metrics_key():
    from starlette.testclient import TestClient

    from llama.serve.app import Service, create_app
    from llama.serve.metrics import Metrics

    service = Service(None, None, "api-key", 64, 4, 1024, metrics=Metrics(lambda: {"running": 2, "waiting": 1}))
    with TestClient(create_app(service)) as client:
        r = client.get("/metrics")
    assert r.status_code == 200
    samples = {s.name: s.value for f in text_string_to_metric_families(r.text) for s in f.samples}
    assert samples["llama_running"] == 2 and samples["llama_waiting"] == 1
