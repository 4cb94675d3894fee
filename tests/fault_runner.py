"""`unipruning` with one fault injected, for tests/test_faults.py:

    python -m tests.fault_runner PHASE unipruning-arguments...

PHASE: ``none``; ``hold`` (after claiming the outputs, wait until the file named by
UNIPRUNING_TEST_GO exists); ``kill-staging`` (SIGKILL once the checkpoint is written into the
staging folder); ``kill-rename`` (SIGKILL right after the atomic exchange put the new output in
place, before the old one is removed); ``kill-rename-fallback`` (no atomic exchange: SIGKILL
between moving the old output aside and moving the new one in). A kill during calibration
comes from the test itself.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    phase, argv = sys.argv[1], sys.argv[2:]
    from unipruning_modifier import checkpoint, cli

    if phase == "hold":
        from unipruning_modifier.cli import prune

        work = prune.prune

        def held(*args, **kwargs):
            print("claimed", file=sys.stderr, flush=True)
            while not Path(os.environ["UNIPRUNING_TEST_GO"]).exists():
                time.sleep(0.05)
            return work(*args, **kwargs)

        prune.prune = held
    elif phase == "kill-staging":
        save = checkpoint.save_sparse
        checkpoint.save_sparse = lambda *args, **kwargs: (save(*args, **kwargs), die())
    elif phase == "kill-rename":
        from unipruning_modifier.cli import outputs

        exchange = outputs._exchange
        outputs._exchange = lambda a, b: (exchange(a, b), die())
    elif phase == "kill-rename-fallback":
        from unipruning_modifier.cli import outputs

        outputs._exchange = lambda a, b: False
        rename = Path.rename

        def rename_then_die(self, target):
            result = rename(self, target)
            if str(target).endswith("-replaced"):
                die()
            return result

        Path.rename = rename_then_die
    elif phase != "none":
        raise SystemExit(f"unknown phase {phase}")
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
