"""Calibrate once, prune to any sparsity later: the saliency file.

A saliency file is one safetensors file holding, for every target layer ``P`` of a calibration,
``P.gamma`` (the saliency Γ), ``P.anchor_mean`` (the tie-break key) and ``P.first_step`` (the
batch at which each weight entered the path, int32), which is everything a mask needs
(mask_policy.MaskPolicy.keys). Its metadata (``"unipruning"``: a JSON string) names the model, a
fingerprint of its target weights, every layer's shape and the calibration settings, so a file
is refused, naming the layer, when it does not belong to the model it is applied to.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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
    always taken from the stored values, so a bf16 file prunes the same way every time.
    """
    if dtype not in STORAGE_DTYPES:
        raise SaliencyFileError(f"saliency dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    path = Path(path)
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.gamma"] = layer.gamma.to("cpu", STORAGE_DTYPES[dtype]).contiguous()
        tensors[f"{name}.anchor_mean"] = layer.anchor_mean.to("cpu", STORAGE_DTYPES[dtype]).contiguous()
        tensors[f"{name}.first_step"] = layer.first_step.to("cpu", torch.int32).contiguous()
    info = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype,
        **metadata,
        "layers": {name: {"shape": list(layer.gamma.shape), "steps": layer.steps} for name, layer in layers.items()},
    }
    partial = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(partial), metadata={"unipruning": json.dumps(info)})
    os.replace(partial, path)


def read_metadata(path: str | os.PathLike) -> dict:
    """The file's metadata; SaliencyFileError when it is not a saliency file of this version."""
    path = Path(path)
    if not path.is_file():
        raise SaliencyFileError(f"saliency file {path}: no such file")
    try:
        with safe_open(str(path), "pt") as handle:
            raw = (handle.metadata() or {}).get("unipruning")
    except Exception as error:  # safetensors raises its own error types for a bad header
        raise SaliencyFileError(f"saliency file {path}: not a safetensors file ({error})") from error
    if raw is None:
        raise SaliencyFileError(f"saliency file {path}: no 'unipruning' metadata; not written by UniPruning")
    info = json.loads(raw)
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise SaliencyFileError(
            f"saliency file {path}: format {info.get('format')!r} version {info.get('version')!r}, "
            f"expected {FORMAT!r} version {VERSION}"
        )
    return info


def load_saliency(
    path: str | os.PathLike, names: list[str] | None = None, device="cpu", info: dict | None = None
) -> tuple[dict[str, LayerSaliency], dict]:
    """The saliency of ``names`` (default: every layer in the file) and the file's metadata
    (``info``, when the caller already read it with ``read_metadata``)."""
    info = read_metadata(path) if info is None else info
    names = list(info["layers"]) if names is None else names
    layers = {}
    with safe_open(str(path), "pt", device=str(device)) as handle:
        stored = set(handle.keys())
        for name in names:
            missing = [f"{name}.{p}" for p in PARAMS if f"{name}.{p}" not in stored]
            if missing:
                raise SaliencyFileError(f"saliency file {path}: layer {name} has no tensors {missing}")
            gamma, anchor, first = (handle.get_tensor(f"{name}.{p}") for p in PARAMS)
            layers[name] = LayerSaliency(gamma, anchor, first, info["layers"].get(name, {}).get("steps"))
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
