"""What every ``unipruning`` command shares: usage errors, argument checks, device and logging."""

from __future__ import annotations

import sys

__all__ = ["DTYPE_CHOICES", "UsageError", "add_model_options", "log", "positive", "select"]

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def add_model_options(parser) -> None:
    """--device, --dtype and --trust-remote-code: how every command loads its model."""
    parser.add_argument("--device", help="cuda, cuda:N, npu, cpu (default: best available)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="load dtype (auto: fp32 on CPU)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder/hub")


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
