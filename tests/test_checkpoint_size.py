"""Disk size of a 2:4 bf16 checkpoint of the shared 28m model (skipped without ../shared)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from unipruning_modifier.checkpoint import mask_24
from unipruning_modifier.checkpoint import load_sparse, write_sparse

from .conftest import SHARED

MODEL = SHARED / "models" / "uni-tiny-28m"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason=f"{MODEL} not present"),
]


def tensor_bytes(folder, keys) -> int:
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return sum(handle.get_tensor(k).nbytes for k in keys)


def test_28m_24_bf16_checkpoint_size(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:  # any 2:4 mask gives the same size; the codec's own top-2 choice is used
            weight = modules[name].weight
            weight.mul_(mask_24(weight))
    dense, sparse = tmp_path / "dense", tmp_path / "sparse"
    model.save_pretrained(dense)
    shutil.copytree(dense, sparse)
    written = write_sparse(sparse, names, "sparse-24-bitmask", "2:4", ["Linear"], ["re:.*lm_head"])
    assert written["format"] == "sparse-24-bitmask"

    with safe_open(str(sparse / "model.safetensors"), "pt") as handle:
        sparse_keys = [k for k in handle.keys() if k.rsplit(".", 1)[0] in names]
    pruned_dense = tensor_bytes(dense, [f"{n}.weight" for n in names])
    pruned_sparse = tensor_bytes(sparse, sparse_keys)
    ratio = pruned_sparse / pruned_dense
    file_ratio = (sparse / "model.safetensors").stat().st_size / (dense / "model.safetensors").stat().st_size
    report = {
        "model": MODEL.name,
        "pruned_tensors_dense_mb": pruned_dense / 2**20,
        "pruned_tensors_sparse_mb": pruned_sparse / 2**20,
        "pruned_tensors_ratio": ratio,
        "file_dense_mb": (dense / "model.safetensors").stat().st_size / 2**20,
        "file_sparse_mb": (sparse / "model.safetensors").stat().st_size / 2**20,
        "file_ratio": file_ratio,
    }
    with capsys.disabled():
        print("\n" + json.dumps(report))
    assert ratio <= 0.6
    assert 0.5625 <= ratio < 0.563  # values 1/2 + bitmask 1/16, plus 16 bytes of shape per layer

    reloaded = load_sparse(sparse)
    for name in names[:4]:
        assert torch.equal(reloaded.get_submodule(name).weight, modules[name].weight)
