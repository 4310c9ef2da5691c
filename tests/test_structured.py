"""Structured outputs (llama/structured.py through the engine): every answer of the bundled demo model
held to a JSON schema parses and validates with `jsonschema` (greedy and sampled, several seeds);
rows without a constraint are untouched by the ones with; the draft model and two processes give
the tokens one process gives alone; top-k and min-p."""
import importlib.util
import json
from typing import List

import jsonschema
import pytest
import torch

import helpers
from llama import demo, structured
from llama.engine import Request, SequenceState
from llama.sampling import filter_logits
from llama.tokenizer import ChatFormat, Tokenizer

_spec = importlib.util.spec_from_file_location("structured_worker", helpers.REPO / "tests" / "workers" / "structured.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

SCHEMAS = {
    "nested_enum_range": {"type": "object", "properties": {
        "kind": {"enum": ["cat", "dog", "bird"]},
        "owner": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                   "age": {"type": "integer", "minimum": 18, "maximum": 99}},
                  "required": ["name", "age"], "additionalProperties": False}},
        "required": ["kind", "owner"], "additionalProperties": False},
    "array_bounds": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 2, "maxItems": 3},
        "count": {"type": "integer", "minimum": -5, "maximum": 5}},
        "required": ["tags", "count"], "additionalProperties": False},
    "anyof_pattern": {"type": "object", "properties": {
        "id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}]},
        "code": {"type": "string", "pattern": "^[a-f0-9]{4}$"}, "ok": {"type": "boolean"}},
        "required": ["id", "code", "ok"], "additionalProperties": False},
    "json_object": None,
}
PROMPT = [{"role": "user", "content": "Answer in JSON."}]


def response_format(name: str) -> dict:
    if SCHEMAS[name] is None:
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


@pytest.fixture(scope="module")
def llama():
    return worker.build()


def run(llama, requests: List[Request]) -> List[SequenceState]:
    engine = llama.engine(len(requests), 160)
    ids = [engine.add(r) for r in requests]
    for _ in engine.run():
        pass
    return [engine.pop(i) for i in ids]


def check_answer(s: SequenceState, name: str, tok: Tokenizer) -> None:
    assert s.finish_reason == "stop" and s.stop_token == tok.eot_id, (s.finish_reason, tok.decode(s.tokens))
    value = json.loads(tok.decode(s.tokens[:-1]))
    jsonschema.validate(value, SCHEMAS[name] or {"type": "object"})


def test_every_answer_parses_and_validates(llama):
    """4 schemas x (greedy, 2 seeds sampled over the whole vocabulary, at temperature 1 where the
    schema bounds the answer, and one seed with top-k and min-p) in one batch: each answer ends on
    <|eot_id|> where its JSON ends and validates."""
    prompt = llama.formatter.encode_dialog_prompt(PROMPT)
    cases = []
    for name in SCHEMAS:
        rf = response_format(name)
        cases += [(name, Request(prompt, 64, temperature=0, response_format=rf))]
        # any JSON object has no bound on its length: sampled cooler, so that it closes within max_tokens
        temperature = 0.5 if SCHEMAS[name] is None else 1.0
        cases += [(name, Request(prompt, 64, temperature=temperature, top_p=1.0, seed=s, response_format=rf)) for s in (0, 1)]
        cases += [(name, Request(prompt, 64, temperature=1.0, top_p=0.9, top_k=20, min_p=0.05, seed=2, response_format=rf))]
    for (name, _), s in zip(cases, run(llama, [r for _, r in cases])):
        check_answer(s, name, llama.tokenizer)


def test_unconstrained_rows_are_unchanged_and_max_tokens_cuts_first(llama):
    """Free rows (greedy and seeded sampling) beside constrained ones give, token for token, what
    they give alone; a constrained answer cut by max_tokens ends with "length"."""
    prompt = llama.formatter.encode_dialog_prompt(PROMPT)
    free = [Request(prompt, 24, temperature=0), Request(prompt, 24, temperature=0.8, seed=3)]
    alone = [s.tokens for s in run(llama, free)]
    mixed = run(llama, [free[0], Request(prompt, 3, temperature=0, response_format=response_format("array_bounds")),
                        free[1], Request(prompt, 40, temperature=0.5, seed=1, response_format={"type": "json_object"})])
    assert [mixed[0].tokens, mixed[2].tokens] == alone
    assert mixed[1].finish_reason == "length" and len(mixed[1].tokens) == 3
    check_answer(mixed[3], "json_object", llama.tokenizer)


def test_draft_model_gives_the_same_greedy_tokens(llama):
    """Speculative decoding with the bundled draft: the grammar walks and rolls back the proposals,
    and greedy answers are the tokens of decoding without the draft."""
    plain = llama
    spec = worker.build(draft_ckpt_dir=str(demo.DRAFT_DIR), speculate_k=4)
    prompts = [plain.formatter.encode_dialog_prompt([{"role": "user", "content": p}]) for p in worker.PROMPTS]
    want, _ = plain.generate(prompts, 48, temperature=0, response_format=response_format("nested_enum_range"))
    got, _ = spec.generate(prompts, 48, temperature=0, response_format=response_format("nested_enum_range"))
    assert got == want and spec.speculator.accepted > 0
    fmt = response_format("array_bounds")
    sampled = run(spec, [Request(prompts[0], 48, temperature=1.0, top_p=1.0, seed=1, response_format=fmt)])
    check_answer(sampled[0], "array_bounds", spec.tokenizer)


def test_two_processes_give_the_tokens_of_one(tmp_path, llama):
    """Every rank runs the same grammar over the same tokens: torchrun on 2 processes (the demo
    model split in two, gloo) answers what one process answers."""
    out = tmp_path / "two.pt"
    r = helpers.run_torchrun(str(helpers.REPO / "tests" / "workers" / "structured.py"), [out], 2)
    assert r.returncode == 0, r.stderr[-3000:]
    two = torch.load(out)
    assert two == worker.answers(llama)
    for tokens in two:
        jsonschema.validate(json.loads(llama.tokenizer.decode(tokens)), worker.SCHEMA)


def test_matcher_rolls_back_and_ends_on_the_stop_token():
    tok = Tokenizer(str(demo.TOKENIZER_PATH))
    m = structured.matcher(tok, response_format("array_bounds"), tok.stop_tokens)
    tokens = tok.encode('{"tags":["ab","cd"],"count":-3}', bos=False, eos=False)
    masks = []
    for t in tokens:
        masks.append(m.allowed(tok.n_words + 8))
        assert masks[-1][t] and m.consume(t)
    end = m.allowed(tok.n_words + 8)
    assert end.nonzero().flatten().tolist() == [tok.eot_id] and m.finished
    assert m.consume(tok.eot_id) and not m.consume(5)  # past the end: refused
    m.rollback(2 + 4)
    assert torch.equal(m.allowed(tok.n_words + 8), masks[-4])
    for t in tokens[-4:]:
        assert m.consume(t)
    assert torch.equal(m.allowed(tok.n_words + 8), end)
    # a custom stop token takes <|eot_id|>'s place
    m = structured.matcher(tok, {"type": "json_object"}, [tok.eos_id])
    assert all(m.consume(t) for t in tok.encode("{}", bos=False, eos=False))
    assert m.allowed(tok.n_words).nonzero().flatten().tolist() == [tok.eos_id]


@pytest.mark.parametrize("bad, names", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}, "not"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(a"}}}, "unclosed group"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/defs/none"}}}, "/defs/none"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strictly": True}}, "json_schema.strictly"),
    ({"type": "json_schema"}, "json_schema is required"),
    ({"type": "yaml"}, "response_format.type"),
    ({"type": "json_object", "schema": {}}, "'schema'"),
])
def test_what_cannot_be_followed_is_a_value_error_naming_it(bad, names):
    with pytest.raises(ValueError, match=names):
        structured.check_response_format(bad)


def test_tool_call_format_is_read_back_as_a_tool_call():
    """tool_choice's constraint: the Llama 3.1 custom call JSON, which ChatFormat parses as a ToolCall."""
    tok = Tokenizer(str(demo.TOKENIZER_PATH))
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 6}}, "required": ["city"], "additionalProperties": False}}} for n in ("a", "b")]
    fmt = structured.tool_call_format(tools, "b")
    m = structured.matcher(tok, fmt, tok.stop_tokens)
    text = '{"name":"b","parameters":{"city":"Oslo"}}'
    assert all(m.consume(t) for t in tok.encode(text, bos=False, eos=False)) and m.finished
    m = structured.matcher(tok, fmt, tok.stop_tokens)
    assert not all(m.consume(t) for t in tok.encode(text.replace('"b"', '"a"'), bos=False, eos=False))  # not the named one
    call = ChatFormat(tok).decode_assistant_message(tok.encode(text, bos=False, eos=False) + [tok.eot_id], "end_of_turn")
    assert call["tool_calls"][0].tool_name == "b" and call["tool_calls"][0].arguments == {"city": "Oslo"}
    with pytest.raises(ValueError, match="'c'"):
        structured.tool_call_format(tools, "c")


def test_top_k_and_min_p():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, 1.0, top_k=2)).tolist() == [[False, False, True, True]]
    # min_p 0.3 at temperature 1: p_i / p_max = e^(l_i - 3) >= 0.3 keeps logits within 1.2 of the top
    assert torch.isinf(filter_logits(logits, 1.0, min_p=0.3)).tolist() == [[False, False, True, True]]
    assert filter_logits(logits, 1.0) is logits


# ---------------------------------------------------------------- the server, in process, through the openai client


@pytest.fixture(scope="module")
def openai_client(llama):
    from fastapi.testclient import TestClient
    import openai

    from llama.serve.app import Service, create_app
    from llama.serve.loop import EngineLoop
    from llama.serve.responses import Shaper

    loop = EngineLoop(llama.engine(4, 384), 16)
    loop.start()
    service = Service(Shaper(llama.tokenizer, llama.formatter, "demo"), loop, None, 384, 16, 1 << 20)
    with TestClient(create_app(service)) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
    loop.stop()


def test_server_answers_follow_the_schema(openai_client):
    messages = [{"role": "user", "content": "Describe a pet."}]
    fmt = response_format("nested_enum_range")
    r = openai_client.chat.completions.create(model="demo", messages=messages, response_format=fmt, n=3, temperature=1.0,
                                              seed=11, max_tokens=64)
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), SCHEMAS["nested_enum_range"])
    chunks = openai_client.chat.completions.create(model="demo", messages=messages, response_format=fmt, temperature=0,
                                                   max_tokens=64, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(streamed), SCHEMAS["nested_enum_range"])
    text = openai_client.completions.create(model="demo", prompt="JSON:", max_tokens=48, temperature=0.9, seed=2,
                                            extra_body={"top_k": 50, "min_p": 0.02, "response_format": response_format("array_bounds")})
    jsonschema.validate(json.loads(text.choices[0].text), SCHEMAS["array_bounds"])


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "time", "parameters": TIME}}]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "time"}}], ids=["required", "named"])
def test_tool_choice_always_returns_a_valid_call(openai_client, choice):
    messages = [{"role": "user", "content": "What now?"}]
    r = openai_client.chat.completions.create(model="demo", messages=messages, tools=TOOLS, tool_choice=choice, n=3,
                                              temperature=1.0, seed=4, max_tokens=64)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1, c.message
        call = c.message.tool_calls[0].function
        assert call.name in schemas and (choice == "required" or call.name == "time")
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])
