"""Dense vs 2:4 cuSPARSELt GEMM per shape, with the path the vLLM plugin would choose.

Needs a CUDA GPU (compute capability >= 8.0) and a torch build with cuSPARSELt. For each
(out, in) weight shape and each token count n it prints one JSON line:
{"m", "k", "n", "dtype", "dense_ms", "sparse_ms", "speedup", "alg_id", "threshold", "chosen",
"max_abs_err", "device", "torch", "cusparselt"}, where ``threshold`` / ``chosen`` come from the
same rule the plugin applies at load (``serving.kernels.choose_threshold`` over these rows) and
``max_abs_err`` compares the sparse result with the dense one.

    python benchmarks/sparse_matmul.py --out benchmarks/results/h100-kernels.jsonl
    python benchmarks/sparse_matmul.py --shapes 4096x4096 14336x4096 --dtype float16 --n 1 16 4096
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from unipruning_modifier.serving import kernels

# Llama-3-8B / Llama-2-7B / 70B-class linear shapes (out x in), as vLLM fuses them (qkv, gate_up).
DEFAULT_SHAPES = [
    "6144x4096",  # Llama-3-8B qkv_proj
    "4096x4096",  # o_proj
    "28672x4096",  # Llama-3-8B gate_up_proj
    "4096x14336",  # Llama-3-8B down_proj
    "22016x4096",  # Llama-2-7B gate_up_proj
    "4096x11008",  # Llama-2-7B down_proj
    "8192x8192",  # 70B-class o_proj
]


def parse_shape(text: str) -> tuple[int, int]:
    m, k = text.lower().split("x")
    return int(m), int(k)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="weight shapes OUTxIN")
    parser.add_argument("--n", nargs="+", type=int, default=list(kernels.N_BUCKETS), help="token counts")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args = parser.parse_args(argv)

    ok, reason = kernels.kernel_available()
    if not ok:
        print(f"benchmarks/sparse_matmul.py needs a GPU with cuSPARSELt: {reason}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cusparselt": torch.backends.cusparselt.version(),
    }
    sink = open(args.out, "a") if args.out else None
    try:
        for text in args.shapes:
            m, k = parse_shape(text)
            supported, why = kernels.shape_supported(m, k, dtype)
            if not supported:
                print(json.dumps({"m": m, "k": k, "chosen": "dense", "reason": why, **info}))
                continue
            weight = kernels.random_24(m, k, dtype, "cuda")
            packed = torch._cslt_compress(weight)
            rows = kernels.measure_shape(weight, tuple(args.n), args.iters, packed=packed)
            threshold = kernels.choose_threshold(rows)
            for row in rows:
                x = torch.randn(row["n"], k, device="cuda", dtype=dtype)
                dense = torch.nn.functional.linear(x, weight)
                sparse = kernels._sparse_mm(packed, x, None, row["alg_id"])
                row.update(
                    threshold=threshold,
                    chosen="sparse" if threshold is not None and row["n"] >= threshold else "dense",
                    max_abs_err=float((dense.float() - sparse.float()).abs().max()),
                    **info,
                )
                line = json.dumps(row)
                print(line, flush=True)
                if sink:
                    sink.write(line + "\n")
    finally:
        if sink:
            sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
