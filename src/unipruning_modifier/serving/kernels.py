"""2:4 sparse linear layer: dense, the Triton 2:4 kernel or cuSPARSELt, each only where it measured fastest.

Plain PyTorch (plus Triton when installed), no vLLM import. ``Sparse24Linear.from_dense(W)``
measures, once per (out, in, dtype, GPU) in the process, three candidates for every token-count
bucket (``N_BUCKETS``, a call with n tokens uses the smallest bucket >= n):

* ``dense``: ``F.linear`` on the dense weight (cuBLAS);
* ``triton_24``: ``triton_24.matmul`` reading values + 2-bit indices (1.125 bytes per weight
  instead of 2), for buckets up to ``TRITON_MAX_N`` tokens (decode);
* ``cslt``: cuSPARSELt (``torch._cslt_sparse_mm`` with the algorithm ``_cslt_sparse_mm_search``
  picked for that bucket).

Each bucket runs the fastest candidate; a sparse kernel only when it was faster than dense in
that measurement. The layer keeps only the weight copies some bucket
uses (dense 1x, Triton layout 0.56x, cuSPARSELt 0.56x the dense bytes).

Why measured and not assumed: on an H100 with torch 2.11 the cuSPARSELt call costs a flat
0.5-1.4 ms of set-up whatever n, so it wins only for n >= 4096 (docs/serving.md has the tables).
Dense and Triton are timed by CUDA-graph replay (how vLLM runs decode), cuSPARSELt eagerly
(its set-up is host work that a graph would hide only where capture works), all rotating over
enough weight copies that the L2 cache cannot hold them. ``UNIPRUNING_SPARSE_KERNEL`` overrides:
``auto`` (default), ``off`` (dense), ``triton`` (Triton for every n, no dense copy) or
``cusparselt`` (alias ``always``: cuSPARSELt for every n, no dense copy).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from . import triton_24

__all__ = [
    "KERNELS",
    "N_BUCKETS",
    "SPARSE_DTYPES",
    "TRITON_MAX_N",
    "KernelDecision",
    "Sparse24Linear",
    "bucket_index",
    "choose_kernels",
    "decide",
    "kernel_available",
    "kernel_mode",
    "measure_shape",
    "random_24",
    "search_algorithm",
    "shape_supported",
    "sparse24_linear",
    "triton_kernel_available",
]

SPARSE_DTYPES = (torch.float16, torch.bfloat16)
N_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096, 16384)
TRITON_MAX_N = 64
KERNELS = ("dense", "triton_24", "cslt")
# cuSPARSELt's algorithm search failed with an internal error on a 256x512 fp16 weight on an
# H100 (torch 2.11, cuSPARSELt 0.8) and left the CUDA context unusable; every shape from 1024
# up searched fine. Smaller layers use the default algorithm (id 0), which ran correctly.
SEARCH_MIN_DIM = 1024
_MODES = ("auto", "off", "triton", "cusparselt", "always")
_FORCED = {"triton": "triton_24", "cusparselt": "cslt", "always": "cslt"}


def kernel_mode() -> str:
    """``UNIPRUNING_SPARSE_KERNEL``: auto (measure), off (dense), triton or cusparselt/always (forced)."""
    mode = os.environ.get("UNIPRUNING_SPARSE_KERNEL", "auto").strip().lower()
    if mode not in _MODES:
        raise ValueError(f"UNIPRUNING_SPARSE_KERNEL must be one of {_MODES}, got {mode!r}")
    return mode


def _cuda_device(device) -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda":
        return False, f"weights on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"compute capability {major}.{minor} < 8.0"
    return True, "ok"


def kernel_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """(usable, reason) for cuSPARSELt: CUDA, compute capability >= 8.0, a cuSPARSELt build of torch."""
    ok, reason = _cuda_device(device)
    if not ok:
        return ok, reason
    if not torch.backends.cusparselt.is_available():
        return False, "this torch build has no cuSPARSELt"
    return True, "cuSPARSELt"


def triton_kernel_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """(usable, reason) for the Triton 2:4 kernel: CUDA, compute capability >= 8.0, Triton installed."""
    ok, reason = _cuda_device(device)
    if not ok:
        return ok, reason
    return triton_24.triton_available()


def shape_supported(out_features: int, in_features: int, dtype: torch.dtype) -> tuple[bool, str]:
    """(ok, reason) for cuSPARSELt's limits on the sparse operand: fp16/bf16, both dims % 16."""
    if dtype not in SPARSE_DTYPES:
        return False, f"dtype {dtype} (the 2:4 kernel path takes fp16 / bf16)"
    if out_features % 16 or in_features % 16:
        return False, f"shape {out_features}x{in_features} is not a multiple of 16"
    return True, "ok"


def bucket_index(n: int) -> int:
    """Index of the smallest bucket >= n (the last bucket for anything larger)."""
    for i, b in enumerate(N_BUCKETS):
        if n <= b:
            return i
    return len(N_BUCKETS) - 1


def choose_kernels(rows: list[dict], margin: float = 1.0) -> list[str]:
    """Per row (bucket): the fastest of ``KERNELS`` measured there; a sparse one only if faster than
    dense and at least ``margin`` times as fast (a tie keeps dense).

    ``rows`` carry ``dense_ms`` and, where measured, ``triton_24_ms`` / ``cslt_ms`` (None or
    missing: not a candidate for that bucket).
    """
    choices = []
    for row in rows:
        best, best_ms = "dense", row["dense_ms"]
        for kernel in KERNELS[1:]:
            ms = row.get(f"{kernel}_ms")
            if ms is not None and row["dense_ms"] / ms >= margin and ms < best_ms:
                best, best_ms = kernel, ms
        choices.append(best)
    return choices


def random_24(out_features: int, in_features: int, dtype: torch.dtype, device, seed: int = 0) -> torch.Tensor:
    """A random weight with exactly 2 nonzeros in every group of 4 inputs (drawn on ``device``)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen, device=device)
    groups = w.view(out_features, -1, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).view(out_features, in_features).to(dtype)


def _pad_rows(x: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    pad = (-x.shape[0]) % multiple
    return torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x


def _sparse_mm(packed: torch.Tensor, x: torch.Tensor, bias, alg_id: int) -> torch.Tensor:
    """x @ W.T + bias with W compressed by ``_cslt_compress``; x is [n, in], result [n, out]."""
    n = x.shape[0]
    xp = _pad_rows(x.contiguous())
    out = torch._cslt_sparse_mm(packed, xp.t(), bias=bias, transpose_result=True, alg_id=alg_id)
    return out[:n] if out.shape[0] != n else out


def search_algorithm(packed: torch.Tensor, x: torch.Tensor, out_features: int, in_features: int) -> int:
    """cuSPARSELt's fastest algorithm id for this weight and input, or 0 where searching is unsafe."""
    if min(out_features, in_features) < SEARCH_MIN_DIM:
        return 0
    return int(torch._cslt_sparse_mm_search(packed, _pad_rows(x).t(), transpose_result=True))


def _time_ms(calls: list, iters: int, graph: bool) -> float:
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


def _median_ms(calls: list, iters: int, graph: bool, repeats: int) -> float:
    return sorted(_time_ms(calls, iters, graph) for _ in range(repeats))[repeats // 2]


def _copies(weight: torch.Tensor) -> int:
    """How many copies of a weight to rotate through so that they are >= 4x the GPU's L2 cache."""
    l2 = getattr(torch.cuda.get_device_properties(weight.device), "L2_cache_size", 50 << 20)
    return max(1, min(8, math.ceil(4 * l2 / (weight.numel() * weight.element_size()))))


def measure_shape(
    weight: torch.Tensor,
    buckets: tuple[int, ...] = N_BUCKETS,
    iters: int = 20,
    candidates: tuple[str, ...] = KERNELS,
    triton_configs: dict[int, triton_24.BlockConfig] | None = None,
    repeats: int = 1,
) -> list[dict]:
    """Per bucket n: ms per call of each candidate kernel for [n, in] @ W.T (None: not a candidate).

    Each time is the median of ``repeats`` timings of ``iters`` calls.
    Rows: ``m``, ``k``, ``n``, ``dtype``, ``dense_ms``, ``triton_24_ms``, ``cslt_ms``,
    ``alg_id`` (cuSPARSELt) and ``triton_config`` (``BlockConfig.as_list()``).
    """
    out_features, in_features = weight.shape
    copies = [weight] + [weight.clone() for _ in range(_copies(weight) - 1)]
    packed = [torch._cslt_compress(w) for w in copies] if "cslt" in candidates else None
    tri = [triton_24.Sparse24Weight.from_dense(w) for w in copies] if "triton_24" in candidates else None
    rows = []
    for n in buckets:
        x = torch.randn(n, in_features, device=weight.device, dtype=weight.dtype)
        row = {"m": out_features, "k": in_features, "n": n, "dtype": str(weight.dtype).removeprefix("torch.")}
        row["dense_ms"] = _median_ms([lambda w=w: torch.nn.functional.linear(x, w) for w in copies], iters, True, repeats)
        row["triton_24_ms"] = row["triton_config"] = None
        if tri is not None and n <= TRITON_MAX_N:
            config = (triton_configs or {}).get(n) or triton_24.default_config(n, out_features, in_features)
            calls = [lambda t=t: triton_24.matmul(x, t, None, config) for t in tri]
            row["triton_24_ms"] = _median_ms(calls, iters, True, repeats)
            row["triton_config"] = config.as_list()
        row["cslt_ms"], row["alg_id"] = None, 0
        if packed is not None:
            row["alg_id"] = search_algorithm(packed[0], x, out_features, in_features)
            calls = [lambda p=p: _sparse_mm(p, x, None, row["alg_id"]) for p in packed]
            row["cslt_ms"] = _median_ms(calls, iters, False, repeats)
        rows.append(row)
    return rows


@dataclass
class KernelDecision:
    """Per bucket of ``N_BUCKETS``: the kernel to run, cuSPARSELt alg id and Triton block config."""

    choices: list[str] = field(default_factory=lambda: ["dense"] * len(N_BUCKETS))
    alg_ids: list[int] = field(default_factory=lambda: [0] * len(N_BUCKETS))
    triton_configs: list[list[int]] = field(default_factory=lambda: [triton_24.BlockConfig().as_list()] * len(N_BUCKETS))
    rows: list[dict] = field(default_factory=list)
    reason: str = ""

    @property
    def sparse(self) -> bool:
        return any(c != "dense" for c in self.choices)

    def uses(self, kernel: str) -> bool:
        return kernel in self.choices

    def describe(self) -> str:
        """E.g. ``triton_24 for n <= 16, dense for n 17-2048, cslt for n > 2048 (measured: ...)``."""
        if not self.sparse:
            return f"dense ({self.reason})"
        if len(set(self.choices)) == 1:
            return f"{self.choices[0]} for every n ({self.reason})"
        spans, lo = [], 1
        for i, kernel in enumerate(self.choices):
            last = i == len(self.choices) - 1
            if last or self.choices[i + 1] != kernel:
                hi = N_BUCKETS[i]
                if last:
                    spans.append(f"{kernel} for n >= {lo}")
                else:
                    spans.append(f"{kernel} for n {lo}-{hi}" if lo != hi else f"{kernel} for n = {lo}")
                lo = hi + 1
        return ", ".join(spans) + f" ({self.reason})"


_DECISIONS: dict[tuple, KernelDecision] = {}


def _summary(rows: list[dict], choices: list[str]) -> str:
    """Best speedup over dense of each sparse kernel that was picked somewhere, with its n."""
    parts = []
    for kernel in KERNELS[1:]:
        picked = [r for r, c in zip(rows, choices) if c == kernel]
        if picked:
            best = max(picked, key=lambda r: r["dense_ms"] / r[f"{kernel}_ms"])
            parts.append(f"{kernel} up to {best['dense_ms'] / best[f'{kernel}_ms']:.2f}x at n={best['n']}")
    if not parts:
        for kernel in KERNELS[1:]:
            timed = [r for r in rows if r.get(f"{kernel}_ms")]
            if timed:
                best = max(timed, key=lambda r: r["dense_ms"] / r[f"{kernel}_ms"])
                parts.append(f"{kernel} best {best['dense_ms'] / best[f'{kernel}_ms']:.2f}x at n={best['n']}")
    return "measured: " + ("; ".join(parts) or "no sparse candidate")


def decide(weight: torch.Tensor, mode: str | None = None) -> KernelDecision:
    """The (cached) per-bucket kernel choice for this weight's shape, dtype and device."""
    mode = kernel_mode() if mode is None else mode
    out_features, in_features = weight.shape
    cslt_ok, cslt_reason = kernel_available(weight.device)
    if cslt_ok:
        cslt_ok, cslt_reason = shape_supported(out_features, in_features, weight.dtype)
    tri_ok, tri_reason = triton_kernel_available(weight.device)
    if tri_ok:
        tri_ok, tri_reason = triton_24.layout_supported(out_features, in_features, weight.dtype)
    if mode == "off":
        return KernelDecision(reason="UNIPRUNING_SPARSE_KERNEL=off")
    forced = _FORCED.get(mode)
    if forced == "cslt" and not cslt_ok or forced == "triton_24" and not tri_ok:
        return KernelDecision(reason=cslt_reason if forced == "cslt" else tri_reason)
    if not (cslt_ok or tri_ok):
        return KernelDecision(reason=f"cuSPARSELt: {cslt_reason}; Triton: {tri_reason}")
    key = (out_features, in_features, weight.dtype, torch.cuda.get_device_name(weight.device), mode)
    if key in _DECISIONS:
        return _DECISIONS[key]
    configs = [triton_24.default_config(n, out_features, in_features).as_list() for n in N_BUCKETS]
    if forced == "triton_24":
        decision = KernelDecision(["triton_24"] * len(N_BUCKETS), triton_configs=configs, reason=f"UNIPRUNING_SPARSE_KERNEL={mode}")
    else:
        candidates = ("dense",) + (("triton_24",) if tri_ok and forced is None else ()) + (("cslt",) if cslt_ok else ())
        rows = measure_shape(random_24(out_features, in_features, weight.dtype, weight.device), candidates=candidates)
        algs = [r["alg_id"] for r in rows]
        if forced == "cslt":
            decision = KernelDecision(["cslt"] * len(N_BUCKETS), algs, configs, rows, f"UNIPRUNING_SPARSE_KERNEL={mode}")
        else:
            choices = choose_kernels(rows)
            decision = KernelDecision(choices, algs, configs, rows, _summary(rows, choices))
    _DECISIONS[key] = decision
    return decision


_KERNEL_IDS = {name: i for i, name in enumerate(KERNELS)}


@torch.library.custom_op("unipruning::sparse24_linear", mutates_args=())
def sparse24_linear(
    x: torch.Tensor,
    dense: torch.Tensor | None,
    packed: torch.Tensor | None,
    values: torch.Tensor | None,
    indices: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    choices: list[int],
    alg_ids: list[int],
    triton_configs: list[int],
) -> torch.Tensor:
    """x @ W.T + bias with the kernel ``choices[bucket(n)]`` (0 dense, 1 triton_24, 2 cslt).

    One opaque op so that torch.compile / CUDA graphs keep the per-call choice on n.
    ``triton_configs``: the buckets' ``BlockConfig.as_list()`` concatenated.
    """
    x2 = x.reshape(-1, x.shape[-1])
    bucket = bucket_index(x2.shape[0])
    kernel = KERNELS[choices[bucket]]
    if kernel == "cslt":
        out = _sparse_mm(packed, x2, bias, alg_ids[bucket])
    elif kernel == "triton_24":
        width = len(triton_configs) // len(choices)
        config = triton_24.BlockConfig.from_list(triton_configs[bucket * width : (bucket + 1) * width])
        out = triton_24.matmul(x2, triton_24.Sparse24Weight(values, indices), bias, config)
    else:
        out = torch.nn.functional.linear(x2, dense, bias)
    return out.reshape(*x.shape[:-1], out_features)


@sparse24_linear.register_fake
def _sparse24_linear_fake(x, dense, packed, values, indices, bias, out_features, choices, alg_ids, triton_configs):
    return x.new_empty(*x.shape[:-1], out_features)


class Sparse24Linear:
    """A 2:4 weight in the representations its decision uses: dense, Triton layout, cuSPARSELt."""

    def __init__(self, decision: KernelDecision, out_features: int, in_features: int, dense=None, packed=None, triton=None):
        self.decision = decision
        self.out_features = out_features
        self.in_features = in_features
        self.dense = dense
        self.packed = packed
        self.triton = triton
        self._choices = [_KERNEL_IDS[c] for c in decision.choices]
        self._configs = [v for config in decision.triton_configs for v in config]

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mode: str | None = None) -> Sparse24Linear | None:
        """The sparse layer for a 2:4 weight, or None when the decision is dense for every n."""
        decision = decide(weight, mode)
        if not decision.sparse:
            return None
        weight = weight.contiguous()
        return cls(
            decision,
            weight.shape[0],
            weight.shape[1],
            dense=weight if decision.uses("dense") else None,
            packed=torch._cslt_compress(weight) if decision.uses("cslt") else None,
            triton=triton_24.Sparse24Weight.from_dense(weight) if decision.uses("triton_24") else None,
        )

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        tri = self.triton
        return sparse24_linear(
            x,
            self.dense,
            self.packed,
            tri.values if tri is not None else None,
            tri.indices if tri is not None else None,
            bias,
            self.out_features,
            self._choices,
            self.decision.alg_ids,
            self._configs,
        )
