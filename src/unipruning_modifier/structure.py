"""Mask structure strings, parsed in one place: "unstructured" / "0:0", or "N:M".

"N:M" prunes N weights in every group of M consecutive inputs of a row, as llm-compressor's
Wanda and SparseGPT modifiers read ``mask_structure``, so a recipe means the same thing for
every modifier in it: "2:4" and "4:8" are the half-sparse patterns (kept = pruned), "1:4"
prunes one weight in four, "3:4" three in four. Pure Python (no torch): the recipe fields, the
CLI, the checkpoint's ``sparsity_structure`` and the benchmarks all read the same strings.
"""

from __future__ import annotations

import re

__all__ = ["kept_per_group", "parse_mask_structure", "structure_name"]

_N_OF_M = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_mask_structure(mask_structure: str) -> tuple[int, int]:
    """"unstructured" / "0:0" -> (0, 0); "N:M" -> (N, M) with 0 < N < M (N weights pruned per M)."""
    text = str(mask_structure).strip().lower()
    if text == "unstructured":
        return 0, 0
    match = _N_OF_M.match(text)
    if not match:
        raise ValueError(
            f"mask_structure must be 'unstructured', '0:0' or 'N:M' such as '2:4', got {mask_structure!r}"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if (n, m) == (0, 0):
        return 0, 0
    if not 0 < n < m:
        raise ValueError(
            f"mask_structure {mask_structure!r}: N:M prunes N weights in every M (llm-compressor's "
            "meaning), so 0 < N < M is required (e.g. '2:4', '4:8')"
        )
    return n, m


def structure_name(n: int, m: int) -> str:
    """The ``sparsity_structure`` string of (N, M): "unstructured" for (0, 0), else "N:M"."""
    return f"{n}:{m}" if m else "unstructured"


def kept_per_group(n: int, m: int) -> int:
    """Weights kept in each group of M under "N:M" (N pruned): M - N."""
    return m - n
