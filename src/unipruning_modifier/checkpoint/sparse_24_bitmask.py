"""sparse-24-bitmask: 2 values per group of 4 inputs, their positions in a bitmask.

Tensors per module ``P`` (compressed-tensors 0.14.0.1, byte-compatible): ``P.compressed``
[out, in/2] (weight dtype, exactly 2 values per group of 4, zeros included), ``P.bitmask`` uint8
[out, ceil(in/8)] (bitmask.py), ``P.shape`` int64 [2, 1] = [[out], [in]].

Compatibility notes (compressed-tensors 0.14.0.1, ``get_24_bytemasks``):

* The 2:4 mask is ``abs(W.view(-1, 4)).topk(2)`` computed on the CPU. Ties are broken by the CPU
  ``topk`` (``std::nth_element``), which is *not* "lowest index first" (e.g. an all-zero group
  keeps columns 2 and 3, ``[x, 0, 0, 0]`` keeps 0 and 2). We reproduce it exactly with a
  729-entry table indexed by the 6 pairwise comparisons of the group (``_TIE_TABLE``), so the
  result is the same on every device; NaN ranks above everything, as in ``topk``.
* float8_e4m3fn weights are ranked by ``abs()`` of their *int8 view* (that is what
  compressed-tensors did): the order among negative values is inverted and -0.0 ranks below
  +0.0. Any nonzero still ranks above any zero, so 2:4-sparse fp8 weights are stored losslessly.
* int8 weights: compressed-tensors ranks by ``int8.abs()``, which overflows for -128 (it stays
  -128, below zero) and so *drops* -128 from a group that has a zero to keep instead. We rank by
  the true magnitude (int16 ``abs``). This is the one deliberate deviation: bytes differ from
  compressed-tensors only in groups that contain -128, where its output lost that value.
* Strict by default: ``compress_sparse_24_bitmask`` refuses a weight with more than 2 nonzeros in
  a group of 4 (it would drop weights); then only the zero / nonzero / fp8 -0.0 class of each
  entry decides the kept columns, which an 81-entry table derived from ``_TIE_TABLE`` resolves
  (fast path). ``prune=True`` ranks every group like ``from_dense`` (729-entry table).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .bitmask import int_view, join_nibbles, nonzero, scatter_dense, unpack_bitmask
from .registry import Codec, check_bitmask, check_values, check_weight, fail, parse_shape, register_format

__all__ = ["Sparse24BitmaskCodec", "compress_sparse_24_bitmask", "decompress_sparse_24_bitmask", "mask_24"]

# --------------------------------------------------------------------------------------------
# 2:4 tie table. Index: sum over the pairs p=(i, j) of (1 + [k_i > k_j] - [k_i < k_j]) * 3**p;
# value: 4-bit mask of the two columns CPU ``torch.topk(k, 2)`` keeps. Generated from torch
# 2.13 CPU topk over all 5**4 groups of the levels {0, 1, 2, 3, nan} (75 weak orders; the other
# codes cannot occur and hold 0). tests/test_checkpoint_codecs.py regenerates and compares it.
# --------------------------------------------------------------------------------------------
_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
_TIE_TABLE_HEX = (
    "ccc00c009000000009000000009c000c0009000000009000000009a00a00aa9000000009000000009"
    "000000000000000000000000000000000000000000000000000000a00a00a000000000a0000000003"
    "000000000000000000000000000000000000000000000000000000a00a00a00000000a00000000333"
    "ccc00000000000c000000000005000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000c000000000000c0000000000005000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000a00000000000a00000000000333"
    "ccc00000000c000000005005005000000000000000000000000000000000000000000000000000000"
    "c000000000c0000000005005005000000000000000000000000000000000000000000000000000000"
    "600000000600000000665005005600000000600000000600060003600000000600000000600600333"
)
if len(_TIE_TABLE_HEX) != 3**6:  # pragma: no cover
    raise ImportError("corrupt 2:4 tie table")
_TIE_TABLE: tuple[int, ...] = tuple(int(c, 16) for c in _TIE_TABLE_HEX)


# An "entry" packs what the codec needs for one group: bits 0-3 the kept columns, bit 4 "more
# than 2 nonzeros" (strict mode refuses it), bits 5-6 / 7-8 the first / second kept column.
_BAD = 16


def _entry(bits: int, bad: bool = False) -> int:
    cols = [j for j in range(4) if bits >> j & 1]
    first, second = (cols[0], cols[1]) if len(cols) == 2 else (0, 1)  # (unreachable codes)
    return bits | (_BAD if bad else 0) | first << 5 | second << 7


def _code_of(keys: Sequence[float]) -> int:
    """Scalar version of ``_tie_codes`` for one group of 4 comparable keys (no NaN)."""
    return sum((1 + (keys[i] > keys[j]) - (keys[i] < keys[j])) * 3**p for p, (i, j) in enumerate(_PAIRS))


def _reduced_entries() -> tuple[int, ...]:
    """Entries for the reduced keys r in {0: fp8 -0.0, 1: zero, 2: nonzero}, code sum(r_i 3**i).

    For a group with at most 2 nonzeros only these classes decide the kept columns: the
    nonzeros are kept whatever their order, the zeros are ranked by compressed-tensors' keys
    (fp8 -0.0 -> int8 -128 ranks below +0.0 -> 0; float -0.0 and +0.0 have equal |x|).
    """
    out = []
    for code in range(81):
        r = [code // 3**i % 3 for i in range(4)]
        out.append(_entry(_TIE_TABLE[_code_of(r)], bad=sum(v == 2 for v in r) > 2))
    return tuple(out)


_ENTRIES_FULL = tuple(_entry(bits) for bits in _TIE_TABLE)
_ENTRIES_REDUCED = _reduced_entries()
_NIBBLE_POPCOUNT = tuple(bin(v).count("1") for v in range(16))
_TABLE_CACHE: dict[tuple[str, torch.device], torch.Tensor] = {}


def _lookup(which: str, index: torch.Tensor) -> torch.Tensor:
    """table[index] (int16) for the "full", "reduced" or "nibble" table, index of any integer dtype."""
    key = (which, index.device)
    if key not in _TABLE_CACHE:
        values = {"full": _ENTRIES_FULL, "reduced": _ENTRIES_REDUCED, "nibble": _NIBBLE_POPCOUNT}[which]
        _TABLE_CACHE[key] = torch.tensor(values, dtype=torch.int16, device=index.device)
    return torch.index_select(_TABLE_CACHE[key], 0, index.reshape(-1).to(torch.int64)).view(index.shape)


def _rank_keys(weight: torch.Tensor) -> torch.Tensor:
    """Magnitudes compared by the 2:4 selection (see the module docstring)."""
    if weight.dtype == torch.float8_e4m3fn:
        return weight.view(torch.int8).abs()  # as compressed-tensors: int8 view, wrapping abs
    if weight.dtype == torch.int8:
        return weight.to(torch.int16).abs()  # true |-128| = 128 (compressed-tensors overflowed)
    return weight.abs()


def _tie_codes(keys: torch.Tensor) -> torch.Tensor:
    """int16 [..., G] index into the tie table for keys [..., G, 4]."""
    columns = keys.movedim(-1, 0).contiguous()  # [4, ..., G]: contiguous operands
    nan = torch.isnan(columns) if keys.is_floating_point() else None
    if nan is not None and not bool(nan.any()):
        nan = None
    code = torch.full(columns.shape[1:], sum(3**p for p in range(6)), dtype=torch.int16, device=keys.device)
    for p, (i, j) in enumerate(_PAIRS):
        a, b = columns[i], columns[j]
        gt, lt = a > b, a < b
        if nan is not None:  # topk's comparator: NaN is larger than any number
            gt = gt | (nan[i] & ~nan[j])
            lt = lt | (nan[j] & ~nan[i])
        code.add_(gt.to(torch.int16), alpha=3**p).sub_(lt.to(torch.int16), alpha=3**p)
    return code


def _24_entries(weight: torch.Tensor, name: str | None, prune: bool) -> torch.Tensor:
    """int16 [out, in/4]: the entry of every group (kept columns, see ``_entry``)."""
    rows, cols = weight.shape
    if cols % 4:
        raise fail(name, f"sparse-24-bitmask needs the input size to be a multiple of 4, got shape [{rows}, {cols}]")
    if prune:
        return _lookup("full", _tie_codes(_rank_keys(weight).reshape(rows, cols // 4, 4)))
    classes = nonzero(weight).to(torch.uint8) + 1  # 1: zero, 2: nonzero
    if weight.dtype == torch.float8_e4m3fn:
        classes -= (weight.view(torch.int8) == -128).to(torch.uint8)  # 0: fp8 -0.0
    r = classes.view(rows, cols // 4, 4)
    entries = _lookup("reduced", r[..., 0] + r[..., 1] * 3 + r[..., 2] * 9 + r[..., 3] * 27)
    bad = (entries & _BAD) != 0
    if bool(bad.any()):
        row, group = (int(v) for v in bad.nonzero()[0].tolist())
        raise fail(
            name,
            f"weight is not 2:4 sparse: {int(bad.sum())} group(s) of 4 inputs hold more than 2 "
            f"nonzeros (first: row {row}, columns {4 * group}-{4 * group + 3}); compressing would "
            "drop weights (pass prune=True to keep the top-2 |value| per group as compressed-tensors did)",
        )
    return entries


def _entry_bits(entries: torch.Tensor) -> torch.Tensor:
    return (entries & 0xF).to(torch.uint8)


def mask_24(weight: torch.Tensor, name: str | None = None, prune: bool = True) -> torch.Tensor:
    """bool [out, in]: the 2 kept columns of every group of 4 (compressed-tensors' choice)."""
    check_weight(weight, name)
    rows, cols = weight.shape
    bits = _entry_bits(_24_entries(weight, name, prune))
    shifts = torch.arange(4, dtype=torch.uint8, device=weight.device)
    return ((bits.unsqueeze(-1) >> shifts) & 1).bool().reshape(rows, cols)


def compress_sparse_24_bitmask(
    weight: torch.Tensor, name: str | None = None, *, prune: bool = False
) -> dict[str, torch.Tensor]:
    """Dense [out, in] -> {"compressed", "bitmask", "shape"} of sparse-24-bitmask.

    ``prune=False`` (default) refuses a weight with more than 2 nonzeros in a group of 4;
    ``prune=True`` keeps the top-2 per group like compressed-tensors' ``from_dense``.
    """
    check_weight(weight, name)
    rows, cols = weight.shape
    entries = _24_entries(weight, name, prune)
    kept_columns = torch.stack(((entries >> 5) & 3, (entries >> 7) & 3), dim=-1).to(torch.int64)
    groups = int_view(weight).reshape(rows, cols // 4, 4)
    kept = groups.gather(-1, kept_columns)  # [out, G, 2], columns ascending = W[mask] order
    return {
        "compressed": kept.reshape(rows, cols // 2).view(weight.dtype),
        "bitmask": join_nibbles(_entry_bits(entries)),
        "shape": torch.tensor([[rows], [cols]], dtype=torch.int64, device=weight.device),
    }


def decompress_sparse_24_bitmask(
    compressed: torch.Tensor,
    bitmask: torch.Tensor,
    shape: Any,
    dtype: torch.dtype | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """sparse-24-bitmask -> dense [out, in] on ``compressed``'s device.

    ``dtype``: the expected dtype of the stored values (None: accept what is stored).
    """
    rows, cols = parse_shape(shape, name)
    check_values(compressed, dtype, name)
    check_bitmask(bitmask, rows, cols, name)
    if cols % 4:
        raise fail(name, f"sparse-24-bitmask needs the input size to be a multiple of 4, got shape [{rows}, {cols}]")
    if tuple(compressed.shape) != (rows, cols // 2):
        raise fail(
            name,
            f"compressed has shape {list(compressed.shape)}, expected [{rows}, {cols // 2}] = [out, in/2]",
        )
    bitmask = bitmask.to(compressed.device)
    nbytes = bitmask.shape[1]
    nibbles = torch.stack((bitmask & 0xF, bitmask >> 4), dim=-1).reshape(rows, 2 * nbytes)[:, : cols // 4]
    per_group = _lookup("nibble", nibbles)
    bad = per_group > 2
    if bool(bad.any()):
        row, group = (int(v) for v in bad.nonzero()[0].tolist())
        raise fail(
            name,
            f"bitmask is not 2:4: {int(bad.sum())} group(s) of 4 have more than 2 set bits "
            f"(first: row {row}, columns {4 * group}-{4 * group + 3})",
        )
    count = int(per_group.sum(dtype=torch.int64))
    if count != compressed.numel():
        raise fail(
            name,
            f"compressed holds {compressed.numel()} values but the bitmask has {count} set bits "
            f"(sparse-24-bitmask stores exactly 2 per group of 4)",
        )
    return scatter_dense(compressed, unpack_bitmask(bitmask, cols))


@register_format("sparse-24-bitmask")
class Sparse24BitmaskCodec(Codec):
    param_names = ("shape", "compressed", "bitmask")  # compressed-tensors' order
    sparsity_structure = "2:4"

    def compress(self, weight, name=None, *, prune: bool = False, **kwargs):
        out = compress_sparse_24_bitmask(weight, name, prune=prune)
        return {k: out[k] for k in self.param_names}

    def decompress(self, tensors, dtype=None, name=None):
        self.require(tensors, name)
        return decompress_sparse_24_bitmask(
            tensors["compressed"], tensors["bitmask"], tensors["shape"], dtype=dtype, name=name
        )
