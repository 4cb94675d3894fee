#!/usr/bin/env python
"""Saliency file size, encoding and extraction time, and what the compact form costs in masks.

    python benchmarks/saliency_size.py MODEL --num-samples 32 --seq-len 512 --eval-tokens 16384

One calibration with ``save_saliency`` (timed; the records handed to ``save_saliency`` are kept
in memory). Then one JSON line with the file's size (bytes per weight, by tensor kind, against
version 1's 12) and the time ``save_saliency`` took, and for every config one line: the
extraction through ``oneshot`` (timed), how many mask entries differ from the masks the records
themselves give (what a fresh calibration with ``calibration_inputs: dense`` applies:
``MaskPolicy.masks``), and the perplexity of both. A last line extrapolates the size to
Llama-2-7B's shapes with the measured per-layer overheads.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import harness
from harness import Benchmark, log, release

with harness.contextlib.redirect_stdout(sys.stderr):
    import torch
    from safetensors import safe_open

    from unipruning_modifier import UniPruningModifier, evaluation
    from unipruning_modifier import modifier as modifier_module
    from unipruning_modifier.saliency_encoding import GRID, count_bits, rank_bits
    from unipruning_modifier.saliency_file import read_metadata

IGNORE = ["re:.*lm_head"]
CONFIGS = {
    "0.5": {"sparsity": 0.5},
    "0.7": {"sparsity": 0.7},
    "0.555": {"sparsity": 0.555},
    "0.625": {"sparsity": 0.625},
    "row-0.6": {"sparsity": 0.6, "allocation": "row"},
    "2:4": {"mask_structure": "2:4"},
    "4:8-first_step": {"mask_structure": "4:8", "nm_order": "first_step"},
    "global-0.6": {"sparsity": 0.6, "allocation": "global"},
    "owl-0.7": {"sparsity": 0.7, "allocation": "owl"},
}
LLAMA_7B = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]  # per decoder layer, x 32


def calibrate(bench: Benchmark, path: Path) -> tuple[dict, float, float]:
    """(the records written, calibration seconds, save_saliency seconds)."""
    captured, timing = {}, {}
    original = modifier_module.save_saliency

    def capture(target, layers, metadata):
        captured.update({name: record.to("cpu", torch.float32) for name, record in layers.items()})
        start = time.perf_counter()
        original(target, layers, metadata)
        timing["save"] = time.perf_counter() - start

    modifier_module.save_saliency = capture
    try:
        model = bench.load()
        cost = bench.timed_oneshot(model, [UniPruningModifier(sparsity=0.5, kappa=0.1, ignore=IGNORE, save_saliency=str(path))])
    finally:
        modifier_module.save_saliency = original
    del model
    return captured, cost["seconds"], timing["save"]


def apply(model, masks: dict) -> None:
    with torch.no_grad():
        for name, mask in masks.items():
            weight = model.get_submodule(name).weight
            weight.masked_fill_(~mask.to(weight.device), 0)


def size_line(path: Path, records: dict) -> dict:
    weights = sum(r.gamma.numel() for r in records.values())
    kinds = Counter()
    with safe_open(str(path), "pt") as handle:
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            kinds[key.rsplit(".", 1)[1]] += tensor.numel() * tensor.element_size()
    size = path.stat().st_size
    return {"weights": weights, "layers": len(records), "bytes": size, "bytes_per_weight": size / weights,
            "by_kind": {k: v / weights for k, v in sorted(kinds.items())}, "header_bytes": size - sum(kinds.values()),
            "version_1_bytes": 12 * weights}


def extrapolate(measured: dict, layers: int) -> dict:
    """Llama-2-7B: ranks and counts from the shapes, histograms and first_step exceptions at the
    measured per-layer / per-weight rates."""
    per_layer_histograms = (measured["by_kind"]["gamma_histogram"] + measured["by_kind"]["anchor_histogram"]) * measured["weights"] / layers
    late = measured["by_kind"]["late"]
    total = weights = 0
    for out, columns in LLAMA_7B * 32:
        weights += out * columns
        total += math.ceil(out * columns * rank_bits(columns) / 8) + math.ceil(out * (GRID - 1) * count_bits(columns) / 8)
        total += per_layer_histograms + late * out * columns
    return {"weights": weights, "bytes": total, "bytes_per_weight": total / weights, "version_1_bytes": 12 * weights,
            "bf16_model_weight_bytes": 2 * weights}


def run(args) -> int:
    bench = Benchmark(args)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "saliency.safetensors"
        log("calibrating once")
        records, seconds, save_seconds = calibrate(bench, path)
        release(bench.device)
        size = size_line(path, records)
        bench.record("saliency_file", "-", seconds=seconds, save_seconds=save_seconds, **size)
        bench.record("extrapolated", "llama-2-7b", **extrapolate(size, len(records)))
        for config, fields in CONFIGS.items():
            log(f"{config}: extraction")
            model = bench.load()
            cost = bench.timed_oneshot(model, [UniPruningModifier(ignore=IGNORE, load_saliency=str(path), **fields)], calibrate=False)
            file_masks = {name: model.get_submodule(name).weight != 0 for name in records}
            sparsity = evaluation.total_sparsity(model, list(records))
            ppl_file = evaluation.perplexity(model, bench.eval_tokens, args.eval_window, args.eval_tokens) if args.eval_tokens else None
            reference = bench.load()
            policy = UniPruningModifier(ignore=IGNORE, **fields).resolve(reference)[1]
            fresh = policy.masks(records)
            apply(reference, fresh)
            ppl_fresh = evaluation.perplexity(reference, bench.eval_tokens, args.eval_window, args.eval_tokens) if args.eval_tokens else None
            differ = sum(int((file_masks[n] != fresh[n].to(file_masks[n].device)).sum()) for n in records)
            bench.record(
                "extract", config, sparsity=sparsity, ppl=ppl_file, ppl_fresh=ppl_fresh, seconds=cost["seconds"],
                peak_memory_mb=cost["peak_memory_mb"], mask_entries_differing=differ, mask_fraction_differing=differ / size["weights"],
                layer_budgets_equal=all(int(file_masks[n].sum()) == int(fresh[n].sum()) for n in records),
            )
            log(f"{config}: {differ} mask entries differ, extraction {cost['seconds']:.2f}s, ppl {ppl_file} vs {ppl_fresh}")
            del model, reference
            release(bench.device)
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    harness.add_common_arguments(parser, num_samples=32, seq_len=512)
    parser.set_defaults(eval_tokens=16384)
    return harness.finish_common_arguments(parser, parser.parse_args(argv))


def main(argv=None) -> int:
    return harness.script_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
