"""scripts/benchmark.py (benchmarks/bench_generate.py) runs end to end and reports every field (never a timing), and the compiled
decode step gives the tokens of the eager one."""
import json
import logging
import subprocess
import sys
import time

import pytest
import torch

import helpers
from llama import Llama

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

BENCHMARK = helpers.REPO / "scripts" / "benchmark.py"


def test_benchmark_reports_every_field_and_compares_the_policy_with_forced_dtypes(tmp_path):
    """One run (one start-up of the benchmark for both claims): every field of the report, never a
    timing, for ours beside hf-eager and hf-sdpa; and ours (the measured policy) beside forced
    bfloat16 and float32, with the ratio the benchmark pages quote; the quantized and llama.cpp
    implementations run when available, else are noted."""
    import inspect

    out = tmp_path / "bench.json"
    env = helpers.child_env(OMP_NUM_THREADS="2")
    env.pop("LLAMA_CPP_DIR", None)
    proc = subprocess.run(
        [sys.executable, str(BENCHMARK), "--shape", "tiny", "--quick", "--out", str(out),
         "--impls", "ours,hf-eager,hf-sdpa,ours-bf16,ours-f32,ours-int8,llama.cpp"],
        capture_output=True, text=True, timeout=300, cwd=helpers.REPO, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ours / hf" in proc.stdout and "ours / ceiling" in proc.stdout
    report = json.loads(out.read_text())

    assert report["complete"] is True
    quantized = "quantize" in inspect.signature(Llama.build).parameters
    assert set(report["results"]) == {"ours", "hf-eager", "hf-sdpa", "ours-bf16", "ours-f32"} | ({"ours-int8"} if quantized else set())
    assert {"read", "copy", "gemv", "ceiling"} <= set(report["bandwidth_gb_s"])
    assert report["bytes"]["weights"] > 0 and report["bytes"]["kv_per_token"] > 0
    for impl in ("ours", "hf-eager", "hf-sdpa"):
        r = report["results"][impl]
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
    # the measured policy beside the forced dtypes
    r = report["results"]
    assert r["ours-bf16"]["weights_dtype"] == "bfloat16" and r["ours-f32"]["weights_dtype"] == "float32"
    assert "measured on this CPU" in r["ours"]["policy"] and "(forced)" in r["ours-f32"]["policy"]
    for metric in ("decode tok/s, batch 1", "prefill tok/s"):
        assert any(k.startswith(metric) and k.endswith("ours / best of forced bf16, f32") for k in report["ratios"])
    assert not any("load time" in k and "forced" in k for k in report["ratios"])  # speeds only
    assert "llama.cpp not given" in report["skipped"]["llama.cpp"]  # never needed to pass
    if quantized:
        assert r["ours-int8"]["weight_bytes"] < r["ours-bf16"]["weight_bytes"]
    else:
        assert "no quantize=" in report["skipped"]["ours-int8"]
    assert "llama.cpp skipped: llama.cpp not given" in proc.stdout


BAD_INPUT = [(["--shape", "nope"], "error: unknown model 'nope': known are llama3-8b"),
             (["--impls", "ours,bogus"], "error: unknown implementation(s) ['bogus']: choose from ours")]


def test_benchmark_help_and_bad_input_is_one_line():
    """--help names its flags; an unknown model or implementation is one line (exit 1). The three
    processes run side by side."""
    procs = helpers.run_at_once([[sys.executable, str(BENCHMARK), *args] for args in [["--help"]] + [a for a, _ in BAD_INPUT]],
                                capture_output=True, text=True, timeout=60)
    text = procs[0].stdout + procs[0].stderr  # fire writes help to stderr when that is not a terminal
    assert procs[0].returncode == 0 and "--n_layers" in text and "--compile" in text
    for proc, (args, message) in zip(procs[1:], BAD_INPUT):
        assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], args
        assert proc.stderr.startswith(message), proc.stderr


PROMPTS = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15]]


@pytest.mark.slow
def test_a_run_cut_short_keeps_what_it_measured(tmp_path):
    """The JSON is written after each implementation, so a run stopped midway (a time limit on a
    lent GPU) keeps the implementations it finished."""
    import os
    import signal

    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCHMARK), "--shape", "tiny", "--quick", "--impls", "ours,hf-eager", "--baseline", "False",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=helpers.REPO, env=helpers.child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("[ours] done"):
                break
        for _ in range(600):  # stopped once the first is written, while the second runs
            if out.is_file() and out.read_text().endswith("}\n"):
                break
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
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
    assert compiled._compiled.fn is not None  # it did not fall back
    assert compiled._compiled.in_graph is None  # steps over 4 cache rows: no one-row probe run


def test_failed_compilation_warns_and_decodes_eagerly(tiny_ckpt, byte_tokenizer, monkeypatch, caplog):
    monkeypatch.setattr(torch, "compile", helpers.broken_compile)
    kwargs = dict(max_seq_len=64, max_batch_size=4, device="cpu", dtype="float32")
    llama = Llama.build(str(tiny_ckpt), str(byte_tokenizer), compile=True, **kwargs)
    with caplog.at_level(logging.WARNING, logger="llama.generation"):
        got, _ = llama.generate(PROMPTS, max_gen_len=6, temperature=0)
    assert "no compiler here" in caplog.text and llama._compiled.fn is None
    eager = Llama.build(str(tiny_ckpt), str(byte_tokenizer), **kwargs)
    assert got == eager.generate(PROMPTS, max_gen_len=6, temperature=0)[0]


def test_report_sets_each_precision_beside_llama_cpp(tmp_path):
    """The report takes partial entries (llama.cpp has decode and prefill only) and sets ours beside
    llama.cpp at each precision and quantized beside bfloat16, as measured."""
    def ours(tok_s: float, prefill: float, load_gb: float, weight_bytes: int) -> dict:
        return {"decode": {"short_b1": {"batch": 1, "prompt": 64, "new": 64, "context": 97, "tokens_per_s": tok_s}},
                "prefill": {"tokens": 512, "tokens_per_s": prefill, "ttft_s": 512 / prefill}, "load_s": 1.0,
                "load_peak_rss_gb": load_gb, "peak_rss_gb": load_gb, "weight_bytes": weight_bytes, "kv_itemsize": 2}

    results = {
        "ours": ours(12.0, 60.0, 3.0, 2_000), "ours-bf16": ours(11.0, 20.0, 3.0, 2_000),
        "ours-f32": ours(4.0, 58.0, 6.0, 4_000), "ours-int8": ours(18.0, 40.0, 1.5, 1_000),
        "llama.cpp-BF16": {"decode": {"short_b1": {"batch": 1, "context": 96, "tokens_per_s": 15.0}},
                           "prefill": {"tokens": 512, "tokens_per_s": 80.0, "ttft_s": 6.4}, "file_gb": 3.0},
        "llama.cpp-Q8_0": {"decode": {"short_b1": {"batch": 1, "context": 96, "tokens_per_s": 20.0}},
                           "prefill": {"tokens": 512, "tokens_per_s": 70.0, "ttft_s": 7.3}, "file_gb": 1.6},
    }
    bw = {"ceiling": 50.0, "gemv": 40.0}
    stored, rendered = tmp_path / "stored.json", tmp_path / "rendered.json"
    stored.write_text(json.dumps({"results": results, "bandwidth_gb_s": bw, "dtype": "bfloat16",
                                  "bytes": {"weights": 2_000, "kv_per_token": 100}}))
    proc = subprocess.run([sys.executable, str(BENCHMARK), "--report", str(stored), "--out", str(rendered)],
                          capture_output=True, text=True, timeout=120, cwd=helpers.REPO, env=helpers.child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(rendered.read_text())
    rows, ratios = report["table"], report["ratios"]
    decode = "decode tok/s, batch 1, context 97"
    assert ratios[f"{decode}: ours / best of forced bf16, f32"] == pytest.approx(12 / 11)
    assert ratios["prefill tok/s, 512-token prompt: ours / best of forced bf16, f32"] == pytest.approx(60 / 58)
    assert ratios[f"{decode}: ours-bf16 / llama.cpp-BF16"] == pytest.approx(11 / 15)
    assert ratios[f"{decode}: ours-int8 / llama.cpp-Q8_0"] == pytest.approx(18 / 20)
    assert ratios[f"{decode}: ours-int8 / ours-bf16"] == pytest.approx(18 / 11)
    assert ratios["peak resident memory after loading, GB: ours-int8 / ours-bf16"] == pytest.approx(0.5)
    # each share of the ceiling counts that implementation's own bytes: float32 reads twice as many
    f32_share, bf16_share = ratios[f"{decode}: ours-f32 / ceiling"], ratios[f"{decode}: ours-bf16 / ceiling"]
    assert f32_share / bf16_share == pytest.approx((4 / 11) * (4_000 + 97 * 100) / (2_000 + 97 * 100))
    assert {r["metric"] for r in rows} >= {decode, "model file, GB", "peak resident memory after loading, GB"}


RENDER = helpers.REPO / "benchmarks" / "render.py"


def _stored_run(date: str, tok_s: float) -> dict:
    return {
        "benchmark": "generate", "machine": {"cpu": "Some CPU 9000", "cores": 2, "gpu": None}, "date": date,
        "command": "python scripts/benchmark.py --shape tiny --quick --out bench.json", "torch": "2.13.0",
        "results": {"ours": {}},
        "table": [{"metric": "decode tok/s, batch 1", "ours": tok_s, "hf-sdpa": 10.0, "ours / hf": tok_s / 10},
                  {"metric": "load time, s", "ours": 1.25, "hf-sdpa": None}],
        "headline": [{"metric": "decode tok/s, batch 1 (ours)", "value": tok_s}],
    }


def test_render_writes_one_table_per_run_with_its_machine_date_and_command(tmp_path):
    """benchmarks/render.py: the page gets each JSON file's table (a new run replaces it, the prose
    around stays), and the README's headline table is filled between its markers."""
    stored, page, readme = tmp_path / "cpu-generate.json", tmp_path / "benchmarks.md", tmp_path / "README.md"
    page.write_text("# Benchmarks\n\nProse a person wrote, naming `<!-- bench:tables:start -->`.\n")
    readme.write_text("intro\n<!-- bench:start -->\nold numbers\n<!-- bench:end -->\nthe rest\n")

    def render() -> str:
        proc = subprocess.run([sys.executable, str(RENDER), str(stored), "--out", str(page), "--readme", str(readme)],
                              capture_output=True, text=True, timeout=60, cwd=helpers.REPO, env=helpers.child_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        return page.read_text()

    stored.write_text(json.dumps(_stored_run("2026-12-01 10:00 UTC", 123.456)))
    text = render()
    assert text.startswith("# Benchmarks\n\nProse a person wrote, naming `<!-- bench:tables:start -->`.\n")
    assert "## cpu-generate" in text and "Some CPU 9000, 2 cores; 2026-12-01 10:00 UTC; torch 2.13.0" in text
    assert "`python scripts/benchmark.py --shape tiny --quick --out bench.json`" in text
    assert "| metric | ours | hf-sdpa | ours / hf |\n|---|---|---|---|\n| decode tok/s, batch 1 | 123 | 10 | 12.3 |" in text
    assert "| load time, s | 1.25 | - | - |" in text
    assert readme.read_text() == (
        "intro\n<!-- bench:start -->\n| metric | value | machine | date |\n|---|---|---|---|\n"
        "| decode tok/s, batch 1 (ours) | 123 | Some CPU 9000, 2 cores | 2026-12-01 10:00 UTC |\n\n"
        "Measured with `python scripts/benchmark.py --shape tiny --quick --out bench.json` (tables: docs/benchmarks.md).\n"
        "<!-- bench:end -->\nthe rest\n")

    stored.write_text(json.dumps(_stored_run("2026-12-07 09:00 UTC", 150.0)))  # a new run replaces the table
    text = render()
    assert text.count("## cpu-generate") == 1 and "2026-12-01" not in text and "| decode tok/s, batch 1 | 150 |" in text
    assert text.startswith("# Benchmarks\n\nProse a person wrote, naming `<!-- bench:tables:start -->`.\n")
    assert "| 150 |" in readme.read_text()
