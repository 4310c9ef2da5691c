"""The OpenAI-compatible server, started in a subprocess on a free loopback port and spoken to
through the official `openai` client (raw HTTP only where that client cannot send the request:
malformed JSON, and a client that drops its connection)."""
import concurrent.futures
import json
import subprocess
import sys
import time

import httpx
import openai
import psutil
import pytest
import torch

import helpers
from llama import Llama
from llama.weights.save import save_checkpoint
from llama.chat_format import to_dialog, tool_prompt

KEY = helpers.SERVER_KEY
MAX_SEQ_LEN = 96


@pytest.fixture(scope="module")
def server(tiny_ckpt, byte_tokenizer, tmp_path_factory):
    served = helpers.start_server(tmp_path_factory.mktemp("server"), tiny_ckpt, byte_tokenizer)
    yield served
    helpers.stop_server(served)


@pytest.fixture(scope="module")
def llama(tiny_ckpt, byte_tokenizer) -> Llama:
    return Llama.build(str(tiny_ckpt), str(byte_tokenizer), max_seq_len=MAX_SEQ_LEN, max_batch_size=4, device="cpu", dtype="float32")


PROMPTS = ["Hello", "A rather longer prompt, to make lengths differ", "mid-sized one", "x", "Batching", "The end is near"]
LENGTHS = [24, 9, 17, 30, 5, 12]


def test_concurrent_requests_each_get_what_generate_gives_them_alone(server, llama):
    prompts = PROMPTS[:5] + [llama.tokenizer.encode(PROMPTS[5], bos=True, eos=False)]  # token ids too
    results = helpers.concurrent_completions(server, prompts, LENGTHS)
    helpers.check_against_generate(llama, results, prompts, LENGTHS)
    assert results[0].usage.prompt_tokens == len(llama.tokenizer.encode(PROMPTS[0], bos=True, eos=False))


def test_models_and_several_prompts_and_n(server, llama):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [server.model]
    r = client.completions.create(model=server.model, prompt=["one", "two"], n=2, max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == llama.tokenizer.decode(helpers.alone(llama, "one", 6))
    assert r.choices[2].text == llama.tokenizer.decode(helpers.alone(llama, "two", 6))


def test_streamed_deltas_join_to_the_whole_answer(server):
    client = server.client()
    kwargs = dict(model=server.model, max_tokens=20, temperature=0)
    whole = client.completions.create(prompt="Stream me", **kwargs).choices[0]
    chunks = list(client.completions.create(prompt="Stream me", stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason and whole.finish_reason is not None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    whole = client.chat.completions.create(messages=messages, **kwargs).choices[0]
    chunks = [c for c in client.chat.completions.create(messages=messages, stream=True, **kwargs) if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_chat_answers_the_formatted_dialog(server, llama):
    messages = [{"role": "user", "content": "What is up?"}, {"role": "assistant", "content": "Not much."},
                {"role": "user", "content": "Really?"}]
    r = server.client().chat.completions.create(model=server.model, messages=messages, max_tokens=10, temperature=0)
    prompt = llama.formatter.encode_dialog_prompt(messages)
    want = llama.generate([prompt], max_gen_len=10, temperature=0)[0][0]
    assert r.choices[0].message.content == llama.tokenizer.decode(want)
    assert r.usage.prompt_tokens == len(prompt)


def test_stop_strings_cut_the_answer(server):
    client = server.client()
    kwargs = dict(model=server.model, prompt="Stop strings", max_tokens=24, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    stop = full[6:9]
    r = client.completions.create(stop=[stop, "\x00never"], **kwargs).choices[0]
    assert r.text == full[: full.index(stop)] and r.finish_reason == "stop"
    streamed = list(client.completions.create(stop=stop, stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in streamed) == r.text


def test_seed_makes_sampling_reproducible(server):
    client = server.client()
    kwargs = dict(model=server.model, prompt="Sampled", max_tokens=16, temperature=1.0, top_p=0.95)
    a = client.completions.create(seed=5, **kwargs).choices[0].text
    b = client.completions.create(seed=5, **kwargs).choices[0].text
    c = client.completions.create(seed=6, **kwargs).choices[0].text
    assert a == b and a != c


def test_logprobs_with_echo_are_the_prompts_log_probs(server, llama):
    prompt = "Score this"
    r = server.client().completions.create(model=server.model, prompt=prompt, max_tokens=1, temperature=0, logprobs=2, echo=True)
    lp = r.choices[0].logprobs
    tokens = llama.tokenizer.encode(prompt, bos=True, eos=False)
    gen = helpers.alone(llama, prompt, 1)
    seq = tokens + gen
    llama.model.free_cache()
    lsm = torch.log_softmax(llama.model(torch.tensor([seq]), 0)[0], dim=-1)
    want = lsm[:-1].gather(1, torch.tensor(seq[1:])[:, None])[:, 0].tolist()
    assert r.choices[0].text == llama.tokenizer.decode(seq)
    assert lp.tokens == [llama.tokenizer.decode([t]) for t in seq]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    # as lm-eval's local-completions reads it: is each token the likeliest one?
    greedy = [max(top, key=top.get) == tok for tok, top in zip(lp.tokens[1:], lp.top_logprobs[1:])]
    assert greedy == (lsm[:-1].argmax(-1) == torch.tensor(seq[1:])).tolist()
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])


def test_echo_logprobs_keep_the_stop_token_that_ended_the_answer(byte_tokenizer):
    """lm-eval's local-completions asks echo with max_tokens 1 and drops the last logprobs entry as the
    generated token's; when the model stops at once, that entry is the stop token's (not in the
    text), else the prompt's last token would be dropped from the score instead."""

    from llama.engine import Event
    from llama.serve.responses import Choice, Shaper
    from llama.tokenizer import Tokenizer

    tok = Tokenizer(str(byte_tokenizer))
    server = Shaper(tok, None, "m")
    prompt = tok.encode("ab", bos=True, eos=False)
    c = Choice()
    c.add(Event(0, tok.eos_id, "", logprob=-0.5, top_logprobs=[(tok.eos_id, -0.5)], finished=True, finish_reason="stop",
                prompt_logprobs=[None, -1.0, -2.0], prompt_top_logprobs=[None, [(97, -1.0)], [(1, -0.1)]]),
          server.stop_tokens)
    lp = server.completion_logprobs(c, prompt, 0)
    assert c.text == "" and c.tokens == []  # the stop token is no part of the answer
    assert lp["token_logprobs"] == [None, -1.0, -2.0, -0.5] and lp["tokens"][-1] == tok.decode([tok.eos_id])
    assert sum(lp["token_logprobs"][1:-1]) == -3.0  # what local-completions sums for continuation "ab"


def test_errors_are_openai_errors(server):
    client = server.client()
    m = server.model
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.post("/no/such/route", cast_to=object, body={})
    bad = [dict(prompt="x", max_tokens="ten"), dict(prompt="x", temperature=-1), dict(prompt=[], max_tokens=1),
           dict(prompt=[[1, 2], [10**6]]), dict(prompt="x", n=0), dict(prompt="x", logprobs=99),
           dict(prompt="x" * MAX_SEQ_LEN), dict(prompt="x", max_tokens=MAX_SEQ_LEN), dict(prompt="x", stop=[""])]
    for kwargs in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=m, **kwargs)
        assert set(e.value.body) == {"message", "type", "param", "code"}, kwargs
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=m, messages=[{"role": "wizard", "content": "x"}])
    assert e.value.body["param"] == "messages[0]"
    # what the server would not honour is refused, not dropped: through the official client as a user sends it
    refused = [(client.chat.completions.create, dict(messages=[{"role": "user", "content": "x"}],
                                                     extra_body={"frobnicate_level": 3}), "frobnicate_level"),
               (client.completions.create, dict(prompt="x", extra_body={"repetition_penalty": 1.1}), "repetition_penalty"),
               (client.chat.completions.create, dict(messages=[{"role": "user", "content": "x"}],
                                                     reasoning_effort="low"), "reasoning_effort"),
               (client.chat.completions.create, dict(messages=[{"role": "user", "content": "x"}], store=True), "store"),
               (client.chat.completions.create, dict(messages=[{"role": "user", "content": "x"}], tool_choice="required"),
                "tool_choice")]
    for create, kwargs, param in refused:
        with pytest.raises(openai.BadRequestError) as e:
            create(model=m, max_tokens=2, **kwargs)
        assert e.value.body["param"] == param and param in e.value.body["message"], e.value.body
    text = client.chat.completions.create(model=m, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                          response_format={"type": "text"})
    assert text.choices[0].finish_reason == "length"
    r = httpx.post(server.base + "/v1/completions", content=b'{"model": "x", "prompt": ',
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_a_full_queue_answers_429_with_retry_after(server):
    client = server.client()
    long = dict(model=server.model, prompt="Fill the queue", max_tokens=80, temperature=0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.completions.create, n=12, **long)
        deadline = time.time() + 10
        while server.health()["sequences"] < 12 and time.time() < deadline:
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(n=8, **long)
        assert e.value.response.headers["retry-after"] == "1"
        assert len(first.result().choices) == 12
    # more prompts in one request than the queue holds: never admitted, so a 400, not "retry shortly"
    with pytest.raises(openai.BadRequestError, match=r"asks for 17 sequences \(17 prompts, n 1\), more than .*--max_queue 16"):
        client.completions.create(model=server.model, prompt=["x"] * 17, max_tokens=1)


def test_many_malformed_requests_leave_it_serving(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bodies = [b"{", b"[]", b"null", b'{"model": 3}', b'{"model": "%s", "prompt": {}}' % server.model.encode(),
              b'{"model": "%s", "messages": "hi"}' % server.model.encode(), b"\xff\xfe", b'{"a": ' * 50]
    with httpx.Client(base_url=server.base, headers=headers, timeout=30) as http:
        for i in range(500):
            path = "/v1/chat/completions" if i % 2 else "/v1/completions"
            r = http.post(path, content=bodies[i % len(bodies)])
            assert 400 <= r.status_code < 500 and "error" in r.json(), (r.status_code, r.text)
    r = server.client().completions.create(model=server.model, prompt="still here", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def wait_idle(served: helpers.Served, timeout: float = 10) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = served.health()
        if h["running"] == 0 and h["waiting"] == 0 and h["sequences"] == 0:
            return h
        time.sleep(0.05)
    return served.health()


def test_clients_that_go_away_leave_no_row_behind(server, tmp_path):
    body = {"model": server.model, "prompt": "long", "max_tokens": 90, "temperature": 0}
    headers = {"Authorization": f"Bearer {KEY}"}
    # a client process killed mid-stream, and one killed while it waits for a whole answer
    script = tmp_path / "client.py"
    script.write_text(
        "import sys, openai\n"
        f"c = openai.OpenAI(base_url='{server.base}/v1', api_key='{KEY}', max_retries=0)\n"
        "if sys.argv[1] == 'stream':\n"
        f"    for chunk in c.completions.create(stream=True, **{body!r}):\n"
        "        print('chunk', flush=True)\n"
        f"else:\n    c.completions.create(**{body!r})\n"
    )
    killed = []
    for mode in ("stream", "whole"):
        p = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE, env=helpers.child_env(), text=True)
        if mode == "stream":
            assert p.stdout.readline().strip() == "chunk"
        else:
            deadline = time.time() + 20
            while server.health()["running"] == 0 and time.time() < deadline:
                time.sleep(0.02)
        p.kill()
        p.wait()
        killed.append(p)
    # and a connection dropped after two chunks
    with httpx.stream("POST", server.base + "/v1/completions", json={**body, "stream": True}, headers=headers) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 2:
                break
    assert wait_idle(server) == {"status": "ok", "running": 0, "waiting": 0, "sequences": 0}


@pytest.fixture(scope="module")
def bigram_ckpt(tmp_path_factory, byte_tokenizer) -> tuple:
    """A tiny model whose next token depends only on the current one (its blocks add nothing):
    after the assistant header's newline it writes <|python_tag|>print(42)<|eom_id|>."""
    from llama.tokenizer import Tokenizer

    tok = Tokenizer(str(byte_tokenizer))
    params = dict(helpers.TINY_PARAMS)
    sd = helpers.random_state_dict(params, seed=3)
    for key in sd:
        if key.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            sd[key].zero_()
    sd["norm.weight"].fill_(1.0)
    emb = sd["tok_embeddings.weight"]
    normed = emb * torch.rsqrt(emb.pow(2).mean(-1, keepdim=True) + params["norm_eps"])
    chain = [ord("\n"), tok.python_tag_id, *map(ord, "print(42)"), tok.eom_id]
    out = torch.zeros_like(sd["output.weight"])
    for a, b in zip(chain, chain[1:]):
        out[b] = 50 * normed[a]
    sd["output.weight"] = out
    path = tmp_path_factory.mktemp("bigram")
    save_checkpoint(sd, params, path)
    return path, tok


def test_tools_become_the_tool_prompt_and_calls_come_back_as_tool_calls(tmp_path, bigram_ckpt, byte_tokenizer):
    ckpt, tok = bigram_ckpt
    served = helpers.start_server(tmp_path, ckpt, byte_tokenizer, max_seq_len=1024)  # the tool prompt, a byte per token
    try:
        client = served.client()
        messages = [{"role": "user", "content": "What is 6 times 7?"}]
        tools = [{"type": "function", "function": {"name": "calc", "description": "arithmetic",
                                                   "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}}}}]
        r = client.chat.completions.create(model=served.model, messages=messages, tools=tools, temperature=0, max_tokens=20)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        call = choice.message.tool_calls[0]
        assert call.function.name == "code_interpreter" and json.loads(call.function.arguments) == {"code": "print(42)"}
        from llama.tokenizer import ChatFormat

        prompt = ChatFormat(tok).encode_dialog_prompt(to_dialog(messages, tools))
        assert r.usage.prompt_tokens == len(prompt)
        assert tok.decode(prompt).count(tool_prompt(tools)) == 1
        streamed = [c for c in client.chat.completions.create(model=served.model, messages=messages, tools=tools,
                                                              temperature=0, max_tokens=20, stream=True) if c.choices]
        assert streamed[-1].choices[0].finish_reason == "tool_calls"
        assert json.loads(streamed[-1].choices[0].delta.tool_calls[0].function.arguments) == {"code": "print(42)"}
        # the tool's answer goes back as a "tool" message (Llama 3.1's ipython turn)
        follow = messages + [choice.message.model_dump(exclude_none=True),
                             {"role": "tool", "tool_call_id": call.id, "content": "42"}]
        r = client.chat.completions.create(model=served.model, messages=follow, tools=tools, temperature=0, max_tokens=5)
        assert r.usage.prompt_tokens > len(prompt)
        plain = client.chat.completions.create(model=served.model, messages=messages, temperature=0, max_tokens=20)
        assert plain.choices[0].message.content == "<|python_tag|>print(42)" and plain.choices[0].finish_reason == "stop"
    finally:
        helpers.stop_server(served)


def test_two_processes_serve_what_one_process_generates_and_a_dead_rank_ends_it(tmp_path, tiny_ckpt_2shards, byte_tokenizer, llama):
    served = helpers.start_server(tmp_path, tiny_ckpt_2shards, byte_tokenizer, nproc=2)
    try:
        results = helpers.concurrent_completions(served, PROMPTS, LENGTHS)
        helpers.check_against_generate(llama, results, PROMPTS, LENGTHS)
        rank1 = [p for p in psutil.Process(served.proc.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
        assert len(rank1) == 1
        client = served.client(timeout=30)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            load = [pool.submit(lambda: list(client.completions.create(model=served.model, prompt="under load", max_tokens=80,
                                                                        temperature=0, stream=True))) for _ in range(4)]
            time.sleep(0.5)
            killed_at = time.time()
            rank1[0].kill()
            served.proc.wait(timeout=30)
            assert time.time() - killed_at < 30
            for f in load:  # every client hears of it: an error or a cut stream, never a hang
                try:
                    f.result(timeout=30)
                except (openai.APIError, httpx.HTTPError):
                    pass
        assert served.proc.returncode != 0
        assert "error: the engine stopped" in served.output()  # rank 0 saw it and said so
    finally:
        helpers.stop_server(served)


def test_listening_beyond_localhost_without_a_key_warns(caplog):
    from llama.serve.cli import warn_if_open

    with caplog.at_level("WARNING", logger="llama.serve.cli"):
        warn_if_open("127.0.0.1", None)
        warn_if_open("0.0.0.0", "a key")
        assert not caplog.records
        warn_if_open("0.0.0.0", None)
    assert "without an API key" in caplog.text


def test_quantize_serves_what_the_quantized_generator_generates(tmp_path, tiny_ckpt, byte_tokenizer):
    """--quantize reaches Llama.build: greedy answers equal a generator quantized the same way."""
    served = helpers.start_server(tmp_path, tiny_ckpt, byte_tokenizer, extra=("--quantize", "int8"))
    try:
        quantized = Llama.build(str(tiny_ckpt), str(byte_tokenizer), MAX_SEQ_LEN, 4, dtype="float32", quantize="int8")
        got = served.client().completions.create(model=served.model, prompt=PROMPTS[0], max_tokens=8, temperature=0)
        want = helpers.alone(quantized, PROMPTS[0], 8)
        assert got.choices[0].text == quantized.tokenizer.decode(want)
        assert "quantized (int8" in served.output()  # the server's own load line says so
    finally:
        helpers.stop_server(served)
