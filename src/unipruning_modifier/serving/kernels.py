"""2:4 sparse linear layer: dense, the Triton 2:4 kernel or cuSPARSELt, each only where it measured fastest.

Plain PyTorch (plus Triton when installed), no vLLM import. ``Sparse24Linear.from_dense(W)``
measures, once per (out, in, dtype, GPU) in the process, three candidates for every token-count
bucket (``N_BUCKETS``, a call with n tokens uses the smallest bucket >= n):

* ``dense``: ``F.linear`` on the dense weight (cuBLAS);
* ``triton_24``: ``triton_24.matmul`` reading values + 2-bit indices (1.125 bytes per weight
  instead of 2), for buckets up to ``measure.TRITON_MAX_N`` tokens (decode), each bucket with
  the fastest of ``triton_24_configs.candidate_configs`` (up to four block configs per bucket of
  1-8 tokens: the best one differs by shape);
* ``cslt``: cuSPARSELt (``cusparselt.sparse_mm`` with the algorithm searched for that bucket).

Each bucket runs the fastest candidate; a sparse kernel only when it was at least
``PICK_MARGIN`` (3%) faster than dense in that measurement. The decision (with the Triton configs picked and the seconds the measurement
took) is what vLLM's log line shows per layer. The layer keeps only the weight copies some bucket
uses (dense 1x, Triton layout 0.56x, cuSPARSELt 0.56x the dense bytes).

Why measured and not assumed: on an H100 with torch 2.11 the cuSPARSELt call costs a flat
0.5-1.4 ms of set-up whatever n, so it wins only for n >= 4096 (docs/serving.md has the tables).
How each is timed: ``measure.py``. ``UNIPRUNING_SPARSE_KERNEL`` overrides:
``auto`` (default), ``off`` (dense), ``triton`` (Triton for every n, no dense copy) or
``cusparselt`` (alias ``always``: cuSPARSELt for every n, no dense copy).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from . import cusparselt, triton_24
from .measure import TRITON_MAX_N, measure_shape, random_24
from .triton_24_configs import BlockConfig, candidate_configs, default_config
from .triton_24_layout import Sparse24Weight, layout_supported

__all__ = [
    "KERNELS",
    "N_BUCKETS",
    "PICK_MARGIN",
    "KernelDecision",
    "Sparse24Linear",
    "bucket_index",
    "choose_kernels",
    "decide",
    "kernel_available",
    "kernel_mode",
    "sparse24_linear",
    "triton_kernel_available",
]

N_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096, 16384)
KERNELS = ("dense", "triton_24", "cslt")
# decide() picks a sparse kernel only where it measured at least this much faster than dense: a
# load-time timing of 20 calls varies by a few percent, and a tie must not turn into a loss.
PICK_MARGIN = 1.03
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


@dataclass
class KernelDecision:
    """Per bucket of ``N_BUCKETS``: the kernel to run, cuSPARSELt alg id and Triton block config."""

    choices: list[str] = field(default_factory=lambda: ["dense"] * len(N_BUCKETS))
    alg_ids: list[int] = field(default_factory=lambda: [0] * len(N_BUCKETS))
    triton_configs: list[list[int]] = field(default_factory=lambda: [BlockConfig().as_list()] * len(N_BUCKETS))
    rows: list[dict] = field(default_factory=list)
    reason: str = ""
    seconds: float = 0.0  # how long measuring this shape took at load

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


def _summary(rows: list[dict], choices: list[str], seconds: float) -> str:
    """Best speedup over dense of each sparse kernel picked somewhere, the Triton block config of
    each bucket that runs it, and how long the measurement took."""
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
    configs = [f"n={r['n']} {BlockConfig.from_list(r['triton_config']).describe()}" for r, c in zip(rows, choices) if c == "triton_24"]
    if configs:
        parts.append("triton_24 configs " + ", ".join(configs))
    return "measured: " + ("; ".join(parts) or "no sparse candidate") + f"; {seconds:.1f} s"


def decide(weight: torch.Tensor, mode: str | None = None) -> KernelDecision:
    """The (cached) per-bucket kernel choice for this weight's shape, dtype and device."""
    mode = kernel_mode() if mode is None else mode
    out_features, in_features = weight.shape
    cslt_ok, cslt_reason = kernel_available(weight.device)
    if cslt_ok:
        cslt_ok, cslt_reason = cusparselt.shape_supported(out_features, in_features, weight.dtype)
    tri_ok, tri_reason = triton_kernel_available(weight.device)
    if tri_ok:
        tri_ok, tri_reason = layout_supported(out_features, in_features, weight.dtype)
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
    configs = [default_config(n, out_features, in_features).as_list() for n in N_BUCKETS]
    if forced == "triton_24":
        decision = KernelDecision(["triton_24"] * len(N_BUCKETS), triton_configs=configs, reason=f"UNIPRUNING_SPARSE_KERNEL={mode}")
    else:
        start = time.monotonic()
        candidates = ("dense",) + (("triton_24",) if tri_ok and forced is None else ()) + (("cslt",) if cslt_ok else ())
        tuned = {n: candidate_configs(n, out_features, in_features) for n in N_BUCKETS if n <= TRITON_MAX_N}
        sample = random_24(out_features, in_features, weight.dtype, weight.device)
        rows = measure_shape(sample, N_BUCKETS, candidates=candidates, triton_configs=tuned)
        seconds = time.monotonic() - start
        algs = [r["alg_id"] for r in rows]
        configs = [r["triton_config"] or c for r, c in zip(rows, configs)]
        if forced == "cslt":
            decision = KernelDecision(["cslt"] * len(N_BUCKETS), algs, configs, rows, f"UNIPRUNING_SPARSE_KERNEL={mode}", seconds)
        else:
            choices = choose_kernels(rows, PICK_MARGIN)
            decision = KernelDecision(choices, algs, configs, rows, _summary(rows, choices, seconds), seconds)
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
        out = cusparselt.sparse_mm(packed, x2, bias, alg_ids[bucket])
    elif kernel == "triton_24":
        width = len(triton_configs) // len(choices)
        config = BlockConfig.from_list(triton_configs[bucket * width : (bucket + 1) * width])
        out = triton_24.matmul(x2, Sparse24Weight(values, indices), bias, config)
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
            triton=Sparse24Weight.from_dense(weight) if decision.uses("triton_24") else None,
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
