"""Defence in depth, in process: a sequence that fails while it is admitted or stepped fails its own
request (a 500 with OpenAI's error body, or an error event and [DONE] in a stream), is logged
once with its cause, and leaves the engine and every other request running."""
import json
import logging

import pytest
from fastapi.testclient import TestClient

import helpers
from llama import Llama
from llama.serve.app import Service, create_app
from llama.serve.loop import EngineLoop
from llama.serve.responses import Shaper

ADMIT_FAILS, STEP_FAILS = 0.5, 0.25  # top_p values that mark the requests to break


@pytest.fixture(scope="module")
def llama(tiny_ckpt, byte_tokenizer) -> Llama:
    return Llama.build(str(tiny_ckpt), str(byte_tokenizer), max_seq_len=64, max_batch_size=4, device="cpu", dtype="float32")


@pytest.fixture
def client(llama):
    engine = llama.engine(4, 64)
    add, advance = engine.add, engine.runner._advance

    def failing_add(request, seq_id=None):
        if request.top_p == ADMIT_FAILS:
            raise RuntimeError("admission broke")
        return add(request, seq_id)

    def failing_advance(s, token, logprob, top):
        if s.request.top_p == STEP_FAILS and len(s.tokens) == 2:
            raise KeyError("step broke")
        return advance(s, token, logprob, top)

    engine.add, engine.runner._advance = failing_add, failing_advance
    loop = EngineLoop(engine, 16)
    loop.start()
    service = Service(Shaper(llama.tokenizer, llama.formatter, "m"), loop, None, 64, 16, 1 << 20)
    with TestClient(create_app(service)) as http:
        yield http
    loop.stop()


def complete(client, top_p: float, stream: bool = False):
    body = {"model": "m", "prompt": "isolate", "max_tokens": 6, "temperature": 0, "top_p": top_p, "stream": stream}
    if not stream:
        return client.post("/v1/completions", json=body)
    with client.stream("POST", "/v1/completions", json=body) as r:
        return [line for line in r.iter_lines() if line]


def test_a_failing_sequence_fails_its_request_alone(client, llama, caplog):
    want = llama.tokenizer.decode(helpers.alone(llama, "isolate", 6))
    with caplog.at_level(logging.ERROR, logger="llama.serve"):
        for top_p, cause in ((ADMIT_FAILS, "RuntimeError"), (STEP_FAILS, "KeyError")):
            r = complete(client, top_p)
            assert r.status_code == 500, r.text
            error = r.json()["error"]
            assert error["type"] == "server_error" and cause in error["message"]
            lines = complete(client, top_p, stream=True)
            assert lines[-1] == "data: [DONE]" and cause in json.loads(lines[-2][6:])["error"]["message"]
            assert complete(client, 0.9).json()["choices"][0]["text"] == want  # the others go on
    failures = [r for r in caplog.records if "failed alone" in r.getMessage()]
    assert len(failures) == 4 and all(r.exc_info for r in failures)  # once per failed request, with its cause
    assert client.get("/health").json() == {"status": "ok", "running": 0, "waiting": 0, "sequences": 0}
