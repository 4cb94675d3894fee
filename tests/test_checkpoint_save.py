"""Pruned models save in the sparse formats through llm-compressor's save path and load back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from unipruning_modifier import UniPruningModifier
from unipruning_modifier.checkpoint import load_sparse, sparse_config_of

from .conftest import load, run_oneshot

pytestmark = pytest.mark.slow


def keys(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return set(handle.keys())


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize(
    "fields, fmt, structure",
    [
        ({"mask_structure": "2:4"}, "sparse-24-bitmask", "2:4"),
        ({"sparsity": 0.6}, "sparse-bitmask", "unstructured"),
    ],
)
def test_oneshot_output_dir_writes_sparse_and_loads_back(tiny_model_path, calibration, tokenizer, tmp_path, fields, fmt, structure):
    out = tmp_path / "out"
    recipe = UniPruningModifier(ignore=["re:.*lm_head"], **fields)
    model = run_oneshot(load(tiny_model_path), recipe, calibration, tokenizer, output_dir=str(out))
    config = sparse_config_of(out)
    assert config["format"] == fmt and config["sparsity_structure"] == structure
    assert config["targets"] == ["Linear"] and config["ignore"] == ["re:.*lm_head"]
    stored = keys(out)
    assert "model.layers.0.mlp.down_proj.bitmask" in stored and "model.layers.0.mlp.down_proj.weight" not in stored
    assert "lm_head.weight" in stored
    tokens = torch.randint(0, len(tokenizer), (2, 16))
    reloaded = load_sparse(out)
    assert torch.equal(logits(reloaded, tokens), logits(model, tokens))
    assert (out / "recipe.yaml").is_file()
    # trust_remote_code only allows folder code; a built-in architecture loads the same way
    assert torch.equal(logits(load_sparse(out, trust_remote_code=True), tokens), logits(model, tokens))


def test_sparse_checkpoint_is_smaller_and_opt_out_stays_dense(tiny_model_path, calibration, tokenizer, tmp_path):
    model = run_oneshot(load(tiny_model_path), UniPruningModifier(mask_structure="2:4"), calibration, tokenizer)
    model.save_pretrained(tmp_path / "sparse")
    model.save_pretrained(tmp_path / "dense", sparse_format="dense")
    assert sparse_config_of(tmp_path / "dense") is None
    assert "model.layers.0.mlp.down_proj.weight" in keys(tmp_path / "dense")
    dense_bytes = (tmp_path / "dense" / "model.safetensors").stat().st_size
    sparse_bytes = (tmp_path / "sparse" / "model.safetensors").stat().st_size
    assert sparse_bytes < dense_bytes
    tokens = torch.randint(0, len(tokenizer), (1, 8))
    assert torch.equal(logits(load_sparse(tmp_path / "sparse"), tokens), logits(load(str(tmp_path / "dense")), tokens))


def test_broken_24_pattern_is_left_dense_with_a_warning(tiny_model_path, calibration, tokenizer, tmp_path, caplog_loguru):
    """A later stage that refills pruned weights must not be silently truncated on save."""
    model = run_oneshot(load(tiny_model_path), UniPruningModifier(mask_structure="2:4"), calibration, tokenizer)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, :4] = 1.0
    model.save_pretrained(tmp_path / "out")
    assert sparse_config_of(tmp_path / "out") is None
    assert "model.layers.0.mlp.down_proj.weight" in keys(tmp_path / "out")
    assert any("model.layers.1.mlp.up_proj" in message and "MaskedGPTQModifier" in message for message in caplog_loguru)
