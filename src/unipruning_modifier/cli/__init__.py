"""The ``unipruning`` command: prune a causal LM with a recipe and report what it cost.

``unipruning prune`` with no arguments prunes the built-in demo model on the built-in text, so
it runs offline; with ``--save-saliency`` it also keeps the calibrated saliency, from which
``unipruning extract`` prunes the same model to any other sparsity without calibrating;
``unipruning eval`` runs lm-eval-harness on a checkpoint; ``unipruning recipes`` lists the
built-in recipes. One module per command; every input is checked before the model is loaded; a
run holds ``--output`` to itself and writes the checkpoint to a staging folder beside it,
published in one step when complete (outputs.py).

stdout is the report, its last line one JSON object; everything else (progress, llm-compressor's
and transformers' logs, bars) goes to stderr, less with ``--quiet``, more with ``--verbose``.
Nothing heavy is imported before the arguments are parsed, so ``--help`` and usage errors answer
at once. Every failure is one ``error:`` line on stderr and exit code 2 (130 when interrupted),
never a traceback unless UNIPRUNING_TRACEBACK=1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from . import evaluate, extract, prune, recipes
from .common import UsageError, output_for
from .recipes import BUILTIN_RECIPES

__all__ = ["BUILTIN_RECIPES", "build_parser", "main"]

DESCRIPTION = (
    "Prune causal language models with UniPruning (llm-compressor), prune again from a saved saliency, "
    "and evaluate the checkpoints. stdout holds the report and, last, one JSON line; progress and logs go to stderr."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unipruning", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{prune,extract,eval,recipes}")
    for command in (prune, extract, evaluate, recipes):
        command.add_parser(commands)
    return parser


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _error(command: str, message: str) -> None:
    print(f"unipruning {command}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def _logs_to_current_stdout(module) -> None:
    """llm-compressor's loguru sink writes to the sys.stdout of when it was configured: configure
    it again inside the redirection (stderr), at the level configure_output chose."""
    module.configure_logger(module.LoggerConfig(console_log_level=os.environ.get("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # --nproc starts workers with the same arguments
    previous = {}
    if threading.current_thread() is threading.main_thread():  # SIGTERM / SIGHUP clean up as Ctrl-C does
        previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with output_for(args.verbosity):  # whatever the libraries print is not the report
            if "llmcompressor" in sys.modules:
                _logs_to_current_stdout(sys.modules["llmcompressor"])
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
    if result is None:  # a worker process of a multi-process run: the launcher reports
        return 0
    args.report(result)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
