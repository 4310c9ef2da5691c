"""`python scripts/bench_kernels.py ...` runs benchmarks/bench_kernels.py (see scripts/moved.py)."""
from moved import forward

if __name__ == "__main__":
    forward("benchmarks/bench_kernels.py")
