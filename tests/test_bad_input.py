"""Bad input to `unipruning`: one `error:` line naming the flag, file or field, exit code 2, no
traceback, nothing written; checked before the model loads wherever the input allows
(issue 15, items 1 and 4-11; docs/reliability.md lists them)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from unipruning_modifier import data
from unipruning_modifier.checkpoint import load_sparse, sparse_config_of

from .reliability import FAST, assert_clean_error, cli, copy_model, edit_json, recipe, rewrite_safetensors, write_saliency

W4A16_GROUP_128 = """
sparsity_stage:
  sparsity_modifiers:
    UniPruningModifier: {mask_structure: '2:4', ignore: ['re:.*lm_head']}
quant_stage:
  quant_modifiers:
    MaskedGPTQModifier: {targets: [Linear], ignore: ['re:.*lm_head'], scheme: W4A16}
"""


def not_loaded(err: str) -> bool:
    """The run stopped before loading the model's weights."""
    return "loading " not in err


# ---------------------------------------------------------------- 1. quantization group sizes


def test_group_size_that_does_not_divide_a_layer_fails_before_loading(capsys, tmp_path):
    """The demo model's down_proj has 704 inputs: groups of 128 do not fit."""
    code, _, err = cli(capsys, "prune", "--recipe", recipe(tmp_path, W4A16_GROUP_128), "--output", tmp_path / "out", *FAST)
    assert_clean_error(code, err, "--recipe", "groups of 128", "model.layers.0.mlp.down_proj (704 inputs)", "ignore")
    assert not_loaded(err) and not (tmp_path / "out").exists()


def test_shipped_w4a16_recipe_fits_the_demo_model():
    from unipruning_modifier.cli.model_io import skeleton
    from unipruning_modifier.cli.recipes import BUILTIN_RECIPES, check_fits, load_recipe

    args = type("Args", (), {"trust_remote_code": False})()
    model = skeleton(data.demo_model_path(), args)
    targets = check_fits(load_recipe(str(BUILTIN_RECIPES / "uni_24_w4a16.yaml")).modifiers, model, "--recipe")
    assert len(targets) == 28


@pytest.mark.slow
def test_prune_then_w4a16_reports_sparsity_and_writes_the_checkpoint(capsys, tmp_path, tiny_model_path):
    """The sparsity summary used to read the packed int4 weights after saving (AttributeError)."""
    code, out, err = cli(capsys, "prune", "--model", tiny_model_path, "--recipe", "uni_24_w4a16", "--output", tmp_path / "out", *FAST)
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result["sparsity"] >= 0.5 and len(result["layer_sparsity"]) == 14
    assert sparse_config_of(tmp_path / "out")["sparsity_structure"] == "2:4"


# ---------------------------------------------------------------- 2. one writer per output


def test_claimed_saliency_path_fails_at_once_naming_the_holder(capsys, tmp_path):
    from unipruning_modifier.cli.outputs import OutputClaim

    saliency = tmp_path / "s.safetensors"
    with OutputClaim(saliency, "--save-saliency"):
        code, _, err = cli(capsys, "prune", "--output", tmp_path / "out", "--save-saliency", saliency, *FAST)
    assert_clean_error(code, err, "--save-saliency", f"pid {os.getpid()}")
    assert not_loaded(err) and not (tmp_path / "out").exists() and not saliency.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # both locks released


def test_saliency_file_inside_the_output_is_refused(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    code, _, err = cli(capsys, "prune", "--output", tmp_path / "out", "--save-saliency", tmp_path / "out" / "s.safetensors", *FAST)
    assert_clean_error(code, err, "--save-saliency", "is inside --output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not any((tmp_path / "out").iterdir())


# ---------------------------------------------------------------- 4. output location


def writable(folder: Path) -> bool:
    try:
        (folder / ".probe").touch()
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


def unwritable_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    if writable(folder):  # root: permissions do not stop it; sysfs does
        folder = Path("/sys")
        if not folder.is_dir() or writable(folder):
            pytest.skip("no folder this user cannot write to")
    return folder


def test_unwritable_output_location_fails_before_loading(capsys, tmp_path):
    folder = unwritable_folder(tmp_path)
    code, _, err = cli(capsys, "prune", "--output", folder / "pruned-out", *FAST)
    assert_clean_error(code, err, "--output", f"cannot write in {folder}")
    assert not_loaded(err)


def test_too_little_free_space_fails_before_loading(capsys, tmp_path, monkeypatch):
    import unipruning_modifier.cli.outputs as outputs

    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20))
    code, _, err = cli(capsys, "prune", "--output", tmp_path / "out", "--save-saliency", tmp_path / "s.safetensors", *FAST)
    assert_clean_error(code, err, "--output", "--save-saliency", "1 MiB free", "MiB are needed")
    assert not_loaded(err) and sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------- 5, 6. damaged or foreign saliency files


@pytest.fixture(scope="module")
def saliency(tmp_path_factory, tiny_model_path) -> Path:
    return write_saliency(tiny_model_path, tmp_path_factory.mktemp("saliency") / "tiny.safetensors")


def extract(capsys, model, saliency_path, output, *flags):
    return cli(capsys, "extract", "--model", model, "--saliency", saliency_path, "--output", output, "--eval-tokens", "0", *flags)


def test_nan_saliency_is_refused_naming_the_layer(capsys, tmp_path, tiny_model_path):
    damaged = write_saliency(tiny_model_path, tmp_path / "nan.safetensors", version=1)  # version 2 holds no values

    def nan_layer(tensors):
        tensors["model.layers.1.mlp.up_proj.gamma"] = torch.full_like(tensors["model.layers.1.mlp.up_proj.gamma"], float("nan"))

    rewrite_safetensors(damaged, nan_layer, lambda m: m.pop("unipruning.crc32", None))  # as if calibration had written NaN
    code, _, err = extract(capsys, tiny_model_path, damaged, tmp_path / "out", "--sparsity", "0.5")
    assert_clean_error(code, err, "--saliency", "model.layers.1.mlp.up_proj", "NaN/inf")
    assert not (tmp_path / "out").exists()


def _metadata(edit):
    def apply(metadata):
        info = json.loads(metadata["unipruning"])
        edit(info)
        metadata["unipruning"] = json.dumps(info)

    return apply


@pytest.mark.parametrize(
    "edit_tensors, edit_metadata, needles",
    [
        (None, lambda m: m.update(unipruning="{not json"), ["--saliency", "metadata 'unipruning' is not JSON"]),
        (None, _metadata(lambda info: info["calibration"].pop("targets")), ["--saliency", "calibration.targets"]),
        (
            lambda t: t.update({"model.layers.0.mlp.down_proj.rank": torch.zeros(100, dtype=torch.uint8)}),
            lambda m: m.pop("unipruning.crc32", None),
            ["--saliency", "layer model.layers.0.mlp.down_proj: rank is torch.uint8 [100], expected torch.uint8 [32768] for shape [128, 256]"],
        ),
    ],
    ids=["metadata-not-json", "no-calibration-targets", "shape-differs-from-metadata"],
)
def test_malformed_saliency_file_is_refused_naming_the_field(capsys, tmp_path, tiny_model_path, saliency, edit_tensors, edit_metadata, needles):
    damaged = tmp_path / "bad.safetensors"
    shutil.copy(saliency, damaged)
    rewrite_safetensors(damaged, edit_tensors, edit_metadata)
    code, _, err = extract(capsys, tiny_model_path, damaged, tmp_path / "out", "--sparsity", "0.5")
    assert_clean_error(code, err, *needles)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 7. extract's flags


@pytest.mark.parametrize(
    "flags, needles, absent",
    [
        (["--mask-structure", "0:4"], ["--mask-structure: mask_structure '0:4'", "0 < N < M"], "--arguments"),
        ([], ["--sparsity: sparsity is required"], "--arguments"),
        (["--mask-structure", "2:3"], ["--mask-structure 2:3: layer model.layers.0.self_attn.q_proj has 128 inputs"], "--ignore"),
    ],
    ids=["0:4", "no-sparsity", "2:3"],
)
def test_extract_errors_name_flags_that_exist(capsys, tmp_path, tiny_model_path, saliency, flags, needles, absent):
    code, _, err = extract(capsys, tiny_model_path, saliency, tmp_path / "out", *flags)
    assert_clean_error(code, err, *needles)
    assert absent not in err and not_loaded(err) and not (tmp_path / "out").exists()


def test_extract_blames_targets_of_the_file_on_the_file(capsys, tmp_path, tiny_model_path):
    foreign = write_saliency(tiny_model_path, tmp_path / "f.safetensors")
    rewrite_safetensors(foreign, None, _metadata(lambda info: info["calibration"].update(targets=["re:.*no_such_layer"])))
    code, _, err = extract(capsys, tiny_model_path, foreign, tmp_path / "out", "--sparsity", "0.5")
    assert_clean_error(code, err, f"--saliency {foreign}", "match no Linear layer")
    assert "--mask-structure" not in err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 8. model folders that cannot be loaded


def truncated(folder: Path) -> str:
    shard = folder / "model.safetensors"
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    return "model.safetensors"


def pickle_only(folder: Path) -> str:
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return "pickle weights only (pytorch_model.bin)"


def config_only(folder: Path) -> str:
    for path in folder.iterdir():
        if path.name != "config.json":
            path.unlink()
    return "no *.safetensors file"


def custom_code(folder: Path) -> str:
    edit_json(folder / "config.json", lambda c: c.update(model_type="tiny_custom", auto_map={"AutoConfig": "x.Config"}))
    return "--trust-remote-code"


def no_tokenizer(folder: Path) -> str:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    return "no tokenizer files"


@pytest.mark.parametrize("damage", [truncated, pickle_only, config_only, custom_code, no_tokenizer])
def test_model_folder_that_cannot_load_fails_before_loading(capsys, tmp_path, tiny_model_path, damage):
    model = copy_model(tiny_model_path, tmp_path / "model")
    needle = damage(model)
    for command in (["prune", "--output", tmp_path / "out", *FAST], ["eval", "--tasks", "unipruning_demo_ppl"]):
        code, _, err = cli(capsys, *command, "--model", model)
        assert_clean_error(code, err, f"--model {model}", needle)
        assert not_loaded(err) and not (tmp_path / "out").exists()


def test_unknown_sparse_format_names_config_json(capsys, tmp_path, tiny_model_path):
    model = copy_model(tiny_model_path, tmp_path / "model")
    edit_json(model / "config.json", lambda c: c.update(quantization_config={"sparsity_config": {"format": "sparse-bogus"}}))
    code, _, err = cli(capsys, "eval", "--model", model, "--tasks", "unipruning_demo_ppl")
    assert_clean_error(code, err, f"{model}/config.json", "sparse-bogus", "sparse-24-bitmask")


def test_nan_weight_is_refused_naming_the_parameter(capsys, tmp_path, tiny_model_path):
    model = copy_model(tiny_model_path, tmp_path / "model")

    def poison(tensors):
        tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("inf")

    rewrite_safetensors(model / "model.safetensors", poison)
    code, _, err = cli(capsys, "prune", "--model", model, "--recipe", recipe(tmp_path), "--output", tmp_path / "out", *FAST)
    assert_clean_error(code, err, "model.layers.1.mlp.up_proj.weight", "1 NaN/inf")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 9, 10. calibration and evaluation text


def test_dataset_shorter_than_one_window_fails_before_loading(capsys, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("three words only")
    code, _, err = cli(capsys, "prune", "--dataset", text, "--output", tmp_path / "out", *FAST)
    assert_clean_error(code, err, f"--dataset {text}", "fewer than one window of --seq-len 32")
    assert not_loaded(err) and not (tmp_path / "out").exists()


def test_binary_dataset_is_refused_naming_the_file(capsys, tmp_path):
    noise = tmp_path / "noise.txt"
    noise.write_bytes(bytes(range(256)) * 64)
    code, _, err = cli(capsys, "prune", "--dataset", noise, "--output", tmp_path / "out", *FAST)
    assert_clean_error(code, err, "--dataset", str(noise), "not UTF-8 text (byte 0x80 at offset 128)")
    assert not_loaded(err) and not (tmp_path / "out").exists()
    code, _, err = cli(capsys, "eval", "--model", data.demo_model_path(), "--tasks", f"text:{noise}")
    assert_clean_error(code, err, "--tasks", str(noise), "not UTF-8 text")


# ---------------------------------------------------------------- 11. model code


@pytest.mark.parametrize("trust", [False, True])
def test_model_code_is_carried_only_with_trust_remote_code(capsys, tmp_path, tiny_model_path, saliency, trust):
    model = copy_model(tiny_model_path, tmp_path / "model")
    (model / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\n\n\nclass TinyForCausalLM(LlamaForCausalLM):\n    pass\n"
    )
    auto_map = {"AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    edit_json(model / "config.json", lambda c: c.update(auto_map=auto_map))
    trust_flag = ["--trust-remote-code"] if trust else []
    code, _, err = extract(capsys, model, saliency, tmp_path / "out", "--sparsity", "0.5", *trust_flag)
    assert code == 0, err
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    if trust:
        assert config.get("auto_map") == auto_map and (out / "modeling_tiny.py").is_file()
    else:
        assert not list(out.glob("*.py")) and "auto_map" not in config
        assert load_sparse(out) is not None
