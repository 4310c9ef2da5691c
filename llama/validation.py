"""The one validation layer for what users hand us: request arguments and params.json values.

Every check raises TypeError (wrong type) or ValueError (wrong value) with one line that names the
argument or key, what it got, and what it takes. Nothing here imports the model: model.py,
checkpoint.py, generation.py (and the server) call in.
"""
import math
import numbers
from typing import Any, Mapping, Optional, Sequence

ROLES = ("system", "user", "assistant", "ipython")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: Optional[int] = None, allow_none: bool = False) -> None:
    """`value` is an int (not a bool), at least `minimum`; None only with `allow_none`."""
    if value is None and allow_none:
        return
    if not _is_int(value):
        kind = "an int" + (" or None" if allow_none else "")
        raise TypeError(f"{name} must be {kind}, got {_show(value)} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_real(
    name: str,
    value: Any,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    positive: bool = False,
    allow_none: bool = False,
) -> None:
    """`value` is a finite real number (not a bool) within [minimum, maximum] (> 0 with `positive`)."""
    if value is None and allow_none:
        return
    if not _is_real(value):
        kind = "a number" + (" or None" if allow_none else "")
        raise TypeError(f"{name} must be {kind}, got {_show(value)} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_show(value)} ({type(value).__name__})")


# ---------------------------------------------------------------------------------------------
# Requests


def check_sampling(
    temperature: Any, top_p: Any, max_gen_len: Any, seed: Any, logprobs: Any = False, echo: Any = False,
    max_gen_len_optional: bool = True,
) -> None:
    """The sampling arguments every generation method shares."""
    check_real("temperature", temperature, minimum=0)
    check_real("top_p", top_p, minimum=0, maximum=1)
    check_int("max_gen_len", max_gen_len, minimum=0, allow_none=max_gen_len_optional)
    check_int("seed", seed, allow_none=True)
    check_bool("logprobs", logprobs)
    check_bool("echo", echo)


def _check_list(name: str, value: Any, what: str) -> None:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of {what}, got {_show(value)} ({type(value).__name__})")


def check_prompt_tokens(prompt_tokens: Any, vocab_size: int) -> None:
    """A list of token lists, each id an int in [0, vocab_size)."""
    _check_list("prompt_tokens", prompt_tokens, "token lists (one list of ints per prompt)")
    for i, tokens in enumerate(prompt_tokens):
        _check_list(f"prompt_tokens[{i}]", tokens, "ints (token ids)")
        if not all(type(t) is int for t in tokens):  # the fast path; numpy ints pass the slow one
            bad = next((t for t in tokens if not _is_int(t)), None)
            if bad is not None:
                raise TypeError(f"prompt_tokens[{i}] holds {_show(bad)} ({type(bad).__name__}): token ids are ints")
        if tokens and (min(tokens) < 0 or max(tokens) >= vocab_size):
            bad = next(t for t in tokens if not 0 <= t < vocab_size)
            raise ValueError(
                f"prompt_tokens[{i}] holds token id {bad}, outside the vocabulary [0, {vocab_size}): "
                "encode prompts with this model's tokenizer"
            )


def check_prompts(prompts: Any) -> None:
    """text_completion's prompts: a list of strings (a bare string would complete each character)."""
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a list of strings, got one string {_show(prompts)}: pass [prompt]")
    _check_list("prompts", prompts, "strings")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}] must be a string, got {_show(prompt)} ({type(prompt).__name__})")


def check_dialogs(dialogs: Any) -> None:
    """chat_completion's dialogs: a list of dialogs, each a list of messages {"role", "content"}."""
    hint = "pass a list of dialogs, each a list of {'role': ..., 'content': ...} messages"
    if isinstance(dialogs, Mapping):
        raise TypeError(f"dialogs must be a list of dialogs, got one message {_show(dialogs)}: {hint}")
    _check_list("dialogs", dialogs, "dialogs")
    for i, dialog in enumerate(dialogs):
        if isinstance(dialog, Mapping):
            raise TypeError(f"dialogs[{i}] is one message, not a dialog (a list of messages): wrap it as [[message]]")
        _check_list(f"dialogs[{i}]", dialog, "messages")
        if not dialog:
            raise ValueError(f"dialogs[{i}] is empty: a dialog needs at least one message")
        for j, message in enumerate(dialog):
            where = f"dialogs[{i}][{j}]"
            if not isinstance(message, Mapping):
                raise TypeError(f"{where} must be a message dict with 'role' and 'content', got {_show(message)}")
            for key in ("role", "content"):
                if key not in message:
                    raise ValueError(f"{where} has no {key!r}: a message is {{'role': ..., 'content': ...}}")
            if message["role"] not in ROLES:
                raise ValueError(f"{where} has role {_show(message['role'])}: use one of {list(ROLES)}")
            if not isinstance(message["content"], str):
                raise TypeError(f"{where}['content'] must be a string, got {type(message['content']).__name__}")


def check_request(
    vocab_size: int,
    *,
    prompt_tokens: Any = None,
    prompts: Any = None,
    dialogs: Any = None,
    temperature: Any = 0.6,
    top_p: Any = 0.9,
    max_gen_len: Any = None,
    seed: Any = None,
    logprobs: Any = False,
    echo: Any = False,
    max_gen_len_optional: bool = True,
) -> None:
    """Every argument of one generation request (give one of prompt_tokens, prompts, dialogs)."""
    if prompt_tokens is not None or (prompts is None and dialogs is None):
        check_prompt_tokens(prompt_tokens, vocab_size)
    if prompts is not None:
        check_prompts(prompts)
    if dialogs is not None:
        check_dialogs(dialogs)
    check_sampling(temperature, top_p, max_gen_len, seed, logprobs, echo, max_gen_len_optional)


# ---------------------------------------------------------------------------------------------
# params.json

REQUIRED_PARAMS = ("dim", "n_layers", "n_heads", "vocab_size")

# key -> (kind, minimum or None, may be None); "pos" reals must be > 0
PARAM_RULES = {
    "dim": ("int", 1, False),
    "n_layers": ("int", 1, False),
    "n_heads": ("int", 1, False),
    "n_kv_heads": ("int", 1, True),
    "vocab_size": ("int", None, False),  # ModelArgs.validate() says why -1 (its default) cannot build
    "multiple_of": ("int", 1, False),
    "ffn_dim_multiplier": ("pos", None, True),
    "norm_eps": ("pos", None, False),
    "rope_theta": ("pos", None, False),
    "use_scaled_rope": ("bool", None, False),
    "rope_scale_factor": ("pos", None, False),
    "rope_low_freq_factor": ("pos", None, False),
    "rope_high_freq_factor": ("pos", None, False),
    "rope_original_max_seq_len": ("int", 1, False),
    "max_batch_size": ("int", 1, False),
    "max_seq_len": ("int", 1, False),
}


def check_params(params: Any, source: str = "params", required: bool = False) -> None:
    """Type and range of each known key of a params.json (unknown keys are allowed: later releases
    add some). `required`: the keys a checkpoint's params.json must have are there. The message
    names `source` and the key."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{source} must be a JSON object of model settings, got {type(params).__name__}")
    if required:
        missing = [k for k in REQUIRED_PARAMS if k not in params]
        if missing:
            raise ValueError(f"{source} lacks required key(s) {missing}: use the params.json of this checkpoint")
    for key, (kind, minimum, nullable) in PARAM_RULES.items():
        if key not in params:
            continue
        value, name = params[key], f"{source}: {key!r}"
        if kind == "int":
            check_int(name, value, minimum=minimum, allow_none=nullable)
        elif kind == "pos":
            check_real(name, value, positive=True, allow_none=nullable)
        else:
            check_bool(name, value)
    low, high = params.get("rope_low_freq_factor", 1.0), params.get("rope_high_freq_factor", 4.0)
    if high <= low:  # the RoPE scaling recipe blends between the two: (x - low) / (high - low)
        raise ValueError(f"{source}: 'rope_high_freq_factor' ({high}) must exceed 'rope_low_freq_factor' ({low})")


class ContextLengthError(ValueError):
    """A prompt that does not fit the context, alone or with the tokens asked for; `param` names
    the argument to change ("prompt" or "max_tokens")."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def check_prompt_length(
    n_tokens: int,
    context: int,
    max_new_tokens: Optional[int] = None,
    name: str = "the prompt",
    limit: str = "max_seq_len",
    fix: str = "build with a larger max_seq_len",
) -> None:
    """The one check of a prompt's length, wherever a prompt comes in (the Llama API, the engine,
    the server): not empty (ValueError), at most `context` tokens, and with `max_new_tokens` (where
    the caller refuses what would be cut) at most `context` with them (ContextLengthError).
    `name` names the prompt, `limit` the context in the message, `fix` the other way out."""
    if n_tokens == 0:
        raise ValueError(f"{name} is empty: every prompt needs at least one token")
    if n_tokens > context:
        raise ContextLengthError(f"{name} has {n_tokens} tokens, longer than {limit} {context}: shorten it or {fix}", "prompt")
    if max_new_tokens is not None and n_tokens + max_new_tokens > context:
        raise ContextLengthError(
            f"{name}'s {n_tokens} tokens plus max_tokens {max_new_tokens} exceed {limit} {context}: "
            f"ask for at most {context - n_tokens} tokens", "max_tokens",
        )
