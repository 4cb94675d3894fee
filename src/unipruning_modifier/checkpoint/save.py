"""Write sparse checkpoints: a pruned model's ``save_pretrained`` output rewritten into a sparse format.

``mark_sparse`` records, on a model a pruning modifier finished, which modules it pruned and with
which structure; ``save_sparse(model, folder)`` (and the model's ``save_pretrained``, which it
wraps, so ``oneshot(output_dir=...)`` works too) then writes the checkpoint and rewrites the
pruned modules' ``.weight`` in every shard into the format's tensors (``write_sparse``), updates
the shard index and adds ``quantization_config.sparsity_config`` to config.json. Quantized
(FP8 / INT8) checkpoints are compressed after quantization, their scales stored beside; packed
int4 weights stay as they are.
"""

from __future__ import annotations

import functools
import json
import os
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .bitmask import nonzero
from .files import atomic_write, read_safetensors, write_safetensors
from .load import INDEX_NAME, shards
from .registry import SUPPORTED_DTYPES, SparseFormatError, get_codec
from .state_dict import compress_state_dict, sparsity_config

__all__ = ["is_sparse", "mark_sparse", "save_sparse", "write_sparse"]


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
    Returns it, or None for ``format == "dense"`` (nothing written). Every shard is rewritten,
    atomically, with a checksum of each tensor in its metadata (files.py); so are the index and
    config.json. ``global_sparsity`` (zeros over all parameters, as compressed-tensors computed
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
    for shard in shards(folder):
        tensors, metadata = read_safetensors(shard)
        if global_sparsity is None:
            for tensor in tensors.values():
                if tensor.is_floating_point():
                    zeros += int(torch.count_nonzero(tensor == 0))  # not .sum(): an int64 copy; fp8 has no count_nonzero
                    total += tensor.numel()
        here = [name for name in wanted if _stored_weight(tensors, name) is not None]
        compressed_any |= bool(here)
        compressed = compress_state_dict(tensors, here, codec.format) if here else tensors
        write_safetensors(shard, compressed, metadata)
        weight_map.update({key: shard.name for key in compressed})
    index = folder / INDEX_NAME
    if index.is_file() and compressed_any:
        data = json.loads(index.read_text())
        data["weight_map"] = dict(sorted(weight_map.items()))
        atomic_write(index, lambda partial: partial.write_text(json.dumps(data, indent=2) + "\n"))

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
    atomic_write(config_path, lambda partial: partial.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return result


def _check_24(folder: Path, modules: set[str]) -> None:
    """Raise SparseFormatError naming every module whose stored weight breaks 2:4, before any write."""
    broken = []
    for shard in shards(folder):
        with safe_open(str(shard), "pt") as handle:
            keys = set(handle.keys())
            for module in sorted(modules):
                if f"{module}.weight" not in keys:
                    continue
                weight = handle.get_tensor(f"{module}.weight")
                if weight.dtype not in SUPPORTED_DTYPES or weight.shape[-1] % 4:
                    continue
                if int(nonzero(weight).reshape(weight.shape[0], -1, 4).sum(-1).max()) > 2:
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


@dataclass
class SparseRecord:
    """What ``save_sparse`` needs to know about a pruned model."""

    modules: set[str] = field(default_factory=set)
    structures: set[str] = field(default_factory=set)
    targets: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)

    @property
    def structure(self) -> str:
        return next(iter(self.structures)) if len(self.structures) == 1 else "unstructured"


_RECORDS: "weakref.WeakKeyDictionary[torch.nn.Module, SparseRecord]" = weakref.WeakKeyDictionary()


def mark_sparse(
    model: torch.nn.Module,
    module_names: Iterable[str],
    structure: str,
    targets: Iterable[str],
    ignore: Iterable[str],
) -> None:
    """Record that ``module_names`` of ``model`` were pruned with ``structure`` ("2:4", "unstructured"...).

    Later calls add modules. The model's ``save_pretrained`` is wrapped once, so that it calls
    ``save_sparse`` (opt out per call with ``sparse_format="dense"`` or ``save_compressed=False``).
    """
    record = _RECORDS.get(model)
    if record is None:
        record = _RECORDS[model] = SparseRecord()
        _wrap_save_pretrained(model)
    record.modules.update(module_names)
    record.structures.add(structure)
    record.targets = list(dict.fromkeys([*record.targets, *targets]))
    record.ignore = list(dict.fromkeys([*record.ignore, *ignore]))


def is_sparse(model: torch.nn.Module) -> bool:
    """True when a UniPruning modifier pruned ``model`` (``save_sparse`` writes a sparse format)."""
    return model in _RECORDS


def save_sparse(model: torch.nn.Module, folder: str | os.PathLike, sparse_format: str | None = None, **kwargs) -> dict | None:
    """``model.save_pretrained(folder, **kwargs)``, the pruned modules stored in a sparse format.

    ``sparse_format``: None picks sparse-24-bitmask for 2:4 and sparse-bitmask otherwise;
    "dense" keeps zeros in dense tensors. A model that was not pruned is saved as it is. Returns
    the sparsity_config written, or None.
    """
    if not is_sparse(model):
        model.save_pretrained(folder, **kwargs)
        return None
    return model.save_pretrained(folder, sparse_format=sparse_format or "auto", **kwargs)


def _wrap_save_pretrained(model: torch.nn.Module) -> None:
    original = model.save_pretrained

    @functools.wraps(original)
    def save_pretrained(save_directory, *args, sparse_format: str | None = None, **kwargs):
        # in a process group every rank calls this (llm-compressor's save is collective too):
        # rank 0 rewrites the folder, and no rank returns before it is done. A rank that fails
        # raises at once, without the barrier: the others may wait in one of llm-compressor's
        # collectives, which a barrier would never match; its exit makes torchrun stop them
        written = _save(save_directory, *args, sparse_format=sparse_format, **kwargs)
        _barrier()
        return written

    def _save(save_directory, *args, sparse_format: str | None = None, **kwargs):
        rewrite = kwargs.get("save_compressed", True) and sparse_format != "dense" and _is_main_process()
        sparsity = _global_sparsity(model) if rewrite else None  # before llm-compressor compresses it in place
        original(save_directory, *args, **kwargs)
        if not rewrite:
            return None
        record = _RECORDS[model]
        structure = record.structure
        chosen = sparse_format if sparse_format not in (None, "auto") else (
            "sparse-24-bitmask" if structure == "2:4" else "sparse-bitmask"
        )
        from loguru import logger

        try:
            written = write_sparse(save_directory, record.modules, chosen, structure, record.targets, record.ignore, sparsity)
        except SparseFormatError as error:
            logger.warning(f"UniPruning: {save_directory} left dense with zeros: {error}")
            return None
        if written is not None and written["format"] == "dense":
            logger.info(
                "UniPruning: the pruned weights are stored packed (int4), which the sparse formats "
                f"cannot hold; {save_directory} records the {structure} sparsity with format 'dense'"
            )
        return written

    model.save_pretrained = save_pretrained


def _global_sparsity(model: torch.nn.Module) -> float | None:
    """Zeros over all parameters of the model, or None when some are not materialised."""
    zeros = total = 0
    for parameter in model.parameters():
        if parameter.is_meta:
            return None
        zeros += int(torch.count_nonzero(parameter == 0))
        total += parameter.numel()
    return zeros / total if total else None


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
