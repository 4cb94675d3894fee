"""Model-level compress / decompress of a state dict, and the config.json ``sparsity_config``.

``compress_state_dict`` replaces ``P.weight`` of every listed module ``P`` by the tensors of the
format (``P.shape``, ``P.compressed``, ``P.bitmask`` and, for sparse-bitmask, ``P.row_offsets``,
in compressed-tensors' order, at the place of ``P.weight``); every other key (biases,
``weight_scale``, ``input_scale``, zero points, other modules) is passed through unchanged.
``decompress_state_dict`` reverses it, finding the modules by their ``P.bitmask`` key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import torch

from .registry import FORMATS, Codec, SparseFormatError, get_codec

__all__ = [
    "FORMATS",
    "compress_state_dict",
    "decompress_state_dict",
    "sparsity_config",
    "compressed_module_names",
]

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def _key(prefix: str, param: str) -> str:
    return f"{prefix}.{param}" if prefix else param


def compress_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    module_names: Iterable[str],
    format: str,
    *,
    prune: bool = False,
) -> dict[str, torch.Tensor]:
    """New state dict with the ``.weight`` of each module in ``module_names`` compressed.

    ``format="dense"`` returns an unchanged (shallow) copy. A listed module without a
    ``.weight`` key, or a compressed key that already exists, is a SparseFormatError naming it.
    ``prune`` is passed to the sparse-24-bitmask codec (see ``compress_sparse_24_bitmask``).
    """
    codec = get_codec(format)
    modules = list(dict.fromkeys(module_names))
    if codec.format == "dense":
        return dict(state_dict)
    for prefix in modules:
        if _key(prefix, "weight") not in state_dict:
            raise SparseFormatError(f"module {prefix!r}: no {_key(prefix, 'weight')!r} in the state dict to compress")
        clashes = [_key(prefix, p) for p in codec.param_names if _key(prefix, p) in state_dict]
        if clashes:
            raise SparseFormatError(f"module {prefix!r}: the state dict already holds {clashes}")
    by_weight = {_key(prefix, "weight"): prefix for prefix in modules}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        prefix = by_weight.get(key)
        if prefix is None:
            out[key] = value
            continue
        kwargs = {"prune": prune} if codec.format == "sparse-24-bitmask" else {}
        for param, tensor in codec.compress(value, name=prefix, **kwargs).items():
            out[_key(prefix, param)] = tensor
    return out


def compressed_module_names(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Prefixes P with a ``P.bitmask`` key, in state-dict order."""
    names = []
    for key in state_dict:
        if key == "bitmask":
            names.append("")
        elif key.endswith(".bitmask"):
            names.append(key[: -len(".bitmask")])
    return names


def decompress_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    format: str,
    *,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """New state dict with every compressed module ``P`` turned back into ``P.weight``.

    ``P.weight`` takes the place of the first of P's compressed keys. ``dtype`` (optional) is
    the expected dtype of the stored values. Missing tensors or a ``P.weight`` next to
    ``P.bitmask`` are SparseFormatErrors naming P.
    """
    codec: Codec = get_codec(format)
    if codec.format == "dense":
        return dict(state_dict)
    modules = compressed_module_names(state_dict)
    owner: dict[str, str] = {}
    for prefix in modules:
        if _key(prefix, "weight") in state_dict:
            raise SparseFormatError(
                f"module {prefix!r}: holds both {_key(prefix, 'weight')!r} and compressed tensors"
            )
        foreign = [
            _key(prefix, p)
            for other in FORMATS.values()
            for p in other.param_names
            if p not in codec.param_names and p != "weight" and _key(prefix, p) in state_dict
        ]
        if foreign:
            raise SparseFormatError(
                f"module {prefix!r}: {foreign} are not part of format {codec.format!r}; "
                "is the checkpoint in another sparse format?"
            )
        for param in codec.param_names:
            if _key(prefix, param) in state_dict:
                owner[_key(prefix, param)] = prefix
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for key, value in state_dict.items():
        prefix = owner.get(key)
        if prefix is None:
            out[key] = value
            continue
        if prefix in done:
            continue
        done.add(prefix)
        tensors = {p: state_dict[_key(prefix, p)] for p in codec.param_names if _key(prefix, p) in state_dict}
        out[_key(prefix, "weight")] = codec.decompress(tensors, dtype=dtype, name=prefix)
    return out


def _structure(structure: str | None) -> str:
    text = "unstructured" if structure is None else str(structure).strip().lower()
    if text == "unstructured":
        return text
    match = _NM.match(text)
    if not match:
        raise SparseFormatError(f"sparsity_structure must be 'unstructured' or 'N:M', got {structure!r}")
    return f"{int(match.group(1))}:{int(match.group(2))}"


def _names(value: str | Sequence[str] | None, field: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    names = list(value)
    if not all(isinstance(v, str) for v in names):
        raise SparseFormatError(f"sparsity_config {field} must be strings, got {names!r}")
    return names


def sparsity_config(
    format: str,
    global_sparsity: float,
    structure: str | None,
    targets: str | Sequence[str] = ("Linear",),
    ignore: str | Sequence[str] | None = None,
) -> dict:
    """The ``quantization_config.sparsity_config`` dict of config.json.

    Keys, in this order: format, global_sparsity, sparsity_structure, targets, ignore,
    registry_requires_subclass (false). compressed-tensors writes config.json with
    ``sort_keys=True``, so the order on disk is alphabetical either way.
    """
    fmt = get_codec(format).format
    gs = float(global_sparsity)
    if not 0.0 <= gs <= 1.0:
        raise SparseFormatError(f"global_sparsity must be in [0, 1], got {global_sparsity!r}")
    struct = _structure(structure)
    required = FORMATS[fmt].sparsity_structure
    if required is not None and struct != required:
        raise SparseFormatError(f"format {fmt!r} holds {required!r} sparsity only, got structure {structure!r}")
    return {
        "format": fmt,
        "global_sparsity": gs,
        "sparsity_structure": struct,
        "targets": _names(targets, "targets"),
        "ignore": _names(ignore, "ignore"),
        "registry_requires_subclass": False,
    }

