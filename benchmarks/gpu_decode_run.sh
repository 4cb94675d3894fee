#!/usr/bin/env bash
# One GPU call for the Triton 2:4 decode kernel (issue 17): the serving kernel tests on the GPU
# (Triton vs exact product on Llama shapes in bf16 / fp16, the op under CUDA-graph replay and
# torch.compile, cuSPARSELt), then benchmarks/sparse_matmul.py with a block-config sweep per
# (shape, n). Needs torch + triton (+ pytest for the tests); writes everything under OUT.
#   OUT=/tmp/out bash benchmarks/gpu_decode_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the results}
export PYTHONPATH=src PYTHONUNBUFFERED=1
start=$(date +%s)
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cusparselt', torch.backends.cusparselt.version())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 90")
timeout 100 python3 -m pytest -q -p no:cacheprovider $per_test \
  tests/test_serving_triton24.py tests/test_serving_kernels.py > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? after $(( $(date +%s) - start )) s"; tail -4 "$OUT/pytest.log"

# Target shapes first, so that a timeout leaves the rows that matter.
timeout 210 python3 benchmarks/sparse_matmul.py --tune --budget-s 110 --n 1 2 4 8 16 32 64 \
  --shapes 4096x14336 14336x4096 28672x8192 8192x28672 4096x4096 6144x4096 28672x4096 12288x4096 22016x4096 4096x11008 10240x8192 8192x8192 \
  --out "$OUT/h200-decode.jsonl" --sweep-out "$OUT/sweep.jsonl" --tuned-out "$OUT/tuned.json" > /dev/null 2> "$OUT/bench.log"
echo "bench rc=$? after $(( $(date +%s) - start )) s"; tail -3 "$OUT/bench.log"
python3 benchmarks/sparse_matmul.py --table "$OUT/h200-decode.jsonl"
