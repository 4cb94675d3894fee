"""Saliency state of one layer and its mirror-descent (linearised Bregman) update.

Per weight the state holds the split variable z (fp32), the running mean of the anchors (fp32,
the tie-break for weights whose Gamma is zero) and, only where a mask or a saliency file needs
it, the batch at which the weight first entered the regularisation path (int32, -1 = never).
Gamma itself is derived: it is the soft threshold of z at the last quantile threshold, so it
is not stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .device import to_device

# Above this many entries the lambda-quantile is estimated on a random sample.
EXACT_QUANTILE_LIMIT = 1_000_000
QUANTILE_SAMPLE_SIZE = 100_000


def soft_threshold(z: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """sign(z) * max(|z| - t, 0): the proximal map of the elastic-net potential (= z - clip(z, -t, t))."""
    return z - _clip(z, threshold)


def _clip(z: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(threshold, dtype=z.dtype, device=z.device)
    return torch.clamp(z, -t, t)


def quantile_threshold(
    values: torch.Tensor,
    q: float,
    generator: torch.Generator | None = None,
    exact_limit: int = EXACT_QUANTILE_LIMIT,
    sample_size: int = QUANTILE_SAMPLE_SIZE,
) -> torch.Tensor:
    """The q-quantile of ``values`` (lower order statistic, no interpolation), a 0-dim tensor.

    Tensors over ``exact_limit`` entries are estimated on ``sample_size`` entries drawn with
    replacement using ``generator`` (CPU), which keeps the cost flat for 7B-class layers. The
    result stays on the values' device (no host synchronisation).
    """
    if not 0.0 <= q < 1.0:
        raise ValueError(f"quantile must be in [0, 1), got {q}")
    flat = values.reshape(-1)
    if q == 0.0 or flat.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=values.device)
    if flat.numel() > exact_limit:
        index = torch.randint(flat.numel(), (sample_size,), generator=generator)
        flat = flat[to_device(index, flat.device)]
    count = flat.numel()
    k = min(count, max(1, math.ceil(round(q * count, 6))))
    flat = flat.float()
    # kth smallest via topk: CUDA's kthvalue runs one block per slice, slow on one large slice
    if k <= count // 2:
        return flat.topk(k, largest=False, sorted=False).values.max()
    return flat.topk(count - k + 1, largest=True, sorted=False).values.min()


@dataclass
class SaliencyState:
    """Mirror-descent state of one weight matrix while its layer is calibrated."""

    z: torch.Tensor
    first_step: torch.Tensor | None
    anchor_mean: torch.Tensor
    threshold: float | torch.Tensor = 0.0
    steps: int = 0

    @classmethod
    def zeros(
        cls, shape: torch.Size | tuple[int, ...], device: torch.device | str, track_first_step: bool = True
    ) -> "SaliencyState":
        """A fresh state; ``track_first_step=False`` saves 4 bytes per weight and four passes
        per batch when neither the mask order nor a saliency file uses first_step."""
        first_step = torch.full(shape, -1, dtype=torch.int32, device=device) if track_first_step else None
        return cls(
            z=torch.zeros(shape, dtype=torch.float32, device=device),
            first_step=first_step,
            anchor_mean=torch.zeros(shape, dtype=torch.float32, device=device),
        )

    @property
    def gamma(self) -> torch.Tensor:
        """The saliency Gamma = soft_threshold(z, t) (fp32, same shape as the weight)."""
        return soft_threshold(self.z, self.threshold)


def mirror_descent_step(
    state: SaliencyState,
    anchor: torch.Tensor,
    kappa: float,
    lam: float,
    generator: torch.Generator | None = None,
) -> None:
    """One batch: z += kappa (S - Gamma); t = quantile(|z|, lam); Gamma = soft(z, t).

    Also records ``first_step`` (when tracked) for weights whose Gamma became non-zero at this
    step and updates the running mean of the anchors. Works in place on ``state``.
    """
    step = state.steps
    anchor = anchor.to(state.z.device, torch.float32)
    # z + kappa (S - Gamma) with Gamma = z - clip(z, -t, t), written to need one temporary
    clipped = _clip(state.z, state.threshold)
    state.z.mul_(1.0 - kappa).add_(anchor, alpha=kappa).add_(clipped, alpha=kappa)
    del clipped
    magnitude = state.z.abs()
    state.threshold = quantile_threshold(magnitude, lam, generator)
    if state.first_step is not None:
        entered = (magnitude > state.threshold) & (state.first_step < 0)
        state.first_step.masked_fill_(entered, step)
    del magnitude
    state.anchor_mean.mul_(step / (step + 1)).add_(anchor, alpha=1.0 / (step + 1))
    state.steps = step + 1

