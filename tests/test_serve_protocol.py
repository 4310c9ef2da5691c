"""The server's request schema (llama/serve/protocol.py) and the OpenAI <-> Llama 3.1 chat
translation (llama/chat_format.py), without a server: each field that cannot be served is a 400
naming it, and what passes can be formatted."""
import json

import pytest

import helpers
from llama.chat_format import openai_tool_calls, to_dialog, tool_prompt
from llama.serve import protocol
from llama.serve.protocol import MAX_DEPTH, SEED_MAX, SEED_MIN, APIError
from llama.tokenizer import ToolCall

MODEL, VOCAB, QUEUE = "m", 512, 16


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "hi", **fields}


def check(body, is_chat: bool) -> dict:
    return protocol.check_request(body, is_chat, MODEL, VOCAB, QUEUE)


def refused(body, is_chat: bool, status: int = 400) -> APIError:
    with pytest.raises(APIError) as e:
        check(body, is_chat)
    assert e.value.status == status, e.value.message
    json.dumps(e.value.body()).encode("ascii")  # always encodable
    return e.value


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize("seed, n, ok", [
    (SEED_MAX, 1, True), (SEED_MIN, 4, True), (SEED_MAX - 1, 2, True),
    (2**80, 1, False), (SEED_MIN - 1, 1, False), (SEED_MAX, 2, False),
])
def test_the_seed_stays_in_the_generators_range_for_every_choice(seed, n, ok):
    for is_chat, body in ((True, chat(seed=seed, n=n)), (False, completion(seed=seed, n=n))):
        if ok:
            assert check(body, is_chat)["seed"] == seed
        else:
            assert refused(body, is_chat).param == "seed"
    if seed == SEED_MAX and n == 1:  # two prompts are two choices too: seed and seed + 1
        assert refused(completion(seed=seed, prompt=["a", "b"]), False).param == "seed"


@pytest.mark.parametrize("role", [["user"], {"a": 1}, 3, None, "wizard"])
def test_a_role_that_is_no_known_string_is_a_400_naming_the_message(role):
    e = refused(chat(messages=[{"role": role, "content": "x"}]), True)
    assert e.param == "messages[0]" and "role" in e.message


def test_tool_call_arguments_nested_too_deep_are_a_400_naming_them():
    deep = "[" * 5000 + "]" * 5000
    for arguments in (json.dumps({"x": json.loads("[" * 500 + "]" * 500)}), '{"x": ' + deep + "}"):
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
        e = refused(chat(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call]}]), True)
        assert e.param.startswith("messages[1].tool_calls[0]"), e.param
    ok = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": json.dumps(nested(MAX_DEPTH - 5))}}
    check(chat(messages=[{"role": "assistant", "tool_calls": [ok]}]), True)


def test_the_body_nesting_and_lone_surrogates_are_400s_naming_where():
    with pytest.raises(APIError) as e:
        protocol.parse_body(json.dumps(chat(metadata=nested(MAX_DEPTH + 1))).encode())
    assert e.value.param.startswith("metadata.a.a")
    for body, where in ((b'{"model": "\\ud800"}', "model"), (b'{"model": "m", "prompt": ["ok", "x\\udfff"]}', "prompt[1]"),
                        (b'{"model": "m", "messages": [{"role": "user", "content": "\\ud83d"}]}', "messages[0].content"),
                        (b'"\\ud800"', "body")):
        with pytest.raises(APIError) as e:
            protocol.parse_body(body)
        assert e.value.status == 400 and e.value.param == where, (body, e.value.param)
        json.dumps(e.value.body()).encode("ascii")
    assert protocol.parse_body('{"model": "\U0001f600"}'.encode())["model"] == "\U0001f600"  # a pair is fine
    for raw in (b"{", b"\xff\xfe", b"[" * 100_000, b"1" * 5000):
        with pytest.raises(APIError) as e:
            protocol.parse_body(raw)
        assert e.value.code == "invalid_json"


def test_strings_are_bounded():
    long = "x" * (protocol.MAX_NAME_CHARS + 1)
    assert refused(completion(stop=["y" * (protocol.MAX_STOP_CHARS + 1)]), False).param == "stop"
    assert refused(completion(user=long), False).param == "user"
    assert refused(chat(tools=[{"type": "function", "function": {"name": long}}]), True).param == "tools[0]"
    assert refused(chat(messages=[{"role": "user", "content": "x", "name": long}]), True).param == "messages[0].name"
    assert refused(completion(model=long), False, status=404).param == "model"


def test_a_tool_message_needs_its_tool_call_id():
    e = refused(chat(messages=[{"role": "tool", "content": "42"}]), True)
    assert e.param == "messages[0].tool_call_id"
    check(chat(messages=[{"role": "tool", "content": "42", "tool_call_id": "c1"}]), True)


def test_other_fields_that_cannot_be_served():
    cases = [(chat(tool_choice={"type": "function"}), "tool_choice"), (chat(tool_choice=3), "tool_choice"),
             (chat(tool_choice="always"), "tool_choice"),
             (chat(tools=[{}] * (protocol.MAX_TOOLS + 1)), "tools"), (chat(stream_options=[]), "stream_options"),
             (chat(stream_options={"include_usage": "yes"}), "include_usage"), (completion(n=10**30), "n"),
             (completion(temperature=float("nan")), "temperature"), (completion(top_p=float("inf")), "top_p"),
             (completion(prompt=[[1, True]]), "prompt"), (completion(prompt=[[VOCAB]]), "prompt")]
    for body, param in cases:
        assert refused(body, "messages" in body).param == param, body


def test_a_field_the_endpoint_does_not_read_is_refused_by_name():
    for name in ("frobnicate_level", "repetition_penalty", "max_tokns", "reasoning_effort"):
        e = refused(chat(**{name: 3}), True)
        assert (e.param, e.code) == (name, "unknown_parameter") and name in e.message
        assert refused(completion(**{name: 3}), False).param == name
    # each endpoint's own fields are not the other's
    assert refused(completion(messages=[]), False).param == "messages"
    assert refused(chat(echo=True), True).param == "echo"
    assert "(and 1 more)" in refused(chat(top_a=1, min_q=0.1), True).message


def openai_fields(module) -> set:
    """Every field of an OpenAI request, from the installed `openai` package's own TypedDicts."""
    names = set()
    for value in vars(module).values():
        if isinstance(value, type) and value.__name__.startswith("CompletionCreateParams"):
            names |= set(value.__annotations__) | getattr(value, "__optional_keys__", set())
    return names


@pytest.mark.parametrize("is_chat", [True, False], ids=["chat", "completions"])
def test_every_openai_field_is_served_documented_as_without_behaviour_or_refused(is_chat):
    """OpenAI's list of fields (not ours): each is read by the endpoint, accepted as carrying no behaviour
    (listed in docs/serving.md) or answered 400 naming it."""
    openai = pytest.importorskip("openai")
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_create_params

    fields = openai_fields(chat_create_params if is_chat else completion_create_params)
    assert {"model", "temperature", "stream"} <= fields, openai.__version__
    known = protocol.CHAT_FIELDS if is_chat else protocol.COMPLETION_FIELDS
    docs = (helpers.REPO / "docs" / "serving.md").read_text()
    base = chat() if is_chat else completion()
    for name in sorted(fields):
        if name in protocol.NO_BEHAVIOUR or name in protocol.NEUTRAL:
            assert f"`{name}`" in docs, name
            check({**base, name: protocol.NEUTRAL.get(name, "x")}, is_chat)
        elif name not in known:
            e = refused({**base, name: "x"}, is_chat)
            assert e.param == name and name in e.message


def test_neutral_values_only_and_sampling_fields():
    check(chat(store=False, modalities=["text"], metadata={"a": "b"}, parallel_tool_calls=False, service_tier="auto"), True)
    for name, value in (("store", True), ("modalities", ["text", "audio"])):
        e = refused(chat(**{name: value}), True)
        assert (e.param, e.code) == (name, "unsupported_value")
    out = check(completion(top_k=-1, min_p=0.05), False)
    assert (out["top_k"], out["min_p"]) == (0, 0.05)
    assert check(chat(top_k=40), True)["top_k"] == 40
    for name, value in (("top_k", -2), ("top_k", 1.5), ("min_p", 1.5), ("min_p", "x")):
        assert refused(chat(**{name: value}), True).param == name


SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
    "a": {"type": "integer"}}, "required": ["a"]}}}


def test_response_format_is_compiled_and_what_cannot_be_followed_is_named():
    for fmt in ({"type": "json_object"}, SCHEMA_FORMAT):
        assert check(chat(response_format=fmt), True)["response_format"] == fmt
        assert check(completion(response_format=fmt), False)["response_format"] == fmt
    assert check(chat(response_format={"type": "text"}), True)["response_format"] is None
    for fmt, part in (({"type": "xml"}, "response_format.type"),
                      ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}, "not"),
                      ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}, "strin"),
                      ({"type": "json_schema", "json_schema": {"schema": {}}}, "json_schema.name")):
        e = refused(chat(response_format=fmt), True)
        assert e.param == "response_format" and part in e.message, e.message


def test_tool_choice_required_or_named_constrains_to_a_call():
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("f", "g")]
    schema = check(chat(tools=tools, tool_choice="required"), True)["response_format"]["json_schema"]["schema"]
    assert [c["properties"]["name"]["const"] for c in schema["anyOf"]] == ["f", "g"]
    named = check(chat(tools=tools, tool_choice={"type": "function", "function": {"name": "g"}}), True)
    assert named["response_format"]["json_schema"]["schema"]["properties"]["name"] == {"const": "g"}
    for choice in ("auto", "none", None):
        assert check(chat(tools=tools, tool_choice=choice), True)["response_format"] is None
    cases = [chat(tools=tools, tool_choice={"type": "function", "function": {"name": "h"}}), chat(tool_choice="required"),
             chat(tools=tools, tool_choice="required", response_format={"type": "json_object"})]
    for body in cases:
        assert refused(body, True).param == "tool_choice"
    bad_params = [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]
    assert refused(chat(tools=bad_params, tool_choice="required"), True).param == "tools"


def test_401_is_openais_invalid_request_error():
    protocol.check_key(None, None)
    protocol.check_key("k", "Bearer k")
    for sent in (None, "Bearer x", "Bearer k ", "Bearer \u00e9"):
        with pytest.raises(APIError) as e:
            protocol.check_key("k", sent)
        assert e.value.status == 401 and e.value.body()["error"]["type"] == "invalid_request_error"


def test_chat_format_translates_checked_messages():
    call = {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": '{"x": 1}'}}
    messages = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "2"}]
    tools = [{"type": "function", "function": {"name": "calc"}}]
    check(chat(messages=messages, tools=tools), True)
    dialog = to_dialog(messages, tools)
    assert dialog[0] == {"role": "system", "content": "Be brief.\n\n" + tool_prompt(tools)}
    assert dialog[1]["tool_calls"] == [ToolCall("c1", "calc", {"x": 1})] and dialog[2]["role"] == "ipython"
    assert to_dialog([{"role": "user", "content": "q"}], tools)[0]["role"] == "system"
    assert json.loads(openai_tool_calls(dialog[1]["tool_calls"])[0]["function"]["arguments"]) == {"x": 1}
