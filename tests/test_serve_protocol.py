"""The server's request schema (llama/serve/protocol.py) and the OpenAI <-> Llama 3.1 chat
translation (llama/chat_format.py), without a server: each field that cannot be served is a 400
naming it, and what passes can be formatted."""
import json

import pytest

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
    for name in ("frobnicate_level", "top_k", "min_p", "repetition_penalty", "max_tokns"):
        e = refused(chat(**{name: 3}), True)
        assert (e.param, e.code) == (name, "unknown_parameter") and name in e.message
        assert refused(completion(**{name: 3}), False).param == name
    # each endpoint's own fields are not the other's
    assert refused(completion(messages=[]), False).param == "messages"
    assert refused(chat(echo=True), True).param == "echo"
    assert "(and 1 more)" in refused(chat(top_k=1, min_p=0.1), True).message


def test_what_is_not_enforced_yet_is_refused_not_ignored():
    for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}):
        e = refused(chat(response_format=fmt), True)
        assert (e.param, e.code) == ("response_format", "unsupported_value")
    assert refused(chat(response_format={"type": "xml"}), True).param == "response_format"
    check(chat(response_format={"type": "text"}), True)
    tools = [{"type": "function", "function": {"name": "f"}}]
    for choice in ("required", {"type": "function", "function": {"name": "f"}}):
        e = refused(chat(tools=tools, tool_choice=choice), True)
        assert (e.param, e.code) == ("tool_choice", "unsupported_value")
    for choice in ("auto", "none", None):
        check(chat(tools=tools, tool_choice=choice), True)


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
