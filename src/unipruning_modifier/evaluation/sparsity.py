"""Sparsity of a pruned model: exact zeros in the weights of its Linear layers.

A layer whose weight is no longer a dense tensor (packed int4 after llm-compressor compressed
the model in place when it was saved) has no such count and is left out.
"""

from __future__ import annotations

import torch


def _dense_weight(module: torch.nn.Module) -> torch.Tensor | None:
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def layer_sparsity(model: torch.nn.Module, names: list[str] | None = None) -> dict[str, float]:
    """Fraction of exact zeros in the weight of each Linear layer (or of the named ones)."""
    result = {}
    for name, module in model.named_modules():
        weight = _dense_weight(module)
        if isinstance(module, torch.nn.Linear) and weight is not None and (names is None or name in names):
            result[name] = int(torch.count_nonzero(weight == 0)) / weight.numel()
    return result


def total_sparsity(model: torch.nn.Module, names: list[str]) -> float:
    """Zeros over all weights of the named Linear layers (those with a dense weight)."""
    zeros = total = 0
    modules = dict(model.named_modules())
    for name in names:
        weight = _dense_weight(modules[name])
        if weight is not None:
            zeros += int(torch.count_nonzero(weight == 0))
            total += weight.numel()
    return zeros / total if total else 0.0
