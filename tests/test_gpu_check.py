"""The prepared GPU check (scripts/gpu_check.sh): its benchmark runs end to end on the CPU at a tiny
shape, so that it cannot rot where no GPU is at hand, and its JSON renders into the docs' table."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


def test_the_gpu_benchmark_runs_on_cpu_and_renders(tmp_path):
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, "benchmarks/bench_gpu.py", "--shape", "tiny", "--device", "cpu", "--nocompile",
           "--new_tokens", "6", "--prompt_len", "8", "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["complete"] is True
    assert [row["precision"] for row in data["table"]] == ["bfloat16", "int8", "int4"]
    for row in data["table"]:
        assert row["tokens/s"] > 0 and row["GB read per token"] > 0 and row["peak memory GB"] > 0
    gb = {row["precision"]: row["GB read per token"] for row in data["table"]}
    assert gb["int4"] < gb["int8"] < gb["bfloat16"]  # the bytes as held
    page = tmp_path / "benchmarks.md"
    r = subprocess.run([sys.executable, "benchmarks/render.py", str(out), "--out", str(page), "--readme", ""],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "### gpu" in page.read_text() and "share of peak bandwidth" in page.read_text()


def test_the_peak_bandwidth_follows_the_card_name():
    from bench_gpu import card_peak_tb_s

    assert card_peak_tb_s("NVIDIA H100 80GB HBM3") == 3.35
    assert card_peak_tb_s("NVIDIA H100 PCIe") == 2.0
    assert card_peak_tb_s("NVIDIA H200") == 4.8
    assert card_peak_tb_s("NVIDIA GeForce RTX 4090") is None


def test_the_gpu_check_script_is_one_valid_command():
    script = REPO / "scripts" / "gpu_check.sh"
    assert script.stat().st_mode & 0o111
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "bench_gpu.py" in script.read_text() and "-m gpu" in script.read_text()
