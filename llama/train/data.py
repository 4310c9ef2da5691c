"""Fine-tuning data: JSON Lines read and encoded into token sequences with a mask of the tokens that
train, then packed or padded into rows, and each optimizer step's rows drawn deterministically.

Formats, one JSON object a line:
- SFT, `{"messages": [...]}` in OpenAI's chat format (system, user, assistant, tool; optional
  "tools"), encoded with llama.tokenizer.ChatFormat exactly as a chat prompt is at inference. Only
  the assistant turns train: their content (tool calls included) and the token that ends them
  (<|eot_id|>, or <|eom_id|> after a tool call). Their header <|start_header_id|>assistant
  <|end_header_id|>"\\n\\n" does not: at inference the prompt already ends with it
  (encode_dialog_prompt), so the model never has to produce it; likewise nothing the user, the
  system or a tool wrote trains.
- Continued pretraining, `{"text": "..."}`: every token after <|begin_of_text|>, <|end_of_text|> included.
- DPO, `{"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}`
  (TRL's conversational preference format): the prompt as a chat prompt (open assistant header),
  each completion its content and <|eot_id|>; only the completion's tokens count.

A row is (inputs, targets, positions): targets are the next tokens, -100 where nothing trains.
Packed rows hold several samples one after another, each numbered from position 0, and the
model's packed forward lets each attend only to itself (Transformer.forward_train's positions).
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from llama.chat_format import to_dialog
from llama.tokenizer import ChatFormat, Tokenizer

IGNORE = -100  # the target of a token that does not train (torch's and transformers' ignore_index)


@dataclass
class Sample:
    """One sequence: its tokens and, for each, whether it is a target that trains."""

    tokens: list
    trained: list

    @property
    def n_inputs(self) -> int:
        return len(self.tokens) - 1


@dataclass
class Row:
    """One row of a batch: model inputs, targets (IGNORE where nothing trains), positions."""

    inputs: list
    targets: list
    positions: list


def read_jsonl(path: str) -> Iterator[tuple[str, dict]]:
    """(where, object) for each non-blank line; `where` is "FILE:LINE". A line that is not a JSON
    object is a ValueError naming its file and line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no data file {path}: pass a JSON Lines file (one JSON object a line)")
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}): fix or remove the line") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n}: a line must be a JSON object, not {type(obj).__name__}")
            yield f"{path}:{n}", obj


def encode_chat(fmt: ChatFormat, messages: list, tools: Sequence = (), where: str = "") -> Sample:
    """A dialog in OpenAI's message format as the chat format encodes it; the assistant turns train."""
    try:
        dialog = to_dialog(messages, list(tools))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: messages not in OpenAI's chat format ({e!r}): each needs a role and content") from None
    if not any(m["role"] == "assistant" for m in dialog):
        raise ValueError(f"{where}: the dialog has no assistant turn, so nothing in it trains: add one or remove the line")
    tokens, trained = [fmt.tokenizer.bos_id], [False]
    for m in dialog:
        encoded = fmt.encode_message(m)
        n_header = len(fmt.encode_header(m))
        tokens += encoded
        trained += [False] * n_header + [m["role"] == "assistant"] * (len(encoded) - n_header)
    return Sample(tokens, trained)


def encode_text(tokenizer: Tokenizer, text: str) -> Sample:
    """Continued pretraining: every token after <|begin_of_text|> trains."""
    tokens = tokenizer.encode(text, bos=True, eos=True)
    return Sample(tokens, [False] + [True] * (len(tokens) - 1))


def encode_sft(fmt: ChatFormat, obj: dict, where: str) -> Sample:
    """One SFT line: {"messages": [...]} (optionally "tools") or {"text": "..."}."""
    if isinstance(obj.get("messages"), list):
        return encode_chat(fmt, obj["messages"], obj.get("tools") or (), where)
    if isinstance(obj.get("text"), str):
        return encode_text(fmt.tokenizer, obj["text"])
    raise ValueError(f'{where}: an SFT line is {{"messages": [...]}} or {{"text": "..."}}: this one has {sorted(obj)}')


def encode_preference(fmt: ChatFormat, obj: dict, where: str) -> tuple[Sample, Sample]:
    """One DPO line: (prompt + chosen, prompt + rejected), only the completions training."""
    if not all(isinstance(obj.get(k), list) for k in ("prompt", "chosen", "rejected")):
        raise ValueError(f'{where}: a DPO line is {{"prompt": [messages], "chosen": [message], "rejected": [message]}}')
    try:
        prompt = fmt.encode_dialog_prompt(to_dialog(obj["prompt"], []))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: prompt not in OpenAI's chat format ({e!r})") from None
    out = []
    for key in ("chosen", "rejected"):
        msgs = obj[key]
        if len(msgs) != 1 or not isinstance(msgs[0], dict) or msgs[0].get("role") != "assistant":
            raise ValueError(f"{where}: {key} must be a list of one assistant message")
        full = fmt.encode_message(to_dialog(msgs, [])[0])
        completion = full[len(fmt.encode_header(msgs[0])):]
        out.append(Sample(prompt + completion, [False] * len(prompt) + [True] * len(completion)))
    return out[0], out[1]


def load_samples(path: str, tokenizer: Tokenizer, method: str, max_seq_len: int, drop_long: bool = True) -> tuple[list, int]:
    """The encoded samples of a file (SFT: Samples; DPO: (chosen, rejected) pairs) that fit
    max_seq_len model inputs, and how many were dropped for length. With drop_long False a sample
    that does not fit is a ValueError naming its line."""
    fmt = ChatFormat(tokenizer)
    out, dropped = [], 0
    for where, obj in read_jsonl(path):
        item = encode_preference(fmt, obj, where) if method == "dpo" else encode_sft(fmt, obj, where)
        n = max(s.n_inputs for s in item) if method == "dpo" else item.n_inputs
        if n > max_seq_len:
            if not drop_long:
                raise ValueError(f"{where}: {n + 1} tokens, more than --max_seq_len {max_seq_len} + 1: raise it, or pass --drop_long to skip such lines")
            dropped += 1
            continue
        out.append(item)
    if not out:
        raise ValueError(f"{path}: no sample fits --max_seq_len {max_seq_len} ({dropped} dropped): raise --max_seq_len")
    return out, dropped


def to_row(samples: Sequence[Sample]) -> Row:
    """Samples one after another in one row, each predicting only its own next tokens and
    numbered from position 0."""
    row = Row([], [], [])
    for s in samples:
        row.inputs += s.tokens[:-1]
        row.targets += [t if keep else IGNORE for t, keep in zip(s.tokens[1:], s.trained[1:])]
        row.positions += list(range(s.n_inputs))
    return row


def pack(samples: Sequence[Sample], max_seq_len: int) -> list[Row]:
    """Consecutive samples joined into rows of at most max_seq_len inputs (a new row when the next
    one does not fit)."""
    rows, current, used = [], [], 0
    for s in samples:
        if current and used + s.n_inputs > max_seq_len:
            rows.append(to_row(current))
            current, used = [], 0
        current.append(s)
        used += s.n_inputs
    if current:
        rows.append(to_row(current))
    return rows


def make_rows(samples: list, max_seq_len: int, packing: bool, seed: int) -> list[Row]:
    """SFT rows: the samples shuffled once (seeded), then packed or one a row."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [samples[i] for i in order]
    return pack(shuffled, max_seq_len) if packing else [to_row([s]) for s in shuffled]


def step_indices(n_items: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The items of optimizer step `step`: the data in a new seeded order each epoch, read in
    order, so the batch of a step depends only on (seed, step) and a resumed run continues exactly."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(k, n_items)
        out.append(_epoch_order(n_items, epoch, seed)[i])
    return out


_orders: dict = {}


def _epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    key = (n, epoch, seed)
    if key not in _orders:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _orders.clear()
        _orders[key] = torch.randperm(n, generator=g).tolist()
    return _orders[key]


def collate(rows: Sequence[Row], device: Optional[torch.device] = None) -> dict:
    """Rows padded to the longest into tensors: inputs (pad 0), targets (IGNORE), positions
    (continuing, so a padded tail is never a sequence start that real tokens could see)."""
    n = max(len(r.inputs) for r in rows)
    inputs = torch.zeros(len(rows), n, dtype=torch.long)
    targets = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    positions = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r.inputs)
        inputs[i, :k] = torch.tensor(r.inputs)
        targets[i, :k] = torch.tensor(r.targets)
        positions[i, :k] = torch.tensor(r.positions)
        positions[i, k:] = torch.arange(r.positions[-1] + 1, r.positions[-1] + 1 + n - k)
    return {k: v.to(device) for k, v in {"inputs": inputs, "targets": targets, "positions": positions}.items()}


def preference_rows(pairs: Sequence[tuple[Sample, Sample]]) -> list[Row]:
    """A DPO batch as rows: every chosen sequence, then every rejected one."""
    return [to_row([c]) for c, _ in pairs] + [to_row([r]) for _, r in pairs]
