"""Timing kernels on this GPU the way vLLM runs them, for the plugin's measured rule.

Dense and Triton are timed by CUDA-graph replay (how vLLM decodes), cuSPARSELt eagerly (its
set-up is host work that a graph would hide only where capture works), all rotating over enough
weight copies that the L2 cache cannot hold them. Timing once per (shape, dtype, GPU) at load
is what lets the rule use a sparse kernel only where it was faster.
"""

from __future__ import annotations

import math

import torch

from . import cusparselt, triton_24
from .triton_24_configs import BlockConfig, default_config
from .triton_24_layout import Sparse24Weight

__all__ = ["TRITON_MAX_N", "measure_shape", "median_ms", "random_24", "rotation_copies", "time_ms"]

TRITON_MAX_N = 64


def random_24(out_features: int, in_features: int, dtype: torch.dtype, device, seed: int = 0) -> torch.Tensor:
    """A random weight with exactly 2 nonzeros in every group of 4 inputs (drawn on ``device``)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen, device=device)
    groups = w.view(out_features, -1, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).view(out_features, in_features).to(dtype)


def time_ms(calls: list, iters: int, graph: bool) -> float:
    """Mean ms per call, cycling through ``calls`` (one per weight copy), eager or by CUDA-graph replay."""
    reps = max(1, math.ceil(iters / len(calls)))
    for fn in calls:
        fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                for fn in calls:
                    fn()
        g.replay()
        run = g.replay
    else:

        def run():
            for _ in range(reps):
                for fn in calls:
                    fn()

        run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (reps * len(calls))


def median_ms(calls: list, iters: int, graph: bool, repeats: int) -> float:
    return sorted(time_ms(calls, iters, graph) for _ in range(repeats))[repeats // 2]


def rotation_copies(weight: torch.Tensor) -> int:
    """How many copies of a weight to rotate through so that they are >= 4x the GPU's L2 cache."""
    l2 = getattr(torch.cuda.get_device_properties(weight.device), "L2_cache_size", 50 << 20)
    return max(1, min(8, math.ceil(4 * l2 / (weight.numel() * weight.element_size()))))


def _fastest_config(tri: list[Sparse24Weight], x: torch.Tensor, configs: list[BlockConfig], iters: int) -> tuple[BlockConfig, list]:
    """The fastest of ``configs`` for these weight copies, and [[config, ms], ...] for each tried."""
    tried = []
    for config in configs:
        ms = time_ms([lambda t=t: triton_24.matmul(x, t, None, config) for t in tri], iters, True)
        tried.append([config.as_list(), ms])
    best = min(range(len(configs)), key=lambda i: tried[i][1])
    return configs[best], tried


def measure_shape(
    weight: torch.Tensor,
    buckets: tuple[int, ...],
    iters: int = 20,
    candidates: tuple[str, ...] = ("dense", "triton_24", "cslt"),
    triton_configs: dict[int, list[BlockConfig]] | None = None,
    repeats: int = 1,
) -> list[dict]:
    """Per bucket n: ms per call of each candidate kernel for [n, in] @ W.T (None: not a candidate).

    Each time is the median of ``repeats`` timings of ``iters`` calls. Triton runs the
    configurations ``triton_configs[n]`` (default: ``default_config``); with more than one, each
    is timed once, and the fastest is timed again for the row (a fresh timing, so that picking
    the minimum of noisy timings does not flatter it against dense).
    Rows: ``m``, ``k``, ``n``, ``dtype``, ``dense_ms``, ``triton_24_ms``, ``cslt_ms``,
    ``alg_id`` (cuSPARSELt), ``triton_config`` (``BlockConfig.as_list()``) and
    ``triton_tried`` ([[config, ms], ...] when several were timed).
    """
    out_features, in_features = weight.shape
    copies = [weight] + [weight.clone() for _ in range(rotation_copies(weight) - 1)]
    packed = [torch._cslt_compress(w) for w in copies] if "cslt" in candidates else None
    tri = [Sparse24Weight.from_dense(w) for w in copies] if "triton_24" in candidates else None
    rows = []
    for n in buckets:
        x = torch.randn(n, in_features, device=weight.device, dtype=weight.dtype)
        row = {"m": out_features, "k": in_features, "n": n, "dtype": str(weight.dtype).removeprefix("torch.")}
        row["dense_ms"] = median_ms([lambda w=w: torch.nn.functional.linear(x, w) for w in copies], iters, True, repeats)
        row["triton_24_ms"] = row["triton_config"] = row["triton_tried"] = None
        if tri is not None and n <= TRITON_MAX_N:
            configs = (triton_configs or {}).get(n) or [default_config(n, out_features, in_features)]
            config = configs[0]
            if len(configs) > 1:
                config, row["triton_tried"] = _fastest_config(tri, x, configs, iters)
            calls = [lambda t=t: triton_24.matmul(x, t, None, config) for t in tri]
            row["triton_24_ms"] = median_ms(calls, iters, True, repeats)
            row["triton_config"] = config.as_list()
        row["cslt_ms"], row["alg_id"] = None, 0
        if packed is not None:
            row["alg_id"] = cusparselt.search_algorithm(packed[0], x, out_features, in_features)
            calls = [lambda p=p: cusparselt.sparse_mm(p, x, None, row["alg_id"]) for p in packed]
            row["cslt_ms"] = median_ms(calls, iters, False, repeats)
        rows.append(row)
    return rows
