"""Two data-parallel ranks against one process: mask agreement and perplexity (docs/distributed.md).

    python benchmarks/distributed.py [--nproc 2] [--eval-text FILE]

Runs tests/torchrun_worker.py (the demo model, 16 x 128 windows) under torchrun and in one
process for 50% (layer budget) and 2:4, both with ``reconstruct: least_squares``, then prints
one JSON line per case: the share of mask entries that agree, the largest weight difference,
and the perplexity of both checkpoints on the evaluation text.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "torchrun_worker.py"
CASES = {
    "0.5-least_squares": {"sparsity": 0.5, "reconstruct": "least_squares"},
    "2:4-least_squares": {"mask_structure": "2:4", "reconstruct": "least_squares"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--eval-text", help="default: the demo model's evaluation text")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from unipruning_modifier import data
    from unipruning_modifier.checkpoint import load_sparse
    from unipruning_modifier.evaluation import perplexity

    tokenizer = AutoTokenizer.from_pretrained(data.demo_model_path())
    tokens = data.token_stream(tokenizer, data.read_text(args.eval_text or data.demo_eval_text()))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
        runs = {"dist": torchrun, "single": [sys.executable]}
        for name, launch in runs.items():
            (root / name).mkdir()
            worker = [*launch, str(WORKER), str(root / name), json.dumps(CASES)]
            subprocess.run(worker, check=True, stdout=sys.stderr, env={**os.environ, "OMP_NUM_THREADS": "1"})
        for case in CASES:
            ranks = [torch.load(root / "dist" / f"{case}-rank{r}.pt") for r in range(args.nproc)]
            single = torch.load(root / "single" / f"{case}-single.pt")
            agree = total = 0
            difference = 0.0
            for name, weight in single["weights"].items():
                agree += int(((ranks[0]["weights"][name] != 0) == (weight != 0)).sum())
                total += weight.numel()
                difference = max(difference, float((ranks[0]["weights"][name] - weight).abs().max()))
            folder = case.replace(":", "_") + "-checkpoint"
            ppl = {
                name: perplexity(load_sparse(root / name / folder, dtype=torch.float32).eval(), tokens, 512, 65536)
                for name in runs
            }
            print(json.dumps({
                "case": case, "nproc": args.nproc, "mask_agreement": agree / total, "max_weight_difference": difference,
                "ranks_agree": all(torch.equal(r["weights"][n], ranks[0]["weights"][n]) for r in ranks for n in single["weights"]),
                "ppl_single": ppl["single"], "ppl_distributed": ppl["dist"],
            }), flush=True)


if __name__ == "__main__":
    main()
