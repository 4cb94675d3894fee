#!/usr/bin/env python
"""Calibration cost vs model size: seconds and peak memory of each pruner on Llama-shaped models.

    python benchmarks/cost.py --sizes 256x2 512x2 1024x2 2048x2 512x4 512x8 \\
        --methods wanda sparsegpt unipruning unipruning_ls --plot cost.png

A size ``HxL`` is a Llama with hidden size H, intermediate 2.6875·H rounded up to a multiple of
128 (Llama-2's ratio), L decoder layers, H/64 heads, random bf16 weights (make_llama.build;
cost depends on the shapes only). Every (size, method) runs in its own process
(``quality.py --no-dense``, 50 % unstructured, perplexity on one short window only), so peak
memory is that run's alone. ``unipruning`` is the paper's method (mask only), ``unipruning_admm``
the shipped recipes' setting (``reconstruct: admm`` with ``dense_target``), ``unipruning_ls`` the
previous recipes' (``reconstruct: least_squares``), ``alps`` benchmarks/alps.py. JSON lines go to stdout (and
``--output``) with ``params``, ``hidden``, ``layers`` added; ``--plot`` draws seconds and
peak memory against parameters for the sizes of the smallest depth (the width sweep);
``--replot JSONL --plot PNG`` redraws from earlier lines.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from plot import cost_vs_size  # noqa: E402

METHODS = {
    "wanda": ["--methods", "wanda"],
    "sparsegpt": ["--methods", "sparsegpt"],
    "magnitude": ["--methods", "magnitude"],
    "unipruning": ["--methods", "unipruning", "--unipruning-args", "reconstruct=none"],
    "unipruning_ls": ["--methods", "unipruning", "--unipruning-args", "reconstruct=least_squares"],
    "unipruning_admm": ["--methods", "unipruning", "--unipruning-args", "reconstruct=admm", "kappa=0.1", "dense_target=0.3",
                        "dense_target_every=2"],
    "alps": ["--methods", "alps"],
}


def parse_size(text: str) -> tuple[int, int]:
    hidden, _, layers = text.lower().partition("x")
    try:
        hidden, layers = int(hidden), int(layers)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected HIDDENxLAYERS, e.g. 1024x2") from None
    if hidden % 64 or layers < 1:
        raise argparse.ArgumentTypeError(f"size {text!r}: hidden must be a multiple of 64, layers >= 1")
    return hidden, layers


def run(model: Path, method: str, args) -> dict:
    command = [
        sys.executable, str(HERE / "quality.py"), str(model), *METHODS[method],  # its --unipruning-args come last: ours extend them
        *(args.unipruning_args if "--unipruning-args" in METHODS[method] else []), "--configs", "0.5", "--no-dense",
        "--calib", args.calib, "--eval", args.calib, "--num-samples", str(args.num_samples),
        "--seq-len", str(args.seq_len), "--eval-window", "128", "--eval-tokens", "128",
        "--dtype", args.dtype, *(["--device", args.device] if args.device else []),
        *(["--threads", str(args.threads)] if args.threads else []),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": f"quality.py exited {done.returncode}: {done.stderr[-2000:]}"}
    return json.loads(lines[-1])


def main(argv=None) -> int:
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # llm-compressor's import-time warning goes to stdout
        from unipruning_modifier import data as updata

    shared_calib = HERE.parents[1] / "shared" / "data" / "calib.txt"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[parse_size(s) for s in ("256x2", "512x2", "1024x2", "2048x2")])
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["wanda", "sparsegpt", "unipruning", "unipruning_ls"])
    parser.add_argument("--calib", default=str(shared_calib) if shared_calib.is_file() else updata.demo_calibration_text())
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (None: torch's own count)")
    parser.add_argument(
        "--unipruning-args", nargs="+", default=[], metavar="KEY=VALUE",
        help="added to the UniPruning methods' fields, e.g. admm_iterations=1 reconstruct_iterations=1 for a "
        "peak-memory-only run (every iteration allocates the same buffers)",
    )
    parser.add_argument("--output", default=None, help="JSONL file the lines are appended to")
    parser.add_argument("--plot", default=None, metavar="PNG")
    parser.add_argument("--replot", default=None, metavar="JSONL", help="only draw --plot from lines of an earlier run")
    args = parser.parse_args(argv)
    from quality import parse_extra

    try:
        # refused here, not after a model is built for every run
        parse_extra(args.unipruning_args, sparsity_hint="cost.py always prunes to 50 % unstructured")
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    if args.replot:
        rows = [json.loads(line) for line in Path(args.replot).read_text().splitlines() if line.strip()]
        cost_vs_size(rows, args.plot or "cost.png")
        return 0

    from make_llama import build

    rows = []
    output = open(args.output, "a", encoding="utf-8") if args.output else None
    with tempfile.TemporaryDirectory() as folder:
        for hidden, layers in args.sizes:
            model = Path(folder) / f"llama-{hidden}x{layers}"
            intermediate = math.ceil(hidden * 2.6875 / 128) * 128
            params = build(model, hidden, intermediate, layers, hidden // 64)
            for method in args.methods:
                print(f"[cost] {hidden}x{layers} ({params / 1e6:.1f}M) {method}", file=sys.stderr, flush=True)
                row = run(model, method, args)
                row.update(cost_method=method, params=params, hidden=hidden, intermediate=intermediate, layers=layers,
                           model=f"llama-{hidden}x{layers} (random)")
                rows.append(row)
                line = json.dumps(row)
                print(line, flush=True)
                if output:
                    output.write(line + "\n")
                    output.flush()
    if output:
        output.close()
    if args.plot:
        cost_vs_size(rows, args.plot)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
