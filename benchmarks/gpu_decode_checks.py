"""GPU checks of the Triton 2:4 decode path, one JSON line per result (``gpu_decode_run.sh``).

Three parts, each its own process in the run so that one failing loses nothing of the others;
every line is flushed as soon as it is known:

* ``correctness``: the gather path (1-8 tokens) for every load-time candidate config (bf16) and
  the default config with bias (bf16 and fp16) against the exact product (fp64: within one ulp
  of the output dtype plus fp32-accumulation slack, as the CPU tests) and against dense
  ``F.linear`` (largest difference in ulps, fraction bit-equal), on Llama-sized shapes; token
  counts that are not a power of two run the bucket's config with the tail tokens clamped.
* ``decide``: the plugin's own ``kernels.decide`` (what vLLM's loader calls) per shape: the
  choice per bucket, the Triton configs it measured and picked, and the seconds it took, with
  Triton's compile cache as left by the sweep (``--cache warm``) or empty (``--cache cold``:
  the first shape then includes compiling every candidate, a first load on a new machine).
* ``graph``: the op ``unipruning::sparse24_linear`` (Triton for every n) under CUDA-graph
  capture / replay, ``torch.compile(fullgraph=True, dynamic=True)`` and
  ``mode="reduce-overhead"``, compared with the eager call.

    python benchmarks/gpu_decode_checks.py correctness --out OUT/correctness.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch

from unipruning_modifier.serving import kernels, measure, triton_24
from unipruning_modifier.serving.triton_24_configs import candidate_configs, default_config
from unipruning_modifier.serving.triton_24_layout import Sparse24Weight

SHAPES = ["4096x14336", "14336x4096", "28672x8192", "8192x28672", "4096x4096"]


def emit(sink, row: dict, say: str | None = None) -> None:
    """Append one JSON line to the results (flushed at once); ``say`` goes to stdout."""
    sink.write(json.dumps(row) + "\n")
    sink.flush()
    if say:
        print(say, flush=True)


def environment() -> dict:
    return {
        "part": "env",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton_24.triton_available()[1],
        "cusparselt": torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None,
    }


def accuracy(out: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor, dense: torch.Tensor) -> dict:
    """Within rounding of the exact product (fp64, with its sum of |terms| as ``scale``) and the
    difference from dense in ulps."""
    info = torch.finfo(out.dtype)

    def ulp(ref: torch.Tensor) -> torch.Tensor:
        return info.eps * torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(info.tiny))))

    error = (out.double() - exact).abs()
    return {
        "within_rounding": bool((error <= ulp(exact) + 2.0**-20 * scale).all()),
        "dense_within_rounding": bool(((dense.double() - exact).abs() <= ulp(exact) + 2.0**-20 * scale).all()),
        "max_ulp_vs_exact": float((error / ulp(exact)).max()),
        "max_ulp_vs_dense": float(((out.double() - dense.double()).abs() / ulp(dense.double())).max()),
        "equal_to_dense": float((out == dense).float().mean()),
    }


def correctness(sink, shapes: list[str], token_counts: list[int]) -> None:
    cases = [(shape, torch.bfloat16) for shape in shapes] + [(shapes[0], torch.float16)]
    total = failed = 0
    worst = 0.0
    for text, dtype in cases:
        m, k = (int(v) for v in text.split("x"))
        w = measure.random_24(m, k, dtype, "cuda", seed=m + k)
        w64 = w.double()
        sparse = Sparse24Weight.from_dense(w)
        bias = torch.randn(m, device="cuda", dtype=dtype)
        for n in token_counts:
            x = torch.randn(n, k, device="cuda", dtype=dtype)
            exact = x.double() @ w64.T
            scale = x.double().abs() @ w64.abs().T
            # Every candidate without bias (the sweep compiled those), the default with bias.
            runs = [(config, None) for config in candidate_configs(n, m, k)] if dtype == torch.bfloat16 else []
            runs.append((default_config(n, m, k), bias))
            for config, b in runs:
                row = {"part": "correctness", "out": m, "in": k, "n": n, "dtype": str(dtype).removeprefix("torch."),
                       "config": config.as_list(), "bias": b is not None}
                try:
                    out = triton_24.matmul(x, sparse, b, config)
                    dense = torch.nn.functional.linear(x, w, b)
                    if b is None:
                        row.update(accuracy(out, exact, scale, dense))
                    else:
                        row.update(accuracy(out, exact + b.double(), scale + b.double().abs(), dense))
                    row["deterministic"] = bool(torch.equal(triton_24.matmul(x, sparse, b, config), out))
                except Exception as error:  # recorded; the next case still runs
                    row["error"] = repr(error)[:400]
                ok = row.get("within_rounding") and row.get("deterministic")
                failed += not ok
                worst = max(worst, row.get("max_ulp_vs_dense", 0.0))
                emit(sink, row, None if ok else f"FAILED {json.dumps(row)}")
                total += 1
        del w, w64, sparse
        torch.cuda.empty_cache()
    print(f"correctness: {total - failed}/{total} cases within rounding of the exact product and deterministic; "
          f"largest difference from dense {worst:.0f} ulp", flush=True)


def decide(sink, shapes: list[str], cache: str) -> None:
    for text in shapes:
        m, k = (int(v) for v in text.split("x"))
        row = {"part": "decide", "out": m, "in": k, "dtype": "bfloat16", "triton_cache": cache}
        emit(sink, {**row, "started": time.time()})  # a part cut short still says how far it got
        try:
            start = time.monotonic()
            decision = kernels.decide(torch.empty(m, k, device="cuda", dtype=torch.bfloat16), "auto")
            row.update(
                wall_seconds=time.monotonic() - start,
                measure_seconds=decision.seconds,
                describe=decision.describe(),
                choices=dict(zip(kernels.N_BUCKETS, decision.choices)),
                configs={n: c for n, c, kernel in zip(kernels.N_BUCKETS, decision.triton_configs, decision.choices) if kernel == "triton_24"},
                rows=decision.rows,
            )
        except Exception as error:
            row["error"] = repr(error)[:400]
            row["traceback"] = traceback.format_exc()[-1500:]
        emit(sink, row, f"decide {text}: {row.get('describe') or row['error']} [{row.get('wall_seconds', 0):.1f} s]")


def _graph_equal(layer, n: int, k: int, bias: torch.Tensor) -> bool:
    static_x = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(static_x, bias)  # compile / warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_x, bias)
    fresh = torch.randn_like(static_x)
    static_x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    return bool(torch.equal(static_out, layer(fresh, bias)))


def graph(sink, text: str, token_counts: list[int]) -> None:
    m, k = (int(v) for v in text.split("x"))
    w = measure.random_24(m, k, torch.bfloat16, "cuda", seed=1)
    bias = torch.randn(m, device="cuda", dtype=torch.bfloat16)
    layer = kernels.Sparse24Linear.from_dense(w, "triton")
    base = {"part": "graph", "out": m, "in": k}
    for n in token_counts:
        try:
            row = {**base, "check": "cuda_graph", "n": n, "equal": _graph_equal(layer, n, k, bias)}
        except Exception as error:
            row = {**base, "check": "cuda_graph", "n": n, "error": repr(error)[:400]}
        emit(sink, row, f"graph {text} cuda_graph n={n}: {row.get('equal', row.get('error'))}")
    for name, options in (("compile_dynamic", dict(fullgraph=True, dynamic=True)), ("reduce_overhead", dict(mode="reduce-overhead", fullgraph=True))):
        start = time.monotonic()
        try:
            compiled = torch.compile(lambda x: layer(x, bias), **options)
            for n in token_counts:
                x = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                want = layer(x, bias)
                equal = all(torch.equal(compiled(x).clone(), want) for _ in range(3))  # cudagraph trees record, then replay
                emit(sink, {**base, "check": name, "n": n, "equal": equal, "seconds": time.monotonic() - start},
                     f"graph {text} {name} n={n}: {equal} [{time.monotonic() - start:.1f} s]")
        except Exception as error:
            emit(sink, {**base, "check": name, "error": repr(error)[:400], "seconds": time.monotonic() - start},
                 f"graph {text} {name}: {error!r}"[:300])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["correctness", "decide", "graph"])
    parser.add_argument("--out", required=True, help="append the JSON lines here")
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--n", nargs="+", type=int, default=None, help="token counts (correctness: 1 2 3 4 5 8; graph: 1 2 4 8 32)")
    parser.add_argument("--cache", choices=["warm", "cold"], default="warm", help="decide: how Triton's cache was left (a label)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu_decode_checks.py needs a CUDA GPU", file=sys.stderr)
        return 2
    with open(args.out, "a") as sink:
        emit(sink, environment())
        if args.part == "correctness":
            correctness(sink, args.shapes[:3], args.n or [1, 2, 3, 4, 5, 8])
        elif args.part == "decide":
            decide(sink, args.shapes, args.cache)
        else:
            graph(sink, args.shapes[0], args.n or [1, 2, 4, 8, 32])
    return 0


if __name__ == "__main__":
    sys.exit(main())
