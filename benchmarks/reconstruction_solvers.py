#!/usr/bin/env python
"""Least-squares re-fit solvers on real layers: error relative to the exact solve, and seconds.

    python benchmarks/reconstruction_solvers.py ../shared/models/uni-tiny-28m \\
        --layers model.layers.3.self_attn.q_proj model.layers.3.mlp.down_proj

For each layer, H = X^T X over ``--num-samples`` calibration windows of the dense model, a
Wanda-style mask (|W| * ||x||) at each config, and the kept weights re-fitted by
- ``exact``: the row-by-row direct solve (``reconstruction.exact_solve``, fp64),
- ``cg tol=T``: the shipped conjugate gradients (``reconstruction.least_squares``) stopped at
  relative residual T (the modifier's ``reconstruct_tolerance``),
- ``obs``: SparseGPT's blocked OBS update with the mask fixed (one Cholesky factorisation,
  SparseGPT's own cost), which compensates each pruned weight only on the columns to its right.
One JSON line per (layer, config, solver): ``error_ratio`` = tr(ΔW H ΔWᵀ) / the exact solve's
(1.0 = optimal), ``seconds``, and ``masked_error_ratio`` for no re-fit at all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

from harness import RESULTS, SHARED, Config, default_text, script_main

with contextlib.redirect_stdout(sys.stderr):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unipruning_modifier import data as updata
    from unipruning_modifier.masks import nm_mask, unstructured_mask
    from unipruning_modifier.reconstruction import dampen, exact_solve, least_squares, reconstruction_error


def obs_fixed_mask(weight, gram, mask, damping=0.01, block_size=128):
    """SparseGPT's blocked OBS update with a supplied mask (pruned weights exactly 0), fp32."""
    w = weight.float().clone()
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(dampen(gram.float(), damping)))
    upper = torch.linalg.cholesky(inverse, upper=True)
    columns = w.shape[1]
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block, factor = w[:, start:end], upper[start:end, start:end]
        errors = torch.zeros_like(block)
        for i in range(end - start):
            error = block[:, i] * ~mask[:, start + i] / factor[i, i]
            block[:, i:].addr_(error, factor[i, i:], alpha=-1)
            errors[:, i] = error
        w[:, end:].addmm_(errors, upper[start:end, end:], alpha=-1)
    return w.masked_fill_(~mask, 0)


def gram_matrices(args) -> tuple[dict, dict]:
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = tokenizer(open(args.calib).read(), return_tensors="pt").input_ids[0]
    grams, tokens = {}, 0

    def hook(name):
        def accumulate(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            grams[name] = grams.get(name, 0) + x.T @ x

        return accumulate

    for name in args.layers:
        model.get_submodule(name).register_forward_pre_hook(hook(name))
    with torch.no_grad():
        for i in range(args.num_samples):
            window = ids[i * args.seq_len:(i + 1) * args.seq_len]
            tokens += window.numel()
            model(window[None])
    weights = {name: model.get_submodule(name).weight.detach().float() for name in args.layers}
    return weights, {name: gram / tokens for name, gram in grams.items()}


def wanda_mask(weight, gram, config: Config):
    scores = [weight.abs() * gram.diagonal().sqrt()]
    return nm_mask(scores, config.n, config.m) if config.structured else unstructured_mask(scores, config.sparsity)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run(args) -> int:
    weights, grams = gram_matrices(args)
    for name in args.layers:
        weight, gram = weights[name], grams[name]
        for text in args.configs:
            config = Config(text)
            mask = wanda_mask(weight, gram, config)
            damped = dampen(gram, args.damping)
            exact, exact_s = timed(lambda: exact_solve(weight, gram, mask, args.damping))
            best = reconstruction_error(weight, exact, damped)
            masked = reconstruction_error(weight, weight * mask, damped) / best
            solvers = {"exact": lambda: exact, "obs": lambda: obs_fixed_mask(weight, gram, mask, args.damping)}
            for tol in args.tolerances:
                solvers[f"cg tol={tol:g}"] = lambda tol=tol: least_squares(
                    weight, gram, mask, args.damping, max_iterations=1000, tolerance=tol
                )
            for solver, fn in solvers.items():
                fitted, seconds = (exact, exact_s) if solver == "exact" else timed(fn)
                row = {
                    "layer": name, "shape": list(weight.shape), "config": text, "solver": solver,
                    "error_ratio": reconstruction_error(weight, fitted, damped) / best,
                    "masked_error_ratio": masked, "seconds": seconds, "damping": args.damping,
                    "num_samples": args.num_samples, "seq_len": args.seq_len, "model": args.model,
                }
                print(json.dumps(row), file=RESULTS, flush=True)
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--layers", nargs="+", default=["model.layers.3.self_attn.q_proj", "model.layers.3.mlp.down_proj"])
    parser.add_argument("--configs", nargs="+", default=["0.5", "0.7", "2:4"])
    parser.add_argument("--tolerances", nargs="+", type=float, default=[1e-2, 3e-3, 1e-3, 1e-6])
    parser.add_argument("--calib", default=default_text(str(SHARED / "data" / "calib.txt"), updata.demo_calibration_text))
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--damping", type=float, default=0.01)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(script_main(parse_args, run))
