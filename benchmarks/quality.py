#!/usr/bin/env python
"""Quality benchmark: perplexity, time and memory of UniPruning vs ALPS, Wanda, SparseGPT, magnitude.

    python benchmarks/quality.py MODEL --methods unipruning wanda sparsegpt magnitude \\
        --configs 0.5 0.6 0.7 2:4 4:8

For every (method, config) the model is loaded fresh from disk, pruned with llm-compressor's
``oneshot`` (sequential pipeline, the same calibration windows for every run) or, for
``magnitude``, by keeping the largest |W| of each target layer; then its perplexity on the
evaluation text and the achieved sparsity of the target layers (every Linear except lm_head)
are measured. One JSON object per run (harness.py). See benchmarks/README.md.

Configs: a float ``p`` is unstructured sparsity p (a fraction pruned per layer); ``N:M`` is the
mask_structure every method is given.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import harness
from harness import Benchmark, Config, log, release, target_names

with contextlib.redirect_stdout(sys.stderr):
    import torch
    import yaml

    from unipruning_modifier import UniPruningModifier

METHODS = ("unipruning", "wanda", "sparsegpt", "magnitude", "alps")


@torch.no_grad()
def magnitude_prune(model: torch.nn.Module, names: list[str], config: Config) -> None:
    """Keep the largest |W| per layer (unstructured) or per group of M inputs (N:M).

    Ties (common: bf16 checkpoints have few distinct magnitudes) go to the lower index, via a
    stable sort, so CPU and GPU runs pick the same weights.
    """
    modules = dict(model.named_modules())
    for name in names:
        weight = modules[name].weight
        score = weight.detach().abs().float()
        if config.structured:
            if weight.shape[-1] % config.m:
                raise ValueError(f"{name} has {weight.shape[-1]} inputs, not a multiple of {config.m}")
            groups = score.reshape(weight.shape[0], -1, config.m)
            order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
            keep = torch.zeros_like(groups, dtype=torch.bool)
            keep.scatter_(-1, order[..., : config.m - config.n], True)
            keep = keep.reshape(weight.shape)
        else:
            total = score.numel()
            kept = total - int(round(config.sparsity * total))
            order = torch.sort(score.reshape(-1), descending=True, stable=True).indices
            keep = torch.zeros(total, dtype=torch.bool, device=score.device)
            keep[order[:kept]] = True
            keep = keep.reshape(weight.shape)
        weight.masked_fill_(~keep, 0)


def build_modifier(method: str, config: Config, extra: dict, seed: int):
    ignore = ["re:.*lm_head"]
    if method == "unipruning":
        kwargs = {"ignore": ignore, "seed": seed}
        if config.structured:
            kwargs["mask_structure"] = config.text
        else:
            kwargs["sparsity"] = config.sparsity
        kwargs.update(extra)
        return UniPruningModifier(**kwargs)
    # llm-compressor's SparsityModifierBase wants the sparsity with N:M too
    mask_structure = config.text if config.structured else "0:0"
    kwargs = dict(sparsity=config.sparsity, mask_structure=mask_structure, targets=["Linear"], ignore=ignore)
    if method == "wanda":
        from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

        return WandaPruningModifier(**kwargs)
    if method == "sparsegpt":
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

        return SparseGPTModifier(**kwargs)
    if method == "alps":
        from alps import ALPSModifier

        return ALPSModifier(**kwargs)
    raise ValueError(f"unknown method {method!r}")


def parse_extra(items: list[str], sparsity_hint: str = "set it with --configs instead") -> dict:
    """--unipruning-args as recipe fields; ArgumentTypeError for a malformed item or a sparsity
    field (``sparsity_hint`` says where the sparsity comes from instead)."""
    extra = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"--unipruning-args expects KEY=VALUE, got {item!r}")
        extra[key.strip()] = yaml.safe_load(value)
    for key in ("sparsity", "mask_structure"):
        if key in extra:
            raise argparse.ArgumentTypeError(f"--unipruning-args {key}=...: {sparsity_hint}")
    return extra


class QualityBenchmark(Benchmark):
    def run(self, method: str, config: Config) -> None:
        args = self.args
        log(f"{method} {config}: loading {args.model}")
        model = None
        try:
            modifier = None if method == "magnitude" else build_modifier(method, config, self.extra.get(method, {}), args.seed)
            model = self.load()
            if method == "magnitude":
                names = target_names(model)
                with harness.PeakMemory(self.device) as memory, harness.timed(self.device) as timing:
                    magnitude_prune(model, names, config)
                cost = harness._cost(memory, timing)
            else:
                cost = self.timed_oneshot(model, [modifier])
            model.eval()
            sparsity, ppl, names = self.evaluate(model)
            checks = {"target_sparsity": config.sparsity}
            if abs(sparsity - config.sparsity) > harness.SPARSITY_TOLERANCE:
                message = (f"achieved sparsity {sparsity:.4f} differs from the requested "
                           f"{config.sparsity:.4f} by more than {harness.SPARSITY_TOLERANCE}")
                checks["sparsity_warning"] = message
                log(f"WARNING {method} {config}: {message}")
            if config.structured:
                kept = config.m - config.n
                ok = harness.nm_pattern_ok(model, names, kept, config.m)
                checks["nm_pattern_ok"] = ok
                if not ok:
                    log(f"WARNING {method} {config}: some group of {config.m} keeps more than {kept} weights")
            self.record(method, str(config), sparsity=sparsity, **ppl, **cost, **checks)
            log(f"{method} {config}: sparsity {sparsity:.4f} {ppl} in {cost['seconds']:.1f}s")
        except Exception as error:  # noqa: BLE001 - one failed run must not stop the sweep
            self.failed(method, str(config), error)
        finally:
            del model
            release(self.device)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Perplexity / time / memory of UniPruning vs Wanda, SparseGPT and magnitude pruning.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    harness.add_common_arguments(parser)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                        help=f"any of {', '.join(METHODS)}")
    parser.add_argument("--configs", nargs="+", default=["0.5", "0.6", "0.7", "2:4", "4:8"],
                        help="unstructured sparsity p, or N:M")
    parser.add_argument("--unipruning-args", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra UniPruningModifier fields, values parsed as YAML (kappa=0.02 metric=wanda)")
    parser.add_argument("--sequential-targets", nargs="+", default=None, metavar="CLASS",
                        help="oneshot's sequential_targets (default: the decoder layer class), e.g. "
                             "LlamaAttention LlamaMLP to calibrate each MLP on the pruned attention's outputs")
    parser.add_argument("--plot", default=None, metavar="PNG", help="perplexity vs sparsity (unstructured configs)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline line")
    args = parser.parse_args(argv)
    try:
        args.configs = [Config(c) for c in args.configs]
        parse_extra(args.unipruning_args)
    except (ValueError, argparse.ArgumentTypeError) as error:
        parser.error(str(error))
    return harness.finish_common_arguments(parser, args)


def sweep(args) -> int:
    bench = QualityBenchmark(args)
    bench.extra["unipruning"] = parse_extra(args.unipruning_args)
    log(f"model {args.model} on {bench.device} ({args.dtype}); {len(bench.calib_ds)} calibration windows "
        f"of {args.seq_len}; eval {bench.eval_tokens_used} tokens in windows of {args.eval_window}")
    if not args.no_dense:
        bench.dense()
    for config in args.configs:  # methods interleaved per config: their CPU seconds see the same load
        for method in args.methods:
            bench.run(method, config)
    if args.plot:
        from plot import ppl_vs_sparsity

        ppl_vs_sparsity(bench.results, args.plot)
        log(f"plot written to {args.plot}")
    if bench.output:
        bench.output.close()
    return 1 if any("error" in r for r in bench.results) else 0


def main(argv=None) -> int:
    return harness.script_main(parse_args, sweep, argv)


if __name__ == "__main__":
    sys.exit(main())
