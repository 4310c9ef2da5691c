#!/usr/bin/env bash
# The GPU check, one command on a machine with one CUDA GPU (H100 or H200: about 6 minutes):
# the CUDA tests, then batch-1 decode of the Llama 3 8B shape (random weights) in bfloat16, int8
# and int4 with compile=True, as tokens/s, share of the card's peak bandwidth and peak GPU memory,
# written to docs/benchmarks/gpu.json and rendered into docs/benchmarks.md.
#
#     scripts/gpu_check.sh                 # from anywhere; the repository's own package is used
#     GPU_CHECK_SHAPE=llama3.2-1b scripts/gpu_check.sh    # a smaller shape
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device here: run this on a GPU machine')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "== CUDA tests"
tests=0  # a failing test does not stop the benchmark: both results are wanted from one visit
timeout 150 python -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda.py tests/test_quantize.py tests/test_checkpoint.py || tests=$?
echo "== ${GPU_CHECK_SHAPE:-llama3-8b} batch-1 decode, compile=True"
status=0
timeout 330 python benchmarks/bench_gpu.py --shape "${GPU_CHECK_SHAPE:-llama3-8b}" --out docs/benchmarks/gpu.json || status=$?
# a run cut short keeps the precisions it finished (marked "complete": false) and still renders them
[ -f docs/benchmarks/gpu.json ] && python benchmarks/render.py
echo "== CUDA tests exit $tests, benchmark exit $status"
exit $(( tests != 0 ? tests : status ))
