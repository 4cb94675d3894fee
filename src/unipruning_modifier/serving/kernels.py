"""2:4 sparse linear layer on cuSPARSELt (``torch._cslt_*``), used only where it measures faster.

Plain PyTorch, no vLLM import. ``Sparse24Linear.from_dense(W)`` compresses a 2:4 weight once
(``torch._cslt_compress``), then for each token-count bucket times the dense GEMM against the
sparse one (``torch._cslt_sparse_mm`` with the algorithm ``torch._cslt_sparse_mm_search``
picked for that bucket). The sparse kernel is used for a call with n tokens only when n is at
or above the smallest bucket from which sparse was at least as fast as dense for every larger
bucket; below it the dense weight is used. When sparse never wins, the layer stays dense.
Decisions are cached per (out, in, dtype, device) for the process, so a model measures each
distinct shape once.

Why measured and not assumed: on an H100 with torch 2.11 the sparse call costs a flat
0.5-1.4 ms of set-up whatever n, so it loses up to 30x at decode sizes and wins up to 1.5x only
for n >= 4096 (docs/serving.md has the table). ``UNIPRUNING_SPARSE_KERNEL`` overrides the rule:
``auto`` (default), ``off`` (always dense) or ``always`` (sparse for every n, no dense copy
kept: 0.56x the weight memory, slower at small n).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

__all__ = [
    "N_BUCKETS",
    "SPARSE_DTYPES",
    "KernelDecision",
    "Sparse24Linear",
    "bucket_index",
    "choose_threshold",
    "kernel_available",
    "kernel_mode",
    "measure_shape",
    "random_24",
    "search_algorithm",
    "shape_supported",
]

SPARSE_DTYPES = (torch.float16, torch.bfloat16)
N_BUCKETS = (16, 64, 256, 1024, 4096, 16384)
# cuSPARSELt's algorithm search failed with an internal error on a 256x512 fp16 weight on an
# H100 (torch 2.11, cuSPARSELt 0.8) and left the CUDA context unusable; every shape from 1024
# up searched fine. Smaller layers use the default algorithm (id 0), which ran correctly.
SEARCH_MIN_DIM = 1024
_MODES = ("auto", "off", "always")


def kernel_mode() -> str:
    """``UNIPRUNING_SPARSE_KERNEL``: auto (measure), off (dense) or always (sparse)."""
    mode = os.environ.get("UNIPRUNING_SPARSE_KERNEL", "auto").strip().lower()
    if mode not in _MODES:
        raise ValueError(f"UNIPRUNING_SPARSE_KERNEL must be one of {_MODES}, got {mode!r}")
    return mode


def kernel_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """(usable, reason): CUDA, a cuSPARSELt build of torch and compute capability >= 8.0."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda":
        return False, f"weights on {device.type}"
    if not torch.backends.cusparselt.is_available():
        return False, "this torch build has no cuSPARSELt"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"compute capability {major}.{minor} < 8.0 has no 2:4 sparse tensor cores"
    return True, "cuSPARSELt"


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


def choose_threshold(rows: list[dict], margin: float = 1.0) -> int | None:
    """Smallest n from which sparse was >= ``margin`` x dense for that and every larger bucket.

    ``rows`` are ``measure_shape`` rows (``n``, ``speedup`` = dense_ms / sparse_ms). None when
    the largest bucket already loses: the layer then stays dense.
    """
    threshold = None
    for row in sorted(rows, key=lambda r: r["n"], reverse=True):
        if row["speedup"] >= margin:
            threshold = row["n"]
        else:
            break
    return threshold


def random_24(out_features: int, in_features: int, dtype: torch.dtype, device, seed: int = 0) -> torch.Tensor:
    """A random weight with exactly 2 nonzeros in every group of 4 inputs."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen)
    groups = w.view(out_features, -1, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).view(out_features, in_features).to(device=device, dtype=dtype)


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


def _time_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def measure_shape(
    weight: torch.Tensor, buckets: tuple[int, ...] = N_BUCKETS, iters: int = 20, packed: torch.Tensor | None = None
) -> list[dict]:
    """Per bucket n: dense and sparse ms for [n, in] @ W.T, the speedup and the searched alg id."""
    out_features, in_features = weight.shape
    packed = torch._cslt_compress(weight) if packed is None else packed
    rows = []
    for n in buckets:
        x = torch.randn(n, in_features, device=weight.device, dtype=weight.dtype)
        alg_id = search_algorithm(packed, x, out_features, in_features)
        dense_ms = _time_ms(lambda: torch.nn.functional.linear(x, weight), iters)
        sparse_ms = _time_ms(lambda: _sparse_mm(packed, x, None, alg_id), iters)
        rows.append(
            {
                "m": out_features,
                "k": in_features,
                "n": n,
                "dtype": str(weight.dtype).removeprefix("torch."),
                "dense_ms": dense_ms,
                "sparse_ms": sparse_ms,
                "speedup": dense_ms / sparse_ms,
                "alg_id": alg_id,
            }
        )
    return rows


@dataclass
class KernelDecision:
    """Per shape: the token count from which the sparse kernel runs (None: never), alg id per bucket."""

    threshold: int | None
    alg_ids: list[int] = field(default_factory=lambda: [0] * len(N_BUCKETS))
    rows: list[dict] = field(default_factory=list)
    reason: str = ""

    def describe(self) -> str:
        if self.threshold is None:
            return f"dense ({self.reason})"
        if self.threshold <= N_BUCKETS[0]:
            return f"2:4 cuSPARSELt for every n ({self.reason})"
        return f"2:4 cuSPARSELt for n >= {self.threshold} tokens, dense below ({self.reason})"


_DECISIONS: dict[tuple, KernelDecision] = {}


def decide(weight: torch.Tensor, mode: str | None = None) -> KernelDecision:
    """The (cached) decision for this weight's shape, dtype and device."""
    mode = kernel_mode() if mode is None else mode
    out_features, in_features = weight.shape
    ok, reason = kernel_available(weight.device)
    if ok:
        ok, reason = shape_supported(out_features, in_features, weight.dtype)
    if not ok or mode == "off":
        return KernelDecision(None, reason=reason if not ok else "UNIPRUNING_SPARSE_KERNEL=off")
    key = (out_features, in_features, weight.dtype, torch.cuda.get_device_name(weight.device), mode)
    if key not in _DECISIONS:
        rows = measure_shape(random_24(out_features, in_features, weight.dtype, weight.device))
        algs = [r["alg_id"] for r in rows]
        if mode == "always":
            decision = KernelDecision(0, algs, rows, "UNIPRUNING_SPARSE_KERNEL=always")
        else:
            threshold = choose_threshold(rows)
            best = max(rows, key=lambda r: r["speedup"])
            reason = f"measured: best {best['speedup']:.2f}x at n={best['n']}"
            decision = KernelDecision(threshold, algs, rows, reason)
        _DECISIONS[key] = decision
    return _DECISIONS[key]


@torch.library.custom_op("unipruning::sparse24_linear", mutates_args=())
def sparse24_linear(
    x: torch.Tensor,
    dense: torch.Tensor | None,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    threshold: int,
    alg_ids: list[int],
) -> torch.Tensor:
    """x @ W.T + bias: cuSPARSELt when the token count >= threshold, else the dense weight.

    An opaque op so that torch.compile / CUDA graphs keep the per-call choice on n.
    """
    x2 = x.reshape(-1, x.shape[-1])
    n = x2.shape[0]
    if dense is None or n >= threshold:
        out = _sparse_mm(packed, x2, bias, alg_ids[bucket_index(n)])
    else:
        out = torch.nn.functional.linear(x2, dense, bias)
    return out.reshape(*x.shape[:-1], out_features)


@sparse24_linear.register_fake
def _sparse24_linear_fake(x, dense, packed, bias, out_features, threshold, alg_ids):
    return x.new_empty(*x.shape[:-1], out_features)


class Sparse24Linear:
    """A 2:4 weight compressed for cuSPARSELt, plus the dense copy while dense wins for small n."""

    def __init__(self, packed, dense, out_features: int, in_features: int, decision: KernelDecision):
        self.packed = packed
        self.dense = dense
        self.out_features = out_features
        self.in_features = in_features
        self.decision = decision

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mode: str | None = None) -> Sparse24Linear | None:
        """The sparse layer for a 2:4 weight, or None when the decision is dense for every n."""
        decision = decide(weight, mode)
        if decision.threshold is None:
            return None
        packed = torch._cslt_compress(weight.contiguous())
        keep_dense = decision.threshold > N_BUCKETS[0]
        return cls(packed, weight if keep_dense else None, weight.shape[0], weight.shape[1], decision)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return sparse24_linear(
            x, self.dense, self.packed, bias, self.out_features, int(self.decision.threshold), self.decision.alg_ids
        )
