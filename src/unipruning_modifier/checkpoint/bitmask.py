"""Bitmasks as compressed-tensors stores them, and the exact-bytes tensor helpers the formats share.

A bitmask is uint8 [out, ceil(in/8)] with little bit order: bit j of byte b is column 8b+j
(``numpy.packbits(mask, axis=-1, bitorder="little")``, zero padding bits). Used by the codecs,
the vLLM plugin's tensor-parallel slicing and the serving kernels.
"""

from __future__ import annotations

import torch

__all__ = ["int_view", "nonzero", "pack_bitmask", "popcount_lookup", "row_popcounts", "scatter_dense", "unpack_bitmask"]

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32}
_BYTE_POPCOUNT = tuple(bin(v).count("1") for v in range(256))
_POPCOUNTS: dict[torch.device, torch.Tensor] = {}


def int_view(tensor: torch.Tensor) -> torch.Tensor:
    """Same bytes as a signed integer tensor: bit-exact gather/scatter for every dtype."""
    return tensor.view(_INT_VIEW[tensor.element_size()])


def nonzero(weight: torch.Tensor) -> torch.Tensor:
    """``weight != 0`` as compressed-tensors evaluates it (-0.0 is zero, NaN is not)."""
    if weight.dtype == torch.float8_e4m3fn:
        return (weight.view(torch.int8) & 0x7F) != 0
    if weight.dtype in (torch.bfloat16, torch.float16):  # same result as != 0, integer speed
        return (weight.view(torch.int16) & 0x7FFF) != 0
    return weight != 0


def join_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, n] of 4-bit values -> uint8 [rows, ceil(n/2)], nibble 2k low, 2k+1 high."""
    rows, n = nibbles.shape
    if n % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(rows, 1)], dim=1)
    pairs = nibbles.view(rows, (n + 1) // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """bool [out, in] -> uint8 [out, ceil(in/8)]; bit j of byte b is column 8b+j."""
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
    return join_nibbles(nibbles.to(torch.uint8))


def unpack_bitmask(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [out, nbytes] -> bool [out, cols] (the first ``cols`` bits of each row)."""
    rows, nbytes = bitmask.shape
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(rows, nbytes * 8)[:, :cols].bool()


def popcount_lookup(index: torch.Tensor) -> torch.Tensor:
    """Set bits of every byte value in ``index`` (int16, same shape)."""
    if index.device not in _POPCOUNTS:
        _POPCOUNTS[index.device] = torch.tensor(_BYTE_POPCOUNT, dtype=torch.int16, device=index.device)
    return torch.index_select(_POPCOUNTS[index.device], 0, index.reshape(-1).to(torch.int64)).view(index.shape)


def row_popcounts(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """int64 [rows]: set bits among the first ``cols`` columns of each row."""
    if cols % 8:
        bitmask = bitmask.clone()
        bitmask[:, -1] &= (1 << (cols % 8)) - 1  # padding bits are ignored, as numpy's count=
    return popcount_lookup(bitmask).sum(-1, dtype=torch.int64)


def scatter_dense(compressed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dense tensor (compressed's dtype and device) with ``dense[mask] = compressed`` row-major."""
    values = int_view(compressed.reshape(-1))
    dense = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    dense.masked_scatter_(mask, values)
    return dense.view(compressed.dtype)
