"""vLLM-free parts of the serving plugin: which checkpoints it claims, and tensor-parallel slicing.

Everything here is plain torch on top of ``unipruning_modifier.checkpoint`` so that it can be
tested without vLLM. A compressed module arrives as the tensors of one sparse format
(``shape``, ``compressed``, ``bitmask`` and, for sparse-bitmask, ``row_offsets``); a rank keeps
a block of output rows (column-parallel layers) or of input columns (row-parallel layers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..checkpoint import SparseFormatError, get_codec, parse_shape, row_popcounts

__all__ = [
    "SPARSE_FORMATS",
    "SparsitySpec",
    "claims_checkpoint",
    "parse_sparsity_config",
    "slice_rows",
    "slice_columns",
    "decompress_part",
]

SPARSE_FORMATS = ("sparse-24-bitmask", "sparse-bitmask")


class SparsitySpec:
    """The parsed ``sparsity_config``: format, structure, targets and ignore lists."""

    def __init__(self, format: str, structure: str, targets: list[str], ignore: list[str]):
        self.format = format
        self.structure = structure
        self.targets = targets
        self.ignore = ignore

    @property
    def compressed(self) -> bool:
        """True when target weights are stored in a sparse format (not ``dense``)."""
        return self.format in SPARSE_FORMATS

    def __repr__(self) -> str:
        return (
            f"SparsitySpec(format={self.format!r}, structure={self.structure!r}, "
            f"targets={self.targets!r}, ignore={self.ignore!r})"
        )


def parse_sparsity_config(quant_config: Mapping[str, Any] | None) -> SparsitySpec | None:
    """SparsitySpec of a config.json ``quantization_config``, or None when it has no sparse targets.

    Raises SparseFormatError for a format this package cannot read (e.g. marlin-24).
    """
    raw = (quant_config or {}).get("sparsity_config") or None
    if not raw or not raw.get("targets"):
        return None
    fmt = get_codec(str(raw.get("format", "dense"))).format
    structure = str(raw.get("sparsity_structure") or "unstructured").strip().lower()
    targets = [raw["targets"]] if isinstance(raw["targets"], str) else list(raw["targets"])
    ignore = raw.get("ignore") or []
    ignore = [ignore] if isinstance(ignore, str) else list(ignore)
    if fmt == "sparse-24-bitmask" and structure != "2:4":
        raise SparseFormatError(f"sparsity_config: format {fmt!r} needs sparsity_structure '2:4', got {structure!r}")
    return SparsitySpec(fmt, structure, targets, ignore)


def claims_checkpoint(quant_config: Mapping[str, Any] | None) -> bool:
    """True for a compressed-tensors config whose ``sparsity_config`` has targets.

    Those are exactly the checkpoints vLLM >= 0.19 refuses; everything else is left to vLLM.
    """
    if not isinstance(quant_config, Mapping) or quant_config.get("quant_method") != "compressed-tensors":
        return False
    raw = quant_config.get("sparsity_config") or None
    return bool(isinstance(raw, Mapping) and raw.get("targets"))


def _dims(fmt: str, tensors: Mapping[str, torch.Tensor], name: str | None) -> tuple[int, int]:
    missing = [p for p in get_codec(fmt).param_names if p not in tensors]
    if missing:
        raise SparseFormatError(f"sparse tensor {name!r}: {fmt} needs {list(get_codec(fmt).param_names)}, missing {missing}")
    return parse_shape(tensors["shape"], name)


def _shape_like(shape: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return torch.tensor([rows, cols], dtype=torch.int64).reshape(shape.shape)


def slice_rows(fmt: str, tensors: Mapping[str, torch.Tensor], start: int, size: int, name: str | None = None):
    """The tensors of output rows ``[start, start + size)``, still compressed (no decompression)."""
    rows, cols = _dims(fmt, tensors, name)
    if start < 0 or size < 0 or start + size > rows:
        raise SparseFormatError(f"sparse tensor {name!r}: rows [{start}, {start + size}) outside [0, {rows})")
    out = {"shape": _shape_like(tensors["shape"], size, cols), "bitmask": tensors["bitmask"][start : start + size]}
    if fmt == "sparse-24-bitmask":
        out["compressed"] = tensors["compressed"][start : start + size]
        return out
    counts = row_popcounts(tensors["bitmask"], cols)
    offsets = torch.cumsum(counts, 0) - counts
    first = int(offsets[start]) if size else 0
    count = int(counts[start : start + size].sum())
    out["compressed"] = tensors["compressed"][first : first + count]
    out["row_offsets"] = offsets[start : start + size] - first
    return out


def slice_columns(fmt: str, tensors: Mapping[str, torch.Tensor], start: int, size: int, name: str | None = None):
    """Input columns ``[start, start + size)`` of a compressed module (row-parallel sharding).

    sparse-24-bitmask is split without decompressing: the bitmask by bytes, ``compressed`` by
    halves, so ``start`` and ``size`` must be multiples of 8 (refused otherwise). sparse-bitmask
    has no per-column index, so the module is decompressed and a dense tensor is returned.
    """
    rows, cols = _dims(fmt, tensors, name)
    if start < 0 or size < 0 or start + size > cols:
        raise SparseFormatError(f"sparse tensor {name!r}: columns [{start}, {start + size}) outside [0, {cols})")
    if fmt == "sparse-bitmask":
        return decompress_part(fmt, tensors, name=name)[:, start : start + size]
    if start % 8 or size % 8:
        raise SparseFormatError(
            f"sparse tensor {name!r}: tensor parallelism splits its {cols} inputs into partitions of {size} "
            f"starting at {start}; sparse-24-bitmask can only be split at multiples of 8 inputs "
            "(one bitmask byte). Use a tensor-parallel size that divides the input dimension into "
            "multiples of 8."
        )
    return {
        "shape": _shape_like(tensors["shape"], rows, size),
        "compressed": tensors["compressed"][:, start // 2 : (start + size) // 2],
        "bitmask": tensors["bitmask"][:, start // 8 : (start + size) // 8],
    }


def decompress_part(fmt: str, part, dtype: torch.dtype | None = None, name: str | None = None) -> torch.Tensor:
    """Dense [rows, cols] of a part: a dict of compressed tensors, or an already dense tensor."""
    if isinstance(part, torch.Tensor):
        return part
    return get_codec(fmt).decompress(part, dtype=dtype, name=name)
