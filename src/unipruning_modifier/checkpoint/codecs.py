"""Per-tensor codecs of the legacy sparse checkpoint formats (compressed-tensors <= 0.14.0.1).

Pure torch, vectorised (no Python loop over rows), device-agnostic (CPU and CUDA tensors; the
outputs live on the input's device). No llm-compressor / compressed-tensors import.

Formats (see docs/checkpoint-format.md):

``sparse-24-bitmask``
    ``compressed`` [out, in/2] (weight dtype, exactly 2 values per group of 4, zeros included),
    ``bitmask`` uint8 [out, ceil(in/8)] (little bit order: bit j of byte b = column 8b+j),
    ``shape`` int64 [2, 1] = [[out], [in]].
``sparse-bitmask``
    ``compressed`` 1-D [nnz], ``bitmask`` as above, ``shape`` int64 [2],
    ``row_offsets`` int64 [out] = cumsum(row_nnz) - row_nnz.
``dense``
    the weight itself (no-op).

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

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "SparseFormatError",
    "SUPPORTED_DTYPES",
    "FORMATS",
    "Codec",
    "DenseCodec",
    "Sparse24BitmaskCodec",
    "SparseBitmaskCodec",
    "register_format",
    "get_codec",
    "standardize_format",
    "pack_bitmask",
    "unpack_bitmask",
    "mask_24",
    "compress_sparse_24_bitmask",
    "decompress_sparse_24_bitmask",
    "compress_sparse_bitmask",
    "decompress_sparse_bitmask",
    "compress",
    "decompress",
    "storage_bytes",
]


class SparseFormatError(ValueError):
    """A tensor cannot be compressed to, or decompressed from, a sparse checkpoint format."""


SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float8_e4m3fn,
    torch.int8,
)

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32}

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
_BYTE_POPCOUNT = tuple(bin(v).count("1") for v in range(256))
_TABLE_CACHE: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(which: str, device: torch.device) -> torch.Tensor:
    key = (which, device)
    if key not in _TABLE_CACHE:
        values = {
            "full": _ENTRIES_FULL,
            "reduced": _ENTRIES_REDUCED,
            "nibble": _NIBBLE_POPCOUNT,
            "byte": _BYTE_POPCOUNT,
        }[which]
        _TABLE_CACHE[key] = torch.tensor(values, dtype=torch.int16, device=device)
    return _TABLE_CACHE[key]


def _lookup(which: str, index: torch.Tensor) -> torch.Tensor:
    """table[index] (int16), index of any integer dtype and shape."""
    table = _table(which, index.device)
    return torch.index_select(table, 0, index.reshape(-1).to(torch.int64)).view(index.shape)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _label(name: str | None) -> str:
    return f"sparse tensor {name!r}" if name else "sparse tensor"


def _fail(name: str | None, message: str) -> SparseFormatError:
    return SparseFormatError(f"{_label(name)}: {message}")


def _check_dtype(dtype: torch.dtype, name: str | None, what: str = "weight") -> None:
    if dtype not in SUPPORTED_DTYPES:
        supported = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise _fail(name, f"{what} dtype {dtype} is not supported (supported: {supported})")


def _int_view(t: torch.Tensor) -> torch.Tensor:
    """Same bytes as a signed integer tensor: bit-exact gather/scatter for every dtype."""
    return t.view(_INT_VIEW[t.element_size()])


def _nonzero(weight: torch.Tensor) -> torch.Tensor:
    """``weight != 0`` as compressed-tensors evaluates it (-0.0 is zero, NaN is not)."""
    if weight.dtype == torch.float8_e4m3fn:
        return (weight.view(torch.int8) & 0x7F) != 0
    if weight.dtype in (torch.bfloat16, torch.float16):  # same result as != 0, integer speed
        return (weight.view(torch.int16) & 0x7FFF) != 0
    return weight != 0


def _check_weight(weight: torch.Tensor, name: str | None) -> None:
    if not isinstance(weight, torch.Tensor):
        raise _fail(name, f"expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise _fail(name, f"only 2-D [out, in] weights can be compressed, got shape {list(weight.shape)}")
    _check_dtype(weight.dtype, name)


def _parse_shape(shape: Any, name: str | None) -> tuple[int, int]:
    """(out, in) from a shape tensor ([2, 1] or [2]), a list/tuple or a torch.Size."""
    if isinstance(shape, torch.Tensor):
        if shape.is_floating_point() or shape.is_complex() or shape.dtype == torch.bool:
            raise _fail(name, f"shape must be an integer tensor, got dtype {shape.dtype}")
        values = shape.detach().flatten().cpu().tolist()
    else:
        try:
            values = [int(v) for v in shape]
        except (TypeError, ValueError):
            raise _fail(name, f"shape must hold two integers [out, in], got {shape!r}") from None
    if len(values) != 2 or any(v < 0 for v in values):
        raise _fail(name, f"shape must hold two non-negative integers [out, in], got {values}")
    return int(values[0]), int(values[1])


def _join_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, n] of 4-bit values -> uint8 [rows, ceil(n/2)], nibble 2k low, 2k+1 high."""
    rows, n = nibbles.shape
    if n % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(rows, 1)], dim=1)
    pairs = nibbles.view(rows, (n + 1) // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """bool [out, in] -> uint8 [out, ceil(in/8)]; bit j of byte b is column 8b+j.

    Equal to ``numpy.packbits(mask, axis=-1, bitorder="little")`` (zero padding bits).
    """
    rows, cols = mask.shape
    nbytes = (cols + 7) // 8
    if mask.numel() == 0:
        return torch.zeros((rows, nbytes), dtype=torch.uint8, device=mask.device)
    flags = mask.to(torch.uint8)
    if cols != nbytes * 8 or not flags.is_contiguous():
        padded = torch.zeros((rows, nbytes * 8), dtype=torch.uint8, device=mask.device)
        padded[:, :cols] = flags
        flags = padded
    # 4 flag bytes b0..b3 (little-endian int32) times 2^7 + 2^14 + 2^21 + 2^28 put b_i at bit
    # 28 + i, with no carries and no int64 overflow.
    quads = flags.view(torch.int32).view(rows, nbytes * 2).to(torch.int64)
    nibbles = ((quads * 0x10204080) >> 28) & 0xF
    return _join_nibbles(nibbles.to(torch.uint8))


def unpack_bitmask(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [out, nbytes] -> bool [out, cols] (the first ``cols`` bits of each row)."""
    rows, nbytes = bitmask.shape
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(rows, nbytes * 8)[:, :cols].bool()


def _check_bitmask(bitmask: Any, rows: int, cols: int, name: str | None) -> None:
    if not isinstance(bitmask, torch.Tensor):
        raise _fail(name, f"bitmask must be a torch.Tensor, got {type(bitmask).__name__}")
    if bitmask.dtype != torch.uint8:
        raise _fail(name, f"bitmask must be uint8, got {bitmask.dtype}")
    expected = (rows, (cols + 7) // 8)
    if tuple(bitmask.shape) != expected:
        raise _fail(
            name,
            f"bitmask has shape {list(bitmask.shape)}, expected {list(expected)} "
            f"= [out, ceil(in/8)] for the dense shape [{rows}, {cols}]",
        )


def _check_values(compressed: Any, dtype: torch.dtype | None, name: str | None) -> None:
    if not isinstance(compressed, torch.Tensor):
        raise _fail(name, f"compressed must be a torch.Tensor, got {type(compressed).__name__}")
    _check_dtype(compressed.dtype, name, "compressed")
    if dtype is not None and compressed.dtype != dtype:
        raise _fail(name, f"compressed values are stored as {compressed.dtype}, expected {dtype}")


def _row_popcounts(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """int64 [rows]: set bits among the first ``cols`` columns of each row."""
    if cols % 8:
        bitmask = bitmask.clone()
        bitmask[:, -1] &= (1 << (cols % 8)) - 1  # padding bits are ignored, as numpy's count=
    return _lookup("byte", bitmask).sum(-1, dtype=torch.int64)


def _scatter_dense(compressed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dense tensor (compressed's dtype and device) with ``dense[mask] = compressed`` row-major."""
    values = _int_view(compressed.reshape(-1))
    dense = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    dense.masked_scatter_(mask, values)
    return dense.view(compressed.dtype)


# --------------------------------------------------------------------------------------------
# sparse-24-bitmask
# --------------------------------------------------------------------------------------------
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
        raise _fail(name, f"sparse-24-bitmask needs the input size to be a multiple of 4, got shape [{rows}, {cols}]")
    if prune:
        return _lookup("full", _tie_codes(_rank_keys(weight).reshape(rows, cols // 4, 4)))
    classes = _nonzero(weight).to(torch.uint8) + 1  # 1: zero, 2: nonzero
    if weight.dtype == torch.float8_e4m3fn:
        classes -= (weight.view(torch.int8) == -128).to(torch.uint8)  # 0: fp8 -0.0
    r = classes.view(rows, cols // 4, 4)
    entries = _lookup("reduced", r[..., 0] + r[..., 1] * 3 + r[..., 2] * 9 + r[..., 3] * 27)
    bad = (entries & _BAD) != 0
    if bool(bad.any()):
        row, group = (int(v) for v in bad.nonzero()[0].tolist())
        raise _fail(
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
    _check_weight(weight, name)
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
    _check_weight(weight, name)
    rows, cols = weight.shape
    entries = _24_entries(weight, name, prune)
    kept_columns = torch.stack(((entries >> 5) & 3, (entries >> 7) & 3), dim=-1).to(torch.int64)
    groups = _int_view(weight).reshape(rows, cols // 4, 4)
    kept = groups.gather(-1, kept_columns)  # [out, G, 2], columns ascending = W[mask] order
    return {
        "compressed": kept.reshape(rows, cols // 2).view(weight.dtype),
        "bitmask": _join_nibbles(_entry_bits(entries)),
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
    rows, cols = _parse_shape(shape, name)
    _check_values(compressed, dtype, name)
    _check_bitmask(bitmask, rows, cols, name)
    if cols % 4:
        raise _fail(name, f"sparse-24-bitmask needs the input size to be a multiple of 4, got shape [{rows}, {cols}]")
    if tuple(compressed.shape) != (rows, cols // 2):
        raise _fail(
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
        raise _fail(
            name,
            f"bitmask is not 2:4: {int(bad.sum())} group(s) of 4 have more than 2 set bits "
            f"(first: row {row}, columns {4 * group}-{4 * group + 3})",
        )
    count = int(per_group.sum(dtype=torch.int64))
    if count != compressed.numel():
        raise _fail(
            name,
            f"compressed holds {compressed.numel()} values but the bitmask has {count} set bits "
            f"(sparse-24-bitmask stores exactly 2 per group of 4)",
        )
    return _scatter_dense(compressed, unpack_bitmask(bitmask, cols))


# --------------------------------------------------------------------------------------------
# sparse-bitmask (unstructured)
# --------------------------------------------------------------------------------------------
def compress_sparse_bitmask(weight: torch.Tensor, name: str | None = None) -> dict[str, torch.Tensor]:
    """Dense [out, in] -> {"compressed", "bitmask", "shape", "row_offsets"} of sparse-bitmask."""
    _check_weight(weight, name)
    rows, cols = weight.shape
    mask = _nonzero(weight)
    bitmask = pack_bitmask(mask)
    row_counts = _row_popcounts(bitmask, cols)
    values = torch.masked_select(_int_view(weight), mask).view(weight.dtype)
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
    rows, cols = _parse_shape(shape, name)
    _check_values(compressed, dtype, name)
    _check_bitmask(bitmask, rows, cols, name)
    if compressed.dim() != 1:
        raise _fail(name, f"compressed must be 1-D [nnz] for sparse-bitmask, got shape {list(compressed.shape)}")
    bitmask = bitmask.to(compressed.device)
    row_counts = _row_popcounts(bitmask, cols)
    count = int(row_counts.sum())
    if count != compressed.numel():
        raise _fail(name, f"compressed holds {compressed.numel()} values but the bitmask has {count} set bits")
    if row_offsets is not None:
        if not isinstance(row_offsets, torch.Tensor) or row_offsets.shape != (rows,):
            got = list(row_offsets.shape) if isinstance(row_offsets, torch.Tensor) else type(row_offsets).__name__
            raise _fail(name, f"row_offsets must be a tensor of shape [{rows}], got {got}")
        expected = torch.cumsum(row_counts, 0) - row_counts
        if not torch.equal(row_offsets.to(device=expected.device, dtype=expected.dtype), expected):
            raise _fail(name, "row_offsets do not match the bitmask (expected cumsum(row_nnz) - row_nnz)")
    return _scatter_dense(compressed, unpack_bitmask(bitmask, cols))


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
class Codec:
    """A sparse checkpoint format: the tensors it stores per module and how to (de)compress."""

    format: str = ""
    param_names: tuple[str, ...] = ()
    sparsity_structure: str | None = None  # the only structure the format can hold, if any

    def compress(self, weight: torch.Tensor, name: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decompress(
        self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None, name: str | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def _require(self, tensors: Mapping[str, torch.Tensor], name: str | None, optional: Sequence[str] = ()):
        missing = [p for p in self.param_names if p not in tensors and p not in optional]
        if missing:
            raise _fail(name, f"{self.format} needs {list(self.param_names)}, missing {missing}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(format={self.format!r})"


FORMATS: dict[str, Codec] = {}


def standardize_format(fmt: str) -> str:
    """"Sparse_24_Bitmask" -> "sparse-24-bitmask" (compressed-tensors' lookup normalisation)."""
    return str(fmt).replace("_", "-").replace(" ", "-").lower()


def register_format(name: str):
    """Class decorator: register an instance of the codec under ``name``."""

    def wrap(cls: type[Codec]) -> type[Codec]:
        key = standardize_format(name)
        if key in FORMATS:
            raise ValueError(f"sparse format {key!r} is already registered")
        cls.format = key
        FORMATS[key] = cls()
        return cls

    return wrap


def get_codec(fmt: str, name: str | None = None) -> Codec:
    if not isinstance(fmt, str) or standardize_format(fmt) not in FORMATS:
        raise _fail(name, f"unknown sparse format {fmt!r} (known: {sorted(FORMATS)})")
    return FORMATS[standardize_format(fmt)]


@register_format("dense")
class DenseCodec(Codec):
    param_names = ("weight",)

    def compress(self, weight, name=None, **kwargs):
        return {"weight": weight}

    def decompress(self, tensors, dtype=None, name=None):
        self._require(tensors, name)
        weight = tensors["weight"]
        if dtype is not None and weight.dtype != dtype:
            raise _fail(name, f"weight is stored as {weight.dtype}, expected {dtype}")
        return weight


@register_format("sparse-24-bitmask")
class Sparse24BitmaskCodec(Codec):
    param_names = ("shape", "compressed", "bitmask")  # compressed-tensors' order
    sparsity_structure = "2:4"

    def compress(self, weight, name=None, *, prune: bool = False, **kwargs):
        out = compress_sparse_24_bitmask(weight, name, prune=prune)
        return {k: out[k] for k in self.param_names}

    def decompress(self, tensors, dtype=None, name=None):
        self._require(tensors, name)
        return decompress_sparse_24_bitmask(
            tensors["compressed"], tensors["bitmask"], tensors["shape"], dtype=dtype, name=name
        )


@register_format("sparse-bitmask")
class SparseBitmaskCodec(Codec):
    param_names = ("shape", "compressed", "bitmask", "row_offsets")  # compressed-tensors' order

    def compress(self, weight, name=None, **kwargs):
        out = compress_sparse_bitmask(weight, name)
        return {k: out[k] for k in self.param_names}

    def decompress(self, tensors, dtype=None, name=None):
        self._require(tensors, name, optional=("row_offsets",))
        return decompress_sparse_bitmask(
            tensors["compressed"],
            tensors["bitmask"],
            tensors["shape"],
            dtype=dtype,
            row_offsets=tensors.get("row_offsets"),
            name=name,
        )


def compress(weight: torch.Tensor, format: str, name: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
    """Compress one weight with the codec registered as ``format``."""
    return get_codec(format, name).compress(weight, name, **kwargs)


def decompress(
    tensors: Mapping[str, torch.Tensor], format: str, dtype: torch.dtype | None = None, name: str | None = None
) -> torch.Tensor:
    """Dense weight from the tensors of one module (keys without the module prefix)."""
    return get_codec(format, name).decompress(tensors, dtype=dtype, name=name)


def storage_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes the tensors occupy (element size x count), as compressed-tensors reported them."""
    return sum(t.element_size() * t.numel() for t in tensors.values())

