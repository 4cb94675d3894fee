"""Read a checkpoint folder back: shards, its ``sparsity_config``, and ``load_sparse``.

Every shard's header is checked and its checksums (files.py) verified before any tensor is
used, so a damaged file is refused by name instead of loading wrong weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .files import DamagedFileError, check_header, read_safetensors
from .registry import SparseFormatError, get_codec
from .state_dict import decompress_state_dict

__all__ = ["INDEX_NAME", "load_sparse", "load_sparse_state_dict", "shards", "sparse_config_of"]

INDEX_NAME = "model.safetensors.index.json"


def _json(path: Path) -> dict:
    """A JSON object file; DamagedFileError naming it when it does not parse."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise DamagedFileError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise DamagedFileError(f"{path}: not a JSON object")
    return value


def shards(folder: Path) -> list[Path]:
    """The folder's safetensors shards (from the index when there is one)."""
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = _json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise DamagedFileError(f"{index}: has no weight_map")
        names = sorted(set(weight_map.values()))
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing[:3]}")
        return [folder / name for name in names]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"{folder}: no *.safetensors file")
    return found


def sparse_config_of(folder: str | os.PathLike) -> dict | None:
    """The ``sparsity_config`` of a checkpoint folder's config.json, or None; SparseFormatError
    naming config.json when its format is not one we read."""
    path = Path(folder) / "config.json"
    sparse = (_json(path).get("quantization_config") or {}).get("sparsity_config") or None
    if sparse is not None:
        try:
            get_codec(sparse.get("format") if isinstance(sparse, dict) else None)
        except SparseFormatError as error:
            raise SparseFormatError(f"{path}: quantization_config.sparsity_config: {error}") from None
    return sparse


def load_sparse_state_dict(folder: str | os.PathLike, config: dict | None = None, verify: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, sparse modules decompressed to ``P.weight``.

    ``config`` is the folder's sparsity_config when the caller already read it. Quantized
    modules come back as their stored FP8 / INT8 ``P.weight`` beside their scales. ``verify``
    checks each tensor against the checksum its shard records (DamagedFileError naming both).
    """
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards(folder):
        tensors.update(read_safetensors(shard, verify)[0])
    config = config or sparse_config_of(folder)
    return decompress_state_dict(tensors, config["format"]) if config else tensors


def load_sparse(folder: str | os.PathLike, dtype: torch.dtype | None = None, trust_remote_code: bool = False, verify: bool = True):
    """Load a causal LM saved by ``write_sparse`` (or a plain one), sparse tensors decompressed.

    transformers and compressed-tensors 0.19 no longer read the sparse formats, so the state
    dict is decompressed here and handed to ``from_pretrained`` with the sparsity_config
    removed from the model config: an unquantized model comes back with dense weights (zeros
    included); a quantized one goes through transformers' compressed-tensors integration as
    any FP8 / INT8 / W4A16 checkpoint does. Raises ValueError naming the tensors when the
    checkpoint does not match the architecture, DamagedFileError naming the file and tensor when
    a shard is truncated or fails its checksums (``verify=False`` skips the checksums).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    sparse = sparse_config_of(folder)
    if sparse is None:
        for shard in shards(folder):
            check_header(shard)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto", trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    quantization = dict(config.quantization_config)
    quantization.pop("sparsity_config", None)
    if quantization.get("config_groups"):
        config.quantization_config = quantization
    else:
        del config.quantization_config
    state_dict = load_sparse_state_dict(folder, sparse, verify)
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

