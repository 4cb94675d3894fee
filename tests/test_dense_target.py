"""dense_target: the re-fit aims (partly) at the dense model's outputs, from a second activation
stream the modifier keeps beside the sequential pipeline's."""

from __future__ import annotations

import pytest
import torch

from unipruning_modifier import UniPruningModifier
from unipruning_modifier.dense_stream import SAME_INPUTS, DenseStream, hidden_states

from .conftest import load, run_oneshot


def dense_linear_inputs(model, calibration) -> dict[str, list[torch.Tensor]]:
    """Every Linear's input in the (unpruned) model, per calibration sample in order."""
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = [
        module.register_forward_hook(lambda m, args, out, name=name: inputs.setdefault(name, []).append(args[0].detach().clone()))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    with torch.no_grad():
        for sample in calibration:
            model(
                input_ids=torch.tensor([sample["input_ids"]]),
                attention_mask=torch.tensor([sample["attention_mask"]]),
            )
    for handle in handles:
        handle.remove()
    return inputs


def decoder_calls(model, calibration) -> list[list[tuple[tuple, dict]]]:
    """(args, kwargs) of every decoder layer call, per layer and sample, in a dense forward."""
    calls = [[] for _ in model.model.layers]
    handles = [
        layer.register_forward_pre_hook(lambda m, args, kwargs, i=i: calls[i].append((args, kwargs)) and None, with_kwargs=True)
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        for sample in calibration:
            model(input_ids=torch.tensor([sample["input_ids"]]), attention_mask=torch.tensor([sample["attention_mask"]]))
    for handle in handles:
        handle.remove()
    return calls


def test_dense_stream_gives_each_layer_the_dense_models_inputs(tiny_model_path, calibration):
    """Driven as the sequential pipeline drives it: every batch through layer l (dense weights),
    then layer l is pruned and its pruned outputs feed layer l + 1."""
    model = load(tiny_model_path)
    expected = dense_linear_inputs(model, calibration)
    calls = decoder_calls(model, calibration)
    stream = DenseStream(layers=len(model.model.layers))
    pruned_inputs = [args[0] for args, _ in calls[0]]
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            prefix = f"model.layers.{index}."
            linears = {m: prefix + n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
            for batch, (args, kwargs) in enumerate(calls[index]):
                seen = stream.run(index, layer, (pruned_inputs[batch], *args[1:]), kwargs, linears)
                assert set(seen) == set(linears.values())
                if index == 0:  # both streams' inputs: the pipeline's calibration forward is the dense run
                    assert all(dense is SAME_INPUTS for dense in seen.values())
                    stream.keep_output(layer(pruned_inputs[batch], *args[1:], **kwargs))
                    continue
                for name, dense in seen.items():
                    torch.testing.assert_close(dense, expected[name][batch], rtol=1e-4, atol=1e-5, msg=f"{name} batch {batch}")
            for linear in linears:  # prune the layer, as the pipeline does before propagating
                linear.weight.masked_fill_(linear.weight.abs() < linear.weight.abs().median(), 0)
            pruned_inputs = [hidden_states(layer(x, *args[1:], **kwargs)) for x, (args, kwargs) in zip(pruned_inputs, calls[index])]
    assert not any(m._forward_hooks for m in model.modules())


def test_dense_target_changes_only_the_refit(tiny_model_path, calibration, tokenizer):
    weights = {}
    for target in (0.0, 1.0):
        recipe = UniPruningModifier(
            sparsity=0.6, ignore=["re:.*lm_head"], reconstruct="least_squares", dense_target=target,
            reconstruct_tolerance=1e-7, reconstruct_iterations=1000,  # compare solutions, not stopping points
        )
        model = run_oneshot(load(tiny_model_path), recipe, calibration, tokenizer, pipeline="sequential")
        weights[target] = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)}
    for name, weight in weights[0.0].items():
        other = weights[1.0][name]
        assert abs((other == 0).float().mean().item() - 0.6) < 1e-2, name
        if name.startswith("model.layers.0."):  # same inputs in both streams: the same re-fit
            torch.testing.assert_close(other, weight, rtol=1e-4, atol=1e-5)
        else:
            assert not torch.allclose(other, weight, atol=1e-4), name


def test_layers_outside_the_stream_fall_back_with_a_warning(tiny_model_path, calibration, tokenizer, caplog_loguru):
    recipe = UniPruningModifier(sparsity=0.5, targets=["Linear", "lm_head"], reconstruct="least_squares", dense_target=0.3)
    model = run_oneshot(load(tiny_model_path), recipe, calibration, tokenizer, pipeline="sequential")
    assert (model.lm_head.weight == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
    warnings = [m for m in caplog_loguru if "no dense-model inputs" in m]
    assert len(warnings) == 1 and "lm_head" in warnings[0]


def test_first_layer_output_is_kept_only_for_batches_the_stream_runs():
    stream = DenseStream(layers=3, every=2)
    layer = torch.nn.Linear(4, 4)
    linears = {layer: "model.layers.0.proj"}
    outputs = [torch.full((1, 2, 4), float(batch)) for batch in range(3)]
    for batch, output in enumerate(outputs):
        seen = stream.run(0, layer, (torch.ones(1, 2, 4),), {}, linears)
        assert seen == ({"model.layers.0.proj": SAME_INPUTS} if batch % 2 == 0 else {})
        stream.keep_output(output)
    second = torch.nn.Sequential(torch.nn.Identity())
    seen = [stream.run(1, second, (torch.zeros(1, 2, 4),), {}, {second[0]: "model.layers.1.proj"}) for _ in range(3)]
    assert [s["model.layers.1.proj"][0, 0, 0].item() if s else None for s in seen] == [0.0, None, 2.0]


def test_missing_dense_input_names_the_layer_and_batch():
    stream = DenseStream(layers=3)
    layer = torch.nn.Linear(4, 4)
    stream.run(0, layer, (torch.ones(1, 2, 4),), {}, {})
    with pytest.raises(RuntimeError, match="decoder layer 2, batch 0"):
        stream.run(2, layer, (torch.ones(1, 2, 4),), {}, {})


def test_sub_layer_sequential_targets_are_refused_before_calibration(tiny_model_path, calibration, tokenizer):
    recipe = UniPruningModifier(sparsity=0.5, reconstruct="least_squares", dense_target=0.3)
    with pytest.raises(ValueError, match="dense_target needs the decoder layers as sequential targets"):
        run_oneshot(load(tiny_model_path), recipe, calibration, tokenizer, pipeline="sequential",
                    sequential_targets=["LlamaAttention", "LlamaMLP"])
