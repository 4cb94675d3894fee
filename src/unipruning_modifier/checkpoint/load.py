"""Read a checkpoint folder back: shards, its ``sparsity_config``, and ``load_sparse``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from .state_dict import decompress_state_dict

__all__ = ["INDEX_NAME", "load_sparse", "load_sparse_state_dict", "shards", "sparse_config_of"]

INDEX_NAME = "model.safetensors.index.json"


def shards(folder: Path) -> list[Path]:
    """The folder's safetensors shards (from the index when there is one)."""
    index = folder / INDEX_NAME
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"{folder}: no *.safetensors file")
    return found


def sparse_config_of(folder: str | os.PathLike) -> dict | None:
    """The ``sparsity_config`` of a checkpoint folder's config.json, or None."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("sparsity_config") or None


def load_sparse_state_dict(folder: str | os.PathLike, config: dict | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, sparse modules decompressed to ``P.weight``.

    ``config`` is the folder's sparsity_config when the caller already read it. Quantized
    modules come back as their stored FP8 / INT8 ``P.weight`` beside their scales.
    """
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards(folder):
        tensors.update(load_file(str(shard)))
    config = config or sparse_config_of(folder)
    return decompress_state_dict(tensors, config["format"]) if config else tensors


def load_sparse(folder: str | os.PathLike, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """Load a causal LM saved by ``write_sparse`` (or a plain one), sparse tensors decompressed.

    transformers and compressed-tensors 0.19 no longer read the sparse formats, so the state
    dict is decompressed here and handed to ``from_pretrained`` with the sparsity_config
    removed from the model config: an unquantized model comes back with dense weights (zeros
    included); a quantized one goes through transformers' compressed-tensors integration as
    any FP8 / INT8 / W4A16 checkpoint does. Raises ValueError naming the tensors when the
    checkpoint does not match the architecture.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    sparse = sparse_config_of(folder)
    if sparse is None:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto", trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    quantization = dict(config.quantization_config)
    quantization.pop("sparsity_config", None)
    if quantization.get("config_groups"):
        config.quantization_config = quantization
    else:
        del config.quantization_config
    state_dict = load_sparse_state_dict(folder, sparse)
    remote = (getattr(config, "auto_map", None) or {}).get("AutoModelForCausalLM")
    if trust_remote_code and remote:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        model_class = get_class_from_dynamic_module(remote, str(folder))
    elif type(config) in AutoModelForCausalLM._model_mapping:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    else:
        raise ValueError(f"{folder}: no causal-LM class for {type(config).__name__} (pass trust_remote_code for model code in the folder)")
    try:
        model, info = model_class.from_pretrained(
            None, config=config, state_dict=state_dict, dtype=dtype or "auto", output_loading_info=True
        )
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{folder}: checkpoint does not match the model: {error}") from error
    if info["missing_keys"] or info["unexpected_keys"] or info.get("mismatched_keys"):
        raise ValueError(
            f"{folder}: checkpoint does not match the model: missing {sorted(info['missing_keys'])[:5]}, "
            f"unexpected {sorted(info['unexpected_keys'])[:5]}, mismatched {list(info.get('mismatched_keys') or [])[:5]}"
        )
    return model.eval()

