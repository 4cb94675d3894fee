#!/usr/bin/env bash
# One GPU call for the Triton 2:4 decode kernel (issue 17), at most 150 s wall in all. From the
# repository root on a CUDA machine (torch + triton; no pytest, no internet needed):
#   OUT=/tmp/out bash benchmarks/gpu_decode_run.sh
# Parts, each its own process with its own time limit (capped by what is left of the 150 s), so
# that one failing or timing out loses nothing of the others; every result line is flushed as
# soon as it is known. Writes six JSONL files under OUT:
#   sweep.jsonl        every Triton block config timed at n = 1, 2, 4, 8 on the five shapes
#   decode.jsonl       dense vs triton_24 (best config of the sweep) per shape and n, GB/s, ulps
#   correctness.jsonl  the 1-8 token path, every load-time candidate config, vs exact and dense
#   decide.jsonl       the plugin's kernels.decide per shape: choices, configs, load seconds
#                      (Triton's cache warm from the sweep; then, with the time left, one shape
#                      from an empty cache: the cost of a first load on a new machine)
#   graph.jsonl        the op under CUDA-graph replay, torch.compile dynamic / reduce-overhead
#   run.jsonl          the environment, then per part: exit code, seconds, stderr tail
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the results}
export PYTHONPATH=src PYTHONUNBUFFERED=1
SHAPES=${SHAPES:-"4096x14336 14336x4096 28672x8192 8192x28672 4096x4096"}  # override only for a dry run
START=$(date +%s)
LIMIT=144  # every part ends by then (+2 s to kill one that overruns), the table after it

log_line() {  # one JSON line for run.jsonl: the named values, read from V_<name> in the environment
  python3 -c 'import json, os, sys
v = {k: os.environ.get("V_" + k, "") for k in sys.argv[1:]}
print(json.dumps({k: int(x) if x.lstrip("-").isdigit() else x for k, x in v.items()}))' "$@" >> "$OUT/run.jsonl"
}

part() {  # part NAME SECONDS command...: run with min(SECONDS, time left), log rc / seconds / stderr tail
  local name=$1 want=$2; shift 2
  local left=$(( LIMIT - ($(date +%s) - START) ))
  local limit=$(( want < left ? want : left ))
  if (( limit < 5 )); then
    V_part=$name V_rc=skipped V_seconds=0 V_stderr_tail="no time left" log_line part rc seconds stderr_tail
    echo "== $name: skipped, no time left" >&2; return
  fi
  local t0=$(date +%s)
  timeout -k 2 "$limit" "$@" 2> "/tmp/gpu_decode_$name.err"
  local rc=$?
  V_part=$name V_rc=$rc V_seconds=$(( $(date +%s) - t0 )) V_limit=$limit V_stderr_tail="$(grep -v -i warn "/tmp/gpu_decode_$name.err" | tail -c 2500)" \
    log_line part rc seconds limit stderr_tail
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s (limit $limit s; $(( $(date +%s) - START )) s so far)" >&2
}

V_part=env V_gpu="$(nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader 2>&1 | head -1)" \
  V_versions="$(python3 -c 'import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)' 2>&1 | tail -1)" \
  log_line part gpu versions
tail -1 "$OUT/run.jsonl"

# 1. Sweep first: its parallel precompile fills Triton's cache for the parts after it.
part sweep 40 python3 benchmarks/sparse_matmul.py --tune --budget-s 25 --tune-iters 24 --iters 60 --repeats 3 \
  --n 1 2 4 8 --kernels dense triton_24 --shapes $SHAPES \
  --out "$OUT/decode.jsonl" --sweep-out "$OUT/sweep.jsonl" > /dev/null
# 2. Correctness of the 1-8 token path (bf16 on three shapes, fp16 on one).
part correctness 22 python3 benchmarks/gpu_decode_checks.py correctness --out "$OUT/correctness.jsonl" --shapes $SHAPES
# 3. What the plugin picks at load, and what that costs (kernels compiled by the sweep).
part decide 30 python3 benchmarks/gpu_decode_checks.py decide --out "$OUT/decide.jsonl" --shapes $SHAPES
# 4. CUDA graphs and torch.compile around the op.
part graph 30 python3 benchmarks/gpu_decode_checks.py graph --out "$OUT/graph.jsonl" --shapes $SHAPES
# 5. With what is left: one shape's decision from an empty Triton cache (compiling included).
TRITON_CACHE_DIR=$(mktemp -d) part decide_cold 40 python3 benchmarks/gpu_decode_checks.py decide --cache cold \
  --out "$OUT/decide.jsonl" --shapes 4096x4096

if (( 149 - ($(date +%s) - START) > 5 )); then
  timeout 4 python3 benchmarks/sparse_matmul.py --table "$OUT/decode.jsonl" 2>/dev/null
fi
echo "total $(( $(date +%s) - START )) s"
