"""GPTQ that keeps a pruning mask: ``MaskedGPTQModifier`` and its pure solver.

llm-compressor 0.13+ removed the sparsity-preserving GPTQ it used to have, so its
``GPTQModifier`` after a 2:4 pruning stage writes non-zeros back into pruned positions (the
column-by-column error compensation updates every remaining weight). Here the weights that are
exactly zero when GPTQ starts form the mask: they are quantized to zero, and the compensation
either flows into every remaining weight, pruned ones being forced back to zero, with their
error compensated in turn, when their column comes (``compensation: all``, the default: the
order of SparseGPT's joint prune-and-quantize), or only into kept weights (``compensation:
kept``, the update llm-compressor <= 0.12 applied). Either way the result has the mask's
zeros; ``all`` gives the lower layer-output error (tests/test_masked_gptq.py, and the
benchmark in docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
from copy import copy
from typing import Literal

import torch
from compressed_tensors.offload import disable_offloading
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, fake_quantize
from compressed_tensors.quantization.quant_args import ActivationOrdering
from compressed_tensors.utils import getattr_chain
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.gptq.helpers import (
    GPTQ_PRECISION,
    apply_activation_ordering,
    assign_batches,
    column_scale_window,
    factorize_hessian,
    prepare_batch,
    update_batch_qparams,
)
from llmcompressor.utils.metric_logging import CompressionLogger
from loguru import logger

from .registration import register

__all__ = ["MaskedGPTQModifier", "quantize_weight_masked"]

Compensation = Literal["kept", "all"]


def _group_index(quant_args: QuantizationArgs, num_columns: int, perm, batch_size: int, device):
    """Column -> quantization group, in the (possibly permuted) column order."""
    strategy = quant_args.strategy
    if strategy not in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP, QuantizationStrategy.BLOCK):
        return None
    divisor = quant_args.group_size if strategy != QuantizationStrategy.BLOCK else quant_args.block_structure[1]
    g_idx = torch.arange(num_columns, device=device, dtype=torch.int) // divisor
    if perm is not None and quant_args.actorder == ActivationOrdering.WEIGHT:
        g_idx = torch.gather(g_idx.unsqueeze(0).expand(batch_size, -1), 1, perm)
    return g_idx


def quantize_weight_masked(
    weights: torch.Tensor,
    hessians: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    global_scale: torch.Tensor | None,
    quant_args: QuantizationArgs,
    blocksize: int = 128,
    percdamp: float = 0.01,
    compensation: Compensation = "all",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ on stacked weights ``[batch, rows, columns]`` keeping their zeros at zero.

    Same inputs and outputs as llm-compressor's ``quantize_weight`` (quantized weights, loss
    per batch item, RTN-fallback flags); with no zero in ``weights`` the result is the same.
    """
    if weights.ndim != 3 or hessians.ndim != 3 or weights.shape[0] != hessians.shape[0]:
        raise ValueError("weights and hessians must have shapes [batch, rows, columns] and [batch, columns, columns]")
    if compensation not in ("kept", "all"):
        raise ValueError(f"compensation must be 'kept' or 'all', got {compensation!r}")
    batch_size, num_rows, num_columns = weights.shape
    final_dtype, device = weights.dtype, weights.device
    W = weights.to(dtype=GPTQ_PRECISION)
    H = hessians.to(device=device, dtype=GPTQ_PRECISION)
    scale = scale.to(device)
    zero_point = zero_point.to(device)
    global_scale = None if global_scale is None else global_scale.to(device)

    W, H, perm = apply_activation_ordering(W, H, quant_args.actorder)
    keep = W != 0
    g_idx = _group_index(quant_args, num_columns, perm, batch_size, device)
    losses = torch.zeros(batch_size, num_rows, device=device)
    used_rtn_fallback = torch.zeros(batch_size, dtype=torch.bool, device=device)
    Hinv = factorize_hessian(W, H, percdamp, used_rtn_fallback)
    channel_args = copy(quant_args)
    channel_args.strategy = QuantizationStrategy.CHANNEL

    for i1 in range(0, num_columns, blocksize):
        i2 = min(i1 + blocksize, num_columns)
        W1 = W[:, :, i1:i2].clone()
        K1 = keep[:, :, i1:i2].to(W.dtype)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        eff, zp = column_scale_window(
            scale, zero_point, global_scale, g_idx, quant_args, num_rows=num_rows, i1=i1, i2=i2
        )
        for i in range(i2 - i1):
            w = W1[:, :, i]
            q = fake_quantize(
                w.transpose(0, 1),
                eff[:, :, i].transpose(0, 1),
                None if zp is None else zp[:, :, i].transpose(0, 1),
                channel_args,
            ).transpose(0, 1)
            q = q * K1[:, :, i]
            error = (w - q) / Hinv1[:, i, i][:, None]
            Q1[:, :, i] = q
            Err1[:, :, i] = error
            update = error.unsqueeze(-1) * Hinv1[:, i, i:].unsqueeze(1)
            W1[:, :, i:] -= update * K1[:, :, i:] if compensation == "kept" else update
        W[:, :, i1:i2] = Q1
        losses += Err1.square().sum(2) / 2
        update = torch.bmm(Err1, Hinv[:, i1:i2, i2:])
        W[:, :, i2:] -= update * keep[:, :, i2:] if compensation == "kept" else update

    if perm is not None:
        W = torch.gather(W, -1, torch.argsort(perm, dim=-1).unsqueeze(-2).expand(-1, num_rows, -1))
    return W.to(final_dtype), losses.sum(dim=1), used_rtn_fallback


class MaskedGPTQModifier(GPTQModifier):
    """llm-compressor's ``GPTQModifier`` that keeps the zeros of a preceding pruning stage.

    Every field of ``GPTQModifier`` (scheme, config_groups, targets, ignore, block_size,
    dampening_frac, actorder, ...) works the same, plus ``compensation``: ``all`` (default)
    lets the error compensation flow through pruned weights too, each re-zeroed with its error
    compensated when its column is reached; ``kept`` lets it update only kept weights.
    """

    compensation: Compensation = "all"

    def compress_module_list(self, module_list):
        for batch in assign_batches(module_list, self.batched_quantization, self.block_size):
            quant_args = getattr_chain(batch[0], "quantization_scheme.weights")
            batch_qparams = [module.weight_observer.get_qparams() for module in batch]
            names = [self._module_names[module] for module in batch]
            logger.info(f"Quantizing {len(batch)} module(s) keeping their sparsity mask: {names}")
            with torch.no_grad(), disable_offloading(), contextlib.ExitStack() as stack:
                weights, hessians, scales, zero_points, global_scales = prepare_batch(
                    batch, batch_qparams, self._hessians, self._num_samples
                )
                loggers = [stack.enter_context(CompressionLogger(module)) for module in batch]
                quantized, losses, fallback = quantize_weight_masked(
                    weights,
                    hessians,
                    scales,
                    zero_points,
                    global_scales,
                    quant_args,
                    blocksize=self.block_size,
                    percdamp=self.dampening_frac,
                    compensation=self.compensation,
                )
                for index, comp_logger in enumerate(loggers):
                    comp_logger.set_results(name="MaskedGPTQ", loss=losses[index].item())
                    if fallback[index].item():
                        self._rtn_fallback_module_names.append(names[index])
                stack.close()
                update_batch_qparams(batch, quantized, scales, zero_points, global_scales, quant_args)
                self._num_compressed_modules += len(batch)


register(MaskedGPTQModifier)
