"""Build the English corpus (and a few chat dialogs) for the self-trained demo Llama 3 model.

Source: the HTML documentation of Python 3.11, as packaged by Debian 12 ("bookworm") in
``python3.11-doc`` version ``3.11.2-6+deb12u8`` (sha256 pinned below), fetched with
``apt-get download`` and unpacked with ``dpkg -x``. We use only the rendered pages under
``usr/share/doc/python3.11/html``; the generated index/search/table-of-contents pages are skipped.

Licence: "Python software and documentation are licensed under the PSF License Agreement"
(Python Software Foundation License Version 2; examples, recipes and other code in the
documentation are dual licensed under the PSF License and the Zero-Clause BSD licence), see the
package's ``license.html`` / ``usr/share/doc/python3.11-doc/copyright``. The PSF licence allows
preparing and distributing derivative works (such as a model trained on the text) provided the
PSF licence and its copyright notice "Copyright (c) 2001-2023 Python Software Foundation; All
Rights Reserved" are retained with them -- ship that notice next to the demo weights.

Output (``data/demo/`` by default; ``data/`` is git-ignored):
  corpus_train.txt, corpus_heldout.txt   documents joined by DOC_SEPARATOR ("\\n\\n\\n"); inside a
                                         document blank-line runs are collapsed to one blank line,
                                         so ``read_documents`` recovers documents exactly.
  dialogs_train.jsonl, dialogs_heldout.jsonl
                                         ``{"dialog": [{"role": "user", ...}, {"role": "assistant", ...}]}``
                                         questions about documented Python objects, answered with
                                         the first sentence of their description.
A document (one HTML page) is held out iff sha256(its relative path) mod 50 == 0 (about 2%); a
dialog is held out iff the page it comes from is, so no held-out text is ever trained on.

    python recipes/demo/demo_corpus.py            # fetch (cached in data/cache/), extract, write data/demo/*
    python recipes/demo/demo_corpus.py --limit=20 # quick run on the first 20 pages
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

DEB_PACKAGE = "python3.11-doc"
DEB_VERSION = "3.11.2-6+deb12u8"
DEB_SHA256 = "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b"
HTML_ROOT = "usr/share/doc/python3.11/html"
DOC_SEPARATOR = "\n\n\n"
HELDOUT_MODULUS = 50  # 1 page in 50 -> ~2% held out
# Generated pages that are lists of links, not prose; legal texts of bundled third-party code.
SKIP_PAGES = re.compile(r"^(genindex.*|py-modindex|search|contents|download|license|copyright)\.html$")

_VOID = {"br", "img", "hr", "input", "meta", "link", "wbr", "col", "area", "source"}
_BLOCK = {"p", "div", "section", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "dl", "ul",
          "ol", "blockquote", "table", "figure", "figcaption", "caption", "aside", "tr"}
_SKIP_CLASSES = {"headerlink", "footnote-reference", "fn-bracket"}
_DIALOG_KINDS = {"function", "method", "class", "exception", "data", "attribute", "classmethod",
                 "staticmethod", "property", "decorator"}
# Imperative docstring openings ("Return a list ...") read as answers once made third person.
_VERBS = set("""accept acquire add append apply assert attempt bind build calculate call cancel change
check clear close compare compile compute connect construct convert copy create decode define
delete determine disable display draw dump emit enable encode ensure escape evaluate execute expand
extract fetch find flush format generate get handle initialize insert install invoke iterate join
kill listen load lock log make map mark match modify move normalize notify open pack parse perform
pop print process push put quote raise read receive register release remove replace reset resolve
represent retrieve return reverse run save schedule search seek select send set show shut signal skip sort
split start stop store strip submit swap terminate test transform translate truncate unlock unpack update use
validate verify wait wrap write yield""".split())
_ANSWER_SKIP = re.compile(r"^(If|When|For|All|See|Note|Changed|New in|Deprecated|Availability|"
                          r"Example|Arguments|Parameters|Keyword|Optional|The (optional )?arguments?)\b")
_HAS_VERB = re.compile(r"\b(is|are|was|will|can|may|must|should|does|do|has|have)\b")


def _third_person(verb: str) -> str:
    if verb.endswith(("s", "sh", "ch", "x", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2:-1] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


_SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\betc)(?<!\bvs)(?<=[.!?])\s+(?=[A-Z(`\"'])")


def _classes(attrs: list[tuple[str, str | None]]) -> set[str]:
    return set((dict(attrs).get("class") or "").split())


class _PageParser(HTMLParser):
    """Turns the main body of one Sphinx page into plain-text blocks, and records for every
    documented Python object its name, kind and first description paragraph."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self.entries: list[tuple[str, str, str]] = []  # (object name, kind, first paragraph)
        self._stack: list[tuple[str, bool]] = []  # (tag, inside skipped subtree)
        self._body_depth: int | None = None  # stack depth of <div role="main"> while inside it
        self._buf: list[str] = []
        self._pre = 0
        self._row: list[str] | None = None
        self._table: list[str] | None = None  # rows of the open (outermost) table
        self._list_kinds: list[tuple[str, int]] = []  # ("ul"|"ol", next item number)
        self._prefix = ""
        self._dl: list[list] = []  # per open <dl>: [kind or None, object id or None]
        self._want_p: int | None = None  # stack depth of the <dd> whose first <p> we still want
        self._p_start: int | None = None

    # -- helpers -----------------------------------------------------------------------------
    def _skipping(self) -> bool:
        return bool(self._stack) and self._stack[-1][1]

    def _flush(self) -> None:
        raw = "".join(self._buf)
        self._buf = []
        text = re.sub(r"\s+", " ", raw).strip()
        if text:
            self.blocks.append(self._prefix + text)
            self._prefix = ""

    # -- HTMLParser interface ----------------------------------------------------------------
    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID:
            if tag == "br" and self._body_depth is not None:
                self._buf.append("\n" if self._pre else " ")
            return
        a = dict(attrs)
        skip = self._skipping() or tag in ("script", "style") or bool(_classes(attrs) & _SKIP_CLASSES)
        self._stack.append((tag, skip))
        if self._body_depth is None:
            if tag == "div" and a.get("role") == "main":
                self._body_depth = len(self._stack)
            return
        if skip:
            return
        if tag == "pre":
            self._flush()
            self._pre += 1
        elif tag in ("td", "th"):
            self._buf = []
        elif tag == "tr":
            self._flush()
            self._row = []
        elif tag == "table" and self._table is None:
            self._flush()
            self._table = []
        elif tag in _BLOCK and self._row is None and not self._pre:
            self._flush()
            if tag in ("ul", "ol"):
                self._list_kinds.append((tag, 1))
            elif tag == "li" and self._list_kinds:
                kind, n = self._list_kinds[-1]
                self._prefix = "- " if kind == "ul" else f"{n}. "
                self._list_kinds[-1] = (kind, n + 1)
            elif tag == "dl":
                cls = _classes(attrs)
                kind = next((c for c in cls if c in _DIALOG_KINDS), None) if "py" in cls else None
                self._dl.append([kind, None])
            elif tag == "dt" and self._dl and self._dl[-1][0] and self._dl[-1][1] is None and a.get("id"):
                self._dl[-1][1] = a["id"]
            elif tag == "dd" and self._dl and self._dl[-1][1]:
                self._want_p = len(self._stack)
            elif tag == "p" and self._want_p == len(self._stack) - 1:
                self._p_start = len(self.blocks)

    def handle_endtag(self, tag: str) -> None:
        if not any(t == tag for t, _ in self._stack):
            return  # stray end tag: ignore rather than unwinding the stack
        while self._stack:
            open_tag, skip = self._stack.pop()
            depth = len(self._stack) + 1
            if self._body_depth is not None and depth == self._body_depth:
                self._flush()
                self._body_depth = None
            elif self._body_depth is not None and not skip:
                self._close(open_tag, depth)
            if open_tag == tag:
                break

    def _close(self, tag: str, depth: int) -> None:
        if tag == "pre":
            self._pre -= 1
            code = "\n".join(line.rstrip() for line in "".join(self._buf).strip("\n").split("\n"))
            self._buf = []
            if code.strip():
                self.blocks.append(code)
        elif tag in ("td", "th") and self._row is not None:
            self._row.append(re.sub(r"\s+", " ", "".join(self._buf)).strip())
            self._buf = []
        elif tag == "tr" and self._row is not None:
            if any(self._row) and self._table is not None:
                self._table.append(" | ".join(self._row))
            self._row = None
        elif tag == "table" and self._table is not None and self._row is None:
            if self._table:
                self.blocks.append("\n".join(self._table))
            self._table = None
        elif tag in _BLOCK and self._row is None and not self._pre:
            self._flush()
            if tag in ("ul", "ol") and self._list_kinds:
                self._list_kinds.pop()
            elif tag == "dl" and self._dl:
                self._dl.pop()
            elif tag == "dd" and self._want_p == depth:
                self._want_p = None
            elif tag == "p" and self._p_start is not None and self._want_p == depth - 1:
                if len(self.blocks) > self._p_start and self._dl:
                    self.entries.append((self._dl[-1][1], self._dl[-1][0], self.blocks[-1]))
                self._p_start = None
                self._want_p = None

    def handle_data(self, data: str) -> None:
        if self._body_depth is not None and not self._skipping():
            self._buf.append(data)


def page_to_text(html: str) -> tuple[str, list[tuple[str, str, str]]]:
    """Plain text of a Sphinx page's main body, and its documented objects (name, kind, first paragraph)."""
    parser = _PageParser()
    parser.feed(html)
    parser.close()
    text = "\n\n".join(parser.blocks)
    # Documents never hold two blank lines in a row, so DOC_SEPARATOR stays unambiguous.
    text = re.sub(r"\n{3,}", "\n\n", text.replace("\r", "")).strip()
    return text, parser.entries


def is_heldout(name: str) -> bool:
    """Fixed, order-independent split rule: depends only on the document's name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % HELDOUT_MODULUS == 0


def make_dialog(name: str, kind: str, paragraph: str) -> dict | None:
    """A short question/answer pair about one documented object, or None if the text is unsuitable."""
    first = _SENTENCE_END.split(paragraph, maxsplit=1)[0].strip()
    if not (20 <= len(first) <= 300) or not first.endswith(".") or "\n" in first:
        return None
    shown = f"`{name}`"
    if kind in ("function", "method", "classmethod", "staticmethod", "decorator"):
        noun = "method" if kind in ("classmethod", "staticmethod") else kind
        question = f"What does the {shown} {noun} do?"
    elif kind in ("class", "exception"):
        question = f"What is the {shown} {kind}?"
    else:
        question = f"What is {shown}?"
    if _ANSWER_SKIP.match(first):
        return None
    words = first.split(" ")
    head = words[0].lower()
    if head in _VERBS:  # "Return x and set y." -> "`f` returns x and sets y."
        words[0] = _third_person(head)
        for i in range(1, len(words) - 1):  # parallel imperatives: "... and return y"
            if words[i] in ("and", "or") and words[i + 1] in _VERBS:
                words[i + 1] = _third_person(words[i + 1])
        answer = f"{shown} " + " ".join(words)
    elif head.endswith("s") and head[:-1] in _VERBS or head[:-2] in _VERBS and head.endswith("es"):
        answer = f"{shown} {head} " + " ".join(words[1:])  # "Returns x." -> "`f` returns x."
    elif head in ("called", "raised", "used"):
        answer = f"{shown} is {head} " + " ".join(words[1:])
    elif head in ("a", "an") and not _HAS_VERB.search(first):
        answer = f"{shown} is {head} " + " ".join(words[1:])
    else:
        answer = first
    return {"dialog": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def build(pages: list[tuple[str, str]]) -> dict[str, list]:
    """Split (name, html) pages into train/held-out documents and dialogs; deterministic."""
    out: dict[str, list] = {"train": [], "heldout": [], "dialogs_train": [], "dialogs_heldout": []}
    seen: set[str] = set()
    for name, html in sorted(pages):
        text, entries = page_to_text(html)
        split = "heldout" if is_heldout(name) else "train"
        if text:
            out[split].append(text)
        for obj, kind, para in entries:
            dialog = None if obj in seen else make_dialog(obj, kind, para)
            seen.add(obj)
            if dialog:
                out["dialogs_" + split].append(dialog)
    return out


def fetch_html(cache_dir: Path) -> Path:
    """Download (once) the pinned .deb, verify its hash, unpack it; return the HTML root."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    deb = cache_dir / f"{DEB_PACKAGE}_{DEB_VERSION.replace(':', '%3a')}_all.deb"
    if not deb.exists():
        subprocess.run(["apt-get", "download", f"{DEB_PACKAGE}={DEB_VERSION}"], cwd=cache_dir, check=True)
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    if digest != DEB_SHA256:
        raise SystemExit(f"{deb}: sha256 {digest} != pinned {DEB_SHA256}; refusing a different corpus")
    root = cache_dir / "unpacked"
    if not (root / HTML_ROOT).is_dir():
        tmp = tempfile.mkdtemp(dir=cache_dir)  # unpack aside, then rename: no half-unpacked cache
        subprocess.run(["dpkg", "-x", str(deb), tmp], check=True)
        Path(tmp).rename(root)
    return root / HTML_ROOT


def list_pages(html_root: Path, limit: int | None = None) -> list[tuple[str, str]]:
    """(relative path, html) of the prose pages in sorted order, optionally only the first `limit`."""
    paths = sorted(p for p in html_root.rglob("*.html")
                   if not p.relative_to(html_root).parts[0].startswith("_")
                   and not SKIP_PAGES.match(p.relative_to(html_root).as_posix()))
    paths = paths[:limit] if limit else paths
    return [(p.relative_to(html_root).as_posix(), p.read_text(encoding="utf-8")) for p in paths]


def read_documents(path: str | Path) -> list[str]:
    """Documents of a corpus file written by this script."""
    text = Path(path).read_text(encoding="utf-8")
    return [d for d in text.removesuffix("\n").split(DOC_SEPARATOR) if d]


def read_dialogs(path: str | Path) -> list[list[dict]]:
    """Dialogs (lists of {"role", "content"} messages) of a JSONL file written by this script."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["dialog"] for line in f if line.strip()]


def main(out_dir: str = "data/demo", cache_dir: str = "data/cache/python3.11-doc", limit: int | None = None) -> None:
    """Fetch the pinned Python docs package and write the corpus and dialog splits to out_dir.

    Args:
        out_dir: where corpus_{train,heldout}.txt and dialogs_{train,heldout}.jsonl go.
        cache_dir: where the .deb is downloaded and unpacked (reused on later runs).
        limit: only use the first N pages (sorted by path), for quick checks.
    """
    pages = list_pages(fetch_html(Path(cache_dir)), limit)
    out = build(pages)
    dest = Path(out_dir)
    dest.mkdir(parents=True, exist_ok=True)
    for split in ("train", "heldout"):
        text = DOC_SEPARATOR.join(out[split]) + "\n"
        (dest / f"corpus_{split}.txt").write_text(text, encoding="utf-8")
        with open(dest / f"dialogs_{split}.jsonl", "w", encoding="utf-8") as f:
            for d in out["dialogs_" + split]:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        print(f"{split}: {len(out[split])} documents, {len(text.encode()):,} bytes, "
              f"{len(out['dialogs_' + split])} dialogs")
    print(f"pages: {len(pages)}; written to {dest}/")


if __name__ == "__main__":
    from llama.cli import run

    run(main)
