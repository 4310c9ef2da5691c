"""`python scripts/bench_load.py ...` runs benchmarks/bench_load.py (see scripts/moved.py)."""
from moved import forward

if __name__ == "__main__":
    forward("benchmarks/bench_load.py")
