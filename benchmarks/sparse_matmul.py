"""Dense cuBLAS vs the Triton 2:4 kernel vs cuSPARSELt per weight shape and token count.

Needs a CUDA GPU (compute capability >= 8.0). For each (out, in) weight shape and each token
count n it times ``[n, in] @ W.T`` with the plugin's own helpers (``serving.measure.measure_shape``:
dense and Triton by CUDA-graph replay, cuSPARSELt eagerly, rotating over weight copies >= 4x
the L2 cache, median of ``--repeats`` timings of ``--iters`` calls) and prints one JSON line per
(kernel, shape, n):

{"kernel": "dense" | "triton_24" | "cslt", "out", "in", "n", "dtype", "device", "seconds",
"speedup_vs_dense", "gbps" (weight + x + y bytes per second), "peak_gbps" (a measured
device-to-device copy), "fraction_of_peak", "chosen" (what the plugin's rule would pick for this
n from these timings, ``kernels.PICK_MARGIN`` included),
"config" (Triton block config) / "alg_id" (cuSPARSELt), "max_ulp_vs_dense" and
"equal_to_dense" (fraction of outputs bit-identical to dense), "torch", "triton", "cusparselt"}

``--tune`` first times every Triton block configuration of ``sweep_space(n)`` that fits the
shape and keeps the fastest (one ``"kernel": "triton_24_sweep"`` line per configuration in
``--sweep-out``; the winners in ``--tuned-out`` as JSON, readable again with ``--tuned``).

    python benchmarks/sparse_matmul.py --tune --n 1 2 4 8 --kernels dense triton_24 --out decode.jsonl --sweep-out sweep.jsonl
    python benchmarks/sparse_matmul.py --shapes 4096x14336 --n 1 16 4096 --kernels dense cslt
    python benchmarks/sparse_matmul.py --table benchmarks/results/h200-decode.jsonl

The table gives, per shape and n, the dense time, then the Triton and cuSPARSELt speedups over
dense (bold: the kernel the plugin's rule picks).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch

from unipruning_modifier.serving import cusparselt, kernels, measure, triton_24
from unipruning_modifier.serving.triton_24_configs import GATHER_MAX_N, BlockConfig, default_config
from unipruning_modifier.serving.triton_24_layout import Sparse24Weight

# Linear shapes (out x in) of Llama-2-7B, Llama-3-8B and Llama-3-70B: as vLLM fuses them
# (qkv, gate_up) and the unfused MLP projections.
DEFAULT_SHAPES = [
    "12288x4096",  # Llama-2-7B qkv_proj
    "4096x4096",  # Llama-2-7B / Llama-3-8B o_proj
    "22016x4096",  # Llama-2-7B gate_up_proj
    "4096x11008",  # Llama-2-7B down_proj
    "6144x4096",  # Llama-3-8B qkv_proj
    "14336x4096",  # Llama-3-8B gate_proj / up_proj
    "28672x4096",  # Llama-3-8B gate_up_proj
    "4096x14336",  # Llama-3-8B down_proj
    "10240x8192",  # Llama-3-70B qkv_proj
    "8192x8192",  # Llama-3-70B o_proj
    "28672x8192",  # Llama-3-70B gate_proj / up_proj
    "8192x28672",  # Llama-3-70B down_proj
]


def parse_shape(text: str) -> tuple[int, int]:
    m, k = text.lower().split("x")
    return int(m), int(k)


def sweep_space(n: int) -> list[BlockConfig]:
    """Triton block configurations tried by ``--tune`` for n tokens.

    Gather (n <= 8, all tokens in one program): 16 or 32 rows x 64 or 128 groups, split-K 1, 2
    or 4, 4 or 8 warps, 3 stages, a warp along one row or over runs of 16 groups, at most 64
    fp32 accumulators per thread (beyond that the compiled kernel holds 128 registers and more
    would spill); it includes every config of ``candidate_configs``. Dot (16+ tokens): the
    tensor-core path's tiles.
    """
    block_n = 1 << max(0, n - 1).bit_length()
    if block_n <= GATHER_MAX_N:
        space = itertools.product((16, 32), (64, 128), (1, 2, 4), (4, 8), (0, 16))
        return [
            BlockConfig(bo, bg, block_n, sk, False, warps, 3, run)
            for bo, bg, sk, warps, run in space
            if bo * bg // (32 * warps) * block_n <= 64
        ]
    dot_n = min(block_n, 64)  # no 64-row blocks at 64 tokens (they spill)
    space = itertools.product((16, 32, 64)[: 2 if dot_n == 64 else 3], (32, 64), (1, 2, 4), (2, 3))
    return [BlockConfig(bo, bg, dot_n, sk, True, 4, stages) for bo, bg, sk, stages in space]


def fitting(configs: list[BlockConfig], out_features: int, in_features: int) -> list[BlockConfig]:
    ok = []
    for config in configs:
        try:
            config.check(out_features, in_features)
        except ValueError:
            continue
        ok.append(config)
    return ok


def tune(tri: list[Sparse24Weight], n: int, iters: int, deadline: float, sink) -> BlockConfig:
    """The fastest configuration of ``sweep_space(n)`` over these weight copies (default if time runs out)."""
    out_features, in_features = tri[0].shape
    x = torch.randn(n, in_features, device=tri[0].values.device, dtype=tri[0].values.dtype)
    best = default_config(n, out_features, in_features)
    best_ms = float("inf")
    for config in [best] + fitting(sweep_space(n), out_features, in_features):
        if time.monotonic() > deadline:
            break
        try:
            ms = measure.time_ms([lambda t=t: triton_24.matmul(x, t, None, config) for t in tri], iters, graph=True)
        except Exception as error:  # a configuration the compiler or the GPU refuses: skip it, say why
            emit(sink, {"kernel": "triton_24_sweep", "out": out_features, "in": in_features, "n": n,
                        "config": config.as_list(), "error": repr(error)[:300]})
            continue
        emit(sink, {"kernel": "triton_24_sweep", "out": out_features, "in": in_features, "n": n,
                    "config": config.as_list(), "seconds": ms / 1e3})
        if ms < best_ms:
            best, best_ms = config, ms
    return best


def _warm(item: tuple[list[int], str]) -> str:
    """Compile one configuration into Triton's on-disk cache (a worker process; no launch)."""
    config, dtype = BlockConfig.from_list(item[0]), getattr(torch, item[1])
    try:
        gemv_kernel, dot_kernel, _ = triton_24._jitted()
        y_dtype = dtype if config.split_k == 1 else torch.float32
        # Every benchmarked shape has in, out, in/4/split_k divisible by 16, as these do, so the
        # compiled specialization is the one the timed calls look up.
        args = (dtype, dtype, torch.int32, dtype, y_dtype, 1, 4096, 4096, 4096, 1024 // config.split_k)
        common = dict(grid=(1,), HAS_BIAS=False, BLOCK_OUT=config.block_out, BLOCK_G=config.block_g,
                      BLOCK_N=config.block_n, SPLIT_K=config.split_k, NUM_STAGES=config.num_stages,
                      num_warps=config.num_warps, num_stages=config.num_stages)
        if config.dot:
            dot_kernel.warmup(*args, **common, UPCAST_DOT=False)
        else:
            gemv_kernel.warmup(*args, **common, RUN=config.run or config.block_g)
        return ""
    except Exception as error:  # reported, then compiled (or refused) again when timed
        return f"{config}: {error!r}"[:300]


def precompile(configs: list[BlockConfig], dtype: torch.dtype, workers: int = 14, timeout_s: float = 90) -> str:
    """Compile configurations in parallel processes (Triton's disk cache), so tuning only times them."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    start = time.monotonic()
    items = [(c.as_list(), str(dtype).removeprefix("torch.")) for c in dict.fromkeys(configs)]
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        errors = [e for e in pool.map(_warm, items, timeout=timeout_s) if e]
    except Exception as error:  # the sweep then compiles as it goes
        return f"precompile failed after {time.monotonic() - start:.0f} s: {error!r}"
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return f"precompiled {len(items)} configs in {time.monotonic() - start:.0f} s; {len(errors)} errors {errors[:3]}"


def copy_bandwidth_gbps(gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) in GB/s."""
    src = torch.empty(int(gib * (1 << 30)), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = measure.median_ms([lambda: dst.copy_(src)], 10, False, 3)
    return 2 * src.numel() / (ms / 1e3) / 1e9


def weight_bytes(weight: torch.Tensor, packed: torch.Tensor | None) -> dict[str, float]:
    """Bytes of the weight one call reads: dense 2 B/weight, Triton 1.125, cuSPARSELt its packed size."""
    numel, element = weight.numel(), weight.element_size()
    sizes = {"dense": numel * element, "triton_24": numel * (element / 2 + 1 / 8)}
    if packed is not None:
        sizes["cslt"] = packed.numel() * packed.element_size()
    return sizes


def compare(out: torch.Tensor, dense: torch.Tensor) -> dict:
    """Largest difference from dense in units of the output dtype's ulp, and the bit-equal fraction."""
    info = torch.finfo(dense.dtype)
    ulp = info.eps * torch.exp2(torch.floor(torch.log2(dense.float().abs().clamp_min(info.tiny))))
    diff = (out.float() - dense.float()).abs() / ulp
    return {"max_ulp_vs_dense": float(diff.max()), "equal_to_dense": float((out == dense).float().mean())}


def emit(sink, row: dict) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if sink:
        sink.write(line + "\n")
        sink.flush()


def table(path: str) -> str:
    """Markdown table of a results file: per shape and n, Triton / cuSPARSELt speedup over dense."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    rows = [r for r in rows if r.get("kernel") in kernels.KERNELS]
    ns = sorted({r["n"] for r in rows})
    cell = {(r["out"], r["in"], r["n"], r["kernel"]): r for r in rows}
    lines = ["| out × in | " + " | ".join(f"n={n}" for n in ns) + " |", "|---" * (len(ns) + 1) + "|"]
    for out_f, in_f in dict.fromkeys((r["out"], r["in"]) for r in rows):
        parts = []
        for n in ns:
            dense = cell.get((out_f, in_f, n, "dense"))
            tri = cell.get((out_f, in_f, n, "triton_24"))
            cslt = cell.get((out_f, in_f, n, "cslt"))
            text = f"{dense['seconds'] * 1e6:.0f} µs" if dense else "–"
            if tri:
                text += f" · **{tri['speedup_vs_dense']:.2f}x**" if tri["chosen"] == "triton_24" else f" · {tri['speedup_vs_dense']:.2f}x"
            if cslt:
                text += f" · **{cslt['speedup_vs_dense']:.2f}x**" if cslt["chosen"] == "cslt" else f" · {cslt['speedup_vs_dense']:.2f}x"
            parts.append(text)
        lines.append(f"| {out_f} × {in_f} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="weight shapes OUTxIN")
    parser.add_argument("--n", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64], help="token counts")
    parser.add_argument("--kernels", nargs="+", choices=kernels.KERNELS, default=list(kernels.KERNELS))
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--iters", type=int, default=60, help="calls per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings per (kernel, shape, n); the median is kept")
    parser.add_argument("--tune", action="store_true", help="sweep Triton block configurations first")
    parser.add_argument("--tune-iters", type=int, default=24)
    parser.add_argument("--tuned", help="JSON of tuned configs from an earlier --tuned-out")
    parser.add_argument("--tuned-out", help="write the tuned configs here (JSON)")
    parser.add_argument("--sweep-out", help="append the sweep's JSON lines here")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="stop tuning this many seconds after the start (precompiling included)")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    parser.add_argument("--table", metavar="JSONL", help="only print the markdown table of a results file")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0

    if not torch.cuda.is_available():
        print("benchmarks/sparse_matmul.py needs a CUDA GPU", file=sys.stderr)
        return 2
    kinds = tuple(args.kernels)
    if "cslt" in kinds and not kernels.kernel_available()[0]:
        kinds = tuple(k for k in kinds if k != "cslt")
    if "triton_24" in kinds and not kernels.triton_kernel_available()[0]:
        kinds = tuple(k for k in kinds if k != "triton_24")
    dtype = getattr(torch, args.dtype)
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton_24.triton_available()[1],
        "cusparselt": torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None,
    }
    deadline = time.monotonic() + args.budget_s
    peak = copy_bandwidth_gbps()
    if args.tune and "triton_24" in kinds:
        shapes = [parse_shape(text) for text in args.shapes]
        wanted = [c for n in args.n if n <= measure.TRITON_MAX_N for c in sweep_space(n) + [default_config(n, *shapes[0])]]
        wanted = [c for c in wanted if any(fitting([c], *shape) for shape in shapes)]
        print(precompile(wanted, dtype, timeout_s=min(90.0, args.budget_s)), file=sys.stderr, flush=True)
    tuned = json.load(open(args.tuned)) if args.tuned else {}
    sink = open(args.out, "a") if args.out else None
    sweep_sink = open(args.sweep_out, "a") if args.sweep_out else None
    try:
        for text in args.shapes:
            m, k = parse_shape(text)
            weight = measure.random_24(m, k, dtype, "cuda")
            configs = {}
            tri = None
            if args.tune and "triton_24" in kinds:
                tri = [Sparse24Weight.from_dense(weight)]
                tri += [Sparse24Weight(t.values.clone(), t.indices.clone()) for t in tri * (measure.rotation_copies(weight) - 1)]
            for n in args.n:
                saved = tuned.get(f"{m}x{k}", {}).get(str(n))
                if saved:
                    configs[n] = BlockConfig.from_list(saved)
                elif args.tune and "triton_24" in kinds and n <= measure.TRITON_MAX_N:
                    configs[n] = tune(tri, n, args.tune_iters, deadline, sweep_sink)
                tuned.setdefault(f"{m}x{k}", {})[str(n)] = (configs.get(n) or default_config(n, m, k)).as_list()
            del tri
            single = {n: [config] for n, config in configs.items()}
            rows = measure.measure_shape(weight, tuple(args.n), args.iters, kinds, single, args.repeats)
            choices = kernels.choose_kernels(rows, kernels.PICK_MARGIN)
            sparse = Sparse24Weight.from_dense(weight) if "triton_24" in kinds else None
            packed = torch._cslt_compress(weight) if "cslt" in kinds else None
            sizes = weight_bytes(weight, packed)
            for row, chosen in zip(rows, choices):
                n = row["n"]
                x = torch.randn(n, k, device=weight.device, dtype=dtype)
                dense = torch.nn.functional.linear(x, weight)
                io_bytes = (n * k + n * m) * weight.element_size()
                for kernel in kinds:
                    ms = row[f"{kernel}_ms"]
                    if ms is None:
                        continue
                    line = {"kernel": kernel, "out": m, "in": k, "n": n, "dtype": args.dtype, "device": info["device"],
                            "seconds": ms / 1e3, "speedup_vs_dense": row["dense_ms"] / ms}
                    gbps = (sizes[kernel] + io_bytes) / (ms / 1e3) / 1e9
                    line.update(gbps=gbps, peak_gbps=peak, fraction_of_peak=gbps / peak, chosen=chosen)
                    if kernel == "triton_24":
                        config = BlockConfig.from_list(row["triton_config"])
                        line.update(config=row["triton_config"], **compare(triton_24.matmul(x, sparse, None, config), dense))
                    elif kernel == "cslt":
                        line.update(alg_id=row["alg_id"], **compare(cusparselt.sparse_mm(packed, x, None, row["alg_id"]), dense))
                    emit(sink, {**line, **{key: info[key] for key in ("torch", "triton", "cusparselt")}})
            del weight, sparse, packed
            torch.cuda.empty_cache()
    finally:
        for f in (sink, sweep_sink):
            if f:
                f.close()
    if args.tuned_out:
        with open(args.tuned_out, "w") as f:
            json.dump(tuned, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
