"""Integrity of the files we write (issue 15, item 12): a CRC-32 per tensor in the safetensors
metadata of every checkpoint shard and saliency file, verified on load; damaged bitmasks, values,
headers and saliency tensors are refused naming the file and tensor."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from unipruning_modifier.checkpoint import load_sparse, load_sparse_state_dict, mark_sparse, save_sparse
from unipruning_modifier.saliency_file import SaliencyFileError, load_saliency

from .conftest import linear_weights, load
from .reliability import IGNORE, assert_clean_error, cli, write_saliency

CHECKSUMS = "unipruning.crc32"


def prune_24(model) -> list[str]:
    """Zero the 2 smallest of every 4 weights of each Linear but lm_head (no calibration needed)."""
    names = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                w = module.weight.view(module.out_features, -1, 4)
                drop = w.abs().argsort(-1)[..., :2]
                w.scatter_(-1, drop, 0.0)
                names.append(name)
    return names


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_model_path, tokenizer) -> Path:
    """The tiny model pruned to 2:4 and saved sparse (a folder to copy before damaging it)."""
    model = load(tiny_model_path).to(torch.bfloat16)
    mark_sparse(model, prune_24(model), "2:4", ["Linear"], IGNORE)
    folder = tmp_path_factory.mktemp("pruned") / "ckpt"
    save_sparse(model, folder)
    tokenizer.save_pretrained(folder)
    return folder


def damaged_copy(pruned: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(pruned, folder)
    return folder


def span(path: Path, name: str) -> tuple[int, int]:
    """Absolute byte range of tensor ``name`` in a safetensors file."""
    with open(path, "rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(length))
    begin, end = header[name]["data_offsets"]
    return 8 + length + begin, 8 + length + end


def patch_bytes(path: Path, offset: int, edit) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        old = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([edit(old)]))


# ---------------------------------------------------------------- what is written


def test_every_shard_and_saliency_file_carries_checksums(pruned, tiny_model_path, tmp_path):
    with safe_open(str(pruned / "model.safetensors"), "pt") as handle:
        metadata, keys = handle.metadata(), set(handle.keys())
    assert metadata["format"] == "pt" and set(json.loads(metadata[CHECKSUMS])) == keys
    saliency = write_saliency(tiny_model_path, tmp_path / "s.safetensors")
    with safe_open(str(saliency), "pt") as handle:
        assert set(json.loads(handle.metadata()[CHECKSUMS])) == set(handle.keys())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]  # no temporary file left


def test_intact_checkpoint_loads_with_and_without_verification(pruned, tiny_model_path):
    reference = load(tiny_model_path).to(torch.bfloat16)
    prune_24(reference)
    for verify in (True, False):
        model = load_sparse(pruned, verify=verify)
        for name, weight in linear_weights(model).items():
            assert torch.equal(weight, reference.get_submodule(name).weight), name


# ---------------------------------------------------------------- damage


def bits_moved_in_a_24_group(folder: Path) -> str:
    """Keep the popcount (still a valid 2:4 bitmask) but move a kept position: 0b0011 -> 0b0101."""
    name = "model.layers.0.mlp.down_proj.bitmask"
    shard = folder / "model.safetensors"
    begin, end = span(shard, name)
    with open(shard, "rb") as handle:
        handle.seek(begin)
        data = handle.read(end - begin)
    offset = next(i for i, b in enumerate(data) if (b & 0xF) in (0b0011, 0b0110, 0b1100, 0b1001))
    patch_bytes(shard, begin + offset, lambda b: (b & 0xF0) | {0b0011: 0b0101, 0b0110: 0b1010, 0b1100: 0b0101, 0b1001: 0b1010}[b & 0xF])
    return name


def value_byte_flipped(folder: Path) -> str:
    name = "model.layers.1.self_attn.o_proj.compressed"
    begin, _ = span(folder / "model.safetensors", name)
    patch_bytes(folder / "model.safetensors", begin + 7, lambda b: b ^ 0x40)
    return name


@pytest.mark.parametrize("damage", [bits_moved_in_a_24_group, value_byte_flipped])
def test_damaged_tensor_is_refused_naming_file_and_tensor(pruned, tmp_path, damage, capsys):
    folder = damaged_copy(pruned, tmp_path)
    tensor = damage(folder)
    with pytest.raises(ValueError, match=f"model.safetensors: tensor '{tensor}' fails its checksum"):
        load_sparse_state_dict(folder)
    load_sparse_state_dict(folder, verify=False)  # the escape hatch still reads it
    code, _, err = cli(capsys, "eval", "--model", folder, "--tasks", "unipruning_demo_ppl")
    assert_clean_error(code, err, f"--model {folder}", tensor, "fails its checksum")


def truncated_shard(folder: Path) -> str:
    shard = folder / "model.safetensors"
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 100)
    return "truncated or damaged"


def header_garbage(folder: Path) -> str:
    patch_bytes(folder / "model.safetensors", 9, lambda b: 0xFF)
    return "header is not valid JSON"


def tensor_dropped(folder: Path) -> str:
    from safetensors.torch import load_file, save_file

    shard = folder / "model.safetensors"
    with safe_open(str(shard), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(shard))
    tensors.pop("model.norm.weight")
    save_file(tensors, str(shard), metadata=metadata)  # a tool that kept our metadata
    return "tensors differ from those checksummed (missing ['model.norm.weight']"


@pytest.mark.parametrize("damage", [truncated_shard, header_garbage, tensor_dropped])
def test_damaged_shard_is_refused_naming_the_file(pruned, tmp_path, damage):
    folder = damaged_copy(pruned, tmp_path)
    message = damage(folder)
    with pytest.raises(ValueError, match=r"model\.safetensors: .*" + message.replace("(", r"\(").replace("[", r"\[")):
        load_sparse(folder)


def test_damaged_saliency_tensor_is_refused_naming_it(capsys, tmp_path, tiny_model_path):
    saliency = write_saliency(tiny_model_path, tmp_path / "s.safetensors")
    name = "model.layers.0.self_attn.k_proj.rank"
    begin, _ = span(saliency, name)
    patch_bytes(saliency, begin + 2, lambda b: b ^ 0x01)
    with pytest.raises(SaliencyFileError, match=f"tensor '{name}' fails its checksum"):
        load_saliency(saliency)
    code, _, err = cli(capsys, "extract", "--model", tiny_model_path, "--saliency", saliency, "--sparsity", "0.5",
                       "--output", tmp_path / "out", "--eval-tokens", "0")
    assert_clean_error(code, err, "--saliency", name, "fails its checksum")
    assert not (tmp_path / "out").exists()


def test_saliency_header_damage_is_refused_naming_the_file(capsys, tmp_path, tiny_model_path):
    saliency = write_saliency(tiny_model_path, tmp_path / "s.safetensors")
    with open(saliency, "r+b") as handle:
        handle.write(struct.pack("<Q", 2**40))
    code, _, err = cli(capsys, "extract", "--model", tiny_model_path, "--saliency", saliency, "--sparsity", "0.5",
                       "--output", tmp_path / "out")
    assert_clean_error(code, err, "--saliency", str(saliency), "header of 1099511627776 bytes")


def test_nan_saliency_is_not_written(tmp_path):
    from unipruning_modifier.saliency_file import LayerSaliency, save_saliency

    layer = LayerSaliency(torch.tensor([[1.0, float("nan")]]), torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.int32))
    with pytest.raises(SaliencyFileError, match="saliency of layer model.x: 1 NaN/inf values"):
        save_saliency(tmp_path / "s.safetensors", {"model.x": layer}, {})
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_nothing_and_temporary_names_are_unique(tmp_path):
    from unipruning_modifier.checkpoint.files import atomic_write, partial_sibling

    target = tmp_path / "f.safetensors"
    names = {partial_sibling(target).name for _ in range(100)}
    assert len(names) == 100 and all(n.startswith(f".f.safetensors.partial-{os.getpid()}-") for n in names)

    def fail(partial):
        partial.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, fail)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- other readers


@pytest.mark.slow
def test_vllm_reads_checksummed_shards(pruned, tmp_path, vllm_python):
    """vLLM's own safetensors reader takes our shards (the metadata is free-form)."""
    script = (
        "import sys, torch; from safetensors.torch import load_file\n"
        "from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator\n"
        "shard = sys.argv[1]; ref = load_file(shard)\n"
        "got = dict(safetensors_weights_iterator([shard], False))\n"
        "assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)\n"
        "print('ok', len(got))\n"
    )
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
    proc = subprocess.run([str(vllm_python), "-c", script, str(pruned / "model.safetensors")], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]
