"""``unipruning eval``: zero-shot tasks and perplexity with lm-eval-harness on a checkpoint."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from .common import HelpFormatter, UsageError, add_model_options, add_output_options, positive, select
from .model_io import check_model_path, load_for_eval

__all__ = ["add_parser", "print_summary", "run"]


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "eval", help="zero-shot tasks and perplexity with lm-eval-harness", formatter_class=HelpFormatter,
        description="Run lm-eval-harness tasks and local perplexity tasks on a checkpoint (sparse formats included).",
    )
    parser.add_argument(
        "--model", required=True, metavar="PATH_OR_HUB_ID", help="checkpoint folder (sparse formats included) or hub id"
    )
    parser.add_argument(
        "--tasks", required=True,
        help="comma-separated: lm-eval task names (wikitext, arc_easy, hellaswag, piqa, winogrande, boolq, rte, "
        "openbookqa, ...), text:PATH (perplexity of a text file), unipruning_demo_ppl, unipruning_demo_mc",
    )
    parser.add_argument("--limit", type=int, help="at most this many documents per task")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    parser.add_argument("--batch-size", type=int, default=8, help="documents per forward pass")
    add_model_options(parser)
    add_output_options(parser)
    parser.set_defaults(run=run, report=print_summary)


def run(args: argparse.Namespace) -> dict:
    """Validate the tasks, load the checkpoint (sparse formats decompressed), run lm-eval."""
    from importlib.util import find_spec

    if find_spec("lm_eval") is None:
        raise UsageError("lm-eval is not installed: pip install 'unipruning-modifier[eval]'")
    model_id = check_model_path(args.model, args.trust_remote_code)
    if Path(model_id).is_dir():
        from ..checkpoint import sparse_config_of

        try:
            sparse_config_of(model_id)
        except ValueError as error:
            raise UsageError(f"--model {args.model}: {error}") from None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UsageError("--tasks: give at least one task")
    if args.limit is not None:
        positive("--limit", args.limit)
    positive("--batch-size", args.batch_size)
    device = select(args.device)

    from ..evaluation.harness import evaluate as run_tasks
    from ..evaluation.harness import task_specs

    with tempfile.TemporaryDirectory(prefix="unipruning-tasks-") as folder:  # local tasks' data files
        try:
            specs = task_specs(tasks, Path(folder))
        except (OSError, ValueError) as error:
            raise UsageError(f"--tasks: {error}") from error
        model, tokenizer, sparse = load_for_eval(model_id, args, device)
        start = time.perf_counter()
        results = run_tasks(model, tokenizer, specs, batch_size=args.batch_size, limit=args.limit, num_fewshot=args.num_fewshot)
    return {
        "model": str(model_id),
        "sparsity_config": sparse,
        "device": str(device),
        "limit": args.limit,
        "tasks": results,
        "seconds": time.perf_counter() - start,
    }


def print_summary(result: dict) -> None:
    for task, metrics in result["tasks"].items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if not k.endswith("stderr") and k != "sample_len")
        print(f"{task}: {shown}")
