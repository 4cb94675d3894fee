"""ALPSModifier: ALPS (Meng et al., NeurIPS 2024) as an llm-compressor modifier, a baseline.

Used in ``oneshot`` exactly like llm-compressor's ``SparseGPTModifier``: the same base class
(targets, ignore, sparsity, mask_structure "N:M" = N pruned of every M), the same Hessian
accumulation hooks, so it runs in the same sequential pipeline on the same calibration data;
each calibrated Linear is then pruned by ``unipruning_modifier.admm.alps``. ``quality.py
--methods alps`` builds it. At the end it logs where the time went (scaling XᵀX, ADMM, PCG).
"""

from __future__ import annotations

import torch
from compressed_tensors.utils import align_module_device, get_execution_device, update_offload_parameter
from llmcompressor.core import State
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import accumulate_hessian, make_empty_hessian
from loguru import logger
from pydantic import PrivateAttr

from unipruning_modifier.admm import Budget, alps

PHASES = ("scale", "admm", "pcg")


class ALPSModifier(SparsityModifierBase):
    """Prune every target Linear with ALPS (ADMM support selection, then PCG re-fit).

    :param dampening_frac: fraction of mean(diag H) added to H's diagonal (ALPS: 0.01).
    :param rho: initial ADMM penalty, on the unit-diagonal H (ALPS: 0.1).
    :param max_iterations: cap on ADMM iterations (ALPS: 300).
    :param update_every: ADMM iterations between penalty updates (ALPS: 3).
    :param settle_after: iterations before the support is allowed to count as settled (ALPS: 30).
    :param tolerance: settled when fewer than this fraction of the kept weights changed (ALPS: 3e-4).
    :param pcg_iterations: cap on the final conjugate-gradient iterations (ALPS: 10).
    :param pcg_tolerance: PCG stops at this residual relative to the right-hand side (ALPS: 1e-4).
    """

    dampening_frac: float = 0.01
    rho: float = 0.1
    max_iterations: int = 300
    update_every: int = 3
    settle_after: int = 30
    tolerance: float = 3e-4
    pcg_iterations: int = 10
    pcg_tolerance: float = 1e-4

    _num_samples: dict[torch.nn.Module, int] = PrivateAttr(default_factory=dict)
    _hessians: dict[torch.nn.Module, torch.Tensor] = PrivateAttr(default_factory=dict)
    _totals: dict[str, float] = PrivateAttr(default_factory=dict)

    def calibrate_module(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor):
        """Accumulate H = X^T X of the module's input, as SparseGPTModifier does."""
        if not isinstance(module, torch.nn.Linear):
            raise TypeError(f"ALPSModifier prunes Linear layers only, got {type(module).__name__}")
        if module not in self._num_samples:
            self._hessians[module] = make_empty_hessian(module, device=get_execution_device(module))
            self._num_samples[module] = 0
        self._hessians[module], self._num_samples[module] = accumulate_hessian(
            args[0], module, self._hessians[module], self._num_samples[module]
        )

    def compress_modules(self):
        """Prune every calibrated module with ALPS and write its weights back."""
        if self._prune_m:
            budget = Budget(self._prune_n / self._prune_m, self._prune_n, self._prune_m)
        for module in list(self._num_samples):
            if not self._prune_m:
                budget = Budget(float(self._module_sparsities[module]))
            gram = self._hessians.pop(module)
            with torch.no_grad(), align_module_device(module):
                result = alps(module.weight, gram, budget, self.dampening_frac, rho=self.rho,
                              max_iterations=self.max_iterations, update_every=self.update_every,
                              settle_after=self.settle_after, tolerance=self.tolerance,
                              pcg_iterations=self.pcg_iterations, pcg_tolerance=self.pcg_tolerance)
                update_offload_parameter(module, "weight", result.weight.to(module.weight.dtype))
            del self._num_samples[module]
            logger.info(f"ALPS {self._module_names[module]}: {result.admm_iterations} ADMM iterations "
                        f"(final rho {result.rho:.3g}), {result.pcg_iterations} PCG")
            for phase in PHASES:
                self._totals[f"{phase}_cpu_seconds"] = self._totals.get(f"{phase}_cpu_seconds", 0.0) + result.cpu_seconds[phase]
            for key, value in (("layers", 1), ("admm_iterations", result.admm_iterations),
                               ("pcg_iterations", result.pcg_iterations)):
                self._totals[key] = self._totals.get(key, 0) + value

    def on_finalize(self, state: State, **kwargs) -> bool:
        if not self.ended_:
            self.on_end(state, None)
        if self._num_samples:
            raise ValueError(f"Failed to compress {len(self._num_samples)} modules")
        logger.info(f"ALPS totals: {self._totals}")
        self._hessians, self._module_names, self._module_sparsities = {}, {}, {}
        return True
