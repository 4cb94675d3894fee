"""What every ``unipruning`` command shares: usage errors, argument checks, device and logging."""

from __future__ import annotations

import sys

__all__ = ["DTYPE_CHOICES", "UsageError", "log", "positive", "select"]

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


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
