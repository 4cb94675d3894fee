"""A vLLM 0.32.0 virtualenv (CPU) with this checkout installed, for tests/test_serving_vllm.py.

vLLM pins compressed-tensors 0.17.0 and llm-compressor 0.14 pins 0.19.0, so vLLM gets its own
virtualenv, built once and cached outside the repo in
``$XDG_CACHE_HOME/unipruning-modifier/vllm-0.32.0-py3X`` (``~/.cache`` by default):
  1. minimal: a clean venv with ``torch==2.13.0``, ``compressed-tensors==0.17.0``, transformers,
     ``vllm==0.32.0 --no-deps`` and vLLM's declared requirements minus its GPU-only packages
     (flashinfer, tilelang, cutlass, nvidia-*, torchvision/torchaudio/torchcodec...); about 3 min
     cold. ``--system-site-packages`` is not used: it would expose this environment's
     llm-compressor, whose import fails against compressed-tensors 0.17 (the very conflict
     the ``[serve]`` extra avoids) and breaks ``import unipruning_modifier`` there.
  2. else the documented full install: ``pip install vllm==0.32.0`` then
     ``pip uninstall -y torchvision torchaudio torchcodec`` (about 5 min, 5.8 GB).
Then this checkout is installed editable (``pip install -e``, which must not pull llm-compressor).
``UNIPRUNING_VLLM_PYTHON=/path/to/python`` reuses an existing vLLM interpreter instead.

``python -m tests.vllm_env`` builds it ahead of the test run (``.ci/run`` does, so the suite's
time does not include the ~3-5 min download); it prints the interpreter's path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
VLLM_VERSION = "0.32.0"
NETWORK_ERRORS = re.compile(
    r"No matching distribution|Could not find a version|NewConnectionError|ConnectionError|"
    r"Max retries exceeded|Temporary failure in name resolution|Network is unreachable|"
    r"Name or service not known|ReadTimeoutError|ProxyError|SSLError",
    re.I,
)
GPU_ONLY = re.compile(
    r"^(torch|torchaudio|torchvision|torchcodec|PyNvVideoCodec|flashinfer|tilelang|nvidia|nvtx|"
    r"fastsafetensors|instanttensor|quack|tokenspeed|humming|numba|compressed-tensors|transformers)\b",
    re.I,
)
PROBE = (
    "import importlib.util as u, vllm, compressed_tensors, unipruning_modifier, json; "
    "print(json.dumps({'vllm': vllm.__version__, 'ct': compressed_tensors.__version__, "
    "'llmcompressor': u.find_spec('llmcompressor') is not None, 'ours': unipruning_modifier.__file__}))"
)


class RegistryUnreachable(RuntimeError):
    """pip could not reach the package registry: the test skips rather than fails."""


class EnvError(RuntimeError):
    """The vLLM environment could not be built or does not import."""





def _run(cmd, timeout=1800, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)


def _pip(python: Path, *args: str) -> None:
    proc = _run([python, "-m", "pip", "install", "--quiet", *args])
    if proc.returncode:
        text = proc.stdout + proc.stderr
        if NETWORK_ERRORS.search(text):
            raise RegistryUnreachable(f"pip cannot install {' '.join(args)} from the package registry: {text.strip()[-400:]}")
        raise EnvError(f"pip install {' '.join(args)} failed:\n{text[-3000:]}")


def _probe(python: Path) -> dict | None:
    proc = _run([python, "-c", PROBE], timeout=600, env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"})
    if proc.returncode:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _requirements(python: Path) -> list[str]:
    """vLLM's declared requirements without the GPU-only packages and the pinned ones we install."""
    code = (
        "from importlib.metadata import requires; import json; "
        "print(json.dumps([r for r in requires('vllm') if 'extra ==' not in r]))"
    )
    proc = _run([python, "-c", code], timeout=120)
    if proc.returncode:
        raise EnvError(f"cannot read vLLM's requirements: {proc.stderr}")
    reqs = json.loads(proc.stdout)
    return [r for r in reqs if not GPU_ONLY.match(r)]


def _build(path: Path, minimal: bool) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    proc = _run([sys.executable, "-m", "venv", path], timeout=300)
    if proc.returncode:
        raise EnvError(f"python -m venv {path} failed: {proc.stderr}")
    python = path / "bin" / "python"
    if minimal:
        _pip(python, "--no-deps", f"vllm=={VLLM_VERSION}")
        _pip(python, "torch==2.13.0", "compressed-tensors==0.17.0", "transformers>=5.16.1,<5.20", *_requirements(python))
    else:
        _pip(python, f"vllm=={VLLM_VERSION}")
        _run([python, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"])
    return python


def vllm_python() -> Path:
    """Python of a vLLM 0.32.0 environment with this checkout installed (cached across runs)."""
    reuse = os.environ.get("UNIPRUNING_VLLM_PYTHON")
    start = time.perf_counter()
    if reuse:
        python = Path(reuse)
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "unipruning-modifier"
        venv = cache / f"vllm-{VLLM_VERSION}-py{sys.version_info.major}{sys.version_info.minor}"
        python = venv / "bin" / "python"
        if not python.exists():
            partial = venv.with_name(venv.name + ".partial")
            built = _build(partial, minimal=True)
            if _run([built, "-c", "import vllm.model_executor.layers.linear"], env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"}).returncode:
                built = _build(partial, minimal=False)
            partial.rename(venv)
    info = _probe(python)
    if info is None or Path(info["ours"]).resolve().parents[1] != REPO / "src":
        _pip(python, "-e", str(REPO))  # core deps only: torch + safetensors
        info = _probe(python)
    if info is None:
        raise EnvError(f"{python}: vllm / unipruning_modifier do not import")
    if info["vllm"] != VLLM_VERSION:
        raise EnvError(f"{python}: vLLM {info['vllm']}, expected {VLLM_VERSION}")
    if info["llmcompressor"]:
        raise EnvError(f"installing the package pulled llm-compressor into the vLLM env: {info}")
    print(f"\n[vLLM {VLLM_VERSION} env ready in {time.perf_counter() - start:.1f} s: {python}]", file=sys.stderr)
    return python

if __name__ == "__main__":
    try:
        print(vllm_python())
    except RegistryUnreachable as error:
        print(f"vLLM env not built (the test will skip): {error}", file=sys.stderr)
