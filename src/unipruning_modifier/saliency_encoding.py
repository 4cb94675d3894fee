"""What a saliency file (version 2) keeps of a layer's saliency, and masks from it.

A mask only needs the order of the weights, and values only where layers are compared, so a
layer of out x in weights is kept as (about 1.5 bytes per weight instead of 12):

- ``rank``: each weight's place in its row's order (|Γ|, then |anchor mean|, then column, the
  order ``masks.saliency_keys`` gives), bit-packed in ceil(log2 in) bits. The row budget at any
  sparsity and N:M masks at any N:M come from it exactly.
- ``row_counts`` [out, 99], bit-packed in ceil(log2(in + 1)) bits: how many of each row's
  weights the layer budget keeps at sparsity 1%, 2%, ..., 99%. The layer budget at a whole-percent sparsity comes from it exactly; between
  two of them, the weights of the band between the two are taken by their estimated place in it
  (interpolated row by row), which can differ from a calibration's choice near the threshold.
- ``late`` [L, 2]: (flat index, first_step) of the weights whose first_step differs from the
  layer's most common one (``first_step_mode``; about 0.1% of weights with the default lam): the
  N:M first_step order exactly.
- ``gamma_histogram`` / ``anchor_histogram`` [codes, 2]: (bf16 code, count) of |Γ| and of the
  |anchor mean|: the per-layer budgets of allocation global and OWL, as a calibration computes
  them (masks.bf16_histogram). Which weights fill such a budget inside a layer follows ``rank``
  (fp32 order, interpolated off the grid) where a calibration ranks by bf16 keys.

Pure tensor functions; saliency_file.py reads and writes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .masks import bf16_histogram, first_step_key, kept_count, rank_descending, saliency_keys, top_mask_1d

__all__ = [
    "GRID",
    "EncodedSaliency",
    "encode",
    "count_bits",
    "grid_keeps",
    "pack_bits",
    "rank_bits",
    "unpack_bits",
]

GRID = 100  # row_counts hold sparsities 1/GRID, 2/GRID, ..., (GRID-1)/GRID


def rank_bits(columns: int) -> int:
    """Bits of a rank within a row of ``columns`` weights (0 .. columns - 1)."""
    return max(1, math.ceil(math.log2(columns)))


def count_bits(columns: int) -> int:
    """Bits of a count of a row's weights (0 .. columns)."""
    return max(1, math.ceil(math.log2(columns + 1)))


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative integers < 2**bits (bits <= 24), ``bits`` each, into uint8
    [ceil(n * bits / 8)]: value k's bits at bit k * bits on, little-endian, as numpy.packbits of
    the values' bits in order with bitorder "little" would give."""
    flat = values.reshape(-1).to(torch.int32)
    count, groups = flat.numel(), math.ceil(flat.numel() / 8)  # 8 values fill ``bits`` whole bytes
    grouped = torch.zeros(groups * 8, dtype=torch.int32)
    grouped[:count] = flat
    grouped = grouped.view(groups, 8).T.contiguous()  # [8, groups]: value k of every group
    window = math.ceil((7 + bits) / 8)
    out = torch.zeros(bits + window, groups, dtype=torch.int32)  # byte j of every group
    for k in range(8):
        first, shift = divmod(k * bits, 8)
        shifted = grouped[k] << shift
        for t in range(window):
            out[first + t] |= (shifted >> (8 * t)) & 0xFF
    return out[:bits].T.to(torch.uint8).reshape(-1)[: math.ceil(count * bits / 8)]


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The ``count`` integers ``pack_bits`` packed (int32)."""
    groups = math.ceil(count / 8)
    window = math.ceil((7 + bits) / 8)
    data = torch.zeros(bits + window, groups, dtype=torch.int32)  # byte j of every group
    flat = torch.zeros(groups * bits, dtype=torch.uint8)
    flat[: packed.numel()] = packed
    data[:bits] = flat.view(groups, bits).T
    out = torch.empty(8, groups, dtype=torch.int32)
    for k in range(8):
        first, shift = divmod(k * bits, 8)
        joined = data[first]
        for t in range(1, window):
            joined = joined | (data[first + t] << (8 * t))
        out[k] = (joined >> shift) & ((1 << bits) - 1)
    return out.T.reshape(-1)[:count]


def grid_keeps(total: int) -> torch.Tensor:
    """Weights the layer budget keeps at sparsity 0, 1/GRID, ..., 1 (GRID + 1 values, decreasing)."""
    return torch.tensor([total, *(kept_count(total, j / GRID) for j in range(1, GRID)), 0], dtype=torch.int64)


def _histogram(values: torch.Tensor) -> torch.Tensor:
    """(bf16 code, count) of the non-empty bins of |values| (int32 [codes, 2])."""
    counts = bf16_histogram(values)
    codes = counts.nonzero().reshape(-1)
    return torch.stack([codes, counts[codes]], dim=1).to(torch.int32)


def _dense_histogram(pairs: torch.Tensor) -> torch.Tensor:
    counts = torch.zeros(1 << 15, dtype=torch.int64)
    counts[pairs[:, 0].long()] = pairs[:, 1].long()
    return counts


@dataclass
class EncodedSaliency:
    """One layer's saliency as a version 2 file holds it (see the module docstring)."""

    shape: tuple[int, int]
    rank: torch.Tensor  # uint8, packed ranks [out, in]
    row_counts: torch.Tensor  # uint8, packed counts [out, GRID - 1]
    late: torch.Tensor  # int32 [L, 2]
    first_step_mode: int
    gamma_histogram: torch.Tensor  # int32 [codes, 2]
    anchor_histogram: torch.Tensor  # int32 [codes, 2]
    steps: int | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "rank": self.rank, "row_counts": self.row_counts, "late": self.late,
            "gamma_histogram": self.gamma_histogram, "anchor_histogram": self.anchor_histogram,
        }

    def ranks(self) -> torch.Tensor:
        """Every weight's place in its row's order, int32 [out, in]."""
        out, columns = self.shape
        return unpack_bits(self.rank, rank_bits(columns), out * columns).reshape(out, columns)

    def counts(self) -> torch.Tensor:
        """Weights of each row kept at sparsity 0, 1/GRID, ..., 1, int32 [out, GRID + 1]."""
        out, columns = self.shape
        inner = unpack_bits(self.row_counts, count_bits(columns), out * (GRID - 1)).reshape(out, GRID - 1)
        return torch.cat([torch.full((out, 1), columns, dtype=torch.int32), inner, torch.zeros(out, 1, dtype=torch.int32)], 1)

    def first_step(self) -> torch.Tensor:
        first = torch.full(self.shape, self.first_step_mode, dtype=torch.int32)
        first.view(-1)[self.late[:, 0].long()] = self.late[:, 1]
        return first

    def gamma_counts(self) -> torch.Tensor:
        """Counts of |Γ| per bf16 code (masks.bf16_histogram of the layer)."""
        return _dense_histogram(self.gamma_histogram)

    def anchor_counts(self) -> torch.Tensor:
        return _dense_histogram(self.anchor_histogram)

    def row_mask(self, keep_per_row: int) -> torch.Tensor:
        return self.ranks() < keep_per_row

    def nm_mask(self, n_keep: int, m: int, order: str) -> torch.Tensor:
        """Keep the ``n_keep`` first of every m consecutive inputs, by Γ or by first_step."""
        from .masks import nm_mask

        keys = [-self.ranks().to(torch.float64)]
        if order == "first_step":
            keys.insert(0, first_step_key(self.first_step()))
        return nm_mask(keys, n_keep, m)

    def layer_mask(self, keep: int) -> torch.Tensor:
        """Keep ``keep`` weights of the layer: exact where ``keep`` is a grid count; between two,
        the band's weights by their interpolated place in it (row by row), ties by index."""
        out, columns = self.shape
        keeps = grid_keeps(out * columns)
        counts = self.counts()
        ranks = self.ranks()
        exact = (keeps == keep).nonzero()
        if exact.numel():
            return ranks < counts[:, int(exact[0])].unsqueeze(1)
        j = int((keeps > keep).sum())  # keeps[j - 1] > keep > keeps[j]
        low, high = counts[:, j].unsqueeze(1), counts[:, j - 1].unsqueeze(1)
        band = (ranks >= low) & (ranks < high)
        place = (ranks - low + 0.5).to(torch.float64) / (high - low).clamp_min(1)
        chosen = top_mask_1d([-place[band]], keep - int(keeps[j]))
        mask = ranks < low
        mask[band] = chosen
        return mask


def encode(gamma: torch.Tensor, anchor_mean: torch.Tensor, first_step: torch.Tensor, steps: int | None = None) -> EncodedSaliency:
    """The version 2 form of one layer's saliency (CPU)."""
    out, columns = gamma.shape
    keys = saliency_keys(gamma.cpu().float(), anchor_mean.cpu().float())
    order = rank_descending([k.reshape(-1) for k in keys])  # the layer's order, ties by index
    place = torch.empty_like(order)
    place[order] = torch.arange(order.numel())
    sorted_place, columns_in_order = place.reshape(out, columns).sort(dim=1)
    ranks = torch.empty(out, columns, dtype=torch.int64)
    ranks.scatter_(1, columns_in_order, torch.arange(columns).expand(out, columns).contiguous())
    inner = grid_keeps(out * columns)[1:-1]
    row_counts = torch.searchsorted(sorted_place, inner.expand(out, -1).contiguous())
    first = first_step.cpu().to(torch.int32).reshape(-1)
    mode = int(first.mode().values)
    late_index = (first != mode).nonzero().reshape(-1)
    late = torch.stack([late_index.to(torch.int32), first[late_index]], dim=1)
    return EncodedSaliency(
        shape=(out, columns),
        rank=pack_bits(ranks, rank_bits(columns)),
        row_counts=pack_bits(row_counts, count_bits(columns)),
        late=late,
        first_step_mode=mode,
        gamma_histogram=_histogram(keys[0]),
        anchor_histogram=_histogram(keys[1]),
        steps=steps,
    )
