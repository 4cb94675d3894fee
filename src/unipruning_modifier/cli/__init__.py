"""The ``unipruning`` command: prune a causal LM with a recipe and report what it cost.

``unipruning prune`` with no arguments prunes the built-in demo model on the built-in text, so
it runs offline; with ``--save-saliency`` it also keeps the calibrated saliency, from which
``unipruning extract`` prunes the same model to any other sparsity without calibrating;
``unipruning eval`` runs lm-eval-harness on a checkpoint. One module per command; every input
is checked before the model is loaded; a run holds ``--output`` to itself and writes the
checkpoint to a staging folder beside it, published in one step when complete (outputs.py).
stdout is the report, its last line one JSON object. Every failure is one ``error:`` line on
stderr and exit code 2 (130 when interrupted), never a traceback unless UNIPRUNING_TRACEBACK=1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

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


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _error(command: str, message: str) -> None:
    print(f"unipruning {command}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = {}
    if threading.current_thread() is threading.main_thread():  # SIGTERM / SIGHUP clean up as Ctrl-C does
        previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        result = args.run(args)
    except UsageError as error:
        _error(args.command, str(error))
        return 2
    except KeyboardInterrupt as interrupt:
        _error(args.command, f"interrupted{f' by {interrupt}' if str(interrupt) else ''}; no partial output was left")
        return 130
    except Exception as error:  # noqa: BLE001  (a failure we did not foresee: still one line, no traceback)
        if os.environ.get("UNIPRUNING_TRACEBACK") == "1":
            raise
        _error(args.command, f"{type(error).__name__}: {error} (UNIPRUNING_TRACEBACK=1 shows where)")
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    args.report(result)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
