"""The vLLM plugin inside a real vLLM 0.32.0 environment (CPU).

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
The test skips with pip's message when the package registry cannot be reached.

``tests/vllm_serving_checks.py`` runs in that interpreter (``VLLM_TARGET_DEVICE=cpu``) and
reports one JSON entry per check; each check is asserted here.
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

import pytest

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
CHECKS = (
    ["entry_point", "register_is_light", "stock_refuses_sparsity", "override_claims_only_sparse", "model_config_picks_method"]
    + ["non_sparse_unchanged", "dense_format_w4a16_parses", "row_parallel_refuses_split_inside_a_byte"]
    + [
        f"layers_{fmt}_{dtype}_tp{tp}"
        for fmt in ("sparse-24-bitmask", "sparse-bitmask")
        for dtype in ("bfloat16", "float16")
        for tp in (1, 2, 4)
    ]
    + [f"layers_{fmt}_{q}_tp2" for q in ("int8", "fp8") for fmt in ("sparse-24-bitmask", "sparse-bitmask")]
)

pytestmark = pytest.mark.slow


def _run(cmd, timeout=1800, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)


def _pip(python: Path, *args: str) -> None:
    proc = _run([python, "-m", "pip", "install", "--quiet", *args])
    if proc.returncode:
        text = proc.stdout + proc.stderr
        if NETWORK_ERRORS.search(text):
            pytest.skip(f"pip cannot install {' '.join(args)} from the package registry: {text.strip()[-400:]}")
        pytest.fail(f"pip install {' '.join(args)} failed:\n{text[-3000:]}")


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
    assert proc.returncode == 0, proc.stderr
    reqs = json.loads(proc.stdout)
    return [r for r in reqs if not GPU_ONLY.match(r)]


def _build(path: Path, minimal: bool) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    proc = _run([sys.executable, "-m", "venv", path], timeout=300)
    assert proc.returncode == 0, proc.stderr
    python = path / "bin" / "python"
    if minimal:
        _pip(python, "--no-deps", f"vllm=={VLLM_VERSION}")
        _pip(python, "torch==2.13.0", "compressed-tensors==0.17.0", "transformers>=5.16.1,<5.20", *_requirements(python))
    else:
        _pip(python, f"vllm=={VLLM_VERSION}")
        _run([python, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"])
    return python


@pytest.fixture(scope="session")
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
    assert info is not None, f"{python}: vllm / unipruning_modifier do not import"
    assert info["vllm"] == VLLM_VERSION, info
    assert not info["llmcompressor"], f"installing the package pulled llm-compressor into the vLLM env: {info}"
    print(f"\n[vLLM {VLLM_VERSION} env ready in {time.perf_counter() - start:.1f} s: {python}]", file=sys.stderr)
    return python


@pytest.fixture(scope="session")
def report(vllm_python, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("vllm-checks")
    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}  # every plugin loads
    env["VLLM_TARGET_DEVICE"] = "cpu"
    proc = _run([vllm_python, REPO / "tests" / "vllm_serving_checks.py", work], timeout=1200, env=env)
    path = work / "report.json"
    assert path.exists(), f"check script failed before its report:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    print(f"\n[vLLM checks: {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    return json.loads(path.read_text())


def test_report_has_every_check(report):
    assert sorted(report) == sorted(CHECKS)


@pytest.mark.parametrize("name", CHECKS)
def test_vllm_check(report, name):
    result = report.get(name)
    assert result is not None, f"check {name} did not run"
    assert result["ok"], result["detail"]


def test_quantized_line_is_reported(report):
    """INT8 W8A8 stops in vLLM's CPU kernel (vllm._C), FP8 runs: the report says which."""
    for fmt in ("sparse-24-bitmask", "sparse-bitmask"):
        assert "CompressedTensorsW8A8Int8" in report[f"layers_{fmt}_int8_tp2"]["detail"]
        assert "CompressedTensorsW8A8Fp8" in report[f"layers_{fmt}_fp8_tp2"]["detail"]
