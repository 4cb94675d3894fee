"""Prune + quantize recipes: the 2:4 pattern survives quantization, and the checkpoint round-trips."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.quantization.lifecycle.forward import forward_quantize
from safetensors import safe_open

from unipruning_modifier.checkpoint import load_sparse, sparse_config_of
from unipruning_modifier.cli import BUILTIN_RECIPES

from .conftest import load, run_oneshot

pytestmark = pytest.mark.slow

UNSTRUCTURED_FP8 = """
sparsity_stage:
  sparsity_modifiers:
    UniPruningModifier: {sparsity: 0.5, ignore: ["re:.*lm_head"]}
quant_stage:
  quant_modifiers:
    QuantizationModifier: {targets: ["Linear"], ignore: ["re:.*lm_head"], scheme: FP8_DYNAMIC}
"""

# recipe, sparsity format, quantization format, stored dtype of the pruned weights
CASES = {
    "uni_24_fp8": ("sparse-24-bitmask", "float-quantized", torch.float8_e4m3fn),
    "uni_24_w8a8": ("sparse-24-bitmask", "int-quantized", torch.int8),
    "uni_24_w4a16": ("dense", "pack-quantized", None),
    "unstructured_fp8": ("sparse-bitmask", "float-quantized", torch.float8_e4m3fn),
}


def stored(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def dequantized_targets(model) -> dict[str, torch.Tensor]:
    """The weights each target layer computes with (quantize-dequantize of the stored weight)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            scheme = module.quantization_scheme.weights
            with torch.no_grad():
                out[name] = forward_quantize(module, module.weight, "weight", scheme)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_prune_quantize_recipe(case, tiny_model_path, calibration, tokenizer, tmp_path):
    sparse_format, quant_format, dtype = CASES[case]
    recipe = UNSTRUCTURED_FP8 if case == "unstructured_fp8" else str(BUILTIN_RECIPES / f"{case}.yaml")
    out = tmp_path / "out"
    model = run_oneshot(load(tiny_model_path), recipe, calibration, tokenizer)

    weights = dequantized_targets(model)
    assert len(weights) == 14
    for name, weight in weights.items():
        if case == "unstructured_fp8":
            assert (weight == 0).float().mean() >= 0.5, name
        else:
            nonzero = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
            assert int(nonzero.max()) <= 2, f"{name}: a group of 4 holds {int(nonzero.max())} nonzeros"
            # quantization may round a small kept weight to zero, never revive a pruned one
            assert float((nonzero == 2).float().mean()) > 0.8, name

    tokens = torch.randint(0, len(tokenizer), (2, 16))
    with torch.no_grad():
        expected = model(tokens).logits
    model.save_pretrained(out)

    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quantization["format"] == quant_format
    config = sparse_config_of(out)
    assert config["format"] == sparse_format
    assert config["sparsity_structure"] == ("unstructured" if case == "unstructured_fp8" else "2:4")
    tensors = stored(out)
    module = "model.layers.0.mlp.down_proj"
    if dtype is None:  # packed int4: stays dense, the config records the structure
        assert f"{module}.weight_packed" in tensors and f"{module}.bitmask" not in tensors
    else:
        assert f"{module}.weight" not in tensors
        assert tensors[f"{module}.compressed"].dtype == dtype
        assert tensors[f"{module}.bitmask"].dtype == torch.uint8
        assert f"{module}.weight_scale" in tensors
        assert "lm_head.weight" in tensors

    reloaded = load_sparse(out)
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, expected)
