"""Block tuning: after a decoder layer's masks and re-fit, tune its kept weights together.

The re-fit makes each Linear reproduce its own outputs, one Linear at a time. The decoder
layer's output also goes through attention, the activation and the norms, so the errors its
Linears leave interact. Block tuning (the block-wise loss of EBFT and of AutoRound) runs a few
epochs of Adam over the layer's calibration batches on

    L = mean || f(X; W * m) - T ||^2,    T = (1 - a) f(X; W0) + a f(D; W0),

X: the batch's input to the layer (after the pruned earlier layers), D: the dense model's input
(dense_stream.py), a: ``block_tune_target``, W0: the dense weights, m: the masks. The masks stay
fixed: only kept weights move (their gradients are masked), so the sparsity and any N:M pattern
hold. The Linears' weights are tuned as fp32 copies that stand in for them during the tuning's
forwards (offloaded parameters cannot be trained in place, and bf16 loses Adam's small steps);
the caller writes them back.

``BlockBatches`` keeps a layer's batches while it calibrates, ``tune_block`` is the loop and
``BlockTuning`` runs both for the modifier.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from compressed_tensors.offload.utils import send_tensors  # how compressed-tensors onloads a module's call
from llmcompressor.modifiers.utils.hooks import HooksMixin
from loguru import logger

from . import distributed
from .dense_stream import hidden_states

__all__ = ["BlockBatches", "BlockTuning", "tune_block"]


class BlockBatches:
    """One decoder layer's calibration batches, as the block tuning needs them: the layer's call
    (args, kwargs) and its output with the dense weights, on the offload device.

    Only the batches ``kept(batch)`` accepts (local index; None: all) are kept: with
    ``dense_target`` above 0 those whose target exists, the ones the dense stream runs on.
    """

    def __init__(self, kept: Callable[[int], bool] | None = None, offload_device: torch.device | str = "cpu"):
        self._kept = kept or (lambda _batch: True)
        self._offload = torch.device(offload_device)
        self._batches = 0  # calls seen; an output belongs to the last one
        self.calls: dict[int, tuple[tuple, dict]] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def add_call(self, args: tuple, kwargs: dict) -> None:
        """The layer is about to run on its next batch (a forward pre-hook)."""
        batch, self._batches = self._batches, self._batches + 1
        if self._kept(batch):
            self.calls[batch] = (send_tensors(args, self._offload), send_tensors(kwargs, self._offload))

    def add_output(self, output) -> None:
        """The layer's output on that batch, weights still dense (a forward hook)."""
        batch = self._batches - 1
        if self._kept(batch):
            self.outputs[batch] = hidden_states(output).detach().to(self._offload)

    def targets(self, dense_output: Callable[[int], torch.Tensor | None], dense_weight: float) -> Iterator[tuple[tuple, dict, torch.Tensor]]:
        """(args, kwargs, target) per kept batch in order, each handed over (not kept here): the
        output (1 - a) f(X; W0) + a f(D; W0), ``dense_output(batch)`` giving f(D; W0) (None: only
        the layer's own output is known)."""
        for batch in sorted(self.calls):
            args, kwargs = self.calls.pop(batch)
            target = self.outputs.pop(batch)
            dense = dense_output(batch) if dense_weight > 0 else None
            if dense is not None:
                target = target.lerp(dense.to(target.device, target.dtype), dense_weight)  # not in place: tensors are shared
            yield args, kwargs, target


@contextmanager
def _standing_in(linears: list[torch.nn.Linear], weights: list[torch.Tensor]):
    """Each Linear computes with its stand-in weight (cast to its input's dtype) instead of its
    own; a forward the instance already had (llm-compressor's tracing leaves one) comes back."""
    previous = [vars(linear).get("forward") for linear in linears]
    for linear, weight in zip(linears, weights):

        def stand_in(x, weight=weight, bias=linear.bias):
            return torch.nn.functional.linear(x, weight.to(x.dtype), bias)

        linear.forward = stand_in
    try:
        yield
    finally:
        for linear, forward in zip(linears, previous):
            if forward is None:
                del linear.forward
            else:
                linear.forward = forward


def tune_block(
    block: torch.nn.Module,
    linears: list[torch.nn.Linear],
    batches: list[tuple[tuple, dict, torch.Tensor]],
    epochs: int,
    lr: float,
) -> tuple[list[torch.Tensor], list[float]]:
    """Tune the kept weights (the nonzero ones) of ``linears`` inside ``block`` on ``batches``
    ((args, kwargs, target output) each); return their tuned fp32 weights, zeros where they
    were zero, and the mean loss of each epoch.

    Across data-parallel ranks each step averages the gradients of the ranks that still have a
    batch, so every rank takes the same steps and ends with the same weights. The block's other
    parameters stay as they are; the caller disables any hooks it does not want to see the
    tuning's forwards.
    """
    device = linears[0].weight.device
    weights = [linear.weight.detach().to(torch.float32, copy=True).requires_grad_(True) for linear in linears]
    masks = [weight != 0 for weight in weights]
    optimizer = torch.optim.Adam(weights, lr=lr)
    steps = distributed.max_count(len(batches))
    losses = []
    with torch.enable_grad(), _standing_in(linears, weights):
        for _ in range(epochs):
            total = 0.0
            for step in range(steps):
                optimizer.zero_grad(set_to_none=False)
                has_batch = step < len(batches)
                if has_batch:
                    args, kwargs, target = batches[step]
                    output = hidden_states(block(*send_tensors(args, device), **send_tensors(kwargs, device)))
                    loss = (output.float() - target.detach().to(device, torch.float32)).pow(2).mean()
                    loss.backward()
                    total += loss.item()
                distributed.mean_of_present([weight.grad for weight in weights], has_batch)
                for weight, mask in zip(weights, masks):
                    weight.grad.mul_(mask)
                optimizer.step()  # zero gradient and moments where masked: those weights stay 0
            losses.append(total / max(len(batches), 1))
    tuned = [weight.detach().masked_fill_(~mask, 0) for weight, mask in zip(weights, masks)]
    return tuned, losses


class BlockTuning:
    """The block tuning of one calibration: each watched decoder layer's batches, kept by its
    hooks (``keep_call``, ``keep_output``), then its tuning once all its target Linears are
    masked (``tune_ready``), the weights written back to every rank alike."""

    def __init__(self, epochs: int, lr: float, dense_weight: float, kept: Callable[[int], bool] | None = None):
        """``dense_weight``: a of the target; ``kept(batch)``: whether a batch (local index) has a
        target (None: all have)."""
        self._epochs, self._lr, self._dense_weight, self._kept = epochs, lr, dense_weight, kept
        self._waiting: dict[torch.nn.Module, tuple[str, dict[torch.nn.Module, str], BlockBatches]] = {}

    def watch(self, name: str, layer: torch.nn.Module, linears: dict[torch.nn.Module, str]) -> None:
        """Keep decoder layer ``name``'s batches, to tune ``linears`` (module -> name) in it."""
        self._waiting[layer] = (name, linears, BlockBatches(self._kept))

    def keep_call(self, layer: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of a watched layer."""
        self._waiting[layer][2].add_call(args, kwargs)

    def keep_output(self, layer: torch.nn.Module, _args, output) -> None:
        """Forward hook of a watched layer (its calibration forward, weights still dense)."""
        self._waiting[layer][2].add_output(output)

    def tune_ready(self, pruned: set[str], dense_output: Callable[[torch.nn.Module, int], torch.Tensor | None]) -> None:
        """Tune every waiting layer whose target Linears are all in ``pruned`` (masked and
        re-fitted), ``dense_output(layer, batch)`` giving its dense output f(D; W0) or None."""
        for layer, (name, linears, batches) in list(self._waiting.items()):
            if not set(linears.values()) <= pruned:
                continue
            del self._waiting[layer]
            work = list(batches.targets(lambda batch: dense_output(layer, batch), self._dense_weight))
            with HooksMixin.disable_hooks():  # no calibration hook may see the tuning's forwards
                tuned, losses = tune_block(layer, list(linears), work, self._epochs, self._lr)
            distributed.write_same_weights(dict(zip(linears, tuned)))
            if work:
                logger.info(
                    f"UniPruning {name}: block tuning on {len(work)} batches, output error "
                    f"{losses[0]:.4g} in epoch 1, {losses[-1]:.4g} in epoch {len(losses)}"
                )
