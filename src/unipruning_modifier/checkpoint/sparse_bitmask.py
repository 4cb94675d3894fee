"""sparse-bitmask: unstructured sparsity, the nonzero values of each row and a bitmask.

Tensors per module ``P`` (compressed-tensors 0.14.0.1, byte-compatible): ``P.compressed`` 1-D
[nnz] (weight dtype), ``P.bitmask`` uint8 [out, ceil(in/8)] (bitmask.py), ``P.shape`` int64 [2],
``P.row_offsets`` int64 [out] = cumsum(row_nnz) - row_nnz.
"""

from __future__ import annotations

from typing import Any

import torch

from .bitmask import int_view, nonzero, pack_bitmask, row_popcounts, scatter_dense, unpack_bitmask
from .registry import Codec, check_bitmask, check_values, check_weight, fail, parse_shape, register_format

__all__ = ["SparseBitmaskCodec", "compress_sparse_bitmask", "decompress_sparse_bitmask"]


def compress_sparse_bitmask(weight: torch.Tensor, name: str | None = None) -> dict[str, torch.Tensor]:
    """Dense [out, in] -> {"compressed", "bitmask", "shape", "row_offsets"} of sparse-bitmask."""
    check_weight(weight, name)
    rows, cols = weight.shape
    mask = nonzero(weight)
    bitmask = pack_bitmask(mask)
    row_counts = row_popcounts(bitmask, cols)
    values = torch.masked_select(int_view(weight), mask).view(weight.dtype)
    return {
        "compressed": values,
        "bitmask": bitmask,
        "shape": torch.tensor([rows, cols], dtype=torch.int64, device=weight.device),
        "row_offsets": torch.cumsum(row_counts, 0) - row_counts,
    }


def decompress_sparse_bitmask(
    compressed: torch.Tensor,
    bitmask: torch.Tensor,
    shape: Any,
    dtype: torch.dtype | None = None,
    row_offsets: torch.Tensor | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """sparse-bitmask -> dense [out, in]; ``row_offsets`` is checked when given."""
    rows, cols = parse_shape(shape, name)
    check_values(compressed, dtype, name)
    check_bitmask(bitmask, rows, cols, name)
    if compressed.dim() != 1:
        raise fail(name, f"compressed must be 1-D [nnz] for sparse-bitmask, got shape {list(compressed.shape)}")
    bitmask = bitmask.to(compressed.device)
    row_counts = row_popcounts(bitmask, cols)
    count = int(row_counts.sum())
    if count != compressed.numel():
        raise fail(name, f"compressed holds {compressed.numel()} values but the bitmask has {count} set bits")
    if row_offsets is not None:
        if not isinstance(row_offsets, torch.Tensor) or row_offsets.shape != (rows,):
            got = list(row_offsets.shape) if isinstance(row_offsets, torch.Tensor) else type(row_offsets).__name__
            raise fail(name, f"row_offsets must be a tensor of shape [{rows}], got {got}")
        expected = torch.cumsum(row_counts, 0) - row_counts
        if not torch.equal(row_offsets.to(device=expected.device, dtype=expected.dtype), expected):
            raise fail(name, "row_offsets do not match the bitmask (expected cumsum(row_nnz) - row_nnz)")
    return scatter_dense(compressed, unpack_bitmask(bitmask, cols))


@register_format("sparse-bitmask")
class SparseBitmaskCodec(Codec):
    param_names = ("shape", "compressed", "bitmask", "row_offsets")  # compressed-tensors' order

    def compress(self, weight, name=None, **kwargs):
        out = compress_sparse_bitmask(weight, name)
        return {k: out[k] for k in self.param_names}

    def decompress(self, tensors, dtype=None, name=None):
        self.require(tensors, name, optional=("row_offsets",))
        return decompress_sparse_bitmask(
            tensors["compressed"],
            tensors["bitmask"],
            tensors["shape"],
            dtype=dtype,
            row_offsets=tensors.get("row_offsets"),
            name=name,
        )
