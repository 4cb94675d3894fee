"""all_reduce_state across two CPU processes (gloo): every rank must end with the same state and mask."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

WORLD = 2
SHAPE = (6, 8)
SPARSITY = 0.5


def _source_dir() -> Path:
    spec = importlib.util.find_spec("unipruning_modifier")  # does not run the package __init__
    return Path(list(spec.submodule_search_locations)[0])


_PACKAGE = "_unipruning_under_test"


def _load(name: str):
    """Import one module of the package without running its __init__ (which imports
    llm-compressor, far too slow for every spawned process): a bare stand-in package object
    points at the source folder, so the module's relative imports (torch-only) still work."""
    if _PACKAGE not in sys.modules:
        package = types.ModuleType(_PACKAGE)
        package.__path__ = [str(_source_dir())]
        sys.modules[_PACKAGE] = package
    return importlib.import_module(f"{_PACKAGE}.{name}")


def _rank_state(md, rank: int):
    """A deterministic, rank-specific state: rank 0 ran 3 batches, rank 1 ran 1."""
    g = torch.Generator().manual_seed(100 + rank)
    state = md.SaliencyState.zeros(SHAPE, "cpu")
    state.z = torch.randn(SHAPE, generator=g)
    state.anchor_mean = torch.rand(SHAPE, generator=g)
    first = torch.randint(-1, 4, SHAPE, generator=g, dtype=torch.int32)
    if rank == 0:
        first[0, :4] = torch.tensor([-1, -1, 2, 0], dtype=torch.int32)
    else:
        first[0, :4] = torch.tensor([-1, 1, -1, 3], dtype=torch.int32)
    state.first_step = first
    state.threshold = [0.25, 0.75][rank]
    state.steps = [3, 1][rank]
    return state


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    md = _load("mirror_descent")
    masks = _load("masks")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        state = _rank_state(md, rank)
        md.all_reduce_state(state)
        keys = masks.saliency_keys(state.gamma, state.anchor_mean, state.first_step)
        mask = masks.unstructured_mask(keys, SPARSITY)
        first_keys = masks.saliency_keys(state.gamma, state.anchor_mean, state.first_step, nm_order="first_step")
        nm = masks.nm_mask(first_keys, 2, 4)
        torch.save(
            {
                "z": state.z,
                "first_step": state.first_step,
                "anchor_mean": state.anchor_mean,
                "threshold": state.threshold,
                "steps": state.steps,
                "mask": mask,
                "nm": nm,
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_all_reduce_state_is_noop_without_process_group():
    md = _load("mirror_descent")
    assert not dist.is_initialized()
    state = _rank_state(md, 0)
    before = (state.z.clone(), state.first_step.clone(), state.anchor_mean.clone(), state.threshold, state.steps)
    md.all_reduce_state(state)
    assert torch.equal(state.z, before[0])
    assert torch.equal(state.first_step, before[1])
    assert torch.equal(state.anchor_mean, before[2])
    assert (state.threshold, state.steps) == before[3:]


def test_all_reduce_state_is_noop_in_a_single_rank_group(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    md = _load("mirror_descent")
    state = _rank_state(md, 1)
    before = (state.z.clone(), state.first_step.clone(), state.anchor_mean.clone(), state.threshold, state.steps)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'single'}", rank=0, world_size=1)
    try:
        md.all_reduce_state(state)
    finally:
        dist.destroy_process_group()
    assert torch.equal(state.z, before[0])
    assert torch.equal(state.first_step, before[1])
    assert torch.equal(state.anchor_mean, before[2])
    assert (state.threshold, state.steps) == before[3:]


def test_all_reduce_state_two_gloo_ranks(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    import torch.multiprocessing as mp

    init_file = tmp_path / "rendezvous"
    try:
        mp.spawn(_worker, args=(str(init_file), str(tmp_path)), nprocs=WORLD, join=True)
    except (OSError, PermissionError) as error:  # sandbox forbids processes / shared memory
        pytest.skip(f"cannot spawn worker processes in this sandbox: {error}")

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    md = _load("mirror_descent")
    masks = _load("masks")
    states = [_rank_state(md, r) for r in range(WORLD)]

    # every rank holds the same state
    for key in ("z", "first_step", "anchor_mean", "mask", "nm"):
        assert torch.equal(results[0][key], results[1][key]), key
    assert results[0]["threshold"] == results[1]["threshold"]
    assert results[0]["steps"] == results[1]["steps"] == 4

    r = results[0]
    # z: the mean of the ranks
    torch.testing.assert_close(r["z"], (states[0].z + states[1].z) / 2, rtol=1e-6, atol=1e-7)
    # threshold: the mean
    assert r["threshold"] == pytest.approx(0.5, abs=1e-12)
    # anchor mean: weighted by steps (3 and 1 batches)
    torch.testing.assert_close(
        r["anchor_mean"], (3 * states[0].anchor_mean + 1 * states[1].anchor_mean) / 4, rtol=1e-6, atol=1e-7
    )
    # first_step: earliest non-negative, -1 only where both are -1
    f0, f1 = states[0].first_step, states[1].first_step
    big = torch.iinfo(torch.int32).max
    expected_first = torch.minimum(torch.where(f0 < 0, big, f0), torch.where(f1 < 0, big, f1))
    expected_first = torch.where(expected_first == big, -1, expected_first).to(torch.int32)
    assert r["first_step"].dtype == torch.int32
    assert torch.equal(r["first_step"], expected_first)
    assert r["first_step"][0, :4].tolist() == [-1, 1, 2, 0]
    assert bool((expected_first == -1).any()) and bool((expected_first >= 0).any())

    # and the mask is the one the combined state gives
    combined = md.SaliencyState(z=r["z"], first_step=r["first_step"], anchor_mean=r["anchor_mean"], threshold=r["threshold"])
    mask = masks.unstructured_mask(masks.saliency_keys(combined.gamma, combined.anchor_mean), SPARSITY)
    assert torch.equal(r["mask"], mask)
    assert int(r["mask"].sum()) == masks.kept_count(SHAPE[0] * SHAPE[1], SPARSITY)
    assert bool((r["nm"].reshape(SHAPE[0], -1, 4).sum(-1) == 2).all())
