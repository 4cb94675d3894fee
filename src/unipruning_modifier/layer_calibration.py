"""What one target Linear accumulates while it is calibrated, in one object.

A ``LayerCalibration`` is made at the layer's first calibration batch, on that batch's device.
Per batch it takes the layer's inputs (and, with ``dense_target``, the dense model's inputs of
the same tokens; with ``block_feedback``, a factor for the anchor): one mirror-descent step of
the saliency (mirror_descent.py, anchored by saliency.py) and, for the re-fit, running means of
the Gram matrix XᵀX and the drift matrix Xᵀ(D − X) (reconstruction.py). Linears that read the same
input tensor (q/k/v, gate/up) share one ``InputStatistics``, so each distinct input's Gram
matrices are computed and held once. ``finish`` reduces all of it across data-parallel ranks and
returns the saliency record a mask is taken from; ``refit`` re-fits the kept weights once the
mask is known.

Deferred (always, except with ``block_feedback``, which reads the saliency between batches), a
batch only records its activation energy and ``finish`` takes all the mirror-descent steps, so a
Linear's per-weight state (8 bytes per weight) exists only while it is finished, one Linear at a
time, instead of for every Linear of a decoder layer while the layer is calibrated. Across
data-parallel ranks ``finish`` gathers every rank's energies and steps them in global batch
order, so the saliency is the one a single process computes from the same layer inputs, bit for
bit (docs/distributed.md). ``finish_layers`` finishes every layer any rank calibrated, in one
order, each when its record is asked for.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .admm import Budget, ScaledGram, right_hand_side, scale_gram, solve
from .dense_stream import SAME_INPUTS
from .distributed import gather_rows, reduce_mean, union_in_order
from .mirror_descent import SaliencyState, mirror_descent_step
from .reconstruction import accumulate_gram, default_iterations, least_squares
from .saliency import activation_energy, local_saliency
from .saliency_file import LayerSaliency

__all__ = ["CalibrationSettings", "InputStatistics", "LayerCalibration", "RefitSettings", "finish_layers"]

# rho of the ADMM re-fit is raised every this many iterations (ALPS: 3; 2 reached a lower error in
# 20 iterations on uni-tiny-28m's layers, docs/benchmarks.md)
ADMM_UPDATE_EVERY = 2


@dataclass(frozen=True)
class CalibrationSettings:
    """The recipe fields one calibration step needs."""

    metric: str
    exponent: float | None
    beta: float
    kappa: float
    lam: float
    seed: int
    track_first_step: bool  # only where a mask (N:M first_step order) or a saliency file uses it
    gram: bool  # keep XᵀX for a re-fit
    deferred: bool = False  # steps taken at finish from the batches' energies (every rank's)


@dataclass(frozen=True)
class RefitSettings:
    """The recipe fields of the re-fit: ``method`` "least_squares" (conjugate gradients on the
    given mask) or "admm" (the mask chosen again by the reconstruction, admm.py)."""

    method: str
    damping: float
    iterations: int | None
    tolerance: float
    dense_target: float
    admm_iterations: int
    admm_rho: float


class InputStatistics:
    """Running means over the batches of one input, for every Linear that reads it: XᵀX, and with
    the dense model's inputs D of the same tokens the drift Xᵀ(D − X), which moves the re-fit's
    target towards the dense model's outputs (XᵀD = XᵀX + drift, without the cancellation of
    subtracting two separate means, and exact when the dense stream skips batches)."""

    def __init__(self):
        self.gram: torch.Tensor | None = None
        self.drift: torch.Tensor | None = None
        self.tokens = 0
        self.drift_tokens = 0  # fewer than tokens when the dense stream skips batches
        self.batches = 0
        self.reduced = False
        self.readers = 0  # the Linears that will still re-fit from this input
        self._scaled: ScaledGram | None = None

    def accumulate(self, batch: int, inputs: torch.Tensor, dense) -> None:
        """Batch ``batch``'s inputs (and dense inputs), once however many Linears pass them."""
        if batch < self.batches:
            return
        if dense is SAME_INPUTS:  # first decoder layer: the drift is zero, only its tokens count
            if self.drift is None:
                self.drift = inputs.new_zeros((inputs.shape[-1],) * 2, dtype=torch.float32)
            self.drift_tokens += inputs.numel() // inputs.shape[-1]
        elif dense is not None:
            drift = dense.to(inputs.device, torch.float32) - inputs.float()
            self.drift, self.drift_tokens = accumulate_gram(inputs, self.drift, self.drift_tokens, paired=drift)
        self.gram, self.tokens = accumulate_gram(inputs, self.gram, self.tokens)
        self.batches += 1

    def target(self, dense_target: float, device: torch.device) -> torch.Tensor | None:
        """XᵀX + dense_target · drift: the re-fit's right-hand side matrix (None without a drift)."""
        if self.drift is None:
            return None
        return torch.add(self.gram.to(device), self.drift.to(device), alpha=dense_target)

    def scaled(self, damping: float, dense_target: float, device: torch.device) -> ScaledGram:
        """``admm.scale_gram`` of XᵀX (and of the dense-target blend) on ``device``, once for every
        Linear reading this input. XᵀX and the blend become the scaled matrices in place and the
        drift goes once blended (each Linear of the input re-fits from the scaled ones), so at
        most three in × in matrices are held at once, then two."""
        if self._scaled is None:
            target = self.target(dense_target, device)
            gram, self.gram, self.drift = self.gram.to(device), None, None
            self._scaled = scale_gram(gram, damping, target, consume=True)
        return self._scaled

    def problem(self, weight: torch.Tensor, damping: float, dense_target: float) -> tuple[ScaledGram, torch.Tensor]:
        """One Linear's ADMM problem: ``scaled`` XᵀX, without the target matrix, and the
        Linear's ``admm.right_hand_side``. The target matrix is dropped once the last Linear
        reading this input has taken its right-hand side (down_proj at 7B widths: 0.5 GiB)."""
        scaled = self.scaled(damping, dense_target, weight.device)
        rhs = right_hand_side(weight, scaled)
        self.readers -= 1
        if self.readers <= 0:
            self._scaled = self._scaled._replace(target=None)
        return scaled._replace(target=None), rhs

    def reduce(self, features: int, device: torch.device) -> None:
        """Token-weighted mean over data-parallel ranks (once, by the first Linear to finish); a
        rank that saw no batch contributes zeros."""
        if self.reduced:
            return
        shape = (features, features)
        self.drift, self.drift_tokens = reduce_mean(self.drift, self.drift_tokens, shape, device)
        self.gram, self.tokens = reduce_mean(self.gram, self.tokens, shape, device)
        self.reduced = True


class LayerCalibration:
    """Saliency state, its generator and the re-fit statistics of one target Linear."""

    def __init__(
        self,
        name: str,
        shape: torch.Size,
        device: torch.device,
        settings: CalibrationSettings,
        statistics: InputStatistics | None = None,
        group: str | None = None,
    ):
        self.name = name
        self.group = group or name  # the Linear whose input statistics this one shares
        self.settings = settings
        self.shape, self.device = shape, device
        self.seen = 0  # batches of this rank
        self.energies: list[torch.Tensor] = []  # deferred: this rank's activation energies
        self.saliency: SaliencyState | None = None if settings.deferred else self._fresh_state()
        self.finished = False
        self.generator = torch.Generator().manual_seed(settings.seed + zlib.crc32(name.encode()))
        self.statistics = statistics if statistics is not None or not settings.gram else InputStatistics()
        if self.statistics is not None:
            self.statistics.readers += 1
        self.feedback: torch.Tensor | None = None  # the next batch's anchor factor (block_feedback)

    @property
    def gram(self) -> torch.Tensor | None:
        return None if self.statistics is None else self.statistics.gram

    @property
    def drift(self) -> torch.Tensor | None:
        return None if self.statistics is None else self.statistics.drift

    @property
    def calibrating(self) -> bool:
        """True until ``finish``."""
        return not self.finished

    def _fresh_state(self) -> SaliencyState:
        return SaliencyState.zeros(self.shape, self.device, self.settings.track_first_step)

    def observe(self, weight: torch.Tensor, inputs: torch.Tensor, dense: torch.Tensor | None = None) -> None:
        """One calibration batch: a mirror-descent step (deferred: its activation energy) and,
        for a re-fit, the Gram matrices (with the drift when the dense model's inputs ``dense``
        of the same tokens are given, or ``SAME_INPUTS``)."""
        energy = activation_energy(inputs)
        if self.settings.deferred:
            self.energies.append(energy)
        else:
            self._step(weight, energy)
        batch, self.seen = self.seen, self.seen + 1
        if self.statistics is not None:
            self.statistics.accumulate(batch, inputs, dense)

    def _step(self, weight: torch.Tensor, energy: torch.Tensor) -> None:
        s = self.settings
        anchor = local_saliency(s.metric, weight, energy, exponent=s.exponent, beta=s.beta, generator=self.generator)
        if self.feedback is not None:
            anchor = anchor * self.feedback.to(anchor.device)
            self.feedback = None
        mirror_descent_step(self.saliency, anchor, s.kappa, s.lam, self.generator)

    def finish(self, weight: torch.Tensor | None = None) -> LayerSaliency:
        """End calibration: reduce the state across ranks, return the saliency record (on the
        state's device, fp32) and drop the state. Deferred, every rank's batches are stepped
        here, in global order, on ``weight`` (the layer's weight, as in calibration)."""
        if self.settings.deferred:
            self.saliency = self._fresh_state()
            local = torch.stack(self.energies) if self.energies else torch.zeros((0, self.shape[1]), dtype=torch.float32, device=self.device)
            self.energies = []
            for energy in gather_rows(local.to(self.device)):
                self._step(weight, energy)
        saliency, self.saliency = self.saliency, None
        self.feedback = None
        self.finished = True
        if self.statistics is not None:
            self.statistics.reduce(saliency.z.shape[1], saliency.z.device)
        return LayerSaliency(saliency.gamma, saliency.anchor_mean, saliency.first_step, saliency.steps)

    def offload(self) -> None:
        """Move the Gram matrix to the CPU while the layer waits for its mask."""
        if self.gram is not None:
            self.statistics.gram = self.gram.cpu()

    def refit(
        self, weight: torch.Tensor, mask: torch.Tensor, settings: RefitSettings, budget: Budget
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, mask) re-fitted to the layer's calibration outputs (fp32, pruned weights 0),
        aimed ``dense_target`` of the way at the dense model's outputs when the drift was
        gathered. "least_squares" keeps ``mask``; "admm" starts from it and lets the
        reconstruction move the support within ``budget`` (the same number of weights kept)."""
        iterations = settings.iterations or default_iterations(weight.shape[1])
        if settings.method == "least_squares":
            gram = self.gram.to(weight.device)
            target = self.statistics.target(settings.dense_target, weight.device)
            return least_squares(weight, gram, mask, settings.damping, iterations, settings.tolerance, cross=target), mask
        scaled, rhs = self.statistics.problem(weight, settings.damping, settings.dense_target)
        found = solve(
            weight, scaled, budget, rho=settings.admm_rho, max_iterations=settings.admm_iterations,
            update_every=ADMM_UPDATE_EVERY, pcg_iterations=iterations, pcg_tolerance=settings.tolerance,
            initial_mask=mask, rhs=rhs,
        )
        return found.weight, found.mask


def finish_layers(
    layers: dict[str, LayerCalibration], modules: dict[str, torch.nn.Module], settings: CalibrationSettings, device: torch.device
) -> Iterator[tuple[str, LayerSaliency]]:
    """(name, saliency record) of every layer of ``layers`` still calibrating, in the order of
    ``modules`` (every target), each finished only when the caller asks for it, so that a caller
    done with one record before asking for the next holds one Linear's state at a time. Deferred,
    also each target only another rank calibrated (an MoE expert given no tokens here): it joins
    with no batches of this rank, on ``device``, so every rank makes the same collectives in the
    same order; the steps are taken on the onloaded weight."""
    calibrating = {name: calibration for name, calibration in layers.items() if calibration.calibrating}
    names = union_in_order({name: c.group for name, c in calibrating.items()}, list(modules))
    if not settings.deferred:
        yield from ((name, calibrating[name].finish()) for name in names)
        return
    groups = {c.group: c.statistics for c in calibrating.values()}
    for name, group in names.items():
        module = modules[name]
        if name not in layers:
            statistics = groups.setdefault(group, InputStatistics()) if settings.gram else None
            layers[name] = LayerCalibration(name, module.weight.shape, device, settings, statistics, group)
        yield name, _finish_onloaded(layers[name], module)


def _finish_onloaded(calibration: LayerCalibration, module: torch.nn.Module) -> LayerSaliency:
    """``finish`` on the module's onloaded weight (a helper, so the caller's generator frame keeps
    no reference to the record it yields)."""
    from compressed_tensors.utils import align_module_device

    with torch.no_grad(), align_module_device(module):
        return calibration.finish(module.weight)
