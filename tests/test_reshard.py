"""scripts/reshard.py: bit-exact round trips through other shard counts, the canonical Meta layout,
tied checkpoints, dtype conversion, and refusals."""
import json
import os
import subprocess
import sys

import pytest
import torch

import helpers
from llama.weights import checkpoint, reshard, save


PARAMS = {**helpers.TINY_PARAMS, "use_scaled_rope": True}  # 2 KV heads: 4 shards repeat each head twice
SCRIPT = str(helpers.REPO / "scripts" / "reshard.py")


def run_cli(*args):
    pythonpath = os.pathsep.join(p for p in (str(helpers.REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


def read_all(ckpt_dir) -> list[dict]:
    return [checkpoint.load_shard(p) for p in checkpoint.shard_paths(ckpt_dir)]


def assert_same_shards(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert list(g) == list(w)  # same keys, in Meta's order
        for key in w:
            assert g[key].dtype == w[key].dtype and torch.equal(g[key], w[key]), key


@pytest.fixture
def original(tmp_path):
    ckpt = helpers.make_checkpoint(tmp_path / "orig", PARAMS, n_shards=1, seed=11)
    helpers.write_byte_tokenizer(ckpt / "tokenizer.model")
    return ckpt


def test_round_trip_1_4_2_1_is_bit_exact(tmp_path, original):
    r = run_cli(original, tmp_path / "mp4", "--shards", 4)  # the CLI once; the rest in-process
    assert r.returncode == 0, r.stderr
    assert "[4/4] wrote and verified consolidated.03.pth" in r.stdout
    reshard.reshard(tmp_path / "mp4", tmp_path / "mp2", shards=2)
    reshard.reshard(tmp_path / "mp2", tmp_path / "back", shards=1)
    assert_same_shards(read_all(tmp_path / "back"), read_all(original))
    for step in ("mp4", "mp2", "back"):
        assert (tmp_path / step / "params.json").read_bytes() == (original / "params.json").read_bytes()
        assert (tmp_path / step / "tokenizer.model").read_bytes() == (original / "tokenizer.model").read_bytes()


@pytest.mark.parametrize("shards", [2, 4])
def test_output_is_the_canonical_meta_layout(tmp_path, original, shards):
    # the same files save_checkpoint writes from the full weights (whole KV heads repeated past 2 shards)
    reshard.reshard(original, tmp_path / "out", shards=shards)
    expected = helpers.make_checkpoint(tmp_path / "expected", PARAMS, n_shards=shards, seed=11)
    assert_same_shards(read_all(tmp_path / "out"), read_all(expected))


def test_tied_checkpoint_stays_tied_and_dtype_converts(tmp_path):
    full = helpers.random_state_dict(PARAMS, seed=5)
    del full["output.weight"]
    save.save_checkpoint(full, PARAMS, tmp_path / "tied", n_shards=2)
    reshard.reshard(tmp_path / "tied", tmp_path / "one", shards=1, dtype="bfloat16")
    (shard,) = read_all(tmp_path / "one")
    assert "output.weight" not in shard
    assert set(shard) == set(full)
    for key, t in full.items():
        assert shard[key].dtype == torch.bfloat16 and torch.equal(shard[key], t.to(torch.bfloat16)), key


def test_refusals_are_one_line_errors(tmp_path, original):
    reshard.reshard(original, tmp_path / "mp2", shards=2)
    r = run_cli(tmp_path / "mp2", tmp_path / "mp3", "--shards", 3)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "neither count divides the other" in r.stderr
    with pytest.raises(ValueError, match="already holds 4 file.*choose a new or empty directory, or pass --overwrite"):
        reshard.reshard(original, tmp_path / "mp2", shards=2)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "params.json").write_text(json.dumps({**PARAMS, "dim": 128}))
    (bad / "consolidated.00.pth").write_bytes((original / "consolidated.00.pth").read_bytes())
    with pytest.raises(ValueError, match=r"params.json does not match the weights: tok_embeddings\.weight is \(512, 64\)"):
        reshard.reshard(bad, tmp_path / "never", shards=1)
    assert not (tmp_path / "never").exists()


def test_help():
    r = run_cli("--help")
    assert r.returncode == 0
    assert "reshard.py CKPT_DIR OUT_DIR SHARDS" in r.stdout + r.stderr  # fire writes help to stderr when piped
