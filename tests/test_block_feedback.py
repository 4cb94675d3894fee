"""block_feedback: anchors scaled by the gradient of a decoder block's output error w.r.t. its masks."""

from __future__ import annotations

import pydantic
import pytest
import torch

from unipruning_modifier import UniPruningModifier
from unipruning_modifier.block_feedback import block_feedback

from .conftest import Block, load, run_oneshot


def test_restoring_a_pruned_weight_is_rewarded_and_untouched_rows_are_neutral():
    torch.manual_seed(0)
    block = Block()
    inputs = torch.randn(2, 32, 16)
    keep_up = torch.ones_like(block.up.weight, dtype=torch.bool)
    keep_down = torch.ones_like(block.down.weight, dtype=torch.bool)
    keep_down[3, 5] = False  # one pruned weight: the block's error comes from it alone
    factors = block_feedback(block, (inputs,), {"scale": 1.0}, {block.up: keep_up, block.down: keep_down}, 0.5)
    down = factors[block.down]
    assert down[3, 5] > 1.0  # keeping it would lower the error
    others = torch.ones_like(keep_down)
    others[3] = False
    assert torch.all(down[others] == 1.0)  # rows without error get no feedback
    for factor in factors.values():
        assert factor.shape in (block.up.weight.shape, block.down.weight.shape)
        assert torch.all((factor >= 0.5) & (factor <= 1.5))
    assert not block.up._forward_hooks and not block.down._forward_hooks
    assert block.up.weight.grad is None and not inputs.requires_grad


def test_dense_masks_give_no_feedback():
    block = Block()
    keep = {block.up: torch.ones_like(block.up.weight, dtype=torch.bool), block.down: torch.ones_like(block.down.weight, dtype=torch.bool)}
    factors = block_feedback(block, (torch.randn(1, 8, 16),), {}, keep, 0.3)
    assert all(torch.all(f == 1.0) for f in factors.values())


def test_feedback_changes_the_masks_not_the_sparsity(tiny_model_path, calibration, tokenizer):
    masks = {}
    for strength in (0.0, 0.5):
        recipe = UniPruningModifier(sparsity=0.6, ignore=["re:.*lm_head"], block_feedback=strength)
        model = run_oneshot(load(tiny_model_path), recipe, calibration, tokenizer, pipeline="sequential")
        masks[strength] = {
            n: m.weight != 0 for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)
        }
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    changed = 0
    for name, mask in masks[0.5].items():
        assert abs(1 - mask.float().mean().item() - 0.6) < 1e-2, name
        changed += int((mask != masks[0.0][name]).sum())
    assert changed > 0


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"block_feedback": 1.5}, "block_feedback"),
        ({"block_feedback": 0.5, "calibration_inputs": "dense"}, "got calibration_inputs 'dense'"),
        ({"block_feedback": 0.5, "allocation": "global"}, "got allocation 'global'"),
        ({"block_feedback": 0.5, "block_feedback_every": 0}, "block_feedback_every"),
    ],
)
def test_bad_feedback_settings_name_the_field(fields, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        UniPruningModifier(sparsity=0.5, **fields)


def test_sub_layer_sequential_targets_take_feedback_per_block(tiny_model_path, calibration, tokenizer, caplog_loguru):
    recipe = UniPruningModifier(sparsity=0.5, ignore=["re:.*lm_head"], block_feedback=0.5)
    model = run_oneshot(load(tiny_model_path), recipe, calibration, tokenizer, pipeline="sequential",
                        sequential_targets=["LlamaAttention", "LlamaMLP"])
    assert not any("block_feedback never ran" in m for m in caplog_loguru)
    weight = model.model.layers[1].mlp.down_proj.weight
    assert abs((weight == 0).float().mean().item() - 0.5) < 1e-2


@pytest.mark.parametrize("every, expected_runs", [(1, 2 * 15), (4, 2 * 4)])
def test_feedback_every_k_batches(tiny_model_path, calibration, tokenizer, caplog_loguru, every, expected_runs):
    recipe = UniPruningModifier(sparsity=0.5, ignore=["re:.*lm_head"], block_feedback=0.5, block_feedback_every=every)
    run_oneshot(load(tiny_model_path), recipe, calibration, tokenizer, pipeline="sequential")
    assert len(calibration) == 16  # 2 layers; batch 0 has no saliency yet
    assert any(f"block_feedback ran {expected_runs} times" in m for m in caplog_loguru), caplog_loguru[-5:]
