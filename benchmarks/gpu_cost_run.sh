#!/usr/bin/env bash
# Pruning cost on a GPU (issue 14): two Llama-2-7B-shaped decoder layers (random bf16 weights,
# make_llama.py), 16 x 2048 calibration tokens, llm-compressor's SparseGPT against UniPruning's
# recipes, one oneshot per process, timed by quality.py (seconds, cpu_seconds, device peak MiB).
# From the repository root on a CUDA machine without a registry: llm-compressor and its missing
# dependencies come as wheels in .whl/ (pip download ... --python-version 3.12, see
# /work/.library/device/README.md), installed with --no-deps into /tmp/site.
#   OUT=/tmp/out LIMIT=200 bash benchmarks/gpu_cost_run.sh
# Writes OUT/cost14.jsonl: timings of the ADMM W-step's operations at the layer widths first (a
# Cholesky factor per rho, then triangular solves or the explicit inverse: admm.ridge_solver), then
# quality.py's lines; OUT/cost14.err: every part's stderr.
# SHAPE and DEVICE override the model shape and device for a dry run on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the results}
LIMIT=${LIMIT:-200}
START=$(date +%s)
python3 -c "import llmcompressor" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, pyarrow, datasets, llmcompressor; print('versions', torch.__version__, transformers.__version__, pyarrow.__version__, datasets.__version__, llmcompressor.__version__)" >> "$OUT/cost14.err" 2>&1

left() { echo $(( LIMIT - ($(date +%s) - START) )); }

SHAPE=${SHAPE:-"--hidden 4096 --intermediate 11008 --heads 32"}
DEVICE=${DEVICE:-cuda}
python3 - >> "$OUT/cost14.jsonl" 2>> "$OUT/cost14.err" <<'EOF'
import json, time, torch
for n in (4096, 11008) if torch.cuda.is_available() else ():
    x = torch.randn(2 * n, n, device="cuda")
    h = x.T @ x / x.shape[0] + 0.01 * torch.eye(n, device="cuda")
    lower = torch.linalg.cholesky(h)
    w = torch.randn(4096, n, device="cuda")
    for name, fn in (("cholesky_fp32", lambda: torch.linalg.cholesky(h)), ("cholesky_inverse", lambda: torch.cholesky_inverse(lower)),
                     ("two_triangular_solves_4096_rows", lambda: torch.linalg.solve_triangular(lower, torch.linalg.solve_triangular(
                         lower.T, w, upper=True, left=False), upper=False, left=False)), ("product_4096_rows", lambda: w @ h)):
        fn(); torch.cuda.synchronize(); t = time.perf_counter(); fn(); torch.cuda.synchronize()
        print(json.dumps({"op": name, "n": n, "seconds": time.perf_counter() - t}), flush=True)
EOF
cat "$OUT/cost14.jsonl"

# shellcheck disable=SC2086
python3 benchmarks/make_llama.py /tmp/llama7b-2l $SHAPE --layers 2 2>> "$OUT/cost14.err" || exit 1
common=(/tmp/llama7b-2l --configs 0.5 --num-samples 16 --seq-len 2048 --eval-window 1024 --eval-tokens 2048
        --dtype bfloat16 --device "$DEVICE" --no-dense --label llama7b-2l-shapes --output "$OUT/cost14.jsonl")
run() {  # run LABEL ARGS...: one quality.py process, capped by the time left
  local limit; limit=$(left)
  if (( limit < 20 )); then echo "== $1: skipped, no time left" >&2; return; fi
  echo "== $1 (limit $limit s)" >&2
  timeout -k 5 "$limit" python3 benchmarks/quality.py "${common[@]}" "${@:2}" 2>> "$OUT/cost14.err" | cut -c1-200
}
run sparsegpt --methods sparsegpt
run shipped --methods unipruning --unipruning-args reconstruct=admm kappa=0.1 dense_target=0.3 dense_target_every=2
run tuned --methods unipruning --unipruning-args reconstruct=admm kappa=0.1 dense_target=0.3 dense_target_every=1 block_tune_epochs=2
run least_squares --methods unipruning --unipruning-args reconstruct=least_squares kappa=0.1 dense_target=0.3
run sparsegpt2 --methods sparsegpt
run alps --methods alps
