#!/usr/bin/env bash
# The benchmark suite behind docs/benchmarks.md, as run on one GPU:
#   bash benchmarks/suite.sh SHARED_DIR OUT_DIR
# SHARED_DIR holds models/uni-tiny-28m and data/{calib,dev_eval}.txt (../shared here).
# Every line of OUT_DIR/quality.jsonl and OUT_DIR/cost.jsonl is one run (benchmarks/README.md).
set -uo pipefail
shared=${1:?SHARED_DIR}; out=${2:?OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
model=$shared/models/uni-tiny-28m
common=(--calib "$shared/data/calib.txt" --eval "$shared/data/dev_eval.txt"
        --heldout "$here/data/heldout_manpages.txt" --num-samples 128 --seq-len 512
        --eval-window 1024 --eval-tokens 131072 --dtype float32 --output "$out/quality.jsonl")
q() { python3 "$here/quality.py" "$model" "${common[@]}" "$@" 2>>"$out/quality.log"; }

# 1. every method from 40% to 80% and 2:4; UniPruning as shipped (recipes: kappa 0.1, least-squares
#    re-fit aimed 30% at the dense model's outputs) and issue 6's prototype (averaged anchor: lam -> 1, same re-fit)
q --methods wanda sparsegpt magnitude --configs 0.4 0.5 0.6 0.7 0.8 2:4
q --methods unipruning --configs 0.4 0.5 0.6 0.7 0.8 2:4 --no-dense --label shipped \
  --unipruning-args reconstruct=least_squares kappa=0.1 dense_target=0.3
q --methods unipruning --configs 0.5 0.6 0.7 2:4 --no-dense --label prototype \
  --unipruning-args reconstruct=least_squares lam=0.999999
# 2. cost on 7B-class layers: two Llama-2-7B-shaped decoder layers, random bf16 weights
python3 "$here/make_llama.py" "${TMPDIR:-/tmp}/llama7b-2l" --hidden 4096 --intermediate 11008 --layers 2 --heads 32 >&2
python3 "$here/quality.py" "${TMPDIR:-/tmp}/llama7b-2l" --methods wanda sparsegpt unipruning --configs 0.5 \
  --calib "$shared/data/calib.txt" --eval "$shared/data/dev_eval.txt" --num-samples 16 --seq-len 2048 \
  --eval-window 1024 --eval-tokens 2048 --dtype bfloat16 --no-dense --label llama7b-shapes \
  --unipruning-args reconstruct=least_squares kappa=0.1 dense_target=0.3 --output "$out/cost.jsonl" 2>>"$out/cost.log"
rm -rf "${TMPDIR:-/tmp}/llama7b-2l"

# 3. layer budgets at high sparsity: one global threshold (clamp 0.1) and OWL (both mask every layer at the
#    end, so dense_target does not apply: compare with the kappa=0.1 least-squares rows without it)
q --methods unipruning --configs 0.7 0.8 --no-dense --label global \
  --unipruning-args reconstruct=least_squares kappa=0.1 allocation=global clamp=0.1
q --methods unipruning --configs 0.7 0.8 --no-dense --label owl \
  --unipruning-args reconstruct=least_squares kappa=0.1 allocation=owl
