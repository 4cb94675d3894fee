#!/usr/bin/env python
"""Per-batch cost of the calibration hot path: ``local_saliency`` + ``mirror_descent_step``.

    python benchmarks/saliency_step.py --shape 2816x1024 --batches 24 --repeats 5

Random weight and activations of the given (out x in) shape; one JSON line per setting of
``track_first_step`` (only ``true`` for versions before that option; run this script with
``PYTHONPATH=<old checkout>/src`` for a before/after) with the best-of-``repeats`` milliseconds per batch (the best, because the
2-core CI machines are noisy), on ``--device`` (default: CUDA if present, else CPU).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from unipruning_modifier.device import synchronize
from unipruning_modifier.mirror_descent import SaliencyState, mirror_descent_step
from unipruning_modifier.saliency import activation_energy, local_saliency


def new_state(shape, device, track: bool) -> SaliencyState | None:
    """A fresh state; None where this version cannot skip first_step (before track_first_step)."""
    try:
        return SaliencyState.zeros(shape, device, track_first_step=track)
    except TypeError:
        return SaliencyState.zeros(shape, device) if track else None


def one_run(weight, energies, batches: int, track: bool, device) -> float:
    generator = torch.Generator().manual_seed(0)
    state = new_state(weight.shape, device, track)
    synchronize(device)
    start = time.perf_counter()
    for b in range(batches):
        anchor = local_saliency("stochastic_ria", weight, energies[b % len(energies)], generator=generator)
        mirror_descent_step(state, anchor, kappa=0.1, lam=0.001, generator=generator)
    synchronize(device)
    return (time.perf_counter() - start) / batches * 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="2816x1024", help="OUTxIN")
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    out_features, in_features = (int(v) for v in args.shape.lower().split("x"))
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator).to(device)
    energies = [activation_energy(torch.randn(args.tokens, in_features, generator=generator).to(device)) for _ in range(4)]
    for track in (True, False):
        if new_state((1, 1), device, track) is None:
            continue
        one_run(weight, energies, 2, track, device)  # warm-up
        best = min(one_run(weight, energies, args.batches, track, device) for _ in range(args.repeats))
        print(json.dumps({"shape": [out_features, in_features], "track_first_step": track, "ms_per_batch": best,
                          "batches": args.batches, "device": str(device), "torch": torch.__version__}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
