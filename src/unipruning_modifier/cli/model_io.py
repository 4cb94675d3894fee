"""Models in and out of the CLI: check ``--model`` before loading it, load it, and write a
checkpoint into a claimed output (outputs.py).

A local model folder is checked without reading its weights: config.json parses, its
architecture is one transformers knows (or ``--trust-remote-code`` allows the folder's code),
its weights are safetensors with sound headers, and it has tokenizer files. The layer shapes
come from config.json alone (``skeleton``: the model on the meta device), so recipes are
checked against them before the weights load.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import UsageError, log

__all__ = [
    "check_finite",
    "check_model_path",
    "checkpoint_bytes",
    "load_dtypes",
    "load_for_eval",
    "load_model",
    "load_tokenizer",
    "save_checkpoint",
    "skeleton",
]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_model_path(value: str, trust_remote_code: bool = False) -> str:
    """``--model``: a local folder that can be loaded (see the module docstring), or a hub id."""
    path = Path(value).expanduser()
    if not path.exists():
        if value.startswith((".", "/", "~")) or value.count("/") > 1 or "\\" in value:
            raise UsageError(f"--model {value}: no such folder")
        return value  # a hub id such as org/name, checked when it is downloaded
    if not (path / "config.json").is_file():
        raise UsageError(f"--model {value}: folder has no config.json")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from ..checkpoint.files import DamagedFileError, check_header
    from ..checkpoint.load import shards

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except ValueError as error:
        raise UsageError(f"--model {value}: config.json is not valid JSON ({error})") from None
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        if config.get("auto_map") and not trust_remote_code:
            raise UsageError(
                f"--model {value}: config.json's model_type {model_type!r} needs the model code in the folder "
                f"(auto_map); pass --trust-remote-code to run it (only for code you trust)"
            )
        if not config.get("auto_map"):
            raise UsageError(f"--model {value}: config.json's model_type {model_type!r} is not a transformers architecture")
    try:
        for shard in shards(path):
            check_header(shard)
    except FileNotFoundError as error:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise UsageError(
                f"--model {value}: holds pickle weights only ({', '.join(pickles[:3])}); unipruning loads safetensors, "
                "which cannot run code: convert them (e.g. load and save_pretrained with safe_serialization)"
            ) from None
        raise UsageError(f"--model {value}: {error}") from None
    except DamagedFileError as error:
        raise UsageError(f"--model {value}: {error}") from None
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(f"--model {value}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    return str(path)


def checkpoint_dtype(config):
    """The dtype a checkpoint was saved in (fp32 when its config does not say)."""
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _config(model_id: str, args: argparse.Namespace):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)
    except Exception as error:  # transformers raises many types here
        raise UsageError(f"--model {model_id}: cannot read its config ({error})") from None


def load_dtypes(model_id: str, args: argparse.Namespace, device):
    """(dtype to save in, dtype to compute in): ``--dtype``, or for auto the checkpoint's own,
    computed in fp32 on the CPU."""
    import torch

    saved_dtype = checkpoint_dtype(_config(model_id, args)) if args.dtype == "auto" else getattr(torch, args.dtype)
    compute_dtype = torch.float32 if args.dtype == "auto" and device.type == "cpu" else saved_dtype
    return saved_dtype, compute_dtype


def skeleton(model_id: str, args: argparse.Namespace):
    """The model's modules and shapes on the meta device, from its config alone (no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _config(model_id, args)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code)
    except Exception as error:
        raise UsageError(f"--model {model_id}: no causal-LM class for its config ({error})") from None


def checkpoint_bytes(model, dtype) -> int:
    """Upper estimate of a checkpoint's size: every parameter in ``dtype`` (sparse formats write less)."""
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def load_tokenizer(model_id: str, args: argparse.Namespace):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)
    except Exception as error:
        raise UsageError(f"--model {model_id}: cannot load its tokenizer ({error})") from None


def load_model(model_id: str, args: argparse.Namespace, device):
    """(model, dtype to save in): fp32 compute on the CPU for ``--dtype auto``."""
    from transformers import AutoModelForCausalLM

    log(f"loading {model_id} on {device}")
    saved_dtype, compute_dtype = load_dtypes(model_id, args, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=compute_dtype, trust_remote_code=args.trust_remote_code)
    except Exception as error:
        raise UsageError(f"--model {model_id}: cannot load it ({error})") from None
    check_finite(model, f"--model {model_id}")
    return model.to(device), saved_dtype


def load_for_eval(model_id: str, args: argparse.Namespace, device):
    """(model on ``device``, tokenizer, sparsity_config or None); sparse folders via load_sparse."""
    from transformers import AutoModelForCausalLM

    from ..checkpoint import load_sparse, sparse_config_of

    tokenizer = load_tokenizer(model_id, args)
    log(f"loading {model_id} on {device}")
    _, dtype = load_dtypes(model_id, args, device)
    local = Path(model_id).is_dir()
    try:
        sparse = sparse_config_of(model_id) if local else None
        if local:
            model = load_sparse(model_id, dtype=dtype, trust_remote_code=args.trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, trust_remote_code=args.trust_remote_code)
    except Exception as error:
        raise UsageError(f"--model {model_id}: cannot load it ({error})") from None
    check_finite(model, f"--model {model_id}")
    return model.to(device).eval(), tokenizer, sparse


def check_finite(model, what: str) -> None:
    """Refuse a model with NaN or inf in a floating-point parameter, naming it."""
    import torch

    for name, parameter in model.named_parameters():
        if parameter.is_floating_point() and parameter.element_size() > 1 and not parameter.is_meta:  # not fp8
            bad = int(torch.count_nonzero(~torch.isfinite(parameter.detach())))
            if bad:
                raise UsageError(f"{what}: parameter {name} has {bad} NaN/inf values")


def _drop_remote_code(folder: Path) -> None:
    """Remove model code (``*.py``) and ``auto_map`` entries: loaded without
    ``--trust-remote-code``, the model ran transformers' own classes, so its output needs no code."""
    from ..checkpoint.files import atomic_write

    for code in folder.glob("*.py"):
        code.unlink()
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            config = json.loads(path.read_text())
            if config.pop("auto_map", None) is not None:
                atomic_write(path, lambda partial, config=config: partial.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))


def save_checkpoint(model, tokenizer, claim, save_format: str, saved_dtype, trust_remote_code: bool) -> float:
    """Write the checkpoint into a staging folder of ``claim`` and publish it; its MiB.

    Any failure while writing (a full disk, a file-size limit) is a UsageError; the staging
    folder is removed with the claim and the previous output stays as it was.
    """
    from ..checkpoint import save_sparse

    check_finite(model, "the pruned model")
    model.to(saved_dtype)  # exact: kept weights were only upcast from this dtype
    staging = claim.partial()
    try:
        staging.mkdir(mode=0o700)
        save_sparse(model, staging, sparse_format="dense" if save_format == "dense" else None)
        tokenizer.save_pretrained(staging)
        if not trust_remote_code:
            _drop_remote_code(staging)
        claim.publish(staging)
    except Exception as error:  # safetensors and transformers raise their own types for a full disk
        raise UsageError(f"{claim.flag} {claim.path}: writing the checkpoint failed ({error}); nothing was replaced") from None
    return sum(f.stat().st_size for f in claim.path.glob("*.safetensors")) / 2**20
