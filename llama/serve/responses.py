"""Engine requests from checked fields, and engine events shaped into OpenAI's answers: whole
completions and chat completions, their streamed chunks, log-probs and usage."""
import json
import random
from typing import Any, List, Optional, Tuple

from llama.chat_format import openai_tool_calls
from llama.engine import Event, Request
from llama.tokenizer import ChatFormat, Tokenizer


class Choice:
    """One sequence's events, gathered into what an answer needs."""

    def __init__(self):
        self.text, self.tokens, self.logprobs, self.tops = "", [], [], []
        self.finish_reason: Optional[str] = None
        self.stop_token: Optional[int] = None
        self.prompt_logprobs = self.prompt_tops = None
        self.stop_logprob: Optional[float] = None  # the stop token's, when it ended the answer
        self.stop_top: Optional[list] = None
        self.cached_tokens = 0  # prompt tokens the engine found in its prefix cache

    def add(self, e: Event, stop_tokens: frozenset) -> None:
        self.text += e.text
        if e.cached_tokens is not None:
            self.cached_tokens = e.cached_tokens
        if e.prompt_logprobs is not None:
            self.prompt_logprobs, self.prompt_tops = e.prompt_logprobs, e.prompt_top_logprobs
        if e.finished:
            self.finish_reason = e.finish_reason
        if e.token is None:
            return
        if e.finished and e.finish_reason == "stop" and e.token in stop_tokens:
            self.stop_token = e.token  # ends the answer; not part of its text or tokens
            self.stop_logprob, self.stop_top = e.logprob, e.top_logprobs
            return
        self.tokens.append(e.token)
        self.logprobs.append(e.logprob)
        self.tops.append(e.top_logprobs)


def sse(obj: Any) -> str:
    """One server-sent event (ASCII JSON: nothing in it can fail to encode)."""
    return f"data: {json.dumps(obj)}\n\n"


DONE = "data: [DONE]\n\n"


class Shaper:
    """Turns checked requests into engine Requests and engine events into OpenAI answers."""

    def __init__(self, tokenizer: Tokenizer, formatter: Optional[ChatFormat], model_name: str):
        self.tokenizer, self.formatter, self.model_name = tokenizer, formatter, model_name
        self.stop_tokens = frozenset(tokenizer.stop_tokens)

    def requests(self, prompts: List[List[int]], f: dict, prompt_logprobs: bool = False) -> List[Request]:
        seed = f["seed"]
        if seed is None and f["temperature"] > 0:
            seed = random.randrange(2**62)  # chosen here (rank 0) so that every rank draws alike
        reqs = []
        for p in prompts:
            for _ in range(f["n"]):
                reqs.append(Request(
                    p, f["max_tokens"], f["temperature"], f["top_p"], stop=tuple(f["stop"]),
                    seed=None if seed is None else seed + len(reqs), logprobs=f["logprobs"],
                    top_logprobs=f["top_logprobs"], prompt_logprobs=prompt_logprobs,
                    top_k=f["top_k"], min_p=f["min_p"], response_format=f["response_format"],
                ))
        return reqs

    def token_text(self, t: int) -> str:
        return self.tokenizer.decode([t])

    def usage(self, prompts: List[List[int]], choices: List[Choice]) -> dict:
        p = sum(len(x) for x in prompts)
        n = sum(len(c.tokens) for c in choices)
        per_prompt = max(1, len(choices) // max(1, len(prompts)))  # n choices of each prompt: its first's cache hits
        cached = sum(c.cached_tokens for c in choices[::per_prompt])
        return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n,
                "prompt_tokens_details": {"cached_tokens": cached}}

    # ---- /v1/completions

    def completion_logprobs(self, c: Choice, prompt: Optional[List[int]], offset: int) -> dict:
        """OpenAI's legacy logprobs: one entry per generated token, the stop token that ended the
        answer included (its text is not in `text`): lm-eval's local-completions sends echo with
        max_tokens 1 and drops the last entry as the generated one, so a missing entry there would
        drop the continuation's last prompt token instead."""
        tokens, lps, tops = list(c.tokens), list(c.logprobs), list(c.tops)
        if c.stop_token is not None and c.stop_logprob is not None:
            tokens, lps, tops = tokens + [c.stop_token], lps + [c.stop_logprob], tops + [c.stop_top]
        if prompt is not None:  # echo: the prompt's own tokens first
            tokens = prompt + tokens
            lps = (c.prompt_logprobs or [None] * len(prompt)) + lps
            tops = (c.prompt_tops or [None] * len(prompt)) + tops
        strings = [self.token_text(t) for t in tokens]
        offsets = []
        for s in strings:
            offsets.append(offset)
            offset += len(s)
        return {
            "tokens": strings, "token_logprobs": lps, "text_offset": offsets,
            "top_logprobs": [None if top is None else {self.token_text(t): lp for t, lp in top} for top in tops],
        }

    def completion_choice(self, i: int, c: Choice, prompt: List[int], f: dict, echo_text: str) -> dict:
        logprobs = None
        if f["logprobs"]:
            logprobs = self.completion_logprobs(c, prompt if f["echo"] else None, 0)
        return {"index": i, "text": echo_text + c.text, "logprobs": logprobs, "finish_reason": c.finish_reason}

    # ---- /v1/chat/completions

    def chat_logprobs(self, c: Choice) -> dict:
        def entry(t: int, lp: float) -> dict:
            s = self.token_text(t)
            return {"token": s, "logprob": lp, "bytes": list(self.tokenizer.model.decode_single_token_bytes(t))}

        return {"content": [
            {**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in (top or [])]}
            for t, lp, top in zip(c.tokens, c.logprobs, c.tops)
        ]}

    def chat_message(self, c: Choice, tools: bool) -> Tuple[dict, str]:
        """(message, finish_reason): with tools, a parsed Llama 3.1 tool call comes back as tool_calls."""
        if tools:
            reason = ("out_of_tokens" if c.stop_token is None else
                      "end_of_message" if c.stop_token == self.tokenizer.eom_id else "end_of_turn")
            parsed = self.formatter.decode_assistant_message(c.tokens, reason)
            if parsed.get("tool_calls"):
                content = parsed["content"] or None
                return {"role": "assistant", "content": content, "tool_calls": openai_tool_calls(parsed["tool_calls"])}, "tool_calls"
        return {"role": "assistant", "content": c.text}, c.finish_reason

    def chat_choices(self, choices: List[Choice], tools: bool, logprobs: bool) -> list:
        out = []
        for i, c in enumerate(choices):
            message, reason = self.chat_message(c, tools)
            out.append({"index": i, "message": message, "logprobs": self.chat_logprobs(c) if logprobs else None,
                        "finish_reason": reason})
        return out

    def chat_delta(self, e: Event, whole: Choice, tools: bool, logprobs: bool) -> Optional[dict]:
        """A streamed chat choice's chunk for event `e` (`whole`: its events so far, `e` included);
        None when there is nothing to send yet (with tools the answer is known only whole)."""
        c = Choice()
        c.add(e, self.stop_tokens)
        if not tools:
            return {"delta": {"content": c.text} if c.text or not e.finished else {},
                    "logprobs": self.chat_logprobs(c) if logprobs else None, "finish_reason": c.finish_reason}
        if not e.finished:
            return None
        message, reason = self.chat_message(whole, True)
        delta = {k: v for k, v in message.items() if k != "role" and v is not None}
        if "tool_calls" in delta:
            delta["tool_calls"] = [{"index": j, **call} for j, call in enumerate(delta["tool_calls"])]
        return {"delta": delta, "logprobs": None, "finish_reason": reason}
