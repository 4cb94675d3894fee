"""End to end through llm-compressor's oneshot on a 2-layer Llama and the demo model."""

from __future__ import annotations

import math

import pytest
import torch
from llmcompressor.recipe import Recipe

from unipruning_modifier import UniPruningModifier, data
from unipruning_modifier.checkpoint import load_sparse
from unipruning_modifier.masks import kept_count

from .conftest import REPO, all_parameters, linear_weights, load, run_oneshot

pytestmark = pytest.mark.slow


def prune(path, recipe, calibration, tokenizer, **kwargs):
    model = load(path)
    before = all_parameters(model)
    model = run_oneshot(model, recipe, calibration, tokenizer, **kwargs)
    return model, before


def target_names(model, **fields):
    return list(UniPruningModifier(sparsity=0.5, **fields).target_modules(model))


def assert_only_masked(model, before, targets, kept_unchanged=True):
    """Targets: kept weights equal the originals bit for bit (unless re-fitted). Rest: untouched."""
    for name, param in model.named_parameters():
        original = before[name]
        module = name.removesuffix(".weight")
        if module in targets and name.endswith(".weight"):
            kept = param != 0
            assert torch.equal(param[kept], original[kept]) == kept_unchanged, f"{name}: kept weights"
        else:
            assert torch.equal(param, original), f"{name} is not a target but changed"


def assert_two_of_four(model, targets):
    weights = linear_weights(model)
    for name in targets:
        nonzero = (weights[name].reshape(weights[name].shape[0], -1, 4) != 0).sum(-1)
        assert torch.all(nonzero == 2), f"{name}: not exactly 2 of every 4 kept"


MASK_ONLY_24 = """
sparsity_stage:
  sparsity_modifiers:
    UniPruningModifier:
      mask_structure: "2:4"
      targets: Linear
      ignore: ["lm_head"]
"""


def test_yaml_recipe_mask_only_keeps_weights_bit_for_bit(tiny_model_path, calibration, tokenizer):
    """String target and a plain 'lm_head' ignore (both llm-compressor traps) work here."""
    model, before = prune(tiny_model_path, MASK_ONLY_24, calibration, tokenizer)
    targets = target_names(model)
    assert len(targets) == 14
    assert_two_of_four(model, targets)
    assert_only_masked(model, before, targets)


def test_shipped_24_recipe_end_to_end(tiny_model_path, calibration, tokenizer):
    model, before = prune(tiny_model_path, str(REPO / "recipes" / "uni_24.yaml"), calibration, tokenizer)
    targets = target_names(model)
    assert_two_of_four(model, targets)
    assert_only_masked(model, before, targets, kept_unchanged=False)  # reconstruct: least_squares


def test_shipped_tuned_24_recipe_end_to_end(tiny_model_path, calibration, tokenizer):
    model, before = prune(tiny_model_path, str(REPO / "recipes" / "uni_24_tuned.yaml"), calibration, tokenizer)
    targets = target_names(model)
    assert_two_of_four(model, targets)
    assert_only_masked(model, before, targets, kept_unchanged=False)


@pytest.mark.parametrize("name, sparsity", [("uni_unstructured_50", 0.5), ("uni_unstructured_60", 0.6)])
def test_shipped_unstructured_recipes_end_to_end(tiny_model_path, calibration, tokenizer, name, sparsity):
    model, before = prune(tiny_model_path, str(REPO / "recipes" / f"{name}.yaml"), calibration, tokenizer)
    targets = target_names(model)
    weights = linear_weights(model)
    for target in targets:
        weight = weights[target]
        zeros = int((weight == 0).sum())
        assert zeros == weight.numel() - kept_count(weight.numel(), sparsity), target
    assert_only_masked(model, before, targets, kept_unchanged=False)


def test_row_allocation_and_per_layer_sparsity(tiny_model_path, calibration, tokenizer):
    recipe = UniPruningModifier(sparsity=[0.3, 0.7], allocation="row", ignore=["re:.*lm_head"])
    model, _ = prune(tiny_model_path, recipe, calibration, tokenizer)
    for name, weight in linear_weights(model).items():
        if name == "lm_head":
            continue
        target = 0.3 if name.startswith("model.layers.0.") else 0.7
        kept_per_row = (weight != 0).sum(dim=1)
        assert torch.all(kept_per_row == kept_count(weight.shape[1], target)), name


@pytest.mark.parametrize("sparsity, clamp, reconstruct", [(0.6, 0.05, "none"), (0.7, 0.1, "least_squares")])
def test_global_allocation_hits_total_and_respects_clamp(tiny_model_path, calibration, tokenizer, sparsity, clamp, reconstruct):
    recipe = UniPruningModifier(sparsity=sparsity, allocation="global", clamp=clamp, reconstruct=reconstruct)
    model, before = prune(tiny_model_path, recipe, calibration, tokenizer)
    targets = target_names(model)
    weights = linear_weights(model)
    total = sum(weights[n].numel() for n in targets)
    zeros = sum(int((weights[n] == 0).sum()) for n in targets)
    assert abs(zeros - (total - kept_count(total, sparsity))) <= 1
    for name in targets:
        layer = float((weights[name] == 0).float().mean())
        assert sparsity - clamp - 1e-3 <= layer <= sparsity + clamp + 1e-3, (name, layer)
    assert_only_masked(model, before, targets, kept_unchanged=reconstruct == "none")


def test_owl_allocation_varies_per_decoder_layer_and_keeps_the_mean(tiny_model_path, calibration, tokenizer):
    recipe = UniPruningModifier(sparsity=0.6, allocation="owl", owl_lambda=0.1, owl_threshold=3.0)
    model, before = prune(tiny_model_path, recipe, calibration, tokenizer)
    weights = linear_weights(model)
    per_block = {}
    for name in target_names(model):
        block = name.split(".mlp.")[0].split(".self_attn.")[0]
        per_block.setdefault(block, set()).add(round(float((weights[name] == 0).float().mean()), 2))
    assert all(len(values) == 1 for values in per_block.values())  # one sparsity per decoder layer
    sparsities = [next(iter(v)) for v in per_block.values()]
    assert max(sparsities) - min(sparsities) == pytest.approx(0.2, abs=0.02)  # spans 2 * owl_lambda
    assert sum(sparsities) / len(sparsities) == pytest.approx(0.6, abs=0.01)
    assert_only_masked(model, before, target_names(model), kept_unchanged=True)


def test_same_seed_same_mask_other_seed_other_mask(tiny_model_path, calibration, tokenizer):
    masks = []
    for seed in (0, 0, 1):
        model, _ = prune(tiny_model_path, UniPruningModifier(sparsity=0.5, seed=seed), calibration, tokenizer)
        masks.append({n: w != 0 for n, w in linear_weights(model).items()})
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])
    assert not all(torch.equal(masks[0][n], masks[2][n]) for n in masks[0])


def test_first_step_order_and_4_8(tiny_model_path, calibration, tokenizer):
    recipe = UniPruningModifier(mask_structure="4:8", nm_order="first_step", metric="ria")
    model, before = prune(tiny_model_path, recipe, calibration, tokenizer)
    targets = target_names(model)
    for name in targets:
        weight = linear_weights(model)[name]
        assert torch.all((weight.reshape(weight.shape[0], -1, 8) != 0).sum(-1) == 4), name
    assert_only_masked(model, before, targets)


def test_nm_requires_divisible_inputs(tmp_path, tokenizer, calibration):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=100, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="mlp.down_proj has 100 inputs, not a multiple of 8"):
        prune(str(tmp_path), UniPruningModifier(mask_structure="4:8"), calibration, tokenizer)


def test_saved_recipe_round_trips(tiny_model_path, calibration, tokenizer, tmp_path):
    recipe = UniPruningModifier(sparsity=0.5, ignore=["re:.*lm_head"], kappa=0.02, allocation="row")
    model, _ = prune(tiny_model_path, recipe, calibration, tokenizer)
    model.save_pretrained(tmp_path / "out")
    (parsed,) = Recipe.create_instance(str(tmp_path / "out" / "recipe.yaml")).modifiers
    assert isinstance(parsed, UniPruningModifier)
    fields = set(UniPruningModifier.model_fields) - {"index", "group"} - {n for n in UniPruningModifier.model_fields if n.endswith("_")}
    assert {f: getattr(parsed, f) for f in fields} == {f: getattr(recipe, f) for f in fields}

    reloaded = load_sparse(tmp_path / "out")
    for name, weight in linear_weights(reloaded).items():
        assert torch.equal(weight, linear_weights(model)[name]), name


def test_demo_model_reconstruction_beats_masking_alone(tokenizer):
    from unipruning_modifier.evaluation import perplexity

    calibration = data.calibration_dataset(tokenizer, data.read_text(data.demo_calibration_text()), num_samples=16, seq_len=128)
    tokens = data.token_stream(tokenizer, data.read_text(data.demo_eval_text()))
    dense = perplexity(load(data.demo_model_path()), tokens, window=256, max_tokens=4096)
    results = {}
    for reconstruct in ("none", "least_squares"):
        recipe = UniPruningModifier(mask_structure="2:4", ignore=["re:.*lm_head"], reconstruct=reconstruct)
        model = load(data.demo_model_path())
        before = all_parameters(model)
        model = run_oneshot(model, recipe, calibration, tokenizer)
        targets = target_names(model)
        for name in targets:
            weight = linear_weights(model)[name]
            assert torch.all((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2), name
        for name, param in model.named_parameters():
            if name.removesuffix(".weight") not in targets:
                assert torch.equal(param, before[name]), name
        results[reconstruct] = perplexity(model, tokens, window=256, max_tokens=4096)
    assert math.isfinite(results["none"]) and dense < results["least_squares"] < results["none"]


@pytest.mark.parametrize("fields", [{"sparsity": 0.7}, {"mask_structure": "2:4"}, {"sparsity": 0.7, "allocation": "global"}])
def test_admm_reconstruction_keeps_the_budget_and_moves_the_support(tiny_model_path, calibration, tokenizer, fields):
    """reconstruct: admm may move the support, but within the same budget, and re-fits it."""
    models = {}
    for method in ("least_squares", "admm"):
        recipe = UniPruningModifier(ignore=["re:.*lm_head"], reconstruct=method, admm_iterations=8, **fields)
        models[method] = run_oneshot(load(tiny_model_path), recipe, calibration, tokenizer, pipeline="sequential")
    targets = target_names(models["admm"], ignore=["re:.*lm_head"])
    weights = {method: linear_weights(model) for method, model in models.items()}
    moved = 0
    for name in targets:
        kept = weights["admm"][name] != 0
        reference = weights["least_squares"][name] != 0
        if "mask_structure" in fields:
            assert torch.all(kept.reshape(kept.shape[0], -1, 4).sum(-1) == 2), name
        elif fields.get("allocation") != "global":
            assert int(kept.sum()) == int(reference.sum()), name
        moved += int((kept != reference).sum())
    if fields.get("allocation") == "global":
        kept_total = sum(int((weights["admm"][n] != 0).sum()) for n in targets)
        assert kept_total == sum(int((weights["least_squares"][n] != 0).sum()) for n in targets)
    assert moved > 0  # the reconstruction chose other weights than the saliency alone
