"""Models in and out of the CLI: check and load ``--model``, publish a checkpoint atomically."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from .common import UsageError, log

__all__ = ["check_model_path", "check_output", "load_dtypes", "load_for_eval", "load_model", "publish", "save_checkpoint"]


def check_model_path(value: str) -> str:
    """``--model``: a local folder with a config.json, or a hub id (org/name)."""
    path = Path(value).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {value}: folder has no config.json")
        return str(path)
    if value.startswith((".", "/", "~")) or value.count("/") > 1 or "\\" in value:
        raise UsageError(f"--model {value}: no such folder")
    return value  # a hub id such as org/name


def check_output(value: str, overwrite: bool, flag: str = "--output") -> Path:
    """An output path that may be written: absent, empty, or replaceable with ``--overwrite``."""
    path = Path(value).expanduser().resolve()
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise UsageError(f"{flag} {value} exists and is not empty (pass --overwrite to replace it)")
    if not path.parent.is_dir():
        raise UsageError(f"{flag} {value}: parent folder {path.parent} does not exist")
    return path


def checkpoint_dtype(config):
    """The dtype a checkpoint was saved in (fp32 when its config does not say)."""
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def load_dtypes(model_id: str, args: argparse.Namespace, device):
    """(dtype to save in, dtype to compute in): ``--dtype``, or for auto the checkpoint's own,
    computed in fp32 on the CPU."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)
    saved_dtype = checkpoint_dtype(config) if args.dtype == "auto" else getattr(torch, args.dtype)
    compute_dtype = torch.float32 if args.dtype == "auto" and device.type == "cpu" else saved_dtype
    return saved_dtype, compute_dtype


def load_model(model_id: str, args: argparse.Namespace, device):
    """(model, tokenizer, dtype to save in): fp32 compute on the CPU for ``--dtype auto``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"loading {model_id} on {device}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)
        saved_dtype, compute_dtype = load_dtypes(model_id, args, device)
        model = AutoModelForCausalLM.from_pretrained(
            model_id, dtype=compute_dtype, trust_remote_code=args.trust_remote_code
        ).to(device)
    except OSError as error:
        raise UsageError(f"--model {args.model}: cannot load it ({error})") from error
    return model, tokenizer, saved_dtype


def load_for_eval(model_id: str, args: argparse.Namespace, device):
    """(model on ``device``, tokenizer, sparsity_config or None); sparse folders via load_sparse."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..checkpoint import load_sparse, sparse_config_of

    log(f"loading {model_id} on {device}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)
        local = Path(model_id).is_dir()
        sparse = sparse_config_of(model_id) if local else None
        _, dtype = load_dtypes(model_id, args, device)
        if local:
            model = load_sparse(model_id, dtype=dtype, trust_remote_code=args.trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, trust_remote_code=args.trust_remote_code)
    except OSError as error:
        raise UsageError(f"--model {args.model}: cannot load it ({error})") from error
    return model.to(device).eval(), tokenizer, sparse


def publish(staging: Path, output: Path) -> None:
    """Move a complete checkpoint into place (replacing an old one only now).

    The staging folder is private while it is written (mkdtemp); the result gets the usual
    permissions of a new folder under the user's umask.
    """
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    if output.exists():
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    staging.rename(output)


def save_checkpoint(model, tokenizer, output: Path, save_format: str, saved_dtype) -> float:
    """Write the checkpoint to a private staging folder, then move it to ``output``; its MiB."""
    from ..checkpoint import save_sparse

    model.to(saved_dtype)  # exact: kept weights were only upcast from this dtype
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        save_sparse(model, staging, sparse_format="dense" if save_format == "dense" else None)
        tokenizer.save_pretrained(staging)
        publish(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sum(f.stat().st_size for f in output.glob("*.safetensors")) / 2**20
