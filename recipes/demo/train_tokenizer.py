"""Train the byte-level BPE of the demo model and write it in tiktoken's file format.

Text is pre-split with the Llama 3 split regex (as tiktoken does before BPE), every distinct
pre-token is counted once, and merges are learned over those unique byte strings with
incrementally updated pair counts. The most frequent adjacent pair is merged first; ties go to the
smaller (left bytes, right bytes), so a run is fully deterministic.

The output has one line per token, ``base64(token bytes) rank``: ranks 0..255 are the single
bytes, then merges in the order they were learned, so every token ranks above the two tokens it
was merged from -- the order tiktoken's encoder relies on. The 256 Llama 3 special tokens are not
in the file; they take ids n_base..n_base+255 (n_base is kept a multiple of 8, so the total is too).

    python recipes/demo/train_tokenizer.py                                  # data/demo -> llama/demo/tokenizer.model
    python recipes/demo/train_tokenizer.py --n_base=8192 --output=/tmp/t.model
"""

from __future__ import annotations

import base64
import heapq
import time
from collections import Counter, defaultdict
from pathlib import Path

import regex
import tiktoken
from tiktoken.load import load_tiktoken_bpe

LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
              r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_SPECIAL = 256
MAX_ENCODE_CHARS = 400_000  # tiktoken panics on longer inputs (see SPEC.md)


def count_pretokens(texts: list[str]) -> Counter[bytes]:
    """Frequency of each pre-token (as UTF-8 bytes) over the given texts."""
    pat = regex.compile(LLAMA3_PAT)
    counts: Counter[bytes] = Counter()
    for text in texts:
        counts.update(s.encode("utf-8") for s in pat.findall(text))
    return counts


def train_bpe(word_counts: dict[bytes, int], n_base: int) -> list[bytes]:
    """Learn merges until there are n_base tokens (fewer if the text runs out of pairs).

    Returns the token byte strings in rank order: the 256 single bytes, then the merges.
    """
    vocab = [bytes([i]) for i in range(256)]
    ids = {b: i for i, b in enumerate(vocab)}
    items = sorted(word_counts.items())  # sorted so pair bookkeeping never depends on dict order
    words = [list(w) for w, _ in items]
    freqs = [f for _, f in items]
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    # Max-heap by count, ties by bytes; stale entries are skipped when popped (lazy deletion).
    heap = [(-c, vocab[a], vocab[b], a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    while len(vocab) < n_base and heap:
        neg, _, _, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b), 0) != -neg or neg == 0:
            continue
        merged = vocab[a] + vocab[b]
        new = ids.get(merged)
        if new is None:  # the same bytes can arise from another split; keep tokens unique
            new = ids[merged] = len(vocab)
            vocab.append(merged)
        delta: dict[tuple[int, int], int] = defaultdict(int)
        for i in where.pop((a, b)):
            w, f = words[i], freqs[i]
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    out.append(new)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            if len(out) == len(w):
                continue  # stale entry in `where`: the pair left this word earlier
            for pair in zip(w, w[1:]):
                delta[pair] -= f
            for pair in zip(out, out[1:]):
                delta[pair] += f
                where[pair].add(i)
            words[i] = out
        for pair, d in delta.items():
            if d:
                pair_counts[pair] += d
                if pair_counts[pair] > 0:
                    heapq.heappush(heap, (-pair_counts[pair], vocab[pair[0]], vocab[pair[1]], *pair))
                else:
                    del pair_counts[pair]
        pair_counts.pop((a, b), None)
    return vocab


def write_tiktoken(tokens: list[bytes], path: str | Path) -> None:
    """One line per token: base64 of its bytes, a space, its rank."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="ascii") as f:
        for rank, tok in enumerate(tokens):
            f.write(f"{base64.b64encode(tok).decode()} {rank}\n")


def special_tokens(n_base: int) -> dict[str, int]:
    """The 256 Llama 3 special tokens at ids n_base.. (names as in SPEC.md), for checking the file."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
             "<|python_tag|>", "<|image|>"]
    names = named + [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + NUM_SPECIAL - len(named))]
    return {name: n_base + k for k, name in enumerate(names)}


def load_encoding(path: str | Path) -> tiktoken.Encoding:
    """A tiktoken Encoding over a file written by this script, with the Llama 3 specials."""
    ranks = load_tiktoken_bpe(str(path))
    return tiktoken.Encoding(Path(path).name, pat_str=LLAMA3_PAT, mergeable_ranks=ranks,
                             special_tokens=special_tokens(len(ranks)))


def encode_long(enc: tiktoken.Encoding, text: str) -> list[int]:
    """Encode ordinary text of any length, in newline-aligned pieces tiktoken accepts."""
    out: list[int] = []
    start = 0
    while start < len(text):
        end = min(start + MAX_ENCODE_CHARS, len(text))
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        out.extend(enc.encode_ordinary(text[start:end]))
        start = end
    return out


def check_roundtrip(model: str | Path, text: str) -> float:
    """Assert text survives encode/decode exactly; return bytes per token."""
    enc = load_encoding(model)
    tokens = encode_long(enc, text)
    if enc.decode_bytes(tokens) != text.encode("utf-8"):
        raise AssertionError("tokenizer does not round-trip the held-out text")
    return len(text.encode("utf-8")) / max(len(tokens), 1)


def main(corpus: str = "data/demo/corpus_train.txt", output: str = "llama/demo/tokenizer.model",
         n_base: int = 4096, heldout: str = "data/demo/corpus_heldout.txt") -> None:
    """Train the BPE on `corpus`, write `output`, and check it on `heldout`.

    Args:
        corpus: training text (UTF-8).
        output: tiktoken-format file to write.
        n_base: base vocabulary (256 bytes + merges); a multiple of 8 so n_base + 256 is too.
        heldout: text to check round-tripping and compression on ("" to skip).
    """
    if n_base % 8 or n_base <= 256:
        raise SystemExit("n_base must be a multiple of 8 and above 256")
    t0 = time.time()
    counts = count_pretokens([Path(corpus).read_text(encoding="utf-8")])
    print(f"{sum(counts.values()):,} pre-tokens, {len(counts):,} distinct ({time.time() - t0:.1f}s)")
    tokens = train_bpe(counts, n_base)
    if len(tokens) < n_base:
        raise SystemExit(f"only {len(tokens)} tokens learnable from this corpus; lower --n_base")
    write_tiktoken(tokens, output)
    print(f"wrote {output}: {len(tokens)} base + {NUM_SPECIAL} special = {len(tokens) + NUM_SPECIAL} "
          f"tokens ({time.time() - t0:.1f}s)")
    if heldout:
        bpt = check_roundtrip(output, Path(heldout).read_text(encoding="utf-8"))
        print(f"held-out round-trip OK; {bpt:.3f} bytes/token")


if __name__ == "__main__":
    from llama.cli import run

    run(main)
