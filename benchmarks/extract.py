#!/usr/bin/env python
"""Calibrate once, extract many: is extraction identical to a fresh calibration, and how much faster?

    python benchmarks/extract.py MODEL --configs 0.3 0.4 0.5 0.6 0.7 0.8 2:4 4:8

1. One calibration with ``UniPruningModifier(save_saliency=FILE)`` (every layer calibrated on
   dense inputs, ``calibration_inputs: dense``), timed.
2. For every config: ``UniPruningModifier(load_saliency=FILE, ...)`` through oneshot's data-free
   pipeline (timed: the extraction), and a fresh calibration at that config with
   ``calibration_inputs: dense`` and the same seed and batches (timed); every parameter of the
   two pruned models is compared bit for bit.

One JSON line per config (stdout, and appended to ``--output``): ``identical``, the number of
differing tensors, extraction and calibration seconds and peak memory, their ratio, and (with
``--eval-tokens`` > 0) the extracted model's perplexity. ``reconstruct`` is ``none`` here: the
re-fit needs each layer's calibration inputs, so it is not part of extraction.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import harness
from harness import Benchmark, Config, log, release

with contextlib.redirect_stdout(sys.stderr):
    import torch
    from llmcompressor.core import reset_session

    from unipruning_modifier import UniPruningModifier
    from unipruning_modifier import evaluation

IGNORE = ["re:.*lm_head"]


def fields(config: Config) -> dict:
    if config.structured:
        return {"mask_structure": config.text}
    return {"sparsity": config.sparsity}


class ExtractBenchmark(Benchmark):
    def run_oneshot(self, modifier, calibrate: bool):
        model = self.load()
        cost = self.timed_oneshot(model, [modifier], calibrate)
        with contextlib.suppress(Exception):
            reset_session()
        return model.eval(), cost

    def sweep(self, configs: list[Config], saliency: Path) -> None:
        first = configs[0]
        log(f"calibrating once ({first}) -> {saliency}")
        model, cost = self.run_oneshot(
            UniPruningModifier(ignore=IGNORE, seed=self.args.seed, save_saliency=str(saliency), **fields(first)), True
        )
        self.record("calibrate_once", str(first), seconds=cost["seconds"], peak_memory_mb=cost["peak_memory_mb"],
                    saliency_mb=saliency.stat().st_size / 2**20)
        del model
        release(self.device)
        for config in configs:
            log(f"{config}: extraction")
            extracted, extract_cost = self.run_oneshot(
                UniPruningModifier(ignore=IGNORE, load_saliency=str(saliency), **fields(config)), False
            )
            state = {k: v.detach().cpu().clone() for k, v in extracted.state_dict().items()}
            sparsity = evaluation.total_sparsity(extracted, harness.target_names(extracted))
            ppl = None
            if self.args.eval_tokens:
                ppl = evaluation.perplexity(extracted, self.eval_tokens, self.args.eval_window, self.args.eval_tokens)
            del extracted
            release(self.device)
            log(f"{config}: fresh calibration")
            fresh, fresh_cost = self.run_oneshot(
                UniPruningModifier(ignore=IGNORE, seed=self.args.seed, calibration_inputs="dense", **fields(config)), True
            )
            differing = [k for k, v in fresh.state_dict().items() if not torch.equal(v.detach().cpu(), state[k])]
            del fresh
            release(self.device)
            self.record(
                "extract", str(config), sparsity=sparsity, ppl=ppl,
                identical=not differing, differing_tensors=len(differing),
                seconds=extract_cost["seconds"], peak_memory_mb=extract_cost["peak_memory_mb"],
                calibrate_seconds=fresh_cost["seconds"], calibrate_peak_memory_mb=fresh_cost["peak_memory_mb"],
                speedup=fresh_cost["seconds"] / extract_cost["seconds"],
            )
            log(f"{config}: identical={not differing}, extraction {extract_cost['seconds']:.2f}s vs "
                f"calibration {fresh_cost['seconds']:.1f}s")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    harness.add_common_arguments(parser)
    parser.add_argument("--configs", nargs="+", default=["0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "2:4", "4:8"])
    parser.set_defaults(eval_tokens=0)  # perplexity of each extracted model only when asked
    args = parser.parse_args(argv)
    try:
        args.configs = [Config(c) for c in args.configs]
    except ValueError as error:
        parser.error(str(error))
    return harness.finish_common_arguments(parser, args)


def run(args) -> int:
    bench = ExtractBenchmark(args)
    with tempfile.TemporaryDirectory() as folder:
        bench.sweep(args.configs, Path(folder) / "saliency.safetensors")
    return 0 if all(r.get("identical", True) for r in bench.results) else 1


def main(argv=None) -> int:
    return harness.script_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
