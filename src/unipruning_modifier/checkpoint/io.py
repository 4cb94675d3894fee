"""Sparse checkpoints on disk: rewrite a saved folder into a sparse format, and load it back.

``write_sparse`` turns the ``.weight`` of the pruned modules in every safetensors shard of a
folder that ``save_pretrained`` just wrote into the format's tensors, updates the shard index,
and adds ``quantization_config.sparsity_config`` to config.json. ``load_sparse`` reads such a
folder into a transformers model (decompressed, dense weights with zeros). Unquantized
checkpoints only for now: a folder that already carries a quantization config is left dense.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .codecs import get_codec
from .state_dict import compress_state_dict, decompress_state_dict, sparsity_config

INDEX_NAME = "model.safetensors.index.json"


def _shards(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{folder}: no *.safetensors file to rewrite")
    return shards


def _replace_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None) -> None:
    partial = path.with_name(f".{path.name}.partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata=metadata or {"format": "pt"})
    os.chmod(partial, path.stat().st_mode)  # keep the permissions the shard had
    os.replace(partial, path)


def sparse_config_of(folder: str | os.PathLike) -> dict | None:
    """The ``sparsity_config`` of a checkpoint folder's config.json, or None."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("sparsity_config") or None


def write_sparse(
    folder: str | os.PathLike,
    module_names: Iterable[str],
    format: str,
    structure: str,
    targets: Iterable[str] = ("Linear",),
    ignore: Iterable[str] = (),
) -> dict | None:
    """Rewrite the checkpoint in ``folder`` so the modules' weights are stored in ``format``.

    Returns the sparsity_config written to config.json, or None when nothing was written
    (``format == "dense"``, or the checkpoint is quantized, which this does not handle yet).
    Each shard is replaced atomically; ``global_sparsity`` is the fraction of zeros over all
    parameters, as compressed-tensors computed it.
    """
    folder = Path(folder)
    codec = get_codec(format)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if codec.format == "dense" or config.get("quantization_config"):
        return None
    wanted = set(module_names)
    zeros = total = 0
    weight_map: dict[str, str] = {}
    for shard in _shards(folder):
        with safe_open(str(shard), "pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(shard))
        for tensor in tensors.values():
            if tensor.is_floating_point():
                zeros += int((tensor == 0).sum())
                total += tensor.numel()
        here = [name for name in wanted if f"{name}.weight" in tensors]
        compressed = compress_state_dict(tensors, here, codec.format)
        _replace_file(shard, compressed, metadata)
        weight_map.update({key: shard.name for key in compressed})
    index = folder / INDEX_NAME
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = dict(sorted(weight_map.items()))
        index.write_text(json.dumps(data, indent=2) + "\n")

    result = sparsity_config(codec.format, zeros / total if total else 0.0, structure, list(targets), list(ignore))
    try:
        from compressed_tensors import __version__ as version
    except ImportError:
        version = None
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "version": version,
        "sparsity_config": result,
        "transform_config": {},
    }
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return result


def load_sparse_state_dict(folder: str | os.PathLike, config: dict | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, sparse modules decompressed to ``P.weight``.

    ``config`` is the folder's sparsity_config when the caller already read it.
    """
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    for shard in _shards(folder):
        tensors.update(load_file(str(shard)))
    config = config or sparse_config_of(folder)
    return decompress_state_dict(tensors, config["format"]) if config else tensors


def load_sparse(folder: str | os.PathLike, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """Load a causal LM saved by ``write_sparse`` (or a plain one) with dense weights.

    transformers and compressed-tensors 0.19 no longer read the sparse formats, so the model
    is built from its config and given the decompressed state dict. Raises ValueError naming
    the tensors when the checkpoint does not match the architecture.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    sparse = sparse_config_of(folder)
    if sparse is None:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto", trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state_dict = load_sparse_state_dict(folder, sparse)
    stored = next(v.dtype for v in state_dict.values() if v.is_floating_point())
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or stored, trust_remote_code=trust_remote_code)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{folder}: checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.eval()


def enable_sparse_save(
    model: torch.nn.Module,
    module_names: Iterable[str],
    structure: str,
    targets: Iterable[str],
    ignore: Iterable[str],
) -> None:
    """Make ``model.save_pretrained`` write the pruned modules in a sparse format.

    Wraps the (llm-compressor-wrapped) ``save_pretrained`` once per model; later calls add
    modules. 2:4 modules are written as sparse-24-bitmask, anything else as sparse-bitmask.
    Opt out per call with ``save_pretrained(dir, sparse_format="dense")`` (or
    ``save_compressed=False``).
    """
    spec = getattr(model, "_unipruning_sparse", None)
    if spec is None:
        spec = {"modules": set(), "structures": set(), "targets": [], "ignore": []}
        original = model.save_pretrained

        @functools.wraps(original)
        def save_pretrained(save_directory, *args, sparse_format: str | None = None, **kwargs):
            original(save_directory, *args, **kwargs)
            if not kwargs.get("save_compressed", True) or not _is_main_process():
                return
            structures = spec["structures"]
            structure = next(iter(structures)) if len(structures) == 1 else "unstructured"
            chosen = sparse_format or ("sparse-24-bitmask" if structure == "2:4" else "sparse-bitmask")
            written = write_sparse(save_directory, spec["modules"], chosen, structure, spec["targets"], spec["ignore"])
            if written is None and chosen != "dense":
                from loguru import logger

                logger.warning("UniPruning: quantized checkpoint written dense with zeros (sparse + quantized formats are not supported yet)")

        model.save_pretrained = save_pretrained
        model._unipruning_sparse = spec
    spec["modules"].update(module_names)
    spec["structures"].add(structure)
    spec["targets"] = list(dict.fromkeys([*spec["targets"], *targets]))
    spec["ignore"] = list(dict.fromkeys([*spec["ignore"], *ignore]))


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
