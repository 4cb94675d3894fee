"""Sparse checkpoints on disk: rewrite a saved folder into a sparse format, and load it back.

``write_sparse`` turns the ``.weight`` of the pruned modules in every safetensors shard of a
folder that ``save_pretrained`` just wrote into the format's tensors, updates the shard index,
and adds ``quantization_config.sparsity_config`` to config.json. ``load_sparse`` reads such a
folder into a transformers model. Quantized (FP8 / INT8) checkpoints are compressed after
quantization, their scales stored beside; packed int4 weights stay as they are.
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

from .codecs import SUPPORTED_DTYPES, SparseFormatError, _nonzero, get_codec
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


def _stored_weight(tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor | None:
    """The module's ``.weight`` when the sparse codecs can hold it (not packed int4)."""
    weight = tensors.get(f"{module}.weight")
    return weight if weight is not None and weight.dtype in SUPPORTED_DTYPES else None


def write_sparse(
    folder: str | os.PathLike,
    module_names: Iterable[str],
    format: str,
    structure: str,
    targets: Iterable[str] = ("Linear",),
    ignore: Iterable[str] = (),
    global_sparsity: float | None = None,
) -> dict | None:
    """Rewrite the checkpoint in ``folder`` so the modules' weights are stored in ``format``.

    Quantized checkpoints are compressed after quantization, as compressed-tensors 0.14 did:
    an FP8 / INT8 ``P.weight`` becomes the format's tensors and ``P.weight_scale`` etc. stay
    beside it. A module stored packed (``P.weight_packed``, int4 W4A16) cannot be, and stays as
    it is; when no module could be compressed the config says ``format: "dense"`` with the
    structure, which is what llm-compressor 0.10 wrote for such models. The sparsity_config
    goes into config.json's ``quantization_config`` (created if absent, merged if quantized).
    Returns it, or None for ``format == "dense"`` (nothing written). Each shard is replaced
    atomically. ``global_sparsity`` (zeros over all parameters, as compressed-tensors computed
    it on the model) is counted over the stored floating-point tensors when not given.
    """
    folder = Path(folder)
    codec = get_codec(format)
    if codec.format == "dense":
        return None
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    wanted = set(module_names)
    if codec.sparsity_structure == "2:4":
        _check_24(folder, wanted)
    zeros = total = 0
    weight_map: dict[str, str] = {}
    compressed_any = False
    for shard in _shards(folder):
        with safe_open(str(shard), "pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(shard))
        if global_sparsity is None:
            for tensor in tensors.values():
                if tensor.is_floating_point():
                    zeros += int((tensor == 0).sum())
                    total += tensor.numel()
        here = [name for name in wanted if _stored_weight(tensors, name) is not None]
        compressed_any |= bool(here)
        compressed = compress_state_dict(tensors, here, codec.format) if here else tensors
        if here:
            _replace_file(shard, compressed, metadata)
        weight_map.update({key: shard.name for key in compressed})
    index = folder / INDEX_NAME
    if index.is_file() and compressed_any:
        data = json.loads(index.read_text())
        data["weight_map"] = dict(sorted(weight_map.items()))
        index.write_text(json.dumps(data, indent=2) + "\n")

    if global_sparsity is None:
        global_sparsity = zeros / total if total else 0.0
    stored_format = codec.format if compressed_any else "dense"
    result = sparsity_config(stored_format, global_sparsity, structure, list(targets), list(ignore))
    quantization = config.get("quantization_config") or {
        "quant_method": "compressed-tensors",
        "version": _compressed_tensors_version(),
        "transform_config": {},
    }
    quantization["sparsity_config"] = result
    config["quantization_config"] = quantization
    partial = config_path.with_name(".config.json.partial")
    partial.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(partial, config_path)
    return result


def _check_24(folder: Path, modules: set[str]) -> None:
    """Raise SparseFormatError naming every module whose stored weight breaks 2:4, before any write."""
    broken = []
    for shard in _shards(folder):
        with safe_open(str(shard), "pt") as handle:
            keys = set(handle.keys())
            for module in sorted(modules):
                if f"{module}.weight" not in keys:
                    continue
                weight = handle.get_tensor(f"{module}.weight")
                if weight.dtype not in SUPPORTED_DTYPES or weight.shape[-1] % 4:
                    continue
                if int(_nonzero(weight).reshape(weight.shape[0], -1, 4).sum(-1).max()) > 2:
                    broken.append(module)
    if broken:
        raise SparseFormatError(
            f"{len(broken)} module(s) no longer hold 2 non-zeros per 4 inputs after the later stages "
            f"(e.g. llm-compressor's GPTQModifier; use MaskedGPTQModifier to keep the mask): {broken[:5]}"
        )


def _compressed_tensors_version() -> str | None:
    try:
        from compressed_tensors import __version__
    except ImportError:
        return None
    return __version__


def load_sparse_state_dict(folder: str | os.PathLike, config: dict | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, sparse modules decompressed to ``P.weight``.

    ``config`` is the folder's sparsity_config when the caller already read it. Quantized
    modules come back as their stored FP8 / INT8 ``P.weight`` beside their scales.
    """
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    for shard in _shards(folder):
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
            rewrite = kwargs.get("save_compressed", True) and sparse_format != "dense" and _is_main_process()
            sparsity = _global_sparsity(model) if rewrite else None  # before llm-compressor compresses it in place
            original(save_directory, *args, **kwargs)
            if not rewrite:
                return
            structures = spec["structures"]
            structure = next(iter(structures)) if len(structures) == 1 else "unstructured"
            chosen = sparse_format or ("sparse-24-bitmask" if structure == "2:4" else "sparse-bitmask")
            from loguru import logger

            try:
                written = write_sparse(
                    save_directory, spec["modules"], chosen, structure, spec["targets"], spec["ignore"], sparsity
                )
            except SparseFormatError as error:
                logger.warning(f"UniPruning: {save_directory} left dense with zeros: {error}")
                return
            if written is not None and written["format"] == "dense":
                logger.info(
                    "UniPruning: the pruned weights are stored packed (int4), which the sparse formats "
                    f"cannot hold; {save_directory} records the {structure} sparsity with format 'dense'"
                )

        model.save_pretrained = save_pretrained
        model._unipruning_sparse = spec
    spec["modules"].update(module_names)
    spec["structures"].add(structure)
    spec["targets"] = list(dict.fromkeys([*spec["targets"], *targets]))
    spec["ignore"] = list(dict.fromkeys([*spec["ignore"], *ignore]))


def _global_sparsity(model: torch.nn.Module) -> float | None:
    """Zeros over all parameters of the model, or None when some are not materialised."""
    zeros = total = 0
    for parameter in model.parameters():
        if parameter.is_meta:
            return None
        zeros += int((parameter == 0).sum())
        total += parameter.numel()
    return zeros / total if total else None


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
