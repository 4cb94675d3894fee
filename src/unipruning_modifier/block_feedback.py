"""Block-local feedback for the mirror descent (algorithm.md, option b).

The local anchors score each weight from its own layer's weights and inputs. The feedback adds
what the decoder block as a whole sees: before a batch runs through a block, the block's output
error against its dense output on the same input,

    L(m) = mean ||f(X; W * m) - f(X; W)||^2,

is differentiated w.r.t. the current masks m of the block's target layers (from the saliency
so far). -dL/dm estimates, to first order, how much keeping each weight lowers the block's
error (restoring a pruned one, or not removing a kept one), and scales that batch's anchor:

    anchor <- anchor * (1 + strength * tanh(-g / mean|g|)),

which keeps anchors non-negative and bounds the change to a factor in [1 - strength, 1 + strength].
"""

from __future__ import annotations

import torch

from .dense_stream import hidden_states


def block_feedback(
    block: torch.nn.Module,
    args: tuple,
    kwargs: dict,
    masks: dict[torch.nn.Linear, torch.Tensor],
    strength: float,
) -> dict[torch.nn.Linear, torch.Tensor]:
    """Anchor factors (fp32, weight-shaped) for each Linear in ``masks`` (bool keep-masks).

    Runs ``block.forward(*args, **kwargs)`` twice, dense without gradients and masked with them;
    the masked run replaces each Linear's output through a temporary forward hook (offloaded
    parameters cannot be swapped), so the caller disables any other hooks it does not want to
    see these runs.
    """
    with torch.no_grad():
        dense = hidden_states(block.forward(*args, **kwargs)).float()
    with torch.enable_grad():
        soft = {linear: mask.to(torch.float32).requires_grad_(True) for linear, mask in masks.items()}
        handles = [
            linear.register_forward_hook(
                lambda module, inputs, _output, m=m: torch.nn.functional.linear(
                    inputs[0], module.weight.detach() * m.to(module.weight.dtype), module.bias
                )
            )
            for linear, m in soft.items()
        ]
        try:
            masked = hidden_states(block.forward(*args, **kwargs)).float()
        finally:
            for handle in handles:
                handle.remove()
        loss = (masked - dense).pow(2).mean()
        grads = torch.autograd.grad(loss, list(soft.values()), allow_unused=True)
    factors = {}
    for linear, grad in zip(soft, grads):
        if grad is None:  # the Linear does not reach the block's output (unused in this model)
            continue
        score = grad.neg_()
        factors[linear] = score.div_(score.abs().mean().clamp_min(1e-30)).tanh_().mul_(strength).add_(1.0)
    return factors
