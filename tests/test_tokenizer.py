"""Tokenizer tests against the real Llama 3 tokenizer file, Meta's llama_models as an independent reference."""
import base64
import os
from pathlib import Path

import pytest

from llama.tokenizer import Tokenizer

llama_models = pytest.importorskip("llama_models")

REAL_TOKENIZER = os.path.join(os.path.dirname(llama_models.__file__), "llama3", "tokenizer.model")

SPECIALS = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|reserved_special_token_0|>": 128002,
    "<|reserved_special_token_1|>": 128003,
    "<|finetune_right_pad_id|>": 128004,
    "<|step_id|>": 128005,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eom_id|>": 128008,
    "<|eot_id|>": 128009,
    "<|python_tag|>": 128010,
    "<|image|>": 128011,
    "<|reserved_special_token_2|>": 128012,
    "<|reserved_special_token_245|>": 128255,
}

VARIED = [
    "",
    "This is a test sentence.",
    "Héllo wörld, ça va? 漢字とカタカナ 🎉👍🏽 Ελληνικά",
    "def f(x):\n    return x ** 2  # it's   squared\r\n\n\n\t\tdone",
    "I'm sure they'll say 12345678 isn't 3.14159... WE'RE   ",
    "   leading and trailing   \n",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(REAL_TOKENIZER)


@pytest.fixture(scope="module")
def ref():
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer(Path(REAL_TOKENIZER))


def test_known_ids(tok):
    ids = [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tok.encode("This is a test sentence.", bos=True, eos=True) == ids
    assert tok.encode("user", bos=False, eos=False) == [882]
    assert tok.encode("system", bos=False, eos=False) == [9125]
    assert tok.encode("assistant", bos=False, eos=False) == [78191]
    assert tok.encode("\n\n", bos=False, eos=False) == [271]
    assert tok.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"


def test_special_tokens(tok):
    assert tok.n_words == 128256
    assert len(tok.special_tokens) == tok.num_reserved_special_tokens == 256
    assert sorted(tok.special_tokens.values()) == list(range(128000, 128256))
    for name, idx in SPECIALS.items():
        assert tok.special_tokens[name] == idx
        assert tok.encode(name, bos=False, eos=False, allowed_special="all") == [idx]
        assert tok.decode([idx]) == name
    ids = (tok.bos_id, tok.eos_id, tok.eom_id, tok.eot_id, tok.python_tag_id)
    assert ids == (128000, 128001, 128008, 128009, 128010)
    assert tok.stop_tokens == [128001, 128009, 128008]
    assert tok.pad_id == -1


def test_special_token_numbering_matches_meta(tok, ref):
    for idx in range(128000, 128256):
        assert tok.decode([idx]) == ref.decode([idx])


@pytest.mark.parametrize("text", VARIED)
def test_matches_meta_tokenizer(tok, ref, text):
    for bos in (False, True):
        assert tok.encode(text, bos=bos, eos=not bos) == ref.encode(text, bos=bos, eos=not bos)


@pytest.mark.parametrize("text", VARIED)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


def test_long_runs_do_not_panic(tok, ref):
    # Runs far beyond tiktoken's limits, and runs just around the 25,000-character cut.
    for text in ["x" * 1_000_000, " " * 1_000_000, ("ab" * 12_500 + "c" + " " * 25_001) * 8 + "end"]:
        tokens = tok.encode(text, bos=False, eos=False)
        assert tok.decode(tokens) == text
        assert tokens == ref.encode(text, bos=False, eos=False)


def test_special_text_typed_by_user_is_plain_text(tok):
    text = "say <|eot_id|> and <|begin_of_text|> now"
    plain = tok.encode(text, bos=False, eos=False)
    assert not set(plain) & set(tok.special_tokens.values())
    assert tok.decode(plain) == text
    special = tok.encode(text, bos=False, eos=False, allowed_special="all")
    assert 128009 in special and 128000 in special
    assert tok.encode(text, bos=False, eos=False, allowed_special={"<|eot_id|>"}).count(128000) == 0
    with pytest.raises(ValueError):
        tok.encode(text, bos=False, eos=False, disallowed_special="all")


def test_decode_partial_character_is_replaced(tok):
    tokens = tok.encode("🎉", bos=False, eos=False)
    assert len(tokens) > 1  # an emoji is several byte tokens
    assert "\ufffd" in tok.decode(tokens[:1])


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="tokenizer.model") as err:
        Tokenizer(str(missing))
    assert str(missing) in str(err.value)


def test_not_a_tiktoken_file(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x0a\x05hello\x12\x00 not base64 at all")
    with pytest.raises(ValueError, match="tiktoken"):
        Tokenizer(str(bad))


def _write_bpe(path: Path, ranks: dict) -> Path:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path


def test_synthetic_byte_tokenizer(tmp_path):
    path = _write_bpe(tmp_path / "bytes.model", {bytes([b]): b for b in range(256)})
    tok = Tokenizer(str(path))
    assert tok.n_words == 512
    assert tok.bos_id == 256 and tok.eos_id == 257 and tok.eot_id == 265 and tok.eom_id == 264
    assert tok.special_tokens["<|reserved_special_token_245|>"] == 511
    text = "héllo 🎉"
    tokens = tok.encode(text, bos=True, eos=True)
    assert tokens == [256] + list(text.encode("utf-8")) + [257]
    assert tok.decode(tokens[1:-1]) == text


def test_file_changed_in_place_is_reloaded(tmp_path):
    # tiktoken caches BPE files by path name; a new file at the same path must not reuse the old one.
    path = tmp_path / "tok.model"
    _write_bpe(path, {bytes([b]): b for b in range(256)})
    assert Tokenizer(str(path)).n_words == 512
    _write_bpe(path, {**{bytes([b]): b for b in range(256)}, b"ab": 256})
    tok = Tokenizer(str(path))
    assert tok.n_words == 513 and tok.encode("ab", bos=False, eos=False) == [256]
