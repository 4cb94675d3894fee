"""Fault injection (issue 15, items 2-4): `unipruning prune` killed with SIGKILL at each phase
(and stopped by SIGTERM), run against a file-size limit (a full disk, without root), and raced
by a second run on the same output. Each test asserts the error line and exit code, that the previous output and
saliency file are intact, and that nothing partial is left once the next run has swept.

Runs go through tests/fault_runner.py in a subprocess (the 2-layer model, two windows of 32
tokens, a 2:4 recipe without re-fit), so the whole file takes about a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unipruning_modifier.checkpoint import load_sparse, sparse_config_of

from .conftest import REPO
from .reliability import FAST, assert_clean_error, cli, recipe

pytestmark = pytest.mark.slow
OLD_SALIENCY = b"the previous saliency file"


@pytest.fixture
def run(tmp_path, tiny_model_path):
    """(folder holding --output Y and --save-saliency S, the prune arguments for them); Y and S
    hold a previous output that must survive every fault."""
    folder = tmp_path / "outputs"
    (folder / "Y").mkdir(parents=True)
    (folder / "Y" / "old.txt").write_text("previous checkpoint")
    (folder / "S").write_bytes(OLD_SALIENCY)
    args = ["prune", "--model", tiny_model_path, "--recipe", recipe(tmp_path), "--output", folder / "Y",
            "--save-saliency", folder / "S", "--overwrite", *FAST]
    return folder, [str(a) for a in args]


def spawn(phase: str, args: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)
    env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "tests.fault_runner", phase, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def old_output_intact(folder: Path) -> bool:
    return (folder / "Y" / "old.txt").is_file() and (folder / "S").read_bytes() == OLD_SALIENCY


def sweep(capsys, folder: Path, args: list[str]) -> str:
    """The next run on the same outputs (stopped by a missing dataset, after its claim swept)."""
    code, _, err = cli(capsys, *args, "--dataset", folder / "missing.txt")
    assert_clean_error(code, err, "--dataset")
    assert sorted(p.name for p in folder.iterdir()) == ["S", "Y"], "leftovers after the sweep"
    return err


def test_kill_during_calibration(capsys, run):
    folder, args = run
    proc = spawn("none", args)
    for line in proc.stderr:  # tqdm's carriage returns end lines in text mode
        if "Calibrating" in line:
            proc.send_signal(signal.SIGKILL)
            break
    code, _ = finish(proc)
    assert code == -signal.SIGKILL and old_output_intact(folder)
    assert not [p.name for p in folder.iterdir() if ".partial-" in p.name]  # nothing staged yet
    sweep(capsys, folder, args)
    assert old_output_intact(folder)


def test_sigterm_cleans_up_at_once(run):
    """SIGTERM (and SIGHUP) take the Ctrl-C path: one error line, exit 130, no lock left either."""
    folder, args = run
    proc = spawn("none", args)
    for line in proc.stderr:
        if "Calibrating" in line:
            proc.send_signal(signal.SIGTERM)
            break
    code, err = finish(proc)
    assert code == 130 and "error: interrupted by SIGTERM" in err and "Traceback" not in err, err[-2000:]
    assert old_output_intact(folder) and sorted(p.name for p in folder.iterdir()) == ["S", "Y"]


def test_kill_while_staging(capsys, run):
    folder, args = run
    code, _ = finish(spawn("kill-staging", args))
    assert code == -signal.SIGKILL and old_output_intact(folder)
    left = sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)
    assert len(left) == 2 and left[0].startswith(".S.partial-") and left[1].startswith(".Y.partial-"), left
    err = sweep(capsys, folder, args)
    assert err.count("which no longer runs") == 2 and old_output_intact(folder)


def test_kill_after_the_exchange(capsys, run):
    """The new checkpoint is in place, whole; the old one waits in the staging name for the sweep."""
    folder, args = run
    code, _ = finish(spawn("kill-rename", args))
    assert code == -signal.SIGKILL
    assert sparse_config_of(folder / "Y")["format"] == "sparse-24-bitmask" and load_sparse(folder / "Y") is not None
    assert (folder / "S").read_bytes() == OLD_SALIENCY  # published after the checkpoint
    sweep(capsys, folder, args)
    assert not (folder / "Y" / "old.txt").exists() and (folder / "Y" / "model.safetensors").is_file()


def test_kill_between_the_two_renames_of_the_fallback(capsys, run):
    """Without an atomic exchange the old output is moved aside first; the sweep puts it back."""
    folder, args = run
    code, _ = finish(spawn("kill-rename-fallback", args))
    assert code == -signal.SIGKILL and not (folder / "Y").exists()
    assert any(p.name.endswith("-replaced") for p in folder.iterdir())
    err = sweep(capsys, folder, args)
    assert f"restored {folder / 'Y'}" in err and old_output_intact(folder)


def limit_file_size(size: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing

    return apply


@pytest.mark.parametrize(
    "limit, flag",
    [(4 * 2**20, "--output"), (2**17, "--save-saliency")],
    ids=["checkpoint-does-not-fit", "saliency-does-not-fit"],
)
def test_disk_full(run, limit, flag):
    """RLIMIT_FSIZE in the child: files above the limit fail to write as on a full disk. The
    tiny model's saliency file is ~0.5 MiB (version 2), its checkpoint ~8 MiB."""
    folder, args = run
    code, err = finish(spawn("none", args, preexec_fn=limit_file_size(limit)))
    target = folder / ("Y" if flag == "--output" else "S")
    assert_clean_error(code, err, f"{flag} {target}", "File too large", "nothing was replaced")
    assert old_output_intact(folder) and sorted(p.name for p in folder.iterdir()) == ["S", "Y"]


def test_two_runs_on_one_output(capsys, run, tmp_path):
    """The second run fails at once naming the first one's PID; the first completes."""
    folder, args = run
    go = tmp_path / "go"
    first = spawn("hold", args, env={"UNIPRUNING_TEST_GO": str(go)})
    try:
        for line in first.stderr:
            if line.strip() == "claimed":
                break
        start = time.perf_counter()
        code, _, err = cli(capsys, *args)
        assert_clean_error(code, err, f"--output {folder / 'Y'} is being written by another unipruning run (pid {first.pid})")
        assert time.perf_counter() - start < 30 and old_output_intact(folder)
        go.touch()
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:  # the test failed while the first run waited
            first.kill()
            first.wait()
    assert first.returncode == 0, err
    assert json.loads(out.splitlines()[-1])["output"] == str(folder / "Y")
    assert sparse_config_of(folder / "Y")["format"] == "sparse-24-bitmask"
    assert (folder / "S").read_bytes() != OLD_SALIENCY and sorted(p.name for p in folder.iterdir()) == ["S", "Y"]
