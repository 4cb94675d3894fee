"""Data-parallel calibration across CPU processes (gloo), module by module (distributed.py,
layer_calibration.py): the saliency of two ranks equals one process's bit for bit, layers one
rank never saw still reduce, and every weight is computed once and held by every rank.
tests/test_torchrun.py runs the whole pipeline under torchrun."""

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
OUT, IN = 6, 8
BATCHES = 5
SPLIT = 3  # rank 0 calibrates batches 0..2, rank 1 batches 3..4


def _source_dir() -> Path:
    spec = importlib.util.find_spec("unipruning_modifier")  # does not run the package __init__
    return Path(list(spec.submodule_search_locations)[0])


_PACKAGE = "_unipruning_under_test"


def _load(name: str):
    """Import one module of the package without running its __init__ (which imports
    llm-compressor, far too slow for every spawned process): a bare stand-in package object
    points at the source folder, so the module's relative imports still work."""
    if _PACKAGE not in sys.modules:
        package = types.ModuleType(_PACKAGE)
        package.__path__ = [str(_source_dir())]
        sys.modules[_PACKAGE] = package
    return importlib.import_module(f"{_PACKAGE}.{name}")


def _settings(lc, deferred: bool):
    return lc.CalibrationSettings("stochastic_ria", None, 0.2, 0.05, 0.3, 0, track_first_step=True, gram=True, deferred=deferred)


def _data():
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(OUT, IN, generator=g)
    batches = [torch.randn(1, 4, IN, generator=g) * (1 + b) for b in range(BATCHES)]
    return weight, batches


def _single_process():
    lc = _load("layer_calibration")
    weight, batches = _data()
    calibration = lc.LayerCalibration("a", weight.shape, torch.device("cpu"), _settings(lc, deferred=False))
    for inputs in batches:
        calibration.observe(weight, inputs)
    record = calibration.finish()
    return record, calibration.gram


class _Loader(list):
    """A stand-in DataLoader: its batches and a ``dataset``."""

    def __init__(self, batches, dataset):
        super().__init__(batches)
        self.dataset = dataset


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    lc = _load("layer_calibration")
    distributed = _load("distributed")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        weight, batches = _data()
        mine = batches[:SPLIT] if rank == 0 else batches[SPLIT:]
        settings = _settings(lc, deferred=True)
        modules = {name: torch.nn.Linear(IN, OUT, bias=False) for name in ("a", "b", "c")}
        for module in modules.values():
            module.weight.data.copy_(weight)
        layers = {"a": lc.LayerCalibration("a", weight.shape, torch.device("cpu"), settings)}
        if rank == 0:  # "b" (an expert) gets tokens on rank 0 only, "c" on no rank
            layers["b"] = lc.LayerCalibration("b", weight.shape, torch.device("cpu"), settings)
        for inputs in mine:
            for calibration in layers.values():
                calibration.observe(weight, inputs)
        records = dict(lc.finish_layers(layers, modules, settings, torch.device("cpu")))
        first = distributed.first_batch(_Loader(mine, [f"rank {rank}'s slice"]))
        try:
            distributed.first_batch(_Loader(mine, ["the same dataset"]))
            refused = None
        except ValueError as error:
            refused = str(error)
        calls = []

        def compute(name, current):
            calls.append(name)
            return current * 0 + (1 + list(modules).index(name)), torch.ones_like(current, dtype=torch.bool)

        masks = distributed.write_weights(modules, compute)
        torch.save(
            {
                "records": {name: (r.gamma, r.anchor_mean, r.first_step, r.steps) for name, r in records.items()},
                "gram": layers["a"].gram,
                "b_gram": layers["b"].gram,
                "first": first,
                "refused": refused,
                "calls": calls,
                "weights": {name: module.weight.detach().clone() for name, module in modules.items()},
                "masks": masks,
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _gloo_or_skip():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")


def test_single_process_identities():
    distributed = _load("distributed")
    assert not dist.is_initialized()
    rows = torch.randn(3, 4)
    assert distributed.gather_rows(rows) is rows
    matrix = torch.randn(4, 4)
    assert distributed.reduce_mean(matrix, 7, (4, 4), torch.device("cpu")) == (matrix, 7)
    assert distributed.union_in_order({"b": "b", "a": "a"}, ["a", "b", "c"]) == {"a": "a", "b": "b"}
    assert distributed.first_batch([1, 2, 3]) == 0
    assert distributed.world() == (0, 1) and not distributed.active()


@pytest.mark.parametrize("count", [1, 7, 16, 129])
@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_rank_slices_cover_the_data_in_order(count, size):
    distributed = _load("distributed")
    slices = [distributed.rank_slice(count, rank, size) for rank in range(size)]
    assert [i for s in slices for i in s] == list(range(count))
    assert max(len(s) for s in slices) - min(len(s) for s in slices) <= 1


def test_two_gloo_ranks_reproduce_one_process(tmp_path):
    _gloo_or_skip()
    import torch.multiprocessing as mp

    try:
        mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    except (OSError, PermissionError) as error:  # sandbox forbids processes / shared memory
        pytest.skip(f"cannot spawn worker processes in this sandbox: {error}")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single, single_gram = _single_process()

    # the ranks agree bit for bit
    for name in ("a", "b", "c"):
        assert torch.equal(results[0]["weights"][name], results[1]["weights"][name]), name
        assert torch.equal(results[0]["masks"][name], results[1]["masks"][name]), name
    assert list(results[0]["records"]) == list(results[1]["records"]) == ["a", "b"]
    for name in ("a", "b"):
        for mine, other in zip(results[0]["records"][name], results[1]["records"][name]):
            assert torch.equal(mine, other) if isinstance(mine, torch.Tensor) else mine == other
    assert torch.equal(results[0]["gram"], results[1]["gram"]) and torch.equal(results[0]["b_gram"], results[1]["b_gram"])

    # saliency of "a" = the single process's over all batches, bit for bit; first_step is global
    gamma, anchor_mean, first_step, steps = results[0]["records"]["a"]
    assert steps == single.steps == BATCHES
    assert torch.equal(gamma, single.gamma) and torch.equal(anchor_mean, single.anchor_mean)
    assert torch.equal(first_step, single.first_step) and int(first_step.max()) >= SPLIT
    # the Gram matrix: the token-weighted mean, equal up to rounding
    torch.testing.assert_close(results[0]["gram"], single_gram, rtol=1e-6, atol=1e-6)
    # "b", seen by rank 0 only: its SPLIT batches, rank 1 joined with none
    assert results[0]["records"]["b"][3] == SPLIT

    # the global index of each rank's first batch; one dataset on every rank is refused
    assert [r["first"] for r in results] == [0, SPLIT]
    assert all("same calibration dataset" in r["refused"] for r in results)

    # write_weights: each layer computed by one rank (round-robin), its result on every rank
    assert results[0]["calls"] == ["a", "c"] and results[1]["calls"] == ["b"]
    for index, name in enumerate(("a", "b", "c")):
        assert bool((results[1]["weights"][name] == 1 + index).all()), name
