"""`python scripts/bench_serve.py ...` runs benchmarks/bench_serve.py (see scripts/moved.py)."""
from moved import forward

if __name__ == "__main__":
    forward("benchmarks/bench_serve.py")
