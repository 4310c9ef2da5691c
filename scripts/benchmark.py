"""`python scripts/benchmark.py ...` runs benchmarks/bench_generate.py, or with --speculate or
--draft_ckpt_dir benchmarks/bench_speculative.py (see scripts/moved.py)."""
import sys

from moved import forward

SPECULATIVE_FLAGS = ("--speculate", "--draft_ckpt_dir")

if __name__ == "__main__":
    speculative = any(a.split("=", 1)[0] in SPECULATIVE_FLAGS for a in sys.argv[1:])
    forward("benchmarks/bench_speculative.py" if speculative else "benchmarks/bench_generate.py")
