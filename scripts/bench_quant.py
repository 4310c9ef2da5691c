"""`python scripts/bench_quant.py ...` runs benchmarks/bench_quant.py (see scripts/moved.py)."""
from moved import forward

if __name__ == "__main__":
    forward("benchmarks/bench_quant.py")
