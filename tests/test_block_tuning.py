"""block_tune_epochs: after a decoder layer's masks and re-fit, Adam on its kept weights against
its output (block_tuning.py)."""

from __future__ import annotations

import pydantic
import pytest
import torch

from unipruning_modifier import UniPruningModifier
from unipruning_modifier.block_tuning import BlockBatches, tune_block
from unipruning_modifier.dense_stream import DenseStream

from .conftest import Block, load, run_oneshot


def test_tuning_lowers_the_error_and_moves_only_kept_weights():
    torch.manual_seed(0)
    block = Block()
    inputs = [torch.randn(2, 32, 16) for _ in range(4)]
    with torch.no_grad():
        targets = [block(x, scale=0.5)[0] for x in inputs]
        for linear in (block.up, block.down):
            linear.weight.masked_fill_(torch.rand_like(linear.weight) < 0.5, 0)
    before = {linear: linear.weight.detach().clone() for linear in (block.up, block.down)}
    batches = [((x,), {"scale": 0.5}, t) for x, t in zip(inputs, targets)]
    tuned, losses = tune_block(block, [block.up, block.down], batches, epochs=5, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0]
    for linear, weight in zip((block.up, block.down), tuned):
        assert weight.dtype == torch.float32
        assert torch.equal(weight == 0, before[linear] == 0)  # the zeros stay zeros, the others moved
        assert torch.equal(linear.weight, before[linear])  # the caller writes the weights back
        assert "forward" not in vars(linear)  # the stand-in forward is gone
    block.up.forward = block.up.forward  # an instance forward (llm-compressor's tracing leaves one) comes back
    kept = vars(block.up)["forward"]
    tune_block(block, [block.up], batches, epochs=1, lr=1e-2)
    assert vars(block.up)["forward"] is kept


def test_bf16_block_is_tuned_in_fp32():
    torch.manual_seed(0)
    block = Block().to(torch.bfloat16)
    x = torch.randn(1, 8, 16, dtype=torch.bfloat16)
    tuned, losses = tune_block(block, [block.up, block.down], [((x,), {}, block(x)[0] * 1.1)], epochs=2, lr=1e-3)
    assert all(weight.dtype == torch.float32 for weight in tuned) and len(losses) == 2


def _four_batches() -> BlockBatches:
    stream = DenseStream(layers=2, every=2, first_batch=1)  # global batches 1, 2, 3, 4: it runs on 2 and 4
    kept = BlockBatches(stream.takes)
    for batch in range(4):
        kept.add_call((torch.full((1, 2), float(batch)),), {"position": batch})
        kept.add_output((torch.full((1, 2), float(batch)),))
    return kept


def test_batches_keep_the_dense_streams_batches_and_blend_the_target():
    kept = _four_batches()
    assert sorted(kept.calls) == [1, 3]
    dense = {1: torch.full((1, 2), 10.0), 3: None}
    blended = list(kept.targets(dense.get, 0.25))
    assert [kwargs["position"] for _, kwargs, _ in blended] == [1, 3]
    torch.testing.assert_close(blended[0][2], torch.full((1, 2), 0.75 * 1 + 0.25 * 10))
    torch.testing.assert_close(blended[1][2], torch.full((1, 2), 3.0))  # no dense output: the layer's own
    assert not kept.calls and not kept.outputs  # handed over, not held twice
    own = [target for _, _, target in _four_batches().targets(dense.get, 0.0)]
    assert [float(t[0, 0]) for t in own] == [1.0, 3.0]


@pytest.mark.parametrize("structure, dense_target", [("2:4", 0.3), ("0.6", 0.0)])  # 0: no dense stream, own outputs
def test_tuning_keeps_the_masks_and_changes_the_kept_weights(tiny_model_path, calibration, tokenizer, caplog_loguru, structure, dense_target):
    shape = {"mask_structure": structure} if ":" in structure else {"sparsity": float(structure)}
    weights = {}
    for epochs in (0, 2):
        recipe = UniPruningModifier(
            ignore=["re:.*lm_head"], reconstruct="least_squares", dense_target=dense_target, block_tune_epochs=epochs, **shape
        )
        model = run_oneshot(load(tiny_model_path), recipe, calibration, tokenizer, pipeline="sequential")
        weights[epochs] = {
            n: m.weight.detach().clone() for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)
        }
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        assert not any("stand_in" in getattr(vars(m).get("forward"), "__qualname__", "") for m in model.modules())
    for name, weight in weights[2].items():
        kept = weight != 0
        if ":" in structure:
            assert bool((kept.reshape(weight.shape[0], -1, 4).sum(-1) == 2).all()), name
        else:
            assert int(kept.sum()) == int(torch.count_nonzero(weights[0][name])), name
        if name.startswith("model.layers.0."):  # later layers calibrate on the tuned layers' outputs
            assert torch.equal(kept, weights[0][name] != 0), name
        assert not torch.equal(weight, weights[0][name]), name
    tuned = [m for m in caplog_loguru if "block tuning on" in m]
    assert len(tuned) == 2, caplog_loguru[-5:]  # one line per decoder layer, each on all 16 batches
    assert all("on 16 batches" in m for m in tuned)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"block_tune_epochs": -1}, "block_tune_epochs"),
        ({"block_tune_epochs": 2, "block_tune_lr": 0}, "block_tune_lr"),
        ({"block_tune_epochs": 2, "calibration_inputs": "dense"}, "got calibration_inputs 'dense'"),
        ({"block_tune_epochs": 2, "allocation": "owl"}, "got allocation 'owl'"),
        ({"block_tune_epochs": 2, "block_tune_target": 1.5}, "block_tune_target"),
        ({"block_tune_epochs": 2, "block_tune_target": 0.5, "reconstruct": "least_squares"}, "set dense_target above 0"),
    ],
)
def test_bad_tuning_settings_name_the_field(fields, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        UniPruningModifier(sparsity=0.5, **fields)


def test_without_a_dense_stream_the_default_target_is_the_layers_own_output():
    modifier = UniPruningModifier(sparsity=0.5, reconstruct="least_squares", block_tune_epochs=2)
    assert modifier.block_tune_target == 0.6 and modifier.dense_target == 0  # accepted: aims at f(X; W0)


def test_block_tune_target_weights_the_dense_output(tiny_model_path, calibration, tokenizer):
    tuned = {}
    for target in (0.0, 1.0):
        recipe = UniPruningModifier(
            mask_structure="2:4", ignore=["re:.*lm_head"], reconstruct="least_squares", dense_target=0.3,
            block_tune_epochs=1, block_tune_target=target,
        )
        model = run_oneshot(load(tiny_model_path), recipe, calibration, tokenizer, pipeline="sequential")
        tuned[target] = [layer.mlp.down_proj.weight.detach().clone() for layer in model.model.layers]
    assert torch.equal(tuned[0.0][0], tuned[1.0][0])  # the first layer's dense and pruned inputs are one: same target
    assert not torch.equal(tuned[0.0][1], tuned[1.0][1])
