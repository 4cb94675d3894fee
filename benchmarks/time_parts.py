#!/usr/bin/env python
"""Where UniPruning's pruning step spends its CPU time: quality.py with its parts counted.

    python benchmarks/time_parts.py ../shared/models/uni-tiny-28m --methods sparsegpt unipruning \\
        --configs 0.7 --threads 1 --unipruning-args reconstruct=admm kappa=0.1 dense_target=0.3

Takes quality.py's arguments and runs it unchanged, with the step's parts wrapped in process-CPU
counters: the dense model's stream, activation energies, anchors, mirror-descent steps, Gram
matrices, and the re-fit with its ADMM loop, factors of H + rho I, projections and final PCG.
After quality.py's JSON lines it prints one more, ``{"parts": {...}}``, the seconds per part
summed over every UniPruning run of the process (so give it one config). Nested parts are
included in their parents ("admm_loop" in "refit"). docs/benchmarks.md ("Where the time goes").
"""

from __future__ import annotations

import functools
import json
import sys
import time

import quality

from unipruning_modifier import admm, dense_stream, layer_calibration

SECONDS: dict[str, float] = {}

# part name -> (object, attribute) whose calls are counted; layer_calibration imported the
# functions by name, so they are wrapped where it looks them up
PARTS = {
    "dense_stream": (dense_stream.DenseStream, "run"),
    "energy": (layer_calibration, "activation_energy"),
    "anchor": (layer_calibration, "local_saliency"),
    "mirror_descent": (layer_calibration, "mirror_descent_step"),
    "gram": (layer_calibration, "accumulate_gram"),
    "refit": (layer_calibration.LayerCalibration, "refit"),
    "scale_gram": (layer_calibration, "scale_gram"),
    "admm_loop": (admm, "admm"),
    "ridge_solver": (admm, "ridge_solver"),
    "project": (admm, "project"),
    "pcg": (admm, "pcg"),
}


def counted(name: str, function):
    @functools.wraps(function)
    def timed(*args, **kwargs):
        start = time.process_time()
        try:
            return function(*args, **kwargs)
        finally:
            SECONDS[name] = SECONDS.get(name, 0.0) + time.process_time() - start

    return timed


def main(argv=None) -> int:
    for name, (owner, attribute) in PARTS.items():
        setattr(owner, attribute, counted(name, getattr(owner, attribute)))
    code = quality.main(argv)
    print(json.dumps({"parts": {name: round(SECONDS.get(name, 0.0), 2) for name in PARTS}}), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
