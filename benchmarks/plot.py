#!/usr/bin/env python
"""Every benchmark picture: perplexity vs sparsity, and pruning cost vs model size.

    python benchmarks/plot.py benchmarks/results/h100-28m-unstructured.jsonl --out docs/ppl_vs_sparsity_28m.png

draws perplexity vs sparsity from quality.py JSON lines (one curve per method and setting;
unstructured configs only; ``--key ppl_heldout`` plots the held-out text). quality.py ``--plot``
and cost.py ``--plot`` call the functions here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def series_name(row: dict) -> str:
    """A curve's legend: the method, and UniPruning's re-fit settings."""
    extra = row.get("extra") or {}
    if row["method"] == "unipruning" and row.get("label") == "prototype":
        return "issue 6 prototype (averaged anchor + least squares)"
    if row["method"] == "unipruning":
        if extra.get("reconstruct") not in ("least_squares", "admm"):
            return "UniPruning (mask only)"
        name = f"UniPruning + {extra['reconstruct']}"
        target = extra.get("dense_target")
        name = f"{name}, dense_target {target}" if target else name
        return f"{name}, block tuning" if extra.get("block_tune_epochs") else name
    names = {"wanda": "Wanda", "sparsegpt": "SparseGPT", "magnitude": "magnitude", "alps": "ALPS"}
    return names.get(row["method"], row["method"])


def ppl_vs_sparsity(rows: list[dict], path: str, key: str = "ppl", title: str | None = None) -> dict[str, int]:
    """Perplexity (log scale) against the configured unstructured sparsity; points per curve."""
    plt = _pyplot()
    rows = [r for r in rows if r.get(key) is not None and "error" not in r]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    curves: dict[str, dict[float, float]] = {}
    for row in rows:
        if row["method"] == "dense" or ":" in row["config"] or (row.get("extra") or {}).get("allocation") == "global":
            continue
        curves.setdefault(series_name(row), {})[round(float(row["config"]), 3)] = row[key]
    for name, points in curves.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=name)
    dense = [r[key] for r in rows if r["method"] == "dense"]
    if dense:
        ax.axhline(dense[0], color="gray", linestyle="--", label="dense")
    ax.set_xlabel("sparsity of the target layers")
    ax.set_ylabel("perplexity" + (" (held-out)" if key == "ppl_heldout" else ""))
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return {name: len(points) for name, points in curves.items()}


def cost_vs_size(rows: list[dict], path: str) -> None:
    """cost.py's sweep: calibration seconds and peak memory against parameters, per method."""
    plt = _pyplot()
    depth = min(r["layers"] for r in rows)
    rows = [r for r in rows if r["layers"] == depth]  # the width sweep; depths are in the table
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r["cost_method"] for r in rows):
        points = sorted((r["params"], r["seconds"], r["peak_memory_mb"]) for r in rows
                        if r["cost_method"] == method and r.get("seconds") is not None)
        if not points:
            continue
        params = [p[0] / 1e6 for p in points]
        axes[0].plot(params, [p[1] for p in points], marker="o", label=method)
        axes[1].plot(params, [p[2] for p in points], marker="o", label=method)
    for ax, label in zip(axes, ("calibration seconds", "peak memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    device = rows[0].get("device", "?") if rows else "?"
    fig.suptitle(f"pruning cost at 50% unstructured, {depth} decoder layers of growing width ({device})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jsonl", nargs="+")
    parser.add_argument("--out", required=True, metavar="PNG")
    parser.add_argument("--key", default="ppl", choices=("ppl", "ppl_heldout"))
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    rows = [json.loads(line) for path in args.jsonl for line in Path(path).read_text().splitlines() if line.strip()]
    curves = ppl_vs_sparsity(rows, args.out, args.key, args.title)
    print(f"wrote {args.out}: {', '.join(f'{k} ({v} points)' for k, v in curves.items())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
