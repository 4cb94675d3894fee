"""Behaviour stays bit-identical: every case of tests/golden.py against tests/golden.json."""

from __future__ import annotations

import json

import pytest

from . import golden

pytestmark = pytest.mark.slow

RECORDED = json.loads(golden.GOLDEN.read_text())


@pytest.fixture(scope="module")
def computed() -> dict[str, dict[str, str]]:
    if RECORDED["platform"] != golden.platform():
        pytest.skip(f"golden hashes were written on {RECORDED['platform']}, this is {golden.platform()}")
    return golden.compute()


def test_every_case_is_recorded():
    assert sorted(RECORDED["cases"]) == sorted(
        [*golden.CASES, *golden.EXTRACTED, "saliency-file", *(f"saved-{c}" for c in golden.SAVED)]
    )


@pytest.mark.parametrize("case", sorted(RECORDED["cases"]))
def test_case_is_bit_identical(computed, case):
    expected, got = RECORDED["cases"][case], computed[case]
    assert sorted(got) == sorted(expected), f"{case}: tensors differ in name"
    changed = sorted(name for name in expected if got[name] != expected[name])
    assert not changed, f"{case}: {len(changed)} tensors changed, e.g. {changed[:5]}"
