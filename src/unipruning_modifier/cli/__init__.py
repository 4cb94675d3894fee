"""The ``unipruning`` command: prune a causal LM with a recipe and report what it cost.

``unipruning prune`` with no arguments prunes the built-in demo model on the built-in text, so
it runs offline; with ``--save-saliency`` it also keeps the calibrated saliency, from which
``unipruning extract`` prunes the same model to any other sparsity without calibrating;
``unipruning eval`` runs lm-eval-harness on a checkpoint. One module per command; every input
is checked before the model is loaded; a checkpoint is written to a temporary folder beside
``--output`` and renamed only when complete. stdout is the report, its last line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import evaluate, extract, prune
from .common import UsageError
from .recipes import BUILTIN_RECIPES

__all__ = ["BUILTIN_RECIPES", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unipruning", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for command in (prune, extract, evaluate):
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.run(args)
    except UsageError as error:
        print(f"unipruning {args.command}: error: {error}", file=sys.stderr)
        return 2
    args.report(result)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
