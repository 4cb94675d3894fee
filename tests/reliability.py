"""Helpers of the reliability tests (test_bad_input.py, test_integrity.py, test_faults.py):
a fast recipe, short CLI flags, synthetic saliency files and model folders with one defect."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from unipruning_modifier.cli import main

FAST = ["--num-samples", "2", "--seq-len", "32", "--eval-window", "32", "--eval-tokens", "64"]
RECIPE_24 = "s_stage:\n  s_modifiers:\n    UniPruningModifier: {mask_structure: '2:4', ignore: ['re:.*lm_head']}\n"
IGNORE = ["re:.*lm_head"]


def cli(capsys, *argv) -> tuple[int, str, str]:
    """``unipruning ARGV`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code: int, err: str, *needles: str) -> None:
    """Exit code 2, one ``error:`` line naming everything in ``needles``, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    line = [line for line in err.splitlines() if ": error: " in line]
    assert len(line) == 1, err
    for needle in needles:
        assert needle in line[0], line[0]


def recipe(folder: Path, text: str = RECIPE_24) -> str:
    path = folder / "recipe.yaml"
    path.write_text(text)
    return str(path)


def copy_model(source: str, folder: Path) -> Path:
    shutil.copytree(source, folder)
    return folder


def write_saliency(model_path: str, path: Path, targets=("Linear",), ignore=IGNORE, seed: int = 0, version: int = 2) -> Path:
    """A saliency file for the model at ``model_path`` with random Γ (no calibration needed);
    ``version=1`` writes the former format (fp32 Γ, anchor mean, int32 first_step)."""
    from transformers import AutoModelForCausalLM

    from unipruning_modifier import UniPruningModifier
    from unipruning_modifier.saliency_file import LayerSaliency, model_fingerprint, save_saliency

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    modules = UniPruningModifier(sparsity=0.5, targets=list(targets), ignore=list(ignore)).target_modules(model)
    generator = torch.Generator().manual_seed(seed)
    layers = {
        name: LayerSaliency(
            torch.rand(m.weight.shape, generator=generator),
            torch.rand(m.weight.shape, generator=generator),
            torch.zeros(m.weight.shape, dtype=torch.int32),
            4,
        )
        for name, m in modules.items()
    }
    calibration = {"metric": "stochastic_ria", "kappa": 0.1, "lam": 0.001, "beta": 0.2, "exponent": None, "seed": 0,
                   "targets": list(targets), "ignore": list(ignore), "calibration_inputs": "dense"}
    metadata = {"model": model_path, "fingerprint": model_fingerprint(modules), "calibration": calibration}
    if version == 1:
        write_v1_saliency(path, layers, metadata)
    else:
        save_saliency(path, layers, metadata)
    return path


def write_v1_saliency(path: Path, layers: dict, metadata: dict) -> None:
    """A version 1 saliency file, as unipruning_modifier wrote them before version 2."""
    from unipruning_modifier.checkpoint.files import write_safetensors

    tensors = {}
    for name, layer in layers.items():
        tensors.update({f"{name}.gamma": layer.gamma, f"{name}.anchor_mean": layer.anchor_mean, f"{name}.first_step": layer.first_step})
    info = {"format": "unipruning-saliency", "version": 1, "dtype": "float32", **metadata,
            "layers": {name: {"shape": list(layer.gamma.shape), "steps": layer.steps} for name, layer in layers.items()}}
    write_safetensors(path, {k: v.contiguous() for k, v in tensors.items()}, {"unipruning": json.dumps(info)})


def rewrite_safetensors(path: Path, edit_tensors=None, edit_metadata=None) -> None:
    """Rewrite a safetensors file as another tool (or damage) would: tensors and/or metadata
    changed, the checksums left as they were."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_metadata:
        edit_metadata(metadata)
    save_file(tensors, str(path), metadata=metadata)


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def leftovers(folder: Path, *keep: str) -> list[str]:
    """Names in ``folder`` other than ``keep``: what a run left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)
