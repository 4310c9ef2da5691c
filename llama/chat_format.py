"""OpenAI chat messages and tools in Llama 3.1's chat format: the custom-tool prompt, messages as a
Llama dialog, and the tool calls a model made as OpenAI's `tool_calls`.

The token layout itself (headers, <|python_tag|>, <|eom_id|>, how a ToolCall is written and read
back) is `llama.tokenizer.ChatFormat`, Meta's name. This module sits above it and turns the OpenAI
request shapes into its `Dialog` and its `ToolCall`s back into OpenAI's. Its inputs are the ones
the server has already checked (llama.serve.protocol); a shape it cannot use is a ValueError.
"""
import json
import uuid
from typing import Any, List

from llama.tokenizer import Dialog, Message, ToolCall

# OpenAI role -> Llama 3.1 role: a tool's answer is Llama's "ipython" turn, "developer" is "system"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "ipython"}


def tool_prompt(tools: list) -> str:
    """The Llama 3.1 prompt for custom tools (JSON calls), from OpenAI `tools` definitions
    ({"type": "function", "function": {"name", "description", "parameters"}})."""
    functions = [json.dumps(t["function"], ensure_ascii=False) for t in tools]
    return (
        "You have access to the following functions. To call a function, respond with only a JSON object "
        'in the format {"name": function name, "parameters": dictionary of argument name and its value}. '
        "Do not use variables.\n\n" + "\n\n".join(functions)
    )


def message_text(content: Any) -> str:
    """A message's content: a string, an array of text parts ({"type": "text", "text": ...}), or
    None (an assistant message that only calls tools)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part["text"] for part in content)
    raise ValueError(f"a message's content is a string or an array of text parts, not {type(content).__name__}")


def tool_call(call: dict) -> ToolCall:
    """An OpenAI tool call ({"id", "function": {"name", "arguments": a JSON object string}})."""
    f = call["function"]
    arguments = json.loads(f["arguments"]) if isinstance(f["arguments"], str) else f["arguments"]
    if not isinstance(arguments, dict):
        raise ValueError("a tool call's arguments are a JSON object")
    return ToolCall(str(call.get("id") or uuid.uuid4()), f["name"], arguments)


def to_dialog(messages: list, tools: list) -> Dialog:
    """OpenAI messages -> a Llama dialog: roles mapped (ROLES), assistant tool_calls become ToolCalls,
    and the tool prompt of `tools` joins the system message (one is added when there is none)."""
    dialog: List[Message] = []
    for m in messages:
        role = ROLES[m["role"]]
        message: Message = {"role": role, "content": message_text(m.get("content"))}  # type: ignore[typeddict-item]
        if role == "assistant" and m.get("tool_calls"):
            message["tool_calls"] = [tool_call(c) for c in m["tool_calls"]]
        dialog.append(message)
    if tools:
        prompt = tool_prompt(tools)
        if dialog and dialog[0]["role"] == "system":
            dialog[0] = {**dialog[0], "content": dialog[0]["content"] + "\n\n" + prompt}
        else:
            dialog.insert(0, {"role": "system", "content": prompt})
    return dialog


def openai_tool_calls(calls: List[ToolCall]) -> list:
    """ToolCalls as OpenAI's `tool_calls` (arguments as a JSON string)."""
    return [{"id": c.call_id, "type": "function",
             "function": {"name": c.tool_name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}} for c in calls]
