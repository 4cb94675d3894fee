#!/usr/bin/env python
"""Prune, then quantize: does the 2:4 mask survive, and what does each quantizer cost in perplexity?

    python benchmarks/quantize.py MODEL --scheme W4A16 \\
        --quantizers rtn gptq masked_gptq masked_gptq_kept

The model is pruned once (``--prune-recipe``, the shipped ``uni_24`` by default) and kept in
memory as a state dict; then, for every quantizer, a fresh copy of the pruned model is quantized
with llm-compressor's ``oneshot`` on the same calibration windows:

- ``rtn``: llm-compressor's ``QuantizationModifier`` (round to nearest),
- ``gptq``: llm-compressor 0.14's ``GPTQModifier`` (no mask preservation since 0.13),
- ``masked_gptq``: our ``MaskedGPTQModifier`` (``compensation: all``, the default),
- ``masked_gptq_kept``: the same with ``compensation: kept``.

Every line (JSON, stdout; also appended to ``--output``) has perplexity on ``--eval`` (and
``--heldout``), the seconds and peak memory of that oneshot, the fraction of groups of 4 inputs
holding more than 2 non-zeros in the dequantized target weights (``groups_over_2``, 0 when the
pattern holds), and the fraction of pruned weights that became non-zero (``pruned_refilled``).
Lines ``dense`` and ``pruned`` (no quantization) come first.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import harness
from harness import Benchmark, log, release, target_names

with contextlib.redirect_stdout(sys.stderr):
    import torch
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from unipruning_modifier import MaskedGPTQModifier
    from unipruning_modifier.cli.recipes import BUILTIN_RECIPES

QUANTIZERS = ("rtn", "gptq", "masked_gptq", "masked_gptq_kept")


def build_quantizer(name: str, scheme: str):
    common = {"targets": ["Linear"], "ignore": ["re:.*lm_head"], "scheme": scheme}
    if name == "rtn":
        return QuantizationModifier(**common)
    if name == "gptq":
        return GPTQModifier(**common)
    if name == "masked_gptq":
        return MaskedGPTQModifier(**common, compensation="all")
    if name == "masked_gptq_kept":
        return MaskedGPTQModifier(**common, compensation="kept")
    raise ValueError(f"unknown quantizer {name!r}")


@torch.no_grad()
def pattern_report(model, names: list[str], pruned: dict[str, torch.Tensor]) -> dict:
    """2:4 violations and refilled pruned weights, on the weights the layers compute with."""
    modules = dict(model.named_modules())
    groups = over = refilled = pruned_total = 0
    for name in names:
        module = modules[name]
        weight = module.weight.detach()
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and scheme.weights is not None:
            weight = forward_quantize(module, weight, "weight", scheme.weights)
        nonzero = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
        groups += nonzero.numel()
        over += int((nonzero > 2).sum())
        mask = pruned[name].to(weight.device)
        refilled += int((weight[mask] != 0).sum())
        pruned_total += int(mask.sum())
    return {"groups_over_2": over / groups, "pruned_refilled": refilled / max(pruned_total, 1)}


class QuantBenchmark(Benchmark):
    """The harness's data, loading, evaluation and JSON lines; prune once, quantize many."""

    def __init__(self, args):
        super().__init__(args)
        self.pruned_state: dict[str, torch.Tensor] | None = None
        self.pruned_zeros: dict[str, torch.Tensor] = {}

    def prune(self) -> None:
        log(f"pruning with {self.args.prune_recipe}")
        model = self.load()
        cost = self.timed_oneshot(model, self.args.prune_recipe)
        model.eval()
        names = target_names(model)
        self.pruned_zeros = {n: m.weight.detach().eq(0).cpu() for n, m in model.named_modules() if n in names}
        sparsity, ppl, _ = self.evaluate(model)
        self.record("pruned", "2:4", sparsity=sparsity, **ppl, **cost, **pattern_report(model, names, self.pruned_zeros))
        log(f"pruned: {ppl}")
        self.pruned_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        del model
        release(self.device)

    def quantize(self, name: str) -> None:
        log(f"{name} {self.args.scheme}")
        model = None
        try:
            model = self.load()
            model.load_state_dict(self.pruned_state)
            cost = self.timed_oneshot(model, [build_quantizer(name, self.args.scheme)])
            model.eval()
            names = target_names(model)
            sparsity, ppl, _ = self.evaluate(model)
            report = pattern_report(model, names, self.pruned_zeros)
            self.record(name, self.args.scheme, sparsity=sparsity, **ppl, **cost, **report)
            log(f"{name}: {ppl} {report} in {cost['seconds']:.1f}s")
        except Exception as error:  # noqa: BLE001 - one failed run must not stop the sweep
            self.failed(name, self.args.scheme, error)
        finally:
            del model
            release(self.device)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Prune once, then compare quantizers: perplexity and whether the 2:4 mask survives.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    harness.add_common_arguments(parser)
    parser.add_argument("--scheme", default="W4A16", help="llm-compressor preset scheme (W4A16, W8A8, FP8_DYNAMIC, ...)")
    parser.add_argument("--quantizers", nargs="+", default=list(QUANTIZERS), choices=QUANTIZERS, metavar="Q",
                        help=f"any of {', '.join(QUANTIZERS)}")
    parser.add_argument("--prune-recipe", default=str(BUILTIN_RECIPES / "uni_24.yaml"), help="pruning recipe (2:4)")
    args = parser.parse_args(argv)
    if not Path(args.prune_recipe).is_file():
        parser.error(f"--prune-recipe {args.prune_recipe!r} is not a file")
    return harness.finish_common_arguments(parser, args)


def run(args) -> int:
    bench = QuantBenchmark(args)
    bench.dense()
    bench.prune()
    for name in args.quantizers:
        bench.quantize(name)
    return 1 if any("error" in r for r in bench.results) else 0


def main(argv=None) -> int:
    return harness.script_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
