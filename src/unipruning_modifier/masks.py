"""Masks from saliency: unstructured (layer / row / global budget) and N:M.

A mask is a bool tensor shaped like the weight, True where the weight is kept. Rankings take
a list of keys, most significant first, each "larger is kept first"; later keys only break
ties of earlier ones (e.g. |Gamma| first, then the mean anchor for weights Gamma left at 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import get_args

import torch

from .mask_fields import NMOrder


def kept_count(total: int, sparsity: float) -> int:
    """Weights kept out of ``total`` at ``sparsity``: ceil((1 - p) * total)."""
    return min(total, math.ceil(round((1.0 - sparsity) * total, 6)))


def kept_at_most(total: int, sparsity: float) -> int:
    """Most weights that can be kept with sparsity still >= ``sparsity``: floor((1 - p) * total)."""
    return max(0, math.floor(round((1.0 - sparsity) * total, 6)))


def rank_descending(keys: Sequence[torch.Tensor], dim: int = -1) -> torch.Tensor:
    """Indices that sort along ``dim`` by keys[0] descending, ties by keys[1], ... (stable)."""
    order = None
    for key in reversed(list(keys)):
        values = key if order is None else key.gather(dim, order)
        step = torch.sort(values, dim=dim, descending=True, stable=True).indices
        order = step if order is None else order.gather(dim, step)
    return order


def _keep_first(keys: Sequence[torch.Tensor], keep: int, dim: int = -1) -> torch.Tensor:
    mask = torch.zeros_like(keys[0], dtype=torch.bool)
    if keep > 0:
        top = rank_descending(keys, dim).narrow(dim, 0, keep)
        mask.scatter_(dim, top, True)
    return mask


# Values above which the exact keep-th largest is found inside a bracket from a sample
_BRACKET_FROM = 1 << 16
_BRACKET_SAMPLE = 4096


def kth_largest(values: torch.Tensor, keep: int) -> tuple[torch.Tensor, bool]:
    """(the ``keep``-th largest entry of 1-D ``values`` (1 <= keep <= numel) as a 0-dim tensor,
    exact), and whether exactly ``keep`` entries are >= it (no tie crosses the boundary), where
    that came for free (else False).

    On the CPU, large inputs take the bracket route: the order statistics of a small sample (fixed
    seed) around the wanted rank bound a narrow value band; one pass counts the values above it,
    and the answer is found among the few values inside it (on ADMM's iterates about a third of
    the time kthvalue takes over the whole input). When the sample misses (the band is 4 standard
    deviations of the sampled rank wide: rarely), the whole input is searched. On accelerators a
    sort (CUDA's kthvalue runs one block per slice: seconds on one 45M-entry slice, a radix sort
    milliseconds).
    """
    total = values.numel()
    if values.device.type != "cpu":
        return values.sort().values[total - keep], False
    if total >= _BRACKET_FROM:
        index = torch.randint(total, (_BRACKET_SAMPLE,), generator=torch.Generator().manual_seed(0))
        sample = values[index].sort(descending=True).values
        position = keep / total * _BRACKET_SAMPLE
        margin = 4.0 * math.sqrt(position * (1.0 - keep / total)) + 8.0  # 4 sigma of a binomial rank
        upper = sample[max(0, math.floor(position - margin))]
        lower = sample[min(_BRACKET_SAMPLE - 1, math.ceil(position + margin))]
        above = int(torch.count_nonzero(values > upper))  # a bool .sum() copies to int64
        need = keep - above  # the rank of the answer among values <= upper
        if need >= 1:
            band = values[(values >= lower) & (values <= upper)]
            if need <= band.numel():
                threshold = band.kthvalue(band.numel() - need + 1).values
                return threshold, above + int(torch.count_nonzero(band >= threshold)) == keep
    return values.kthvalue(total - keep + 1).values, False


def top_mask_1d(keys: Sequence[torch.Tensor], keep: int) -> torch.Tensor:
    """``_keep_first`` on 1-D keys without sorting everything: the same mask, in O(n).

    The ``keep``-th largest primary key is found by ``kth_largest``; everything above it is kept,
    and only the weights tied with it are ranked (by the other keys, then by index, as the stable
    sort would) when not all of them fit.
    """
    primary = keys[0]
    total = primary.numel()
    if keep <= 0 or keep >= total:
        return torch.full_like(primary, keep > 0, dtype=torch.bool)
    threshold, all_ties_fit = kth_largest(primary, keep)
    if all_ties_fit:
        return primary >= threshold
    mask = primary > threshold
    ties = (primary == threshold).nonzero().reshape(-1)
    missing = keep - int(torch.count_nonzero(mask))
    if len(keys) > 1:
        ties = ties[rank_descending([k[ties] for k in keys[1:]])]
    mask[ties[:missing]] = True
    return mask


def unstructured_mask(keys: Sequence[torch.Tensor], sparsity: float | None = None, keep: int | None = None) -> torch.Tensor:
    """Keep the ``keep`` (or ceil((1-p)*numel)) highest-ranked weights of the whole layer."""
    shape = keys[0].shape
    flat = [k.reshape(-1) for k in keys]
    if keep is None:
        keep = kept_count(flat[0].numel(), sparsity)
    return top_mask_1d(flat, keep).reshape(shape)


def row_mask(keys: Sequence[torch.Tensor], sparsity: float) -> torch.Tensor:
    """Keep ceil((1-p)*in) highest-ranked weights in every output row."""
    return _keep_first(list(keys), kept_count(keys[0].shape[-1], sparsity), dim=-1)


# Groups up to this size are ranked by comparing every pair of positions instead of sorting
_PAIRWISE_GROUP = 8


def nm_mask(keys: Sequence[torch.Tensor], n: int, m: int) -> torch.Tensor:
    """Keep the n highest-ranked weights in each group of m consecutive inputs of a row."""
    rows, cols = keys[0].shape
    if cols % m:
        raise ValueError(f"{n}:{m} needs the input size to be a multiple of {m}, got {cols}")
    grouped = [k.reshape(rows, cols // m, m) for k in keys]
    if m <= _PAIRWISE_GROUP:
        return _keep_first_in_groups(grouped, n).reshape(rows, cols)
    return _keep_first(grouped, n, dim=-1).reshape(rows, cols)


def _keep_first_in_groups(grouped: Sequence[torch.Tensor], keep: int) -> torch.Tensor:
    """``_keep_first`` along a short last dimension: an entry's rank is how many entries of its
    group come before it in the stable order, from m(m-1)/2 comparisons of whole columns (6x
    faster than sorting groups of 4 on a CPU core, and the same mask)."""
    m = grouped[0].shape[-1]
    ranks = [torch.zeros(grouped[0].shape[:-1], dtype=torch.uint8, device=grouped[0].device) for _ in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            first = _comes_before([k[..., i] for k in grouped], [k[..., j] for k in grouped])
            ranks[j] += first
            ranks[i] += ~first
    return torch.stack([rank < keep for rank in ranks], dim=-1)


def _comes_before(earlier: Sequence[torch.Tensor], later: Sequence[torch.Tensor]) -> torch.Tensor:
    """Where the entry at the lower index ranks first: larger first key, ties by the next keys,
    full ties by the index (as a stable descending sort orders them)."""
    result = earlier[-1] >= later[-1]
    for a, b in zip(reversed(earlier[:-1]), reversed(later[:-1])):
        result = (a > b) | ((a == b) & result)
    return result


def first_step_key(first_step: torch.Tensor) -> torch.Tensor:
    """Ranking key from first_step: earlier entry ranks higher, never-entered (-1) last."""
    never = torch.iinfo(torch.int32).max
    steps = torch.where(first_step < 0, torch.full_like(first_step, never), first_step)
    return -steps.to(torch.float64)


def saliency_keys(
    gamma: torch.Tensor,
    anchor_mean: torch.Tensor | None = None,
    first_step: torch.Tensor | None = None,
    nm_order: str = "gamma",
) -> list[torch.Tensor]:
    """The ranking keys of the algorithm: |Gamma|, then the mean anchor.

    With ``nm_order="first_step"`` the order of entry into the path comes first.
    """
    if nm_order not in get_args(NMOrder):
        raise ValueError(f"nm_order must be one of {get_args(NMOrder)}, got {nm_order!r}")
    keys = [gamma.abs().float()]
    if anchor_mean is not None:
        keys.append(anchor_mean.abs().float())
    if nm_order == "first_step":
        if first_step is None:
            raise ValueError("nm_order='first_step' needs first_step")
        keys.insert(0, first_step_key(first_step))
    return keys


def _bf16_bins(values: torch.Tensor) -> torch.Tensor:
    """Monotone integer codes of non-negative values (their bf16 bit patterns)."""
    return values.abs().to(torch.bfloat16).view(torch.int16).to(torch.int64).reshape(-1)


_BINS = 1 << 15  # non-negative bf16 patterns fit in 15 bits
# code -> value (the NaN / inf codes never hold a finite saliency: 0, so that 0 counts stay 0)
BF16_VALUES = torch.nan_to_num(torch.arange(_BINS, dtype=torch.int16).view(torch.bfloat16).to(torch.float64), 0.0, 0.0, 0.0)


def bf16_histogram(values: torch.Tensor) -> torch.Tensor:
    """Counts of |values| per bf16 code (int64 [2**15]): all that the global and OWL budgets
    need of a layer (a saliency file stores it, saliency_encoding.py)."""
    return torch.bincount(_bf16_bins(values.cpu()), minlength=_BINS)


def global_allocation(
    scores: Mapping[str, torch.Tensor], sparsity: float, clamp: float | None = None
) -> dict[str, int]:
    """Weights to keep per layer under one global threshold on |score| (``histogram_allocation``
    of the layers' bf16 histograms)."""
    return histogram_allocation({name: bf16_histogram(score) for name, score in scores.items()}, sparsity, clamp)


def histogram_allocation(
    histograms: Mapping[str, torch.Tensor], sparsity: float, clamp: float | None = None
) -> dict[str, int]:
    """Weights to keep per layer under one global threshold on the bf16 codes counted in
    ``histograms`` (``bf16_histogram`` per layer).

    The total kept is exactly ceil((1-p) * total); each layer's sparsity is clamped to
    [p - clamp, p + clamp] (within [0, 1]) so no layer collapses. The threshold is found on the
    histograms (exact counting, no sort of the whole model); ties at the threshold value are
    shared out within the clamp limits.
    """
    names = list(histograms)
    counts = torch.stack([histograms[n] for n in names])
    sizes = counts.sum(1)
    total = int(sizes.sum())
    target = kept_count(total, sparsity)
    width = 1.0 if clamp is None else clamp
    low = torch.tensor([kept_count(int(s), min(1.0, sparsity + width)) for s in sizes])
    high = torch.tensor([kept_at_most(int(s), max(0.0, sparsity - width)) for s in sizes])
    if int(low.sum()) > target or int(high.sum()) < target:
        raise ValueError(f"clamp {clamp} makes a global sparsity of {sparsity} unreachable")

    # count_at_least[l, v] = weights of layer l whose bf16 code is >= v
    at_least = counts.flip(1).cumsum(1).flip(1)

    def kept_at(code: int) -> torch.Tensor:
        return torch.minimum(torch.maximum(at_least[:, code], low), high)

    lo_code, hi_code = 0, _BINS - 1  # kept_at is non-increasing in the code
    while lo_code < hi_code:
        mid = (lo_code + hi_code + 1) // 2
        if int(kept_at(mid).sum()) >= target:
            lo_code = mid
        else:
            hi_code = mid - 1
    keep = kept_at(lo_code)
    floor = kept_at(lo_code + 1) if lo_code + 1 < _BINS else torch.minimum(low.clone(), keep)
    excess = int(keep.sum()) - target
    for i in range(len(names)):
        if excess == 0:
            break
        give = min(excess, int(keep[i] - floor[i]))
        keep[i] -= give
        excess -= give
    return {n: int(k) for n, k in zip(names, keep)}


def owl_sparsity(
    anchors: Mapping[str, torch.Tensor],
    groups: Mapping[str, str],
    sparsity: float,
    lam: float = 0.08,
    threshold: float = 5.0,
) -> dict[str, float]:
    """Outlier-weighted layer sparsities (OWL) from the mean anchors (``owl_histogram_sparsity``
    of their bf16 histograms)."""
    histograms = {name: bf16_histogram(anchor) for name, anchor in anchors.items()}
    return owl_histogram_sparsity(histograms, groups, sparsity, lam, threshold)


def owl_histogram_sparsity(
    histograms: Mapping[str, torch.Tensor],
    groups: Mapping[str, str],
    sparsity: float,
    lam: float = 0.08,
    threshold: float = 5.0,
) -> dict[str, float]:
    """Outlier-weighted layer sparsities (OWL, Yin et al. 2024) from the layers' histograms of
    bf16 |mean anchor| (``bf16_histogram``).

    For every group (a decoder layer) the outlier ratio is the share of its weights whose mean
    anchor exceeds ``threshold`` times the group's mean anchor. The ratios are mapped linearly
    onto kept fractions spanning 2·``lam``, centred so that the mean over groups is 1 - p:
    groups with more outliers keep more. Every layer of a group gets the group's sparsity.
    """
    if not 0.0 <= lam < 1.0:
        raise ValueError(f"owl lambda must be in [0, 1), got {lam}")
    names = list(histograms)
    order = list(dict.fromkeys(groups[n] for n in names))
    ratios = []
    for group in order:
        counts = sum(histograms[n] for n in names if groups[n] == group).to(torch.float64)
        total = counts.sum()
        mean = (counts * BF16_VALUES).sum() / total
        ratios.append(float(counts[BF16_VALUES > threshold * mean].sum() / total))
    ratio = torch.tensor(ratios, dtype=torch.float64)
    spread = float(ratio.max() - ratio.min())
    kept = (ratio - ratio.min()) * (2 * lam / spread) if spread > 0 else torch.zeros_like(ratio)
    kept = kept - kept.mean() + (1.0 - sparsity)
    if float(kept.min()) <= 0.0 or float(kept.max()) > 1.0:
        raise ValueError(f"owl lambda {lam} pushes a layer's sparsity outside [0, 1) at sparsity {sparsity}")
    per_group = {group: 1.0 - float(k) for group, k in zip(order, kept)}
    return {n: per_group[groups[n]] for n in names}
