"""End to end under ``torchrun --nproc_per_node 2`` (gloo, CPU): the demo model pruned by two
data-parallel ranks against one process (tests/torchrun_worker.py does the pruning; about a
minute on two cores). docs/distributed.md states what is compared and why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from unipruning_modifier import data
from unipruning_modifier.distributed import rank_slice
from unipruning_modifier.masks import kept_count

WORKER = Path(__file__).resolve().parent / "torchrun_worker.py"
WORLD = 2
# least_squares: the Gram matrices are summed over ranks, so the re-fitted weights match one
# process up to rounding, and later layers' masks in nearly every entry (measured 99.998%)
MASK_AGREEMENT = 0.999


def _env(**extra) -> dict[str, str]:
    """This environment, the package under test first on the path."""
    path = os.pathsep.join([str(Path(data.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **extra}


def _run(argv: list[str], cwd: Path) -> None:
    done = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not Path(data.demo_model_path(), "config.json").is_file() or not Path(data.demo_calibration_text()).is_file():
        pytest.skip("the demo model or its calibration text is not installed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    root = tmp_path_factory.mktemp("torchrun")
    (root / "dist").mkdir()
    (root / "single").mkdir()
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    _run([*launch, str(WORKER), str(root / "dist")], root)
    _run([sys.executable, str(WORKER), str(root / "single")], root)
    return root


def _load(root: Path, case: str):
    ranks = [torch.load(root / "dist" / f"{case}-rank{r}.pt") for r in range(WORLD)]
    return ranks, torch.load(root / "single" / f"{case}-single.pt")


@pytest.mark.parametrize("case", ["layer-0.5", "2:4-least_squares"])
def test_each_rank_calibrates_on_its_own_slice(runs, case):
    ranks, single = _load(runs, case)
    everything = single["windows"]
    for rank, result in enumerate(ranks):
        assert torch.equal(result["windows"], everything[list(rank_slice(len(everything), rank, WORLD))])
        passes = result["seen"].reshape(-1, *result["windows"].shape)  # the pipeline runs each batch twice
        assert all(torch.equal(seen, result["windows"]) for seen in passes)
    assert torch.equal(torch.cat([r["windows"] for r in ranks]), everything)


@pytest.mark.parametrize("case", ["layer-0.5", "2:4-least_squares", "2:4-tuned"])
def test_ranks_agree_and_masks_are_exact(runs, case):
    ranks, _ = _load(runs, case)
    weights = ranks[0]["weights"]
    for name, weight in weights.items():
        assert torch.equal(weight, ranks[1]["weights"][name]), name
        kept = weight != 0
        if case == "layer-0.5":
            assert int(kept.sum()) == kept_count(kept.numel(), 0.5), name
        else:
            assert bool((kept.reshape(weight.shape[0], -1, 4).sum(-1) == 2).all()), name
    # when save_sparse returns, on every rank, the folder is rewritten into the sparse format, and
    # the checkpoint loaded then equals the model in memory
    assert [r["format"] for r in ranks] == ["sparse-bitmask" if case == "layer-0.5" else "sparse-24-bitmask"] * WORLD
    assert all(r["loaded_equal"] for r in ranks)
    # the weights were shared between the ranks (rank 0 alone wrote them)
    assert [r["cache"] for r in ranks] == ["DistributedCPUCache"] * WORLD


@pytest.mark.parametrize("case", ["layer-0.5", "2:4-least_squares"])
def test_each_round_deals_one_target_to_every_rank(runs, case):
    ranks, single = _load(runs, case)
    assert all(len(names) == 1 for names in single["rounds"])
    assert ranks[0]["rounds"] == ranks[1]["rounds"]
    per_layer = {}  # every decoder layer's targets in rounds of two, but its last when their count is odd
    for names in ranks[0]["rounds"]:
        per_layer.setdefault(names[0].split(".mlp.")[0].split(".self_attn.")[0], []).append(len(names))
    assert all(sizes[:-1] == [WORLD] * (len(sizes) - 1) for sizes in per_layer.values()), per_layer
    assert [name for names in ranks[0]["rounds"] for name in names] == [name for names in single["rounds"] for name in names]


def test_without_reconstruction_two_ranks_are_one_process_bit_for_bit(runs):
    ranks, single = _load(runs, "layer-0.5")
    for name, weight in single["weights"].items():
        assert torch.equal(ranks[0]["weights"][name], weight), name


def test_with_least_squares_two_ranks_match_one_process_within_tolerance(runs):
    ranks, single = _load(runs, "2:4-least_squares")
    agree = total = 0
    for name, weight in single["weights"].items():
        same = (ranks[0]["weights"][name] != 0) == (weight != 0)
        if name.startswith("model.layers.0."):  # identical inputs: identical saliency and mask
            assert bool(same.all()), name
            torch.testing.assert_close(ranks[0]["weights"][name], weight, rtol=0, atol=1e-3)
        agree, total = agree + int(same.sum()), total + same.numel()
    assert agree / total >= MASK_AGREEMENT


def test_block_tuning_moves_the_kept_weights_alike_on_every_rank(runs):
    """Each step averages the ranks' gradients, so the ranks' weights stay equal (above); the
    tuning moved them, and layer 0 (identical inputs, so identical masks) keeps its masks."""
    tuned, _ = _load(runs, "2:4-tuned")
    fitted, _ = _load(runs, "2:4-least_squares")
    for name, weight in tuned[0]["weights"].items():
        assert not torch.equal(weight, fitted[0]["weights"][name]), name
        if name.startswith("model.layers.0."):
            assert torch.equal(weight != 0, fitted[0]["weights"][name] != 0), name


def test_the_same_dataset_on_every_rank_is_refused(runs):
    for rank in range(WORLD):
        assert "same calibration dataset" in (runs / "dist" / f"refused-rank{rank}.txt").read_text()


def test_cli_nproc_2_prunes_as_one_process_does(runs, tmp_path):
    """``unipruning prune --nproc 2`` (its own launcher, gloo): rank 0 reports and saves a
    checkpoint bit-identical to one process's (no re-fit; one thread each, as in the workers)."""
    from unipruning_modifier.checkpoint import load_sparse

    recipe = tmp_path / "r.yaml"
    recipe.write_text("s_stage:\n  s_modifiers:\n    UniPruningModifier: {sparsity: 0.5, ignore: ['re:.*lm_head']}\n")
    common = ["--recipe", str(recipe), "--num-samples", "4", "--seq-len", "64", "--eval-window", "64", "--eval-tokens", "256", "-q"]
    env = _env(OMP_NUM_THREADS="1")
    reports = {}
    for name, extra in (("two", ["--nproc", "2"]), ("one", [])):
        command = [sys.executable, "-m", "unipruning_modifier.cli", "prune", *common, "--output", str(tmp_path / name), *extra]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        reports[name] = json.loads(done.stdout.strip().splitlines()[-1])
    assert reports["two"]["nproc"] == 2 and reports["one"]["nproc"] == 1
    assert reports["two"]["num_samples"] == reports["one"]["num_samples"] == 4
    two, one = (load_sparse(tmp_path / name, dtype=torch.float32).state_dict() for name in ("two", "one"))
    assert two.keys() == one.keys() and all(torch.equal(two[key], one[key]) for key in one)


def test_cli_nproc_bad_argument_is_one_error_line(tmp_path):
    """Every worker refuses a bad --model; the user sees rank 0's one line and exit code 2."""
    command = [sys.executable, "-m", "unipruning_modifier.cli", "prune", "--nproc", "2", "--model", "/nonexistent/model"]
    done = subprocess.run([*command, "--output", str(tmp_path / "out")], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert [line for line in done.stderr.splitlines() if "error:" in line] == [
        "unipruning prune: error: --model /nonexistent/model: no such folder"
    ]
    assert not (tmp_path / "out").exists()


def test_a_save_failing_on_rank_0_ends_the_run(tmp_path):
    """Rank 0 cannot write the shard (here a folder sits at its path; on a full disk, the same
    error): the run fails with that error instead of hanging, the other rank waiting in one of
    llm-compressor's collectives while rank 0 waited in save_sparse's barrier."""
    if not Path(data.demo_model_path(), "config.json").is_file() or not Path(data.demo_calibration_text()).is_file():
        pytest.skip("the demo model or its calibration text is not installed")
    (tmp_path / "layer-0.5-checkpoint" / "model.safetensors").mkdir(parents=True)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    cases = json.dumps({"layer-0.5": {"sparsity": 0.5}})
    try:
        done = subprocess.run(
            [*launch, str(WORKER), str(tmp_path), cases], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the ranks still wait for each other 300 s after rank 0's save failed")
    assert done.returncode != 0
    assert "[rank0]" in done.stderr and "Is a directory" in done.stderr, done.stderr[-3000:]
