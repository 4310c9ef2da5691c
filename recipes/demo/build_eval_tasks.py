"""Build the data of the bundled lm-eval task suite (llama/eval/tasks/) from the demo corpus's
held-out pages, which the demo model never trained on. Deterministic: the same corpus gives the
same files, byte for byte.

    python recipes/demo/demo_corpus.py               # writes data/demo/corpus_heldout.txt (fetches the pinned .deb)
    python recipes/demo/build_eval_tasks.py build    # writes llama/eval/tasks/*.jsonl
    python recipes/demo/build_eval_tasks.py chance   # what chance scores on them (the baseline in docs/evaluation.md)

Three tasks (see llama/eval/tasks/*.yaml):
  next_sentence.jsonl  multiple choice: the sentence that follows a passage, against three
                       sentences of similar length from other held-out pages (chance: 25%).
  perplexity.jsonl     rolling log-likelihood of the held-out pages, cut at paragraph boundaries
                       into pieces of at most PIECE_CHARS characters.
  next_word.jsonl      generation: the next word of a passage (exact match on the first word).
"""
import json
import math
import random
import re
from collections import Counter
from pathlib import Path
from typing import Optional

from demo_corpus import read_documents

from llama.cli import run
from llama.eval.tasks import TASKS_DIR  # the package's own task directory, wherever it is installed

PIECE_CHARS = 1500
MAX_PIECES_PER_PAGE = 12  # the longest page (the logging cookbook) would otherwise dominate
MAX_ITEMS = 200
SEED = 0
# a sentence ends in . ! or ? after a letter, digit or bracket, before a capital letter
_SENTENCE_END = re.compile(r"(?<=[a-z0-9\)][.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"\S+")


def _prose(paragraph: str) -> bool:
    """A paragraph of running text (not code, not a heading): ends a sentence, mostly letters."""
    letters = sum(c.isalpha() or c == " " for c in paragraph)
    return paragraph.endswith(".") and len(paragraph) >= 80 and letters / len(paragraph) > 0.85 and "\n" not in paragraph


def _pages(heldout: Path) -> list[tuple[str, list[str]]]:
    """(title, paragraphs) of each held-out page: the title is the first line."""
    pages = []
    for doc in read_documents(heldout):
        paragraphs = doc.split("\n\n")
        pages.append((paragraphs[0], paragraphs[1:]))
    return pages


def perplexity_items(pages: list[tuple[str, list[str]]]) -> list[dict]:
    """Pieces of whole paragraphs, each at most PIECE_CHARS long (a longer paragraph is its own piece)."""
    items = []
    for title, paragraphs in pages:
        pieces, current = [], title
        for p in paragraphs:
            if len(current) + 2 + len(p) > PIECE_CHARS and current:
                pieces.append(current)
                current = p
            else:
                current = f"{current}\n\n{p}" if current else p
        pieces.append(current)
        items += [{"text": t} for t in pieces[:MAX_PIECES_PER_PAGE] if len(t) <= 2 * PIECE_CHARS]
    return items


def next_sentence_items(pages: list[tuple[str, list[str]]], rng: random.Random) -> list[dict]:
    """Passage (title, up to three sentences) -> its next sentence among four choices."""
    sentences = []  # (page index, title, sentences of one prose paragraph)
    for i, (title, paragraphs) in enumerate(pages):
        sentences += [(i, title, _SENTENCE_END.split(p)) for p in paragraphs if _prose(p)]
    pool = [(i, s) for i, _, sents in sentences for s in sents if 20 <= len(s) <= 250]
    candidates = []
    for i, title, sents in sentences:
        for k in range(1, len(sents)):
            if 20 <= len(sents[k]) <= 250:
                candidates.append((i, title, sents[max(0, k - 3) : k], sents[k]))
    picked = sorted(rng.sample(range(len(candidates)), min(MAX_ITEMS, len(candidates))))
    items = []
    for c in picked:
        i, title, context, answer = candidates[c]
        # distractors of similar length from other pages, so length alone does not give the answer away
        others = [s for j, s in pool if j != i and 0.5 <= len(s) / len(answer) <= 2.0 and s != answer]
        choices = [answer] + rng.sample(others, 3)
        rng.shuffle(choices)
        items.append({"context": f"{title}\n\n{' '.join(context)}", "choices": choices, "label": choices.index(answer)})
    return items


def next_word_items(pages: list[tuple[str, list[str]]], rng: random.Random) -> list[dict]:
    """Passage (title, the start of a prose paragraph) -> the paragraph's next word (3+ letters)."""
    candidates = []
    for title, paragraphs in pages:
        for p in paragraphs:
            if not _prose(p):
                continue
            words = list(_WORD.finditer(p))
            spots = [m for m in words[12:] if re.fullmatch(r"[A-Za-z]{3,}", m.group())]
            if spots:
                m = rng.choice(spots)
                candidates.append({"context": f"{title}\n\n{p[: m.start()].rstrip()}", "target": m.group()})
    picked = sorted(rng.sample(range(len(candidates)), min(MAX_ITEMS, len(candidates))))
    return [candidates[c] for c in picked]


def write_jsonl(path: Path, items: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n")
    print(f"{path}: {len(items)} items, {path.stat().st_size:,} bytes")


def build(heldout: str = "data/demo/corpus_heldout.txt", out_dir: str = str(TASKS_DIR)) -> None:
    """Write next_sentence.jsonl, perplexity.jsonl and next_word.jsonl to out_dir.

    Args:
        heldout: the held-out corpus written by recipes/demo/demo_corpus.py.
        out_dir: where the task data goes (default: the package's llama/eval/tasks/).
    """
    if not Path(heldout).is_file():
        raise FileNotFoundError(f"{heldout} not found: run `python recipes/demo/demo_corpus.py` first")
    pages = _pages(Path(heldout))
    out = Path(out_dir)
    write_jsonl(out / "next_sentence.jsonl", next_sentence_items(pages, random.Random(SEED)))
    write_jsonl(out / "perplexity.jsonl", perplexity_items(pages))
    write_jsonl(out / "next_word.jsonl", next_word_items(pages, random.Random(SEED)))


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def chance(tasks_dir: str = str(TASKS_DIR), tokenizer_path: Optional[str] = None) -> None:
    """Print the scores of chance on the bundled tasks, in lm-eval's metrics.

    next_sentence: a uniform pick among the choices. next_word: always answering the most common
    target. perplexity: every token uniform over the vocabulary, counted as lm-eval counts tokens
    (each piece's tokens after <|begin_of_text|>, that token included), words and bytes.
    """
    from llama.demo import TOKENIZER_PATH
    from llama.tokenizer import Tokenizer

    d = Path(tasks_dir)
    mc = _read(d / "next_sentence.jsonl")
    print(f"llama_demo_next_sentence acc, acc_norm: {sum(1 / len(x['choices']) for x in mc) / len(mc):.4f}")
    targets = Counter(x["target"] for x in _read(d / "next_word.jsonl"))
    word, n = targets.most_common(1)[0]
    print(f"llama_demo_next_word exact_match: {n / sum(targets.values()):.4f} (always {word!r})")
    tok = Tokenizer(str(tokenizer_path or TOKENIZER_PATH))
    nll = words = n_bytes = 0.0
    for x in _read(d / "perplexity.jsonl"):
        nll += len(tok.encode(x["text"], bos=True, eos=False)) * math.log(tok.n_words)
        words += len(re.split(r"\s+", x["text"]))
        n_bytes += len(x["text"].encode("utf-8"))
    print(f"llama_demo_perplexity (uniform over {tok.n_words} tokens): bits_per_byte {nll / n_bytes / math.log(2):.4f}, "
          f"byte_perplexity {math.exp(nll / n_bytes):.4f}, word_perplexity {math.exp(nll / words):.1f}")


if __name__ == "__main__":
    run({"build": build, "chance": chance})
