"""Sparsity of a pruned model: exact zeros in the weights of its Linear layers."""

from __future__ import annotations

import torch


def layer_sparsity(model: torch.nn.Module, names: list[str] | None = None) -> dict[str, float]:
    """Fraction of exact zeros in the weight of each Linear layer (or of the named ones)."""
    result = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (names is None or name in names):
            weight = module.weight
            result[name] = float((weight == 0).sum().item() / weight.numel())
    return result


def total_sparsity(model: torch.nn.Module, names: list[str]) -> float:
    """Zeros over all weights of the named Linear layers."""
    zeros = total = 0
    modules = dict(model.named_modules())
    for name in names:
        weight = modules[name].weight
        zeros += int((weight == 0).sum().item())
        total += weight.numel()
    return zeros / total if total else 0.0
