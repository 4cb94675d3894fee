"""Recipe fields, validation and target selection of UniPruningModifier (no calibration)."""

from __future__ import annotations

import pydantic
import pytest
import torch
import yaml
from llmcompressor.modifiers.factory import ModifierFactory
from llmcompressor.recipe import Recipe

from unipruning_modifier import UniPruningModifier

from .conftest import REPO, load


def test_import_registers_under_class_name():
    assert ModifierFactory._registered_registry["UniPruningModifier"] is UniPruningModifier


@pytest.mark.parametrize("name", ["uni_24", "uni_unstructured_50", "uni_unstructured_60"])
def test_shipped_recipes_parse(name):
    recipe = Recipe.create_instance(str(REPO / "recipes" / f"{name}.yaml"))
    (modifier,) = recipe.modifiers
    assert isinstance(modifier, UniPruningModifier)
    assert modifier.ignore == ["re:.*lm_head"]
    assert modifier.reconstruct == "admm"  # the benchmark's best row (docs/benchmarks.md)
    assert modifier.dense_target == 0.3 and modifier.dense_target_every == 2


def test_yaml_string_recipe():
    recipe = Recipe.create_instance(
        "sparsity_stage:\n  sparsity_modifiers:\n    UniPruningModifier: {sparsity: 0.7, allocation: row}\n"
    )
    (modifier,) = recipe.modifiers
    assert modifier.sparsity == 0.7 and modifier.allocation == "row"


def test_serialised_recipe_parses_back_into_the_same_modifier():
    original = UniPruningModifier(sparsity=[0.4, 0.6], metric="ria", kappa=0.05, targets="Linear")
    text = Recipe.from_modifiers(original).yaml()
    (parsed,) = Recipe.create_instance(text).modifiers
    fields = set(UniPruningModifier.model_fields) - {"index", "group"}
    assert {f: getattr(parsed, f) for f in fields} == {f: getattr(original, f) for f in fields}


def test_string_target_is_one_pattern():
    assert UniPruningModifier(sparsity=0.5, targets="Linear", ignore="lm_head").targets == ["Linear"]
    assert UniPruningModifier(sparsity=0.5, ignore="lm_head").ignore == ["lm_head"]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"sparsity": 1.0}, "sparsity must be in [0, 1)"),
        ({"sparsity": -0.1}, "sparsity must be in [0, 1)"),
        ({"sparsity": [0.5, 1.2]}, "sparsity must be in [0, 1)"),
        ({"sparsity": []}, "sparsity must be in [0, 1)"),
        ({"mask_structure": "3:2"}, "0 < N < M"),
        ({"mask_structure": "2-4"}, "mask_structure must be"),
        ({"sparsity": 0.7, "mask_structure": "2:4"}, "contradicts mask_structure"),
        ({"mask_structure": "2:4", "allocation": "global"}, "unstructured masks only"),
        ({}, "sparsity is required"),
        ({"sparsity": [0.5, 0.5], "allocation": "global"}, "takes one sparsity"),
        ({"sparsity": 0.5, "metric": "magnitude"}, "metric"),
        ({"sparsity": 0.5, "allocation": "blocks"}, "allocation"),
        ({"sparsity": 0.5, "kappa": 0}, "kappa"),
        ({"sparsity": 0.5, "lam": 1.0}, "lam"),
        ({"sparsity": 0.5, "nm_order": "random"}, "nm_order"),
        ({"sparsity": 0.5, "spasity": 0.5}, "spasity"),
        ({"sparsity": 0.5, "reconstruct": "obs"}, "reconstruct"),
        ({"sparsity": 0.5, "damping": -0.1}, "damping"),
        ({"sparsity": 0.5, "reconstruct_iterations": 0}, "reconstruct_iterations"),
        ({"sparsity": 0.5, "reconstruct_tolerance": 0}, "reconstruct_tolerance"),
        ({"sparsity": [0.5, 0.5], "allocation": "owl"}, "takes one sparsity"),
        ({"sparsity": 0.5, "allocation": "owl", "owl_lambda": 1.0}, "owl_lambda"),
        ({"mask_structure": "2:4", "allocation": "owl"}, "unstructured masks only"),
        ({"sparsity": 0.5, "reconstruct_tolerance": 1.0}, "reconstruct_tolerance"),
        ({"sparsity": 0.5, "dense_target": 1.5}, "dense_target"),
        ({"sparsity": 0.5, "dense_target": 0.3}, "needs reconstruct least_squares or admm"),
        ({"sparsity": 0.5, "dense_target": 0.3, "reconstruct": "least_squares", "calibration_inputs": "dense"},
         "got calibration_inputs 'dense'"),
        ({"sparsity": 0.5, "dense_target": 0.3, "reconstruct": "least_squares", "allocation": "owl"},
         "got allocation 'owl'"),
    ],
)
def test_bad_fields_are_rejected_with_the_field_named(fields, message):
    with pytest.raises(pydantic.ValidationError) as error:
        UniPruningModifier(**fields)
    assert message in str(error.value)


def test_nm_sparsity_may_be_given_when_consistent():
    assert UniPruningModifier(sparsity=0.5, mask_structure="4:8").mask_structure == "4:8"


def test_targets_skip_lm_head_and_embeddings_unless_named(tiny_model_path):
    model = load(tiny_model_path)
    by_class = UniPruningModifier(sparsity=0.5).target_modules(model)
    assert "lm_head" not in by_class
    assert len(by_class) == 2 * 7 and all(name.startswith("model.layers.") for name in by_class)

    named = UniPruningModifier(sparsity=0.5, targets=["Linear", "lm_head"]).target_modules(model)
    assert "lm_head" in named

    ignored = UniPruningModifier(sparsity=0.5, ignore=["model.layers.0.mlp.down_proj", "re:.*q_proj$"])
    names = ignored.target_modules(model)
    assert "model.layers.0.mlp.down_proj" not in names and "model.layers.1.mlp.down_proj" in names
    assert not any(name.endswith("q_proj") for name in names)


def test_recipe_comments_match_fields():
    """Every key of the shipped recipes is a real field (extra keys would be a ValidationError)."""
    for path in (REPO / "recipes").glob("*.yaml"):
        fields = yaml.safe_load(path.read_text())["sparsity_stage"]["sparsity_modifiers"]["UniPruningModifier"]
        assert set(fields) <= set(UniPruningModifier.model_fields), path.name


@pytest.mark.parametrize(
    "fields, tracked",
    [
        ({"sparsity": 0.5}, False),
        ({"mask_structure": "2:4"}, False),
        ({"mask_structure": "2:4", "nm_order": "first_step"}, True),
        ({"sparsity": 0.5, "nm_order": "first_step"}, False),  # unstructured masks rank by Gamma
        ({"sparsity": 0.5, "calibration_inputs": "dense"}, True),  # the saliency record keeps it
        ({"sparsity": 0.5, "save_saliency": "s.safetensors"}, True),
    ],
)
def test_first_step_is_tracked_only_where_used(fields, tracked):
    assert UniPruningModifier(**fields).calibration_settings().track_first_step is tracked


@pytest.mark.parametrize("structure, pruned", [("1:4", 0.25), ("3:4", 0.75), ("2:4", 0.5), ("2:8", 0.25)])
def test_nm_means_n_pruned_of_every_m_like_llm_compressor(structure, pruned):
    """One recipe string, one meaning: "N:M" prunes N of every M for UniPruning as for Wanda/SparseGPT."""
    from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

    assert WandaPruningModifier(sparsity=pruned, mask_structure=structure)._prune_n == int(structure[0])
    assert UniPruningModifier(mask_structure=structure, sparsity=pruned).mask_structure == structure
    if pruned != 0.5:  # the other convention's sparsity is refused
        with pytest.raises(ValueError, match="contradicts mask_structure"):
            UniPruningModifier(mask_structure=structure, sparsity=1 - pruned)


def test_nm_policy_keeps_m_minus_n_per_group():
    from unipruning_modifier.mask_policy import MaskPolicy

    keys = [torch.rand(6, 16)]
    for structure, kept in (("1:4", 3), ("3:4", 1), ("2:8", 6)):
        modifier = UniPruningModifier(mask_structure=structure)
        policy = MaskPolicy.build(modifier, ["layer"], [])
        mask = policy.layer_mask("layer", keys)
        m = int(structure[-1])
        assert torch.all(mask.reshape(6, -1, m).sum(-1) == kept), structure
        assert policy.sparsity["layer"] == pytest.approx(1 - kept / m)


@pytest.mark.parametrize(
    "theirs, ours",
    [
        ({"sparsity_profile": "owl", "owl_m": 3, "owl_lmbda": 0.05}, {"allocation": "owl", "owl_threshold": 3.0, "owl_lambda": 0.05}),
        ({"sparsity_profile": "OWL"}, {"allocation": "owl"}),
        ({"sparsity_profile": None}, {"allocation": "layer"}),
    ],
)
def test_llm_compressor_owl_spelling_is_accepted(theirs, ours):
    modifier = UniPruningModifier(sparsity=0.7, **theirs)
    assert {key: getattr(modifier, key) for key in ours} == ours


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"sparsity_profile": "flat"}, "the only profile is 'owl'"),
        ({"sparsity_profile": "owl", "allocation": "global"}, "contradicts allocation 'global'"),
        ({"owl_m": 3, "owl_threshold": 4}, "not both"),
    ],
)
def test_llm_compressor_owl_spelling_conflicts_name_the_fields(fields, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        UniPruningModifier(sparsity=0.7, **fields)


def test_policy_budget_is_the_masks_own():
    from unipruning_modifier.mask_policy import MaskPolicy

    mask = torch.rand(8, 32) > 0.7
    cases = [({"mask_structure": "2:4"}, (0.5, 2, 4, False)), ({"sparsity": 0.6, "allocation": "row"}, (0.6, 0, 0, True))]
    for fields, (sparsity, n, m, per_row) in cases:
        budget = MaskPolicy.build(UniPruningModifier(**fields), ["layer"], []).budget("layer", mask)
        assert (budget.sparsity, budget.n, budget.m, budget.per_row) == (sparsity, n, m, per_row)
    layer = MaskPolicy.build(UniPruningModifier(sparsity=0.5), ["layer"], []).budget("layer", mask)
    assert layer.kept(mask.shape) == int(mask.sum()) and not layer.per_row
