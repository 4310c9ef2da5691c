"""The demo model's training data (train_demo.py): the corpus and the chat dialogs encoded once into
token streams (cached in the work directory), and each step's batch of windows drawn from them.

Imported as `train_data` by the recipes beside it (a script's own directory comes first on sys.path).
"""
import json
from pathlib import Path

import torch

from llama import Tokenizer
from llama.tokenizer import ChatFormat


def encode_corpus(tokenizer: Tokenizer, text_path: Path) -> torch.Tensor:
    """Documents (separated by blank-line-free form feeds or double newlines as the corpus writes them)
    encoded as one stream: <|begin_of_text|> doc <|end_of_text|> ..."""
    text = text_path.read_text(encoding="utf-8")
    docs = [d for d in text.split("\n\n\n") if d.strip()]
    ids: list[int] = []
    for d in docs:
        ids += tokenizer.encode(d.strip(), bos=True, eos=True)
    return torch.tensor(ids, dtype=torch.int32)


def encode_dialogs(tokenizer: Tokenizer, path: Path) -> torch.Tensor:
    """Dialogs in the Llama 3 chat format, each ending with the assistant's <|eot_id|>."""
    fmt = ChatFormat(tokenizer)
    ids: list[int] = []
    if not path.is_file():
        return torch.tensor(ids, dtype=torch.int32)
    for line in path.read_text(encoding="utf-8").splitlines():
        dialog = json.loads(line)["dialog"]
        ids += fmt.encode_dialog_prompt(dialog[:-1])
        ids += tokenizer.encode(dialog[-1]["content"].strip(), bos=False, eos=False) + [tokenizer.eot_id]
    return torch.tensor(ids, dtype=torch.int32)


def load_data(tokenizer: Tokenizer, data_dir: Path, cache: Path) -> dict:
    """The streams of data_dir (train, heldout, chat_train, chat_heldout), encoded once and then read
    from `cache`."""
    if cache.is_file():
        return torch.load(cache)
    data = {
        "train": encode_corpus(tokenizer, data_dir / "corpus_train.txt"),
        "heldout": encode_corpus(tokenizer, data_dir / "corpus_heldout.txt"),
        "chat_train": encode_dialogs(tokenizer, data_dir / "dialogs_train.jsonl"),
        "chat_heldout": encode_dialogs(tokenizer, data_dir / "dialogs_heldout.jsonl"),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, cache)
    return data


def windows(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(batch, seq_len + 1) token windows of `stream` beginning at `starts`."""
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()]).long()


def batch_for_step(data: dict, step: int, batch_size: int, seq_len: int, chat_fraction: float, seed: int) -> torch.Tensor:
    """The batch of a step depends only on (seed, step): training resumes deterministically."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    n_chat = int(round(batch_size * chat_fraction)) if len(data["chat_train"]) > seq_len + 1 else 0
    parts = []
    for key, n in (("train", batch_size - n_chat), ("chat_train", n_chat)):
        if n:
            starts = torch.randint(0, len(data[key]) - seq_len - 1, (n,), generator=g)
            parts.append(windows(data[key], starts, seq_len))
    return torch.cat(parts)
