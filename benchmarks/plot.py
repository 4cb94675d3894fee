#!/usr/bin/env python
"""Perplexity vs sparsity PNG from quality.py JSON lines (one curve per method and setting).

    python benchmarks/plot.py benchmarks/results/h100-28m-unstructured.jsonl --out docs/ppl_vs_sparsity_28m.png

Unstructured configs only; UniPruning runs with ``reconstruct: least_squares`` get their own
curve. ``--key ppl_heldout`` plots the held-out text instead of the dev text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def series_name(row: dict) -> str:
    extra = row.get("extra") or {}
    if row["method"] == "unipruning" and row.get("label") == "prototype":
        return "issue 6 prototype (averaged anchor + least squares)"
    if row["method"] == "unipruning":
        if extra.get("reconstruct") != "least_squares":
            return "UniPruning (mask only)"
        target = extra.get("dense_target")
        return f"UniPruning + least squares, dense_target {target}" if target else "UniPruning + least squares"
    return {"wanda": "Wanda", "sparsegpt": "SparseGPT", "magnitude": "magnitude"}.get(row["method"], row["method"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jsonl", nargs="+")
    parser.add_argument("--out", required=True, metavar="PNG")
    parser.add_argument("--key", default="ppl", choices=("ppl", "ppl_heldout"))
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    rows = [json.loads(line) for path in args.jsonl for line in Path(path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get(args.key) is not None and "error" not in r]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    curves: dict[str, dict[float, float]] = {}
    for row in rows:
        if row["method"] == "dense" or ":" in row["config"] or (row.get("extra") or {}).get("allocation") == "global":
            continue
        curves.setdefault(series_name(row), {})[round(float(row["config"]), 3)] = row[args.key]
    for name, points in curves.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=name)
    dense = [r[args.key] for r in rows if r["method"] == "dense"]
    if dense:
        ax.axhline(dense[0], color="gray", linestyle="--", label="dense")
    ax.set_xlabel("sparsity of the target layers")
    ax.set_ylabel("perplexity" + (" (held-out)" if args.key == "ppl_heldout" else ""))
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if args.title:
        ax.set_title(args.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}: {', '.join(f'{k} ({len(v)} points)' for k, v in curves.items())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
