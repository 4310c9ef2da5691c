"""Seeded fuzzing: random mutations of params.json and of request arguments each end in a clean
TypeError/ValueError or a correct result, never another exception; and property-based request
bodies against the server each get an OpenAI answer, never a 500 or a dropped connection."""
import json
import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import helpers
from llama import Llama, distributed
from llama.weights import checkpoint, loader
from llama.model import ModelArgs, Transformer

N_PARAMS = 300
N_REQUESTS = 300

WEIRD = ["320", "", [], [64], {}, None, True, False, 0, -1, -64, 0.5, 64.0, math.nan, math.inf, -math.inf, 10**12]


def mutate_params(rng: random.Random) -> dict:
    """TINY_PARAMS with 1-3 keys set to odd values, deleted, scaled or sign-flipped."""
    params = dict(helpers.TINY_PARAMS)
    keys = list(params) + ["multiple_of", "ffn_dim_multiplier", "use_scaled_rope", "rope_scale_factor",
                           "rope_low_freq_factor", "rope_high_freq_factor", "rope_theta", "norm_eps"]
    for _ in range(rng.randint(1, 3)):
        key, op = rng.choice(keys), rng.random()
        if op < 0.15:
            params.pop(key, None)
        elif op < 0.6:
            params[key] = rng.choice(WEIRD)
        elif op < 0.8 and isinstance(params.get(key), (int, float)) and not isinstance(params.get(key), bool):
            params[key] = type(params[key])(params[key] * rng.choice([-1, 0, 2, 0.5, 3]))
        else:
            params[key] = rng.choice([1, 2, 3, 4, 8, 16, 1e-6, 1.3, True])
    return params


@pytest.fixture(scope="module")
def cpu_group():
    distributed.setup(torch.device("cpu"))


def test_params_json_mutations_fail_cleanly_or_build_a_working_model(tmp_path, cpu_group, tiny_ckpt):
    """Each mutated params.json beside the tiny checkpoint's weights: read and checked, then loaded
    (a clean refusal when it no longer matches the weights) and, when small, built from scratch."""
    rng = random.Random(1234)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "consolidated.00.pth").symlink_to(tiny_ckpt / "consolidated.00.pth")
    outcomes = {"refused": 0, "refused by the loader": 0, "loaded": 0, "built": 0}
    for i in range(N_PARAMS):
        params = mutate_params(rng)
        (ckpt / "params.json").write_text(json.dumps(params))  # NaN and inf as JSON writes them
        try:
            args = ModelArgs(**checkpoint.read_params(ckpt), max_seq_len=16, max_batch_size=1)
            args.validate(1)
        except (TypeError, ValueError) as e:
            assert str(e) and "\n" not in str(e), (params, e)
            outcomes["refused"] += 1
            continue
        tokens = torch.randint(0, min(args.vocab_size, 512), (1, 5))
        try:
            model = loader.load_model(ckpt, args, 0, 1, torch.device("cpu"), torch.float32)
        except ValueError as e:  # valid on its own, but not the shape of these weights
            assert "\n" not in str(e), (params, e)
            outcomes["refused by the loader"] += 1
        else:
            assert torch.isfinite(model(tokens, 0)).all(), params
            outcomes["loaded"] += 1
        n_weights = args.vocab_size * args.dim * 2 + args.n_layers * (4 * args.dim**2 + 3 * args.dim * args.ffn_hidden_dim)
        if n_weights <= 2_000_000:  # small enough to build with random weights and run
            torch.manual_seed(i)
            logits = Transformer(args)(tokens, 0)
            assert logits.shape == (1, 5, args.vocab_size), params
            outcomes["built"] += 1
    assert outcomes["refused"] > N_PARAMS // 3 and outcomes["loaded"] > 10 and outcomes["built"] > 10, outcomes
    print(f"params.json mutations ({N_PARAMS}): {outcomes}")


@pytest.fixture(scope="module")
def llama(tiny_ckpt, byte_tokenizer) -> Llama:
    return Llama.build(str(tiny_ckpt), str(byte_tokenizer), max_seq_len=24, max_batch_size=2, device="cpu", dtype="float32")


ODD = [None, -1, 0, 1, 2, 0.5, 1.5, -0.1, math.nan, math.inf, "1", [1], True, 10**9, 3]


def mutate_request(rng: random.Random) -> tuple[str, dict]:
    method = rng.choice(["generate", "stream", "text_completion", "chat_completion"])
    kwargs = {"temperature": rng.choice([0, 0.7]), "top_p": 0.9, "max_gen_len": 3, "seed": 1}
    if method in ("generate", "stream"):
        kwargs["prompt_tokens"] = [[1, 72, 105], [1, 33]]
    elif method == "text_completion":
        kwargs["prompts"] = ["Hi", "there"]
    else:
        kwargs["dialogs"] = [[{"role": "user", "content": "Hi"}]]
    keys = list(kwargs) + ["logprobs"] + (["echo"] if method in ("generate", "text_completion") else [])
    for _ in range(1 if rng.random() < 0.7 else 2):
        key = rng.choice(keys)
        if key == "prompt_tokens":
            kwargs[key] = rng.choice([[], [[]], [[1, 2], "x"], [[-1]], [[512]], [[1.0]], [[True]], "abc",
                                      [[1] * 30], [[1, 2]] * 3, [(1, 2)], ((5, 6),), [[511, 0]]])
        elif key == "prompts":
            kwargs[key] = rng.choice(["abc", [], [3], ["a", None], ["x" * 40], ["", "b"], ("ok",)])
        elif key == "dialogs":
            kwargs[key] = rng.choice([
                [{"role": "user", "content": "Hi"}], [[]], [[{"role": "bot", "content": "x"}]],
                [[{"role": "user", "content": 1}]], [[{"content": "x"}]], "Hi", [["Hi"]],
                [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]],
            ])
        else:
            kwargs[key] = rng.choice(ODD)
    return method, kwargs


def check_result(llama: Llama, method: str, kwargs: dict, result) -> None:
    """A valid request's result has the promised shape: one entry per prompt, ids in the vocabulary,
    at most max_gen_len new tokens, log-probs when asked."""
    limit = llama.model.params.max_seq_len if kwargs["max_gen_len"] is None else kwargs["max_gen_len"]
    if method == "generate":
        tokens, lps = result
        assert len(tokens) == len(kwargs["prompt_tokens"])
        for prompt, t in zip(kwargs["prompt_tokens"], tokens):
            new = t[len(prompt):] if kwargs.get("echo") else t
            assert len(new) <= limit and all(0 <= x < llama.model.params.vocab_size for x in t)
        assert (lps is not None) == kwargs.get("logprobs", False)
    elif method == "stream":
        rows = [tok.index for step in result for tok in step]
        assert all(0 <= r < len(kwargs["prompt_tokens"]) for r in rows)
        assert all(rows.count(r) <= limit for r in set(rows))
    else:
        n = len(kwargs["prompts"] if method == "text_completion" else kwargs["dialogs"])
        assert len(result) == n
        for r in result:
            assert ("logprobs" in r) == kwargs.get("logprobs", False)


def test_request_mutations_fail_cleanly_or_give_a_correct_result(llama):
    rng = random.Random(99)
    outcomes = {"refused": 0, "answered": 0}
    for _ in range(N_REQUESTS):
        method, kwargs = mutate_request(rng)
        call = getattr(llama, method)
        try:
            if method in ("generate", "stream"):
                args = (kwargs.pop("prompt_tokens"), kwargs.pop("max_gen_len"))
                result = call(*args, **kwargs)
                result = list(result) if method == "stream" else result
                kwargs.update(prompt_tokens=args[0], max_gen_len=args[1])
            else:
                result = call(**kwargs)
        except (TypeError, ValueError) as e:
            assert str(e) and "\n" not in str(e), (method, kwargs, e)
            outcomes["refused"] += 1
            continue
        check_result(llama, method, kwargs, result)
        outcomes["answered"] += 1
    assert outcomes["refused"] > N_REQUESTS // 4 and outcomes["answered"] > N_REQUESTS // 6, outcomes
    print(f"request mutations ({N_REQUESTS}): {outcomes}")


# ---------------------------------------------------------------- the server, property-based

N_BODIES = 2000  # most are refused in a few milliseconds; the answered ones ask for 1-4 tokens
ANSWERS = {200, 400, 404, 413, 429}

ODD_JSON = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**30, -1, 0]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["\ud800", "x\udfff", "", "\x00", "\U0001f999", "<|eot_id|>", "user", "assistant", "tool", "m" * 300]),
    st.lists(st.integers(-3, 5000), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.integers(1, 120).map(lambda depth: json.loads("[" * depth + "]" * depth)),
)
MAX_TOKENS = st.sampled_from([None, 0, -1, 5, 10**6, 2**70, "4", 1.5, True, []])
TOOL_CALL = st.fixed_dictionaries({"id": st.text(max_size=5), "type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.text(max_size=8), "arguments": st.one_of(ODD_JSON, st.sampled_from(
        ['{"a": 1}', "{", '{"a": ' + "[" * 3000 + "]" * 3000 + "}", "[]"]))})})
ROLE = st.sampled_from(["system", "user", "assistant", "developer"])
MESSAGE = st.fixed_dictionaries(
    {"role": st.one_of(ROLE, ROLE, ROLE, ODD_JSON), "content": st.one_of(st.text(max_size=30), st.text(max_size=30), ODD_JSON)},
    optional={"tool_call_id": ODD_JSON, "name": ODD_JSON, "tool_calls": st.one_of(ODD_JSON, st.lists(TOOL_CALL, max_size=2))},
)


@st.composite
def request_bodies(draw) -> tuple:
    """(path, body bytes): a valid request of either endpoint with 0-3 fields set to odd values
    (or removed), now and then a body that is not a request at all."""
    chat = draw(st.booleans())
    body = {"model": "llama3-demo", "max_tokens": draw(st.integers(1, 4)), "temperature": draw(st.sampled_from([0, 0.8])),
            "stream": draw(st.booleans())}
    if chat:
        body["messages"] = draw(st.lists(MESSAGE, min_size=1, max_size=3))
    else:
        body["prompt"] = draw(st.one_of(st.text(max_size=40), st.lists(st.text(max_size=10), min_size=1, max_size=3),
                                        st.lists(st.integers(0, 4351), min_size=1, max_size=8)))
    fields = ["model", "temperature", "top_p", "n", "seed", "stop", "logprobs", "top_logprobs", "echo", "user", "tools",
              "tool_choice", "stream_options", "presence_penalty", "logit_bias", "messages", "prompt", "suffix", "best_of"]
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(fields + [draw(st.text(max_size=6))]))
        if draw(st.integers(0, 5)) == 0:
            body.pop(name, None)
        else:
            body[name] = draw(st.one_of(ODD_JSON, st.integers(1, 3), st.lists(MESSAGE, max_size=2)))
    body["max_tokens"] = draw(st.one_of(st.just(body["max_tokens"]), MAX_TOKENS)) if draw(st.booleans()) else body["max_tokens"]
    raw = json.dumps(body).encode()
    kind = draw(st.integers(0, 19))
    if kind == 0:
        raw = draw(st.sampled_from([b"", b"{", b"\xff\xfe", b"[]", b"null", b'"\\ud800"', b"{" * 10000, raw[: len(raw) // 2]]))
    elif kind == 1:
        raw = json.dumps(draw(ODD_JSON)).encode()
    return ("/v1/chat/completions" if chat else "/v1/completions"), raw


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    served = helpers.start_server(tmp_path_factory.mktemp("fuzz"), None, None, max_seq_len=64,
                                  extra=("--max_request_bytes", "100000"))
    yield served
    helpers.stop_server(served)


def check_answer(r: "httpx.Response", stream: bool) -> None:
    assert r.status_code in ANSWERS, (r.status_code, r.text[:500])
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text[:500]
    elif stream:
        lines = [line for line in r.text.split("\n") if line]
        assert lines[-1] == "data: [DONE]", lines[-3:]
        assert all(json.loads(line[6:]).get("error") is None for line in lines[:-1]), lines
    else:
        assert r.json()["choices"], r.text[:500]


def test_generated_requests_get_an_openai_answer_and_leave_the_server_as_it_was(demo_server):
    """Property: whatever the body, the answer is 200 (a whole answer or stream) or an OpenAI
    error (400, 404, 413, 429), never a 500 or a dropped connection; afterwards the server
    answers the same greedy text as before and holds no row."""
    import httpx

    headers = {"Authorization": f"Bearer {helpers.SERVER_KEY}", "Content-Type": "application/json"}
    probe = {"model": demo_server.model, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    statuses: dict = {}
    with httpx.Client(base_url=demo_server.base, headers=headers, timeout=60) as http:
        before = http.post("/v1/completions", json=probe).json()["choices"][0]["text"]

        @settings(max_examples=N_BODIES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(request_bodies())
        def answered(request):
            path, raw = request
            r = http.post(path, content=raw)
            stream = b'"stream": true' in raw
            check_answer(r, stream)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        answered()
        after = http.post("/v1/completions", json=probe).json()["choices"][0]["text"]
    assert after == before
    assert demo_server.health() == {"status": "ok", "running": 0, "waiting": 0, "sequences": 0}
    assert statuses.get(200, 0) > N_BODIES // 20 and statuses.get(400, 0) > N_BODIES // 2, statuses
    print(f"generated requests ({N_BODIES}): {statuses}")
