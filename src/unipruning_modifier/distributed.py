"""Data-parallel calibration (torchrun): the process group, each rank's slice of the data and
the collectives the modifier makes. docs/distributed.md describes the whole scheme.

Every function is the single-process identity outside an initialised group of more than one
process, so a single process runs exactly as it does without this module.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import torch.distributed as dist

__all__ = [
    "active",
    "device",
    "first_batch",
    "gather_rows",
    "init",
    "max_count",
    "mean_of_present",
    "rank_slice",
    "reduce_mean",
    "union_in_order",
    "world",
    "write_same_weights",
    "write_weights",
]


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def active() -> bool:
    """True inside a process group of more than one process."""
    return world()[1] > 1


def device() -> torch.device:
    """This rank's device: the CPU in a gloo group or without an accelerator, else its accelerator."""
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None or (active() and dist.get_backend() == "gloo"):
        return torch.device("cpu")
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def init(cpu: bool = False) -> torch.device:
    """Join torchrun's process group and return this rank's device: compressed-tensors'
    ``init_dist`` (nccl / xccl, one device per local rank) where an accelerator exists, gloo on
    the CPU where none does (``init_dist`` then fails on ``current_accelerator()`` being None)
    or where ``cpu`` asks for it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("no torchrun environment (RANK / WORLD_SIZE); launch with torchrun or unipruning prune --nproc")
    if not dist.is_initialized():
        if cpu or torch.accelerator.current_accelerator() is None:
            dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        else:
            from compressed_tensors.offload import init_dist

            init_dist()
    return device()


def rank_slice(count: int, rank: int | None = None, size: int | None = None) -> range:
    """The consecutive samples of ``count`` that rank ``rank`` of ``size`` calibrates on (ranks
    in order, sizes differing by at most one; as llm-compressor's ``get_rank_partition``)."""
    if rank is None or size is None:
        rank, size = world()
    return range(math.floor(count * rank / size), math.floor(count * (rank + 1) / size))


def _gather_ints(value: int) -> list[int]:
    values = [None] * world()[1]
    dist.all_gather_object(values, value)
    return values


def max_count(count: int) -> int:
    """The largest of the ranks' ``count``."""
    return max(_gather_ints(count)) if active() else count


def mean_of_present(tensors: list[torch.Tensor], present: bool) -> None:
    """In place, each tensor's mean over the ranks where ``present`` (the others pass zeros):
    the gradient of a step to which only the ranks that still had a batch contributed."""
    if not active():
        return
    count = torch.tensor([float(present)], dtype=torch.float32, device=tensors[0].device)
    dist.all_reduce(count)
    for tensor in tensors:
        if not present:
            tensor.zero_()
        dist.all_reduce(tensor)
        tensor.div_(max(count.item(), 1.0))


def first_batch(loader) -> int:
    """Global index of this rank's first calibration batch (0 for a single process).

    Ranks must hold consecutive slices of the data in rank order (``rank_slice``). Identical
    datasets on every rank (judged as llm-compressor judges them: fingerprint, or first sample)
    are refused: llm-compressor 0.14 then "partitions" them, but its sampler yields indices
    0..n/N-1 into the full dataset on every rank, so every rank would calibrate on the same
    first part of the data.
    """
    if not active():
        return 0
    dataset = getattr(loader, "dataset", None)
    fingerprint = getattr(dataset, "_fingerprint", None) or (str(dataset[0]) if dataset is not None and len(dataset) else None)
    fingerprints = [None] * world()[1]
    dist.all_gather_object(fingerprints, fingerprint)
    if fingerprint is not None and len(set(fingerprints)) == 1:
        raise ValueError(
            "UniPruningModifier: every rank got the same calibration dataset; llm-compressor 0.14 would give each "
            "rank the same first part of it. Give rank r its own slice (unipruning_modifier.distributed.rank_slice)"
        )
    counts = _gather_ints(0 if loader is None else len(loader))
    return sum(counts[: world()[0]])


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows [n_r, d] stacked in rank order (ranks may hold different n_r, also 0)."""
    if not active():
        return rows
    counts = _gather_ints(rows.shape[0])
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def reduce_mean(
    matrix: torch.Tensor | None, count: int, shape: tuple[int, ...], on: torch.device
) -> tuple[torch.Tensor | None, int]:
    """The count-weighted mean of the ranks' running means and the total count; a rank without
    one (count 0) contributes zeros. (None, 0) when no rank has one."""
    if not active():
        return matrix, count
    total = torch.tensor([float(count)], dtype=torch.float64, device=on)
    dist.all_reduce(total)
    total = int(total.item())
    if total == 0:
        return None, 0
    if matrix is None:
        matrix = torch.zeros(shape, dtype=torch.float32, device=on)
    matrix.mul_(count / total)
    dist.all_reduce(matrix)
    return matrix, total


def union_in_order(local: dict[str, str], order: list[str]) -> dict[str, str]:
    """The union over ranks of ``local`` (a layer -> the layer whose input statistics it
    shares), in ``order``: every layer some rank calibrated, so that every rank reduces the same
    layers in the same order (an MoE expert may get tokens on one rank only)."""
    if not active():
        return {name: local[name] for name in order if name in local}
    gathered = [None] * world()[1]
    dist.all_gather_object(gathered, local)
    merged = {key: value for part in gathered for key, value in part.items()}
    return {name: merged[name] for name in order if name in merged}


def write_weights(
    modules: dict[str, torch.nn.Module], compute: Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Write ``compute(name, weight)``'s (new weight, mask) into each module; return the masks.

    ``compute`` sees the module's current weight, onloaded. Across ranks the layers are dealt
    round-robin in the given order, one per rank per round: each is computed by one rank from
    the unchanged weight and broadcast, so every rank holds the same bits (written as ``_write``
    says). Barriers keep every read of a round before its writes and every write before the
    next round.
    """
    from compressed_tensors.utils import align_module_device, update_offload_parameter

    rank, size = world()
    masks = {}
    if size == 1:
        for name, module in modules.items():
            with torch.no_grad(), align_module_device(module):
                weight, masks[name] = compute(name, module.weight)
            update_offload_parameter(module, "weight", weight)
        return masks
    names = list(modules)
    for start in range(0, len(names), size):
        round_names = names[start : start + size]
        mine = {}
        for owner, name in enumerate(round_names):
            if owner == rank:
                with torch.no_grad(), align_module_device(modules[name]):
                    mine[name] = compute(name, modules[name].weight)
        dist.barrier()
        for owner, name in enumerate(round_names):
            module = modules[name]
            with torch.no_grad(), align_module_device(module):
                like = module.weight
                weight, mask = mine.pop(name, (torch.empty_like(like), torch.empty(like.shape, dtype=torch.bool, device=like.device)))
            weight, mask = weight.contiguous(), mask.contiguous()
            dist.broadcast(weight, src=owner)
            dist.broadcast(mask.view(torch.uint8), src=owner)
            _write(module, weight)
            masks[name] = mask
        dist.barrier()
    return masks


def write_same_weights(weights: dict[torch.nn.Module, torch.Tensor]) -> None:
    """Write each module's new weight, which every rank computed alike (cast to its dtype)."""
    with torch.no_grad():
        for module, weight in weights.items():
            _write(module, weight.to(module.weight.dtype))
    if active():
        dist.barrier()


def _write(module: torch.nn.Module, weight: torch.Tensor) -> None:
    """Weights that ranks share (compressed-tensors' distributed CPU / disk offload,
    ``load_offloaded_model``) are written by rank 0 alone; the others refresh only their
    onloaded copy."""
    from compressed_tensors.utils import update_offload_parameter

    if world()[0] == 0 or not _shared(module):
        update_offload_parameter(module, "weight", weight)
    else:
        _refresh_onloaded(module, weight)


def _shared(module: torch.nn.Module) -> bool:
    """True when the module's parameters live in offload storage that all ranks share."""
    from compressed_tensors.offload.cache.dist_cpu import DistributedCPUCache
    from compressed_tensors.offload.cache.dist_disk import DistributedDiskCache

    return isinstance(module._parameters, (DistributedCPUCache, DistributedDiskCache))


def _refresh_onloaded(module: torch.nn.Module, weight: torch.Tensor) -> None:
    """Update this rank's kept onloaded copy of a shared weight (rank 0 writes the offload);
    what ``OffloadCache.__setitem__`` does besides writing, in compressed-tensors 0.19."""
    cache = module._parameters
    offloaded = cache.offloaded_values["weight"]
    onloaded = cache.keep_onloaded_values.get(offloaded)
    if onloaded is not None and onloaded is not offloaded:
        onloaded.copy_(weight)
