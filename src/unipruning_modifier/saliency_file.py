"""Calibrate once, prune to any sparsity later: the saliency file.

A saliency file is one safetensors file holding, for every target layer ``P`` of a calibration,
what its masks need in the compact form of saliency_encoding.py (version 2, about 1.5 bytes per
weight): ``P.rank`` (bit-packed ranks within rows), ``P.row_counts``, ``P.late``,
``P.gamma_histogram`` and ``P.anchor_histogram``. Its metadata (``"unipruning"``: a JSON string)
names the model, a fingerprint of its target weights, every layer's shape and the calibration
settings, so a file is refused, naming the layer, when it does not belong to the model it is
applied to. The file is written atomically with a checksum per tensor (checkpoint/files.py);
reading it checks the header, the metadata's fields, the checksums and every tensor's shape and
range, so a damaged or edited file is refused before it decides any mask. Version 1 files (fp32
or bf16 Γ and anchor mean and int32 first_step, 12 or 8 bytes per weight) are still read: their
Γ and anchor are checked to be finite and encoded as version 2 on reading.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint.files import DamagedFileError, check_header, recorded_checksums, verify_tensor, write_safetensors
from .saliency_encoding import GRID, EncodedSaliency, count_bits, encode, rank_bits

FORMAT = "unipruning-saliency"
VERSION = 2
PARAMS = ("rank", "row_counts", "late", "gamma_histogram", "anchor_histogram")
V1_PARAMS = ("gamma", "anchor_mean", "first_step")
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_SAMPLES_PER_LAYER = 4096


class SaliencyFileError(ValueError):
    """A saliency file that cannot be read, or does not match the model."""


@dataclass
class LayerSaliency:
    """What a mask of one layer needs: Γ, the mean anchor, and first_step."""

    gamma: torch.Tensor
    anchor_mean: torch.Tensor
    first_step: torch.Tensor | None  # None where the calibration did not track it
    steps: int | None = None

    def to(self, device="cpu", dtype: torch.dtype = torch.float32) -> "LayerSaliency":
        """A copy with Gamma and the anchor mean in ``dtype`` on ``device``."""
        first_step = None if self.first_step is None else self.first_step.to(device)
        return LayerSaliency(self.gamma.to(device, dtype), self.anchor_mean.to(device, dtype), first_step, self.steps)


def model_fingerprint(modules: dict[str, torch.nn.Module]) -> str:
    """sha256 over every layer's name, shape and an evenly spaced sample of its weight.

    Cheap (a few thousand values per layer, onloaded one layer at a time when offloaded) yet
    different for two checkpoints of the same architecture; the weights must be the dense ones
    the saliency was calibrated on.
    """
    from compressed_tensors.utils import align_module_device

    digest = hashlib.sha256()
    for name in sorted(modules):
        with align_module_device(modules[name]):
            weight = modules[name].weight.detach()
            flat = weight.reshape(-1)
            step = max(1, flat.numel() // _SAMPLES_PER_LAYER)
            sample = flat[::step][:_SAMPLES_PER_LAYER].to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(weight.shape)}:".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def save_saliency(path: str | os.PathLike, layers: dict[str, LayerSaliency], metadata: dict) -> None:
    """Write the layers' saliency (encoded, saliency_encoding.py) and ``metadata``
    (JSON-serialisable) to ``path`` atomically. The ranks follow the records' own values (fp32,
    or bf16 with ``saliency_dtype: bfloat16``). A layer whose Γ or anchor is not finite (a
    diverged calibration) is refused by name."""
    path = Path(path)
    tensors, entries = {}, {}
    for name, layer in layers.items():
        _check_finite(f"saliency of layer {name}", layer.gamma, layer.anchor_mean)
        encoded = encode(layer.gamma, layer.anchor_mean, layer.first_step, layer.steps)
        tensors.update({f"{name}.{param}": tensor.contiguous() for param, tensor in encoded.tensors().items()})
        entries[name] = {"shape": list(encoded.shape), "steps": layer.steps, "first_step_mode": encoded.first_step_mode}
    dtype = next((str(layer.gamma.dtype).removeprefix("torch.") for layer in layers.values()), "float32")
    info = {"format": FORMAT, "version": VERSION, "dtype": dtype, **metadata, "layers": entries}
    try:
        write_safetensors(path, tensors, {"unipruning": json.dumps(info)})
    except Exception as error:  # a full disk or file-size limit (safetensors raises its own type)
        raise SaliencyFileError(f"saliency file {path}: cannot be written ({error})") from None


def estimated_bytes(shapes: list[tuple[int, int]]) -> int:
    """An upper bound of the size of a saliency file of layers of these shapes (the first_step
    exceptions counted as 1% of the weights, the histograms as full)."""
    per_layer = [
        math.ceil(out * columns * rank_bits(columns) / 8) + math.ceil(out * (GRID - 1) * count_bits(columns) / 8)
        + out * columns * 8 // 100 + 2 * 8 * 32768
        for out, columns in shapes
    ]
    return sum(per_layer) + 4096 * len(shapes)


def _check_finite(what: str, *tensors: torch.Tensor) -> None:
    bad = sum(int(torch.count_nonzero(~torch.isfinite(t))) for t in tensors)
    if bad:
        raise SaliencyFileError(f"{what}: {bad} NaN/inf values (calibration diverged, or the file was altered); calibrate again")


def _check_fields(info: dict) -> str | None:
    """What is wrong with a saliency file's metadata fields, or None."""
    layers, calibration = info.get("layers"), info.get("calibration")
    if not isinstance(layers, dict) or not layers:
        return "'layers' must map each layer to its shape"
    for name, entry in layers.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and v > 0 for v in shape)):
            return f"layer {name}: 'shape' must be [out, in], got {shape!r}"
        if info.get("version") == VERSION and not isinstance(entry.get("first_step_mode"), int):
            return f"layer {name}: 'first_step_mode' must be an integer, got {entry.get('first_step_mode')!r}"
    if not isinstance(calibration, dict):
        return "'calibration' (the settings the file was calibrated with) is missing"
    for key in ("targets", "ignore"):
        if not (isinstance(calibration.get(key), list) and all(isinstance(v, str) for v in calibration[key])):
            return f"calibration.{key} must be a list of layer names or patterns, got {calibration.get(key)!r}"
    if not isinstance(info.get("fingerprint"), str):
        return "'fingerprint' is missing"
    return None


def read_metadata(path: str | os.PathLike) -> dict:
    """The file's metadata; SaliencyFileError when it is not a well-formed saliency file of
    version 1 or 2 (naming the field that is wrong, or the version)."""
    path = Path(path)
    if not path.is_file():
        raise SaliencyFileError(f"saliency file {path}: no such file")
    try:
        raw = (check_header(path).get("__metadata__") or {}).get("unipruning")
    except DamagedFileError as error:
        raise SaliencyFileError(f"saliency file {error}") from None
    if raw is None:
        raise SaliencyFileError(f"saliency file {path}: no 'unipruning' metadata; not written by UniPruning")
    try:
        info = json.loads(raw)
    except ValueError as error:
        raise SaliencyFileError(f"saliency file {path}: metadata 'unipruning' is not JSON ({error})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("version") not in (1, VERSION):
        found = (info.get("format"), info.get("version")) if isinstance(info, dict) else (None, None)
        raise SaliencyFileError(
            f"saliency file {path}: format {found[0]!r} version {found[1]!r}; this unipruning_modifier reads {FORMAT!r} "
            f"versions 1 and {VERSION} (a newer version needs a newer unipruning_modifier)"
        )
    problem = _check_fields(info)
    if problem:
        raise SaliencyFileError(f"saliency file {path}: metadata 'unipruning': {problem}")
    return info


def load_saliency(
    path: str | os.PathLike, names: list[str] | None = None, info: dict | None = None
) -> tuple[dict[str, EncodedSaliency], dict]:
    """The saliency of ``names`` (default: every layer in the file), encoded (a version 1 file is
    encoded on reading), and the file's metadata (``info``, when the caller already read it with
    ``read_metadata``). Each tensor is checked against its checksum and the metadata (shape,
    range), a version 1 file's Γ and anchor for NaN / inf; SaliencyFileError naming the layer."""
    info = read_metadata(path) if info is None else info
    names = list(info["layers"]) if names is None else names
    params = PARAMS if info["version"] == VERSION else V1_PARAMS
    layers = {}
    with safe_open(str(path), "pt", device="cpu") as handle:
        stored = list(handle.keys())
        try:
            recorded = recorded_checksums(path, handle.metadata(), stored)
        except DamagedFileError as error:
            raise SaliencyFileError(f"saliency file {error}") from None
        for name in names:
            missing = [f"{name}.{p}" for p in params if f"{name}.{p}" not in stored]
            if missing or name not in info["layers"]:
                raise SaliencyFileError(f"saliency file {path}: layer {name} has no tensors {missing} or no metadata entry")
            tensors = {p: handle.get_tensor(f"{name}.{p}") for p in params}
            for param, tensor in tensors.items():
                try:
                    verify_tensor(path, f"{name}.{param}", tensor, recorded)
                except DamagedFileError as error:
                    raise SaliencyFileError(f"saliency file {error}") from None
            entry = info["layers"][name]
            problem = (_check_v2 if params is PARAMS else _check_v1)(tensors, entry["shape"])
            if problem:
                raise SaliencyFileError(f"saliency file {path}: layer {name}: {problem}")
            if params is PARAMS:
                layers[name] = EncodedSaliency(tuple(entry["shape"]), first_step_mode=entry["first_step_mode"], steps=entry.get("steps"), **tensors)
            else:
                layers[name] = encode(tensors["gamma"], tensors["anchor_mean"], tensors["first_step"], entry.get("steps"))
    return layers, info


def _check_v1(tensors: dict[str, torch.Tensor], shape: list[int]) -> str | None:
    """What is wrong with a version 1 layer's tensors (shape, NaN / inf), or None."""
    for param, tensor in tensors.items():
        if list(tensor.shape) != shape:
            return f"{param} has shape {list(tensor.shape)}, its metadata says {shape}"
    bad = sum(int(torch.count_nonzero(~torch.isfinite(tensors[p]))) for p in ("gamma", "anchor_mean"))
    if bad:
        return f"{bad} NaN/inf values (calibration diverged, or the file was altered); calibrate again"
    return None


def _check_v2(tensors: dict[str, torch.Tensor], shape: list[int]) -> str | None:
    """What is wrong with a version 2 layer's tensors (shapes, dtypes, value ranges), or None."""
    out, columns = shape
    expected = {
        "rank": math.ceil(out * columns * rank_bits(columns) / 8),
        "row_counts": math.ceil(out * (GRID - 1) * count_bits(columns) / 8),
    }
    for param, length in expected.items():
        if list(tensors[param].shape) != [length] or tensors[param].dtype != torch.uint8:
            return f"{param} is {tensors[param].dtype} {list(tensors[param].shape)}, expected torch.uint8 [{length}] for shape {shape}"
    for param in ("late", "gamma_histogram", "anchor_histogram"):
        tensor = tensors[param]
        if tensor.dim() != 2 or tensor.shape[1] != 2 or tensor.dtype != torch.int32:
            return f"{param} is {tensor.dtype} {list(tensor.shape)}, expected int32 [n, 2]"
    late = tensors["late"][:, 0]
    if late.numel() and (int(late.min()) < 0 or int(late.max()) >= out * columns):
        return f"late holds indices outside the layer's {out * columns} weights"
    for param in ("gamma_histogram", "anchor_histogram"):
        codes, counts = tensors[param][:, 0], tensors[param][:, 1]
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << 15 or int(counts.min()) < 0):
            return f"{param} holds codes outside [0, 32768) or negative counts"
        if int(counts.to(torch.int64).sum()) != out * columns:
            return f"{param} counts {int(counts.to(torch.int64).sum())} weights, the layer has {out * columns}"
    return None


def check_matches(info: dict, targets: list[str], linear: dict[str, torch.nn.Module], path: str | os.PathLike) -> None:
    """Refuse a file made for another model, naming the first offending layer.

    ``targets`` are the layers to prune now (each must be in the file), ``linear`` the model's
    (still dense) Linear layers by name: every layer of the file must exist there with its
    shape, and the fingerprint over the file's layers must be the file's.
    """
    layers = info["layers"]
    for name in targets:
        if name not in layers:
            raise SaliencyFileError(
                f"saliency file {path}: has no saliency for layer {name} (it covers {len(layers)} layers, "
                f"e.g. {next(iter(layers), None)}); calibrate with the same targets/ignore"
            )
    for name, entry in layers.items():
        if name not in linear:
            raise SaliencyFileError(f"saliency file {path}: layer {name} of the file is not a Linear layer of this model")
        shape = list(linear[name].weight.shape)
        if shape != list(entry["shape"]):
            raise SaliencyFileError(
                f"saliency file {path}: layer {name} has shape {shape} in the model but {entry['shape']} in the file"
            )
    fingerprint = model_fingerprint({name: linear[name] for name in layers})
    if info.get("fingerprint") != fingerprint:
        raise SaliencyFileError(
            f"saliency file {path}: calibrated on another model ({info.get('model')!r}, fingerprint "
            f"{str(info.get('fingerprint'))[:12]}...) than this one (fingerprint {fingerprint[:12]}...); "
            "the weights of its layers differ"
        )
