#!/usr/bin/env python
"""Peak memory of one Linear's ``reconstruct: admm`` re-fit, phase by phase, on the CPU.

    python benchmarks/refit_memory.py                       # a Llama-2-7B down_proj: 4096 x 11008
    python benchmarks/refit_memory.py --shape 4096 4096 --admm-iterations 20

The whole-model benchmark (cost.py) reports one process's peak; this one shows where the re-fit's
share of it goes. It builds one Linear's statistics as the modifier holds them when the re-fit
starts (XᵀX and the dense-target drift, fp32; random, only the shapes matter), runs
``LayerCalibration.refit`` with the shipped recipe's fields (``dense_target`` 0.3, damping 0.01,
ρ from 0.1; ``--admm-iterations`` / ``--pcg-iterations`` default to a cut that still raises ρ once:
every ADMM and CG iteration allocates the same buffers), and samples the resident memory every
half millisecond (``device.PeakMemory``). It prints, to stderr, the peak inside each step of
the re-fit, then one JSON line: the peak above the process's memory before any tensor was made,
and the same in units of one fp32 copy of the weight. To compare with an older version of the
code, run the same command with ``PYTHONPATH`` pointing at that version's ``src``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import psutil
import torch

from unipruning_modifier import admm, layer_calibration
from unipruning_modifier.admm import Budget
from unipruning_modifier.device import PeakMemory, timed
from unipruning_modifier.layer_calibration import CalibrationSettings, InputStatistics, LayerCalibration, RefitSettings

MIB = 2**20
CPU = torch.device("cpu")
INTERVAL = 0.0005  # seconds between resident-memory samples
STEPS = ((layer_calibration, "scale_gram"), (admm, "ridge_solver"), (admm, "admm"), (admm, "project"), (admm, "pcg"))


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / MIB


def watch(start: float, peaks: dict) -> None:
    """Wrap each step of ``STEPS`` in its own ``PeakMemory`` (so a step inside another is seen by
    both), its largest peak (MiB above ``start``) landing in ``peaks``."""
    for module, name in STEPS:
        step = getattr(module, name)

        @functools.wraps(step)
        def watched(*args, _step=step, _name=name, **kwargs):
            with PeakMemory(CPU, INTERVAL) as memory:
                result = _step(*args, **kwargs)
            peaks[_name] = max(peaks.get(_name, 0.0), memory.rss_peak_mb - start)
            return result

        setattr(module, name, watched)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=2, default=[4096, 11008], metavar=("OUT", "IN"), help="the Linear's weight shape")
    parser.add_argument("--admm-iterations", type=int, default=3, help="ADMM iterations (the recipes: 20)")
    parser.add_argument("--pcg-iterations", type=int, default=2, help="PCG iterations at most")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    rows, inputs = args.shape
    if rows < 1 or inputs < 4 or inputs % 4:
        parser.error(f"--shape {rows} {inputs}: both positive, IN a multiple of 4")
    if args.admm_iterations < 1 or args.pcg_iterations < 1:
        parser.error("--admm-iterations and --pcg-iterations must be at least 1")
    torch.set_num_threads(args.threads)

    start = rss_mib()
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, inputs, generator=generator).bfloat16()
    statistics = InputStatistics()
    factor = torch.randn(inputs, inputs, generator=generator) / inputs**0.5
    statistics.gram = factor @ factor.T
    del factor
    statistics.gram.diagonal().add_(1.0)
    drift = torch.randn(inputs, inputs, generator=generator).mul_(1e-3)
    statistics.drift = drift.add_(drift.T.clone()).div_(2)
    del drift
    statistics.tokens = statistics.drift_tokens = 32768
    statistics.reduced = True
    settings = CalibrationSettings("stochastic_ria", None, 0.2, 0.1, 0.3, 0, track_first_step=False, gram=True, deferred=True)
    layer = LayerCalibration("linear", weight.shape, torch.device("cpu"), settings, statistics)
    mask = torch.rand(rows, inputs, generator=generator) > 0.5
    refit = RefitSettings("admm", 0.01, args.pcg_iterations, 3e-3, 0.3, args.admm_iterations, 0.1)
    budget = Budget(sparsity=1.0 - int(torch.count_nonzero(mask)) / mask.numel())
    given = rss_mib() - start

    peaks: dict[str, float] = {}
    watch(start, peaks)
    with PeakMemory(CPU, INTERVAL) as whole, timed(CPU) as clock:
        layer.refit(weight, mask, refit, budget)
    peak = whole.rss_peak_mb - start
    weight_mib = rows * inputs * 4 / MIB
    for name, value in peaks.items():
        print(f"refit_memory: {name:13s} peak {value:7.0f} MiB above the start", file=sys.stderr)
    line = {
        "method": "unipruning_admm_refit", "setting": f"{rows}x{inputs}", "admm_iterations": args.admm_iterations,
        "pcg_iterations": args.pcg_iterations, "cpu_seconds": round(clock["cpu_seconds"], 2),
        "given_mib": round(given), "peak_mib": round(peak), "peak_fp32_weights": round(peak / weight_mib, 2),
        "steps_peak_mib": {name: round(value) for name, value in peaks.items()},
        "weight_fp32_mib": round(weight_mib), "in_x_in_mib": round(inputs * inputs * 4 / MIB),
    }
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main()
