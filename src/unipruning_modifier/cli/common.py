"""What every ``unipruning`` command shares: usage errors, argument checks, help layout, device,
and where output goes (stdout: the report; stderr: progress and the libraries' logs)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

__all__ = [
    "DTYPE_CHOICES",
    "HelpFormatter",
    "UsageError",
    "add_model_options",
    "add_output_options",
    "output_for",
    "log",
    "positive",
    "select",
]

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")

# --quiet / default / --verbose: llm-compressor's (loguru) and transformers' log levels
_LEVELS = {"quiet": ("ERROR", "error"), "default": ("WARNING", "warning"), "verbose": ("INFO", "info")}


class HelpFormatter(argparse.HelpFormatter):
    """Adds '(default: X)' to the help of an option that takes a value, where the default is not
    None and the help does not already state it."""

    def _get_help_string(self, action):
        help = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or action.nargs == 0 or "default" in help:
            return help
        return f"{help} (default: {action.default})"


def add_model_options(parser) -> None:
    """--device, --dtype and --trust-remote-code: how every command loads its model."""
    parser.add_argument("--device", help="cuda, cuda:N, npu or cpu (default: the best available)")
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto",
        help="load dtype; auto: the checkpoint's, computed in float32 on the CPU",
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder or hub")


def add_output_options(parser) -> None:
    """--quiet and --verbose: what goes to stderr (stdout always holds the report)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-q", "--quiet", dest="verbosity", action="store_const", const="quiet", default="default",
        help="print nothing on stderr but errors: no progress lines, bars, warnings or library logs",
    )
    group.add_argument(
        "-v", "--verbose", dest="verbosity", action="store_const", const="verbose",
        help="also show llm-compressor's and transformers' info logs (each pruned layer, ...)",
    )


@contextlib.contextmanager
def output_for(verbosity: str):
    """While the work runs, whatever anything prints to stdout goes to stderr (stdout is for
    the report alone), and with ``--quiet`` both go nowhere: progress lines, bars, warnings and
    logs alike (an error still reaches stderr: it is printed after). Log levels are set before
    the libraries are imported; LLM_COMPRESSOR_LOG_LEVEL / TRANSFORMERS_VERBOSITY a user set
    win unless a flag was given."""
    loguru_level, transformers_level = _LEVELS[verbosity]
    set_env = os.environ.setdefault if verbosity == "default" else os.environ.__setitem__
    set_env("LLM_COMPRESSOR_LOG_LEVEL", loguru_level)
    set_env("TRANSFORMERS_VERBOSITY", transformers_level)
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(os.devnull, "w")) if verbosity == "quiet" else sys.stderr
        stack.enter_context(contextlib.redirect_stdout(sink))
        stack.enter_context(contextlib.redirect_stderr(sink))
        yield


class UsageError(ValueError):
    """A bad argument, found before any work starts: an ``error:`` line and exit code 2."""


def log(message: str) -> None:
    """Progress for the user, on stderr (stdout holds the report and its JSON line)."""
    print(message, file=sys.stderr, flush=True)


def positive(name: str, value: int, minimum: int = 1) -> int:
    if value < minimum:
        raise UsageError(f"{name} must be >= {minimum}, got {value}")
    return value


def select(device_flag: str | None):
    """The torch device for ``--device`` (None: the best available)."""
    from ..device import select_device

    try:
        return select_device(device_flag)
    except ValueError as error:
        raise UsageError(f"--device: {error}") from error
