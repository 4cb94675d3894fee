"""Calibrate once, prune to any sparsity later: the saliency file.

A saliency file is one safetensors file holding, for every target layer ``P`` of a calibration,
``P.gamma`` (the saliency Γ), ``P.anchor_mean`` (the tie-break key) and ``P.first_step`` (the
batch at which each weight entered the path, int32), which is everything a mask needs
(mask_policy.MaskPolicy.keys). Its metadata (``"unipruning"``: a JSON string) names the model, a
fingerprint of its target weights, every layer's shape and the calibration settings, so a file
is refused, naming the layer, when it does not belong to the model it is applied to. The file
is written atomically with a checksum per tensor (checkpoint/files.py); reading it checks the
header, the metadata's fields, the checksums, every tensor's shape and that Γ and the anchor
are finite, so a damaged or edited file is refused before it decides any mask.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint.files import DamagedFileError, check_header, recorded_checksums, verify_tensor, write_safetensors

FORMAT = "unipruning-saliency"
VERSION = 1
PARAMS = ("gamma", "anchor_mean", "first_step")
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


def save_saliency(path: str | os.PathLike, layers: dict[str, LayerSaliency], metadata: dict, dtype: str = "float32") -> None:
    """Write the layers' saliency and ``metadata`` (JSON-serialisable) to ``path`` atomically.

    ``dtype`` ("float32" or "bfloat16") is the storage dtype of gamma and anchor_mean; masks are
    always taken from the stored values, so a bf16 file prunes the same way every time. A layer
    whose Γ or anchor is not finite (a diverged calibration) is refused by name.
    """
    if dtype not in STORAGE_DTYPES:
        raise SaliencyFileError(f"saliency dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    path = Path(path)
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.gamma"] = layer.gamma.to("cpu", STORAGE_DTYPES[dtype]).contiguous()
        tensors[f"{name}.anchor_mean"] = layer.anchor_mean.to("cpu", STORAGE_DTYPES[dtype]).contiguous()
        tensors[f"{name}.first_step"] = layer.first_step.to("cpu", torch.int32).contiguous()
        _check_finite(f"saliency of layer {name}", tensors[f"{name}.gamma"], tensors[f"{name}.anchor_mean"])
    info = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype,
        **metadata,
        "layers": {name: {"shape": list(layer.gamma.shape), "steps": layer.steps} for name, layer in layers.items()},
    }
    try:
        write_safetensors(path, tensors, {"unipruning": json.dumps(info)})
    except Exception as error:  # a full disk or file-size limit (safetensors raises its own type)
        raise SaliencyFileError(f"saliency file {path}: cannot be written ({error})") from None


def _check_finite(what: str, *tensors: torch.Tensor) -> None:
    bad = sum(int((~torch.isfinite(t)).sum()) for t in tensors)
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
    this version (naming the field that is wrong)."""
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
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("version") != VERSION:
        found = (info.get("format"), info.get("version")) if isinstance(info, dict) else (None, None)
        raise SaliencyFileError(
            f"saliency file {path}: format {found[0]!r} version {found[1]!r}, expected {FORMAT!r} version {VERSION}"
        )
    problem = _check_fields(info)
    if problem:
        raise SaliencyFileError(f"saliency file {path}: metadata 'unipruning': {problem}")
    return info


def load_saliency(
    path: str | os.PathLike, names: list[str] | None = None, device="cpu", info: dict | None = None
) -> tuple[dict[str, LayerSaliency], dict]:
    """The saliency of ``names`` (default: every layer in the file) and the file's metadata
    (``info``, when the caller already read it with ``read_metadata``). Each tensor is checked
    against its checksum and the shape in the metadata, Γ and the anchor for NaN / inf;
    SaliencyFileError naming the layer otherwise."""
    info = read_metadata(path) if info is None else info
    names = list(info["layers"]) if names is None else names
    layers = {}
    with safe_open(str(path), "pt", device="cpu") as handle:
        stored = list(handle.keys())
        try:
            recorded = recorded_checksums(path, handle.metadata(), stored)
        except DamagedFileError as error:
            raise SaliencyFileError(f"saliency file {error}") from None
        for name in names:
            missing = [f"{name}.{p}" for p in PARAMS if f"{name}.{p}" not in stored]
            if missing or name not in info["layers"]:
                raise SaliencyFileError(f"saliency file {path}: layer {name} has no tensors {missing} or no metadata entry")
            tensors = {p: handle.get_tensor(f"{name}.{p}") for p in PARAMS}
            shape = info["layers"][name]["shape"]
            for param, tensor in tensors.items():
                try:
                    verify_tensor(path, f"{name}.{param}", tensor, recorded)
                except DamagedFileError as error:
                    raise SaliencyFileError(f"saliency file {error}") from None
                if list(tensor.shape) != shape:
                    raise SaliencyFileError(
                        f"saliency file {path}: layer {name}: {param} has shape {list(tensor.shape)}, its metadata says {shape}"
                    )
            _check_finite(f"saliency file {path}: layer {name}", tensors["gamma"], tensors["anchor_mean"])
            record = LayerSaliency(tensors["gamma"], tensors["anchor_mean"], tensors["first_step"], info["layers"][name].get("steps"))
            layers[name] = record if str(device) == "cpu" else record.to(device, record.gamma.dtype)
    return layers, info


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
