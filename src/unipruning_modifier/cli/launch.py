"""``unipruning prune --nproc N``: calibrate with N data-parallel processes (docs/distributed.md).

The command starts N copies of itself with the environment torchrun gives its workers (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR / MASTER_PORT; OMP_NUM_THREADS shares the cores); a copy, or any process torchrun started,
is a worker. Each worker joins the process group (``distributed.init``: nccl / xccl on its own
accelerator, gloo on the CPU), loads the model and calibrates on its own slice of the windows;
rank 0 alone measures, saves and reports, after the group is left.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from .common import UsageError, log

__all__ = ["add_option", "is_worker", "join", "launch", "leave"]


def add_option(parser) -> None:
    parser.add_argument(
        "--nproc", type=int, default=1, metavar="N",
        help="calibrate with N processes, each on its own slice of the windows (one per GPU on GPUs, "
        "gloo processes on the CPU); rank 0 measures and saves",
    )


def is_worker() -> bool:
    """True in a process of a multi-process run (started by --nproc or by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(nproc: int, argv: list[str]) -> None:
    """Run ``unipruning argv`` as ``nproc`` workers; exits with a failing worker's exit code.

    Rank 0 writes to this terminal; another rank's output is shown only when it failed and rank
    0 did not fail by itself. When one worker fails the others are stopped (they would wait for
    it in a collective)."""
    port = _free_port()
    logs, workers = [], []
    for rank in range(nproc):
        env = {
            **os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "TORCHELASTIC_RUN_ID": f"unipruning-{port}",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))),
        }
        output = None
        if rank > 0:
            output = tempfile.TemporaryFile("w+")
            logs.append(output)
        command = [sys.executable, "-m", "unipruning_modifier.cli", *argv]
        workers.append(subprocess.Popen(command, env=env, stdout=output, stderr=output))
    log(f"--nproc {nproc}: {nproc} worker processes, rank 0 reports")
    try:
        shown, code = _wait(workers)
    except KeyboardInterrupt:
        for worker in workers:
            worker.send_signal(signal.SIGINT)
        shown, code = 0, max(worker.wait() for worker in workers)
    if shown:
        logs[shown - 1].seek(0)
        sys.stderr.write(logs[shown - 1].read()[-4000:])
    for file in logs:
        file.close()
    if code:
        raise SystemExit(code)


def _wait(workers: list[subprocess.Popen], grace: float = 10.0) -> tuple[int | None, int]:
    """(rank whose error to show, or None; the exit code). Once one worker fails the others get
    ``grace`` seconds to end by themselves (a bad argument fails every rank), then are stopped;
    rank 0's own error wins, as it is already on the terminal."""
    first, deadline, stopped = None, None, set()
    while any(worker.poll() is None for worker in workers):
        if first is None:
            first = next((rank for rank, worker in enumerate(workers) if worker.poll()), None)
            deadline = None if first is None else time.monotonic() + grace
        if deadline is not None and time.monotonic() > deadline:
            stopped = {rank for rank, worker in enumerate(workers) if worker.poll() is None}
            for rank in stopped:
                workers[rank].terminate()
            break
        time.sleep(0.2)
    codes = [worker.wait() for worker in workers]
    first = next((rank for rank, code in enumerate(codes) if code), None) if first is None else first
    if first is None:
        return None, 0
    if codes[0] and 0 not in stopped:
        return 0, codes[0]
    return first, codes[first]


def join(device):
    """Join the process group (``device``: from --device; gloo when it is the CPU) and return
    this rank's device."""
    import torch

    from .. import distributed

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type != "cpu":
        count = torch.accelerator.device_count()
        if local_rank >= count:
            raise UsageError(f"--nproc {os.environ['WORLD_SIZE']}: only {count} {device.type} devices")
    return distributed.init(cpu=device.type == "cpu")


def leave() -> None:
    """Leave the process group: what follows runs on rank 0 alone."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
