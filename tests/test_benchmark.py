"""scripts/benchmark.py runs end to end and reports every field (never a timing), and the compiled
decode step gives the tokens of the eager one."""
import json
import logging
import subprocess
import sys

import pytest
import torch

import helpers
from llama import Llama

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

BENCHMARK = helpers.REPO / "scripts" / "benchmark.py"


def test_benchmark_reports_every_field(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARK), "--shape", "tiny", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=helpers.REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ours / hf" in proc.stdout and "ours / ceiling" in proc.stdout
    report = json.loads(out.read_text())

    assert report["complete"] is True
    assert set(report["results"]) == {"ours", "hf-eager", "hf-sdpa"}
    assert {"read", "copy", "gemv", "ceiling"} <= set(report["bandwidth_gb_s"])
    assert report["bytes"]["weights"] > 0 and report["bytes"]["kv_per_token"] > 0
    for impl, r in report["results"].items():
        assert set(r["decode"]) == {"short_b1", "short_b8", "long_b1"}, impl
        for entry in r["decode"].values():
            assert entry["tokens_per_s"] > 0 and entry["context"] > entry["prompt"]
        assert r["prefill"]["tokens_per_s"] > 0 and r["prefill"]["ttft_s"] > 0
        assert r["mixed"]["new_tokens"] == 8 * report["settings"]["mixed_new"]  # no early stop
        assert r["load_s"] > 0 and r["peak_rss_gb"] > 0
    assert r["mixed"]["lens"][0] == 16 and r["mixed"]["lens"][-1] == report["settings"]["prefill_len"]
    assert report["results"]["ours"]["original_loop"]["tokens_per_s"] > 0
    for name in ("decode tok/s, batch 1", "prefill", "end-to-end", "load time", "peak resident"):
        assert any(name in row["metric"] for row in report["table"]), name
    assert "batch of 8: ours / original loop" in report["ratios"]
    assert any(k.endswith("ours / ceiling") for k in report["ratios"])


def test_benchmark_help():
    proc = subprocess.run([sys.executable, str(BENCHMARK), "--help"], capture_output=True, text=True, timeout=60)
    text = proc.stdout + proc.stderr  # fire writes help to stderr when that is not a terminal
    assert proc.returncode == 0 and "--n_layers" in text and "--compile" in text


@pytest.mark.parametrize(
    "args, message",
    [(["--shape", "nope"], "error: unknown model 'nope': known are llama3-8b"),
     (["--impls", "ours,bogus"], "error: unknown implementation(s) ['bogus']: choose from ours")],
)
def test_bad_input_is_one_line(args, message):
    proc = subprocess.run([sys.executable, str(BENCHMARK), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(message), proc.stderr


PROMPTS = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15]]


@pytest.mark.slow
def test_a_run_cut_short_keeps_what_it_measured(tmp_path, monkeypatch):
    """The JSON is written after each implementation, so a run stopped midway (a time limit on a
    lent GPU) keeps the implementations it finished."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_script", BENCHMARK)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    real_run = subprocess.run

    def run(cmd, **kwargs):
        if "hf-eager.json" in " ".join(map(str, cmd)):
            raise KeyboardInterrupt  # stopped while the second implementation runs
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(bench.subprocess, "run", run)
    out = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(shape="tiny", quick=True, impls="ours,hf-eager", baseline=False, out=str(out))
    report = json.loads(out.read_text())
    assert report["complete"] is False and set(report["results"]) == {"ours"}
    assert report["results"]["ours"]["decode"]["short_b1"]["tokens_per_s"] > 0
    assert report["shape"] == "tiny" and report["bytes"]["weights"] > 0


def test_compiled_decode_gives_the_eager_tokens(tiny_ckpt, byte_tokenizer):
    kwargs = dict(max_seq_len=64, max_batch_size=4, device="cpu", dtype="float32")
    eager = Llama.build(str(tiny_ckpt), str(byte_tokenizer), **kwargs)
    compiled = Llama.build(str(tiny_ckpt), str(byte_tokenizer), compile=True, **kwargs)
    for prompts in (PROMPTS, PROMPTS[:1]):
        want, _ = eager.generate(prompts, max_gen_len=12, temperature=0)
        got, _ = compiled.generate(prompts, max_gen_len=12, temperature=0)
        assert got == want
    assert compiled._compiled_decode is not None  # it did not fall back


def test_failed_compilation_warns_and_decodes_eagerly(tiny_ckpt, byte_tokenizer, monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def step(*args):
            raise RuntimeError("no compiler here")

        return step

    monkeypatch.setattr(torch, "compile", broken_compile)
    kwargs = dict(max_seq_len=64, max_batch_size=4, device="cpu", dtype="float32")
    llama = Llama.build(str(tiny_ckpt), str(byte_tokenizer), compile=True, **kwargs)
    with caplog.at_level(logging.WARNING, logger="llama.generation"):
        got, _ = llama.generate(PROMPTS, max_gen_len=6, temperature=0)
    assert "no compiler here" in caplog.text and llama._compiled_decode is None
    eager = Llama.build(str(tiny_ckpt), str(byte_tokenizer), **kwargs)
    assert got == eager.generate(PROMPTS, max_gen_len=6, temperature=0)[0]
