"""The `unipruning prune` command: bad input fails early and cleanly; a small run end to end."""

from __future__ import annotations

import json
import time

import pytest
import torch

from unipruning_modifier.cli import main

from unipruning_modifier.checkpoint import load_sparse, sparse_config_of

from .conftest import REPO, linear_weights

FAST = ["--num-samples", "4", "--seq-len", "64", "--eval-window", "128", "--eval-tokens", "1024"]


def run(capsys, *argv):
    code = main(["prune", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "recipe_text, message",
    [
        ("s_stage:\n  s_modifiers:\n    UniPruningModifier: {sparsity: 1.5}\n", "sparsity must be in [0, 1)"),
        ("s_stage:\n  s_modifiers:\n    UniPruningModifier: {mask_structure: '3:2'}\n", "0 < N < M"),
        ("UniPruningModifier: {sparsity: 0.5}\n", "defines no modifiers"),
    ],
)
def test_bad_recipe_fails_before_work(capsys, tmp_path, recipe_text, message):
    out_dir = tmp_path / "out"
    start = time.perf_counter()
    code, _, err = run(capsys, "--recipe", write(tmp_path / "r.yaml", recipe_text), "--output", str(out_dir), *FAST)
    assert code == 2 and message in err and "--recipe" in err
    assert not out_dir.exists() and list(tmp_path.iterdir()) == [tmp_path / "r.yaml"]
    assert time.perf_counter() - start < 60  # no model was loaded or calibrated


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such folder"),
        (["--recipe", "no_such_recipe"], "not a built-in recipe"),
        (["--dataset", "/nonexistent/calib.txt"], "--dataset: dataset '/nonexistent/calib.txt': no such text file"),
        (["--num-samples", "0"], "--num-samples must be >= 1"),
        (["--device", "tpu"], "--device"),
        (["--nproc", "0"], "--nproc must be >= 1, got 0"),
        (["--nproc", "2", "--save-saliency", "x.safetensors"], "--save-saliency calibrates in one process; drop --nproc"),
    ],
)
def test_bad_arguments_fail_with_the_argument_named(capsys, tmp_path, argv, message):
    code, _, err = run(capsys, "--output", str(tmp_path / "out"), *FAST, *argv)
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists()


def test_empty_dataset_is_refused(capsys, tmp_path):
    empty = write(tmp_path / "empty.txt", "  \n\n")
    code, _, err = run(capsys, "--dataset", empty, "--output", str(tmp_path / "out"), *FAST)
    assert code == 2 and "is empty" in err and "--dataset" in err
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(capsys, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("x")
    code, _, err = run(capsys, "--output", str(out_dir), *FAST)
    assert code == 2 and "--overwrite" in err
    assert (out_dir / "keep.txt").read_text() == "x"


@pytest.mark.slow
def test_prune_tiny_model_end_to_end(capsys, tmp_path, tiny_model_path):
    out_dir = tmp_path / "pruned"
    code, out, _ = run(
        capsys, "--model", tiny_model_path, "--recipe", str(REPO / "recipes" / "uni_24.yaml"),
        "--output", str(out_dir), *FAST,
    )
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("sparsity", "ppl_dense", "ppl_pruned", "seconds", "peak_memory_mb", "layer_sparsity"):
        assert key in result
    assert result["sparsity"] == pytest.approx(0.5)
    assert len(result["layer_sparsity"]) == 14 and set(result["layer_sparsity"].values()) == {0.5}
    assert result["seconds"] > 0 and result["peak_memory_mb"] > 0
    assert "total (target layers)" in out and "perplexity" in out

    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # no partial folder left
    assert (out_dir / "recipe.yaml").is_file() and (out_dir / "tokenizer.json").is_file()
    assert sparse_config_of(out_dir)["format"] == "sparse-24-bitmask" and result["checkpoint_mb"] > 0
    model = load_sparse(out_dir)
    for name, weight in linear_weights(model).items():
        if name != "lm_head":
            assert torch.all((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) == 2), name


def test_recipe_that_does_not_fit_the_model_fails_before_calibration(capsys, tmp_path):
    """The demo model's down_proj has 704 inputs, not a multiple of 128."""
    recipe = write(tmp_path / "r.yaml", "s_stage:\n  s_modifiers:\n    UniPruningModifier: {mask_structure: '64:128'}\n")
    start = time.perf_counter()
    code, _, err = run(capsys, "--recipe", recipe, "--output", str(tmp_path / "out"), *FAST)
    assert code == 2 and "mlp.down_proj has 704 inputs, not a multiple of 128" in err
    assert not (tmp_path / "out").exists()
    assert time.perf_counter() - start < 60


def test_save_saliency_then_extract_other_settings(capsys, tmp_path, tiny_model_path):
    saliency = tmp_path / "tiny.safetensors"
    code, out, err = run(
        capsys, "--model", tiny_model_path, "--recipe", "uni_24", "--output", str(tmp_path / "calibrated"),
        "--save-saliency", str(saliency), *FAST,
    )
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["saliency"] == str(saliency)
    for flags, structure, expected in (
        (["--sparsity", "0.7"], "unstructured", 0.7),
        (["--mask-structure", "4:8"], "4:8", 0.5),
        (["--sparsity", "0.6", "--allocation", "global"], "unstructured", 0.6),
    ):
        output = tmp_path / f"extracted-{len(list(tmp_path.iterdir()))}"
        code = main(["extract", "--model", tiny_model_path, "--saliency", str(saliency), "--output", str(output),
                     "--eval-window", "128", "--eval-tokens", "1024", *flags])
        out, err = capsys.readouterr()
        assert code == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert abs(result["sparsity"] - expected) < 0.01
        assert result["seconds"] > 0 and result["ppl_pruned"] > 0
        assert sparse_config_of(output)["sparsity_structure"] == structure
        model = load_sparse(output)
        assert all(torch.equal(w, model.get_submodule(n).weight) for n, w in linear_weights(model).items())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--saliency", "/nonexistent.safetensors", "--sparsity", "0.5"], "--saliency: saliency file /nonexistent.safetensors: no such file"),
        (["--mask-structure", "2:4", "--sparsity", "0.7"], "contradicts mask_structure"),
        ([], "sparsity is required"),
    ],
)
def test_extract_bad_arguments(capsys, tmp_path, argv, message, demo_saliency):
    argv = argv if "--saliency" in argv else ["--saliency", str(demo_saliency), *argv]
    code = main(["extract", "--output", str(tmp_path / "out"), *argv])
    _, err = capsys.readouterr()
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_extract_refuses_another_models_saliency(capsys, tmp_path, tiny_model_path, demo_saliency):
    code = main(["extract", "--model", tiny_model_path, "--saliency", str(demo_saliency), "--sparsity", "0.5",
                 "--output", str(tmp_path / "out"), "--eval-tokens", "0"])
    _, err = capsys.readouterr()
    assert code == 2 and "--saliency" in err and "model.layers.0.self_attn.q_proj" in err, err
    assert not (tmp_path / "out").exists()


def test_save_saliency_needs_overwrite_to_replace(capsys, tmp_path, demo_saliency):
    code, _, err = run(capsys, "--output", str(tmp_path / "out"), "--save-saliency", str(demo_saliency), *FAST)
    assert code == 2 and "--save-saliency" in err and "--overwrite" in err


@pytest.fixture(scope="module")
def demo_saliency(tmp_path_factory):
    """A saliency file of the demo model (4 short calibration windows)."""
    folder = tmp_path_factory.mktemp("demo-saliency")
    code = main(["prune", "--recipe", "uni_unstructured_50", "--output", str(folder / "out"),
                 "--save-saliency", str(folder / "demo.safetensors"), *FAST])
    assert code == 0
    return folder / "demo.safetensors"


def test_save_saliency_takes_the_tuned_recipe_without_its_per_layer_parts():
    """A saliency file is calibrated on the dense model: the tuned recipe's dense target and
    block tuning (which need layers masked as they calibrate) are dropped, not refused."""
    from unipruning_modifier.cli.prune import with_saved_saliency
    from unipruning_modifier.cli.recipes import BUILTIN_RECIPES, load_recipe

    path = str(BUILTIN_RECIPES / "uni_24_tuned.yaml")
    (modifier,) = with_saved_saliency(load_recipe(path), "x.safetensors", path).modifiers
    assert modifier.block_tune_epochs == 0 and modifier.dense_target == 0 and modifier.calibration_inputs == "dense"
    assert "block_tune_target" not in modifier.model_fields_set
