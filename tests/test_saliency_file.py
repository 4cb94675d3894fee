"""Calibrate once, prune to any setting: saliency files, ``load_saliency`` and their checks."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from unipruning_modifier import UniPruningModifier
from unipruning_modifier.saliency_file import SaliencyFileError, read_metadata

from .conftest import all_parameters, load, run_oneshot
from .reliability import rewrite_safetensors, write_saliency

pytestmark = pytest.mark.slow

IGNORE = ["re:.*lm_head"]
# masks identical to a fresh calibration (saliency_encoding.py): the row budget at any sparsity,
# N:M at any N:M in both orders, the layer budget at whole-percent sparsities
EXACT = {
    "0.3": {"sparsity": 0.3},
    "0.7": {"sparsity": 0.7},
    "row-0.5": {"sparsity": 0.5, "allocation": "row"},
    "row-0.437": {"sparsity": 0.437, "allocation": "row"},
    "2:4": {"mask_structure": "2:4"},
    "2:4-first_step": {"mask_structure": "2:4", "nm_order": "first_step"},
    "4:8": {"mask_structure": "4:8"},
    "4:8-first_step": {"mask_structure": "4:8", "nm_order": "first_step"},
}
# the same budget in every layer; the weights that fill it may differ near the threshold
BUDGET_ONLY = {
    "0.555": {"sparsity": 0.555},
    "global-0.6": {"sparsity": 0.6, "allocation": "global"},
    "owl-0.7": {"sparsity": 0.7, "allocation": "owl", "owl_threshold": 3.0},
}
MISMATCH_BOUND = 0.01  # of the target weights' mask entries (measured: 0.15-0.25% on the demo model)


def extract(model_path, saliency, **fields):
    """Prune from a saliency file through oneshot's data-free pipeline (no dataset)."""
    from llmcompressor import oneshot

    return oneshot(model=load(model_path), recipe=UniPruningModifier(load_saliency=str(saliency), ignore=IGNORE, **fields))


@pytest.fixture(scope="module")
def saliency(tiny_model_path, calibration, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("saliency") / "tiny.safetensors"
    recipe = UniPruningModifier(sparsity=0.5, ignore=IGNORE, save_saliency=str(path))
    assert recipe.calibration_inputs == "dense"
    run_oneshot(load(tiny_model_path), recipe, calibration, tokenizer)
    return path


def test_file_records_the_model_and_the_calibration(saliency, tiny_model_path):
    info = read_metadata(saliency)
    assert info["model"] == tiny_model_path and info["version"] == 2
    assert len(info["layers"]) == 14
    assert info["layers"]["model.layers.0.mlp.down_proj"]["shape"] == [128, 256]
    assert info["layers"]["model.layers.0.mlp.down_proj"]["steps"] == 16
    assert info["calibration"]["metric"] == "stochastic_ria" and info["calibration"]["seed"] == 0
    assert len(info["fingerprint"]) == 64


def masks_of(model) -> dict[str, torch.Tensor]:
    return {n: p != 0 for n, p in all_parameters(model).items() if n.endswith("proj.weight")}


@pytest.mark.parametrize("setting", [*EXACT, *BUDGET_ONLY])
def test_extraction_against_a_fresh_calibration(setting, saliency, tiny_model_path, calibration, tokenizer):
    fields = {**EXACT, **BUDGET_ONLY}[setting]
    fresh = run_oneshot(
        load(tiny_model_path), UniPruningModifier(calibration_inputs="dense", ignore=IGNORE, **fields), calibration, tokenizer
    )
    extracted = extract(tiny_model_path, saliency, **fields)
    want, got = all_parameters(fresh), all_parameters(extracted)
    assert want.keys() == got.keys()
    if setting in EXACT:
        for name in want:
            assert torch.equal(got[name], want[name]), name
    else:  # every layer keeps as many weights as in the fresh calibration; a few of them differ
        fresh_masks, file_masks = masks_of(fresh), masks_of(extracted)
        assert {n: int(m.sum()) for n, m in file_masks.items()} == {n: int(m.sum()) for n, m in fresh_masks.items()}
        differ = sum(int((file_masks[n] != fresh_masks[n]).sum()) for n in fresh_masks)
        assert 0 < differ <= MISMATCH_BOUND * sum(m.numel() for m in fresh_masks.values()), differ
        for name in want:  # only masks differ: weights kept by both have their original values
            both = file_masks[name] & fresh_masks[name] if name in file_masks else torch.ones_like(want[name], dtype=torch.bool)
            assert torch.equal(got[name][both], want[name][both]), name
    pruned = got["model.layers.1.mlp.up_proj.weight"]
    assert (pruned == 0).any()


def test_bfloat16_file_prunes_like_a_bfloat16_calibration(tiny_model_path, calibration, tokenizer, tmp_path):
    path = tmp_path / "bf16.safetensors"
    fresh = run_oneshot(
        load(tiny_model_path),
        UniPruningModifier(sparsity=0.6, ignore=IGNORE, save_saliency=str(path), saliency_dtype="bfloat16"),
        calibration,
        tokenizer,
    )
    assert read_metadata(path)["dtype"] == "bfloat16"
    extracted = extract(tiny_model_path, path, sparsity=0.6)
    for name, value in all_parameters(fresh).items():
        assert torch.equal(all_parameters(extracted)[name], value), name


def test_demo_model_file_is_at_most_two_bytes_per_weight(tmp_path, tokenizer):
    """The demo model (4 decoder layers, 2.9 M target weights, inputs of 256 and 704): 12 bytes
    per weight in version 1, at most 2 now (docs/benchmarks.md measures it on the 28m model)."""
    from transformers import AutoModelForCausalLM

    from unipruning_modifier import data

    path = tmp_path / "demo.safetensors"
    model = AutoModelForCausalLM.from_pretrained(data.demo_model_path(), dtype=torch.float32)
    windows = data.calibration_dataset(tokenizer, data.read_text(data.demo_calibration_text()), num_samples=4, seq_len=64)
    run_oneshot(model, UniPruningModifier(sparsity=0.5, ignore=IGNORE, save_saliency=str(path)), windows, tokenizer)
    weights = sum(shape[0] * shape[1] for shape in (entry["shape"] for entry in read_metadata(path)["layers"].values()))
    assert weights == 2_949_120
    assert path.stat().st_size <= 2 * weights, path.stat().st_size / weights


def test_version_1_file_prunes_as_its_version_2_form(tiny_model_path, tmp_path):
    """Old files keep loading: encoded on reading, they give the masks of the same saliency
    written as version 2."""
    v1 = write_saliency(tiny_model_path, tmp_path / "v1.safetensors", version=1)
    v2 = write_saliency(tiny_model_path, tmp_path / "v2.safetensors")
    assert read_metadata(v1)["version"] == 1 and read_metadata(v2)["version"] == 2
    assert v2.stat().st_size < v1.stat().st_size / 4
    for fields in ({"sparsity": 0.6}, {"mask_structure": "2:4", "nm_order": "first_step"}, {"sparsity": 0.7, "allocation": "owl"}):
        old, new = all_parameters(extract(tiny_model_path, v1, **fields)), all_parameters(extract(tiny_model_path, v2, **fields))
        assert all(torch.equal(old[name], new[name]) for name in new), fields


def test_unknown_version_is_refused_naming_it(tiny_model_path, tmp_path):
    path = write_saliency(tiny_model_path, tmp_path / "v3.safetensors")
    rewrite_safetensors(path, None, lambda m: m.update(unipruning=m["unipruning"].replace('"version": 2', '"version": 3')))
    with pytest.raises(SaliencyFileError, match="version 3; this unipruning_modifier reads 'unipruning-saliency' versions 1 and 2"):
        read_metadata(path)


def test_refuses_a_file_of_another_model(saliency, tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    def model_folder(name, **changes):
        torch.manual_seed(1)
        config = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        config.update(changes)
        LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(tmp_path / name)
        return str(tmp_path / name)

    with pytest.raises(SaliencyFileError, match="calibrated on another model"):
        extract(model_folder("other-weights"), saliency, sparsity=0.5)
    with pytest.raises(SaliencyFileError, match=r"layer model.layers.0.mlp.gate_proj has shape \[384, 128\] in the model"):
        extract(model_folder("other-shape", intermediate_size=384), saliency, sparsity=0.5)
    with pytest.raises(SaliencyFileError, match="has no saliency for layer model.layers.2"):
        extract(model_folder("deeper", num_hidden_layers=3), saliency, sparsity=0.5)


def test_refuses_targets_outside_the_file(saliency, tiny_model_path):
    with pytest.raises(SaliencyFileError, match="has no saliency for layer lm_head"):
        from llmcompressor import oneshot

        oneshot(model=load(tiny_model_path), recipe=UniPruningModifier(load_saliency=str(saliency), sparsity=0.5, targets=["Linear", "lm_head"]))


def test_saliency_fields_are_checked_when_parsed(saliency, tmp_path):
    with pytest.raises(ValidationError, match="exclude each other"):
        UniPruningModifier(sparsity=0.5, save_saliency=str(tmp_path / "a"), load_saliency=str(saliency))
    with pytest.raises(ValidationError, match="needs calibration_inputs 'dense'"):
        UniPruningModifier(sparsity=0.5, save_saliency=str(tmp_path / "a"), calibration_inputs="pruned")
    with pytest.raises(ValidationError, match="reconstruct 'least_squares'"):
        UniPruningModifier(sparsity=0.5, load_saliency=str(saliency), reconstruct="least_squares")
    assert UniPruningModifier(sparsity=0.5, load_saliency=str(saliency)).requires_calibration_data is False


def test_saliency_files_are_checked_before_calibration(tiny_model_path, calibration, tokenizer, tmp_path):
    """Files are looked at when oneshot initialises the modifier, before any batch runs."""
    from llmcompressor import oneshot

    model = load(tiny_model_path)
    before = all_parameters(model)
    with pytest.raises(ValueError, match="does not exist"):
        run_oneshot(model, UniPruningModifier(sparsity=0.5, save_saliency=str(tmp_path / "missing" / "a")), calibration, tokenizer)
    with pytest.raises(SaliencyFileError, match="no such file"):
        oneshot(model=model, recipe=UniPruningModifier(sparsity=0.5, load_saliency=str(tmp_path / "nothing.safetensors")))
    not_ours = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(not_ours))
    with pytest.raises(SaliencyFileError, match="not written by UniPruning"):
        oneshot(model=model, recipe=UniPruningModifier(sparsity=0.5, load_saliency=str(not_ours)))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
