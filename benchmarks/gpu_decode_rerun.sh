#!/usr/bin/env bash
# Second, shorter GPU call (issue 17): after the one-token path moved to flat tiles. Triton tests
# on the GPU, then dense vs triton_24 at n = 1, 2, 4 on the target shapes, one-token configs swept.
#   OUT=/tmp/out bash benchmarks/gpu_decode_rerun.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the results}
export PYTHONPATH=src PYTHONUNBUFFERED=1
start=$(date +%s)
per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 60")
timeout 75 python3 -m pytest -q -p no:cacheprovider $per_test tests/test_serving_triton24.py > "$OUT/pytest2.log" 2>&1
echo "pytest rc=$? after $(( $(date +%s) - start )) s"; tail -3 "$OUT/pytest2.log"
timeout 80 python3 benchmarks/sparse_matmul.py --tune --budget-s 50 --n 1 2 4 --kernels dense triton_24 \
  --shapes 4096x14336 14336x4096 28672x8192 8192x28672 4096x4096 \
  --out "$OUT/h200-decode-2.jsonl" --sweep-out "$OUT/sweep2.jsonl" --tuned-out "$OUT/tuned2.json" > /dev/null 2> "$OUT/bench2.log"
echo "bench rc=$? after $(( $(date +%s) - start )) s"; grep -v Warn "$OUT/bench2.log" | tail -2
python3 benchmarks/sparse_matmul.py --table "$OUT/h200-decode-2.jsonl"
