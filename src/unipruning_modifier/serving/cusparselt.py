"""cuSPARSELt 2:4 matmul through torch's private ``torch._cslt_*`` ops (padding, algorithm search).

Kept apart from the measured rule (``kernels.py``) that decides where it is used: on an H100 /
H200 with torch 2.11 each call costs a flat 0.5-1.4 ms of set-up, so the rule picks it only for
prefill-sized calls of wide layers (docs/serving.md has the tables).
"""

from __future__ import annotations

import torch

__all__ = ["SEARCH_MIN_DIM", "SPARSE_DTYPES", "search_algorithm", "shape_supported", "sparse_mm"]

SPARSE_DTYPES = (torch.float16, torch.bfloat16)
# cuSPARSELt's algorithm search failed with an internal error on a 256x512 fp16 weight on an
# H100 (torch 2.11, cuSPARSELt 0.8) and left the CUDA context unusable; every shape from 1024
# up searched fine. Smaller layers use the default algorithm (id 0), which ran correctly.
SEARCH_MIN_DIM = 1024


def shape_supported(out_features: int, in_features: int, dtype: torch.dtype) -> tuple[bool, str]:
    """(ok, reason) for cuSPARSELt's limits on the sparse operand: fp16/bf16, both dims % 16."""
    if dtype not in SPARSE_DTYPES:
        return False, f"dtype {dtype} (the 2:4 kernel path takes fp16 / bf16)"
    if out_features % 16 or in_features % 16:
        return False, f"shape {out_features}x{in_features} is not a multiple of 16"
    return True, "ok"


def _pad_rows(x: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    pad = (-x.shape[0]) % multiple
    return torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x


def sparse_mm(packed: torch.Tensor, x: torch.Tensor, bias, alg_id: int) -> torch.Tensor:
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
