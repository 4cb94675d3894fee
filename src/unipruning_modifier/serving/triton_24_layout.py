"""The Triton 2:4 kernel's weight layout, converted once at load (pure torch, no Triton).

Kept apart from the kernels so that loading, checks and tests of the layout need neither Triton
nor a GPU.

``values``  [out, in/2] fp16/bf16: the two kept weights of every group of 4 inputs, in column
            order. This is exactly sparse-24-bitmask's ``compressed`` tensor.
``indices`` int32 [out, in/32]: 4 bits per group, word ``w`` of a row holds groups 8w..8w+7
            (group ``8w+k`` in bits 4k..4k+3), the nibble is ``i0 | i1 << 2`` with ``i0 < i1``
            the in-group positions of the two kept weights. Byte for byte it is the
            sparse-24-bitmask ``bitmask`` with every nibble (a 4-bit group mask) replaced by the
            positions of its two set bits, so converting at load is one table lookup.

1.125 bytes per weight in bf16/fp16 instead of 2: decode, which is memory-bound, can be up to
1.78x faster than dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checkpoint import compress_sparse_24_bitmask

__all__ = ["DTYPES", "IN_MULTIPLE", "OUT_MULTIPLE", "Sparse24Weight", "layout_supported", "nibble_table"]

DTYPES = (torch.float16, torch.bfloat16)
# Smallest multiples the layout and every block configuration need: rows in blocks of 16, inputs
# in blocks of 64 (16 groups, two index words).
OUT_MULTIPLE = 16
IN_MULTIPLE = 64


def layout_supported(out_features: int, in_features: int, dtype: torch.dtype) -> tuple[bool, str]:
    """(ok, reason) for the compressed layout and kernel: fp16/bf16, out % 16, in % 64."""
    if dtype not in DTYPES:
        return False, f"dtype {dtype} (the Triton 2:4 kernel takes float16 / bfloat16)"
    if out_features % OUT_MULTIPLE or in_features % IN_MULTIPLE:
        return False, (
            f"shape {out_features}x{in_features}: the Triton 2:4 kernel needs out % {OUT_MULTIPLE} == 0 "
            f"and in % {IN_MULTIPLE} == 0"
        )
    return True, "ok"


def nibble_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [256]: bitmask byte (two 4-bit group masks) -> index byte (two ``i0 | i1 << 2``).

    Masks without exactly two set bits map to 0xFF in both nibbles' byte (refused by the caller).
    """
    codes = []
    for mask in range(16):
        bits = [p for p in range(4) if mask >> p & 1]
        codes.append(bits[0] | bits[1] << 2 if len(bits) == 2 else -1)
    table = []
    for byte in range(256):
        lo, hi = codes[byte & 15], codes[byte >> 4]
        table.append(0xFF if lo < 0 or hi < 0 else lo | hi << 4)
    return torch.tensor(table, dtype=torch.uint8, device=device)


@dataclass
class Sparse24Weight:
    """A 2:4 weight in the kernel's layout: ``values`` [out, in/2] and ``indices`` int32 [out, in/32]."""

    values: torch.Tensor
    indices: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape[0], self.values.shape[1] * 2

    @classmethod
    def from_bitmask(cls, compressed: torch.Tensor, bitmask: torch.Tensor, name: str | None = None) -> Sparse24Weight:
        """From sparse-24-bitmask tensors (``compressed`` [out, in/2], ``bitmask`` uint8 [out, in/8])."""
        label = f"{name}: " if name else ""
        out_features, half = compressed.shape
        in_features = 2 * half
        ok, reason = layout_supported(out_features, in_features, compressed.dtype)
        if not ok:
            raise ValueError(label + reason)
        if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (out_features, in_features // 8):
            raise ValueError(
                f"{label}bitmask must be uint8 [{out_features}, {in_features // 8}], "
                f"got {bitmask.dtype} {list(bitmask.shape)}"
            )
        index_bytes = nibble_table(bitmask.device)[bitmask.long()]
        bad = index_bytes == 0xFF
        if bool(bad.any()):
            row, byte = (int(v) for v in bad.nonzero()[0].tolist())
            raise ValueError(
                f"{label}bitmask is not 2:4: a group of 4 inputs in row {row}, columns {8 * byte}-{8 * byte + 7}, "
                "does not have exactly 2 kept weights"
            )
        indices = index_bytes.contiguous().view(torch.int32)
        return cls(compressed.contiguous(), indices)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, name: str | None = None) -> Sparse24Weight:
        """From a dense 2:4 weight (at most 2 nonzeros per group of 4; refused otherwise)."""
        if weight.dim() != 2:
            raise ValueError(f"{name or 'weight'}: expected a 2-D weight, got shape {list(weight.shape)}")
        ok, reason = layout_supported(*weight.shape, weight.dtype)
        if not ok:
            raise ValueError(f"{name + ': ' if name else ''}{reason}")
        tensors = compress_sparse_24_bitmask(weight, name)
        return cls.from_bitmask(tensors["compressed"], tensors["bitmask"], name)

    def to_dense(self) -> torch.Tensor:
        """The dense [out, in] weight (for checks)."""
        out_features, in_features = self.shape
        nibbles = self.indices.view(torch.uint8).view(out_features, -1, 1)
        nibbles = torch.cat((nibbles & 15, nibbles >> 4), dim=-1).view(out_features, in_features // 4).long()
        columns = torch.stack((nibbles & 3, nibbles >> 2), dim=-1)  # [out, G, 2]
        dense = torch.zeros(out_features, in_features // 4, 4, dtype=self.values.dtype, device=self.values.device)
        dense.scatter_(-1, columns, self.values.view(out_features, -1, 2))
        return dense.view(out_features, in_features)
