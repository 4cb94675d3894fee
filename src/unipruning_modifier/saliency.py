"""Local saliency metrics: the per-batch anchors S_b of UniPruning.

Pure tensor functions. Every metric returns an fp32 tensor shaped like the weight, normalised
to mean |S| = 1 so that scores of different layers are comparable (the global budget relies
on that). See docs/algorithm.md for the formulas.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

from .device import to_device

Metric = Literal["stochastic_ria", "ria", "wanda"]

# Exponent a of the activation term s_j^a, per metric, as in the authors' scripts.
DEFAULT_EXPONENTS = {"stochastic_ria": 0.35, "ria": 0.5, "wanda": 0.5}

_TINY = 1e-12


def activation_energy(inputs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of x_j^2 for each input feature j (fp32, shape [in])."""
    flat = inputs.reshape(-1, inputs.shape[-1]).float()
    return flat.pow(2).mean(dim=0)


def subset_size(out_features: int, in_features: int, beta: float) -> int:
    """tau = max(1, floor(beta * min(out, in))): entries per stochastic column/row sum."""
    return max(1, math.floor(round(beta * min(out_features, in_features), 6)))


def wanda_score(abs_weight: torch.Tensor, energy: torch.Tensor, exponent: float = 0.5) -> torch.Tensor:
    """|W_ij| * s_j^a (a = 0.5 is Wanda's |W| * ||x_j||)."""
    return abs_weight * energy.clamp_min(0).pow(exponent).unsqueeze(0)


def ria_score(
    abs_weight: torch.Tensor,
    energy: torch.Tensor,
    exponent: float = 0.5,
    column_sums: torch.Tensor | None = None,
    row_sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """Relative importance times activation: (|W|/colsum + |W|/rowsum) * s^a.

    ``column_sums`` [in] and ``row_sums`` [out] default to the full sums of |W|; the stochastic
    variant passes sums over random subsets instead.
    """
    if column_sums is None:
        column_sums = abs_weight.sum(dim=0)
    if row_sums is None:
        row_sums = abs_weight.sum(dim=1)
    relative = abs_weight / column_sums.clamp_min(_TINY).unsqueeze(0)
    relative.addcdiv_(abs_weight, row_sums.clamp_min(_TINY).unsqueeze(1))
    return relative.mul_(energy.clamp_min(0).pow(exponent).unsqueeze(0))


def stochastic_ria_score(
    abs_weight: torch.Tensor,
    energy: torch.Tensor,
    exponent: float = 0.35,
    beta: float = 0.2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RIA whose column and row sums run over tau random entries, drawn anew per call.

    One random set of rows serves every column sum and one random set of columns every row
    sum (our choice: it costs tau*(out+in) reads instead of a gather per column). Indices are
    drawn on the CPU generator so results do not depend on the device.
    """
    out_features, in_features = abs_weight.shape
    tau = subset_size(out_features, in_features, beta)
    rows = to_device(torch.randperm(out_features, generator=generator)[:tau], abs_weight.device)
    cols = to_device(torch.randperm(in_features, generator=generator)[:tau], abs_weight.device)
    column_sums = abs_weight.index_select(0, rows).sum(dim=0)
    row_sums = abs_weight.index_select(1, cols).sum(dim=1)
    return ria_score(abs_weight, energy, exponent, column_sums, row_sums)


def normalise(score: torch.Tensor) -> torch.Tensor:
    """Scale a non-negative score tensor (every metric's) in place to mean 1 (all-zero stays zero)."""
    return score.div_(score.mean().clamp_min(_TINY))  # no host sync on accelerators


def local_saliency(
    metric: str,
    weight: torch.Tensor,
    energy: torch.Tensor,
    *,
    exponent: float | None = None,
    beta: float = 0.2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The normalised anchor S_b of one batch for a 2-D weight, in fp32."""
    if metric not in get_args(Metric):
        raise ValueError(f"metric must be one of {get_args(Metric)}, got {metric!r}")
    if exponent is None:
        exponent = DEFAULT_EXPONENTS[metric]
    abs_weight = weight.detach().float().abs()
    energy = energy.to(abs_weight.device, torch.float32)
    if metric == "wanda":
        score = wanda_score(abs_weight, energy, exponent)
    elif metric == "ria":
        score = ria_score(abs_weight, energy, exponent)
    else:
        score = stochastic_ria_score(abs_weight, energy, exponent, beta, generator)
    return normalise(score)
