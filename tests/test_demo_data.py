"""Quick checks of the demo data scripts: BPE training/tiktoken file and the corpus split."""

from __future__ import annotations

import random
import sys
from collections import Counter
from pathlib import Path

import pytest
from tiktoken.load import load_tiktoken_bpe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "demo"))  # the recipes under test
import demo_corpus  # noqa: E402
import train_tokenizer  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. It's the dog's bone, isn't it?\n\n"
        "def split(self, sep=None):\n    return [w for w in self.text if w]\n\n"
        "Numbers 12345 and 3.14159; naïve café – “quotes” 東京 😀.\n") * 20


def naive_bpe(text: str, n_base: int) -> list[bytes]:
    """Reference BPE: recount every pair from scratch before each merge (slow, obviously right)."""
    counts = train_tokenizer.count_pretokens([text])
    words = {tuple(bytes([c]) for c in w): f for w, f in counts.items()}
    vocab = [bytes([i]) for i in range(256)]
    while len(vocab) < n_base:
        pairs: Counter = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += f
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if best[0] + best[1] not in vocab:
            vocab.append(best[0] + best[1])
        merged = {}
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if w[i:i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + f
        words = merged
    return vocab


def test_bpe_file_is_valid_tiktoken_in_merge_order(tmp_path):
    tokens = train_tokenizer.train_bpe(train_tokenizer.count_pretokens([TEXT]), 360)
    assert tokens == naive_bpe(TEXT, 360)  # incremental pair counts agree with full recounts
    path = tmp_path / "tok.model"
    train_tokenizer.write_tiktoken(tokens, path)
    ranks = load_tiktoken_bpe(str(path))
    assert sorted(ranks.values()) == list(range(360))
    assert all(ranks[bytes([b])] < 256 for b in range(256))
    for tok, rank in ranks.items():  # every merged token comes after two lower-ranked parts
        if rank >= 256:
            assert any(ranks.get(tok[:k], rank) < rank and ranks.get(tok[k:], rank) < rank
                       for k in range(1, len(tok)))
    enc = train_tokenizer.load_encoding(path)
    assert enc.n_vocab == 360 + 256 and enc.n_vocab % 8 == 0
    for text in (TEXT, "unseen wörds ¿y esto? <|eot_id|>\r\n\t  x" + " " * 300):
        ids = enc.encode(text, disallowed_special=())
        assert enc.decode(ids) == text
    assert train_tokenizer.check_roundtrip(path, TEXT) > 2.0  # repeated text compresses well
    assert enc.encode("<|eot_id|>", allowed_special="all") == [360 + 9]


PAGE = """<html><body><div class="sphinxsidebar">navigation junk</div>
<div class="body" role="main"><section><h1>mod — Things<a class="headerlink" href="#">¶</a></h1>
<p>Intro   text with <code><span class="pre">code</span></code>.<a class="footnote-reference">[1]</a></p>
<dl class="py function"><dt class="sig" id="mod.frob">mod.frob(x)</dt>
<dd><p>Return the frobnicated value of x. More detail here.</p><p>Second paragraph.</p></dd></dl>
<div class="highlight"><pre>&gt;&gt;&gt; mod.frob(1)\n    2   \n</pre></div>
<table><tr><th><p>A</p></th><th><p>B</p></th></tr><tr><td><p>1</p></td><td><p>x</p></td></tr></table>
<ul><li><p>item one</p></li><li><p>item two</p></li></ul>
</section></div><div class="footer">footer junk</div></body></html>"""


def test_page_to_text_and_dialog():
    text, entries = demo_corpus.page_to_text(PAGE)
    assert text == ("mod — Things\n\nIntro text with code.\n\nmod.frob(x)\n\n"
                    "Return the frobnicated value of x. More detail here.\n\nSecond paragraph.\n\n"
                    ">>> mod.frob(1)\n    2\n\nA | B\n1 | x\n\n- item one\n\n- item two")
    assert entries == [("mod.frob", "function", "Return the frobnicated value of x. More detail here.")]
    dialog = demo_corpus.make_dialog(*entries[0])["dialog"]
    assert dialog[0] == {"role": "user", "content": "What does the `mod.frob` function do?"}
    assert dialog[1] == {"role": "assistant", "content": "`mod.frob` returns the frobnicated value of x."}


def test_split_is_deterministic_and_disjoint(tmp_path):
    pages = [(f"library/m{i}.html", PAGE.replace("Things", f"Things {i}").replace("mod.frob", f"m{i}.frob"))
             for i in range(150)]
    out = demo_corpus.build(pages)
    shuffled = pages[:]
    random.Random(0).shuffle(shuffled)
    assert demo_corpus.build(shuffled) == out  # order of discovery does not matter
    assert out["heldout"] and out["train"] and not set(out["heldout"]) & set(out["train"])
    assert len(out["train"]) + len(out["heldout"]) == 150
    held = {n for n, _ in pages if demo_corpus.is_heldout(n)}
    assert len(out["heldout"]) == len(held) == len(out["dialogs_heldout"])
    (tmp_path / "c.txt").write_text(demo_corpus.DOC_SEPARATOR.join(out["train"]) + "\n", encoding="utf-8")
    assert demo_corpus.read_documents(tmp_path / "c.txt") == out["train"]


def test_real_pages_subset_if_cached():
    root = Path(__file__).resolve().parents[1] / "data/cache/python3.11-doc/unpacked" / demo_corpus.HTML_ROOT
    if not root.is_dir():
        pytest.skip("python3.11-doc not fetched; run recipes/demo/demo_corpus.py")
    pages = demo_corpus.list_pages(root / "library", limit=12)
    out = demo_corpus.build(pages)
    assert out["train"] and out["dialogs_train"]
    assert all(demo_corpus.DOC_SEPARATOR not in d and d == d.strip() for d in out["train"] + out["heldout"])
