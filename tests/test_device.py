"""Device layer: CPU here, CUDA/NPU requests, a stand-in torch_npu, PeakMemory and timed."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
import time
import types
import warnings

import psutil
import pytest
import torch

from unipruning_modifier import device as dev

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")


@pytest.fixture
def no_torch_npu(monkeypatch):
    """Make sure no (real or stand-in) torch_npu is visible."""
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # None in sys.modules: import raises ImportError
    monkeypatch.delattr(torch, "npu", raising=False)


def _fake_npu(available: bool = True, count: int = 1, error: Exception | None = None):
    def is_available():
        if error is not None:
            raise error
        return available

    return types.SimpleNamespace(
        is_available=is_available,
        device_count=lambda: count,
        synchronize=lambda *a: None,
        empty_cache=lambda: None,
    )


@pytest.fixture
def fake_torch_npu(monkeypatch):
    """A stand-in torch_npu module; the test sets torch.npu."""
    module = types.ModuleType("torch_npu")
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    return module


# --------------------------------------------------------------------------- selection on this machine


@needs_no_cuda
def test_select_device_is_cpu_here_without_warning(no_torch_npu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dev.select_device() == torch.device("cpu")
        assert dev.npu_available() is False


def test_select_device_cpu_requested():
    assert dev.select_device("cpu") == torch.device("cpu")


@needs_no_cuda
@pytest.mark.parametrize("requested", ["cuda", "cuda:1"])
def test_requesting_cuda_without_cuda_raises_naming_the_device(requested):
    with pytest.raises(ValueError, match=repr(requested)):
        dev.select_device(requested)


@pytest.mark.parametrize("requested", ["meta", "mps", "xla"])
def test_requesting_a_device_type_torch_knows_but_we_do_not_raises(requested):
    with pytest.raises(ValueError) as info:
        dev.select_device(requested)
    message = str(info.value)
    assert requested in message
    for allowed in ("cuda", "npu", "cpu"):
        assert allowed in message


def test_requesting_tpu_raises_value_error_naming_allowed_types():
    """An unknown device string is a user error: ValueError listing cuda/npu/cpu, not torch's RuntimeError."""
    with pytest.raises(ValueError) as info:
        dev.select_device("tpu")
    message = str(info.value)
    assert "tpu" in message
    for allowed in ("cuda", "npu", "cpu"):
        assert allowed in message


def test_requesting_npu_without_torch_npu_raises_value_error(no_torch_npu):
    """Without torch_npu "npu" is not a registered torch device type; the request must still be a ValueError."""
    with pytest.raises(ValueError, match="npu"):
        dev.select_device("npu")


# --------------------------------------------------------------------------- stand-in torch_npu


def test_npu_available_with_fake_torch_npu(fake_torch_npu, monkeypatch):
    monkeypatch.setattr(torch, "npu", _fake_npu(True, 1), raising=False)
    assert dev.npu_available() is True


@needs_no_cuda
def test_fake_npu_not_available_falls_back_to_cpu(fake_torch_npu, monkeypatch):
    monkeypatch.setattr(torch, "npu", _fake_npu(False, 1), raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dev.npu_available() is False
        assert dev.select_device() == torch.device("cpu")


@needs_no_cuda
def test_fake_npu_with_zero_devices_falls_back_to_cpu(fake_torch_npu, monkeypatch):
    monkeypatch.setattr(torch, "npu", _fake_npu(True, 0), raising=False)
    assert dev.npu_available() is False
    assert dev.select_device() == torch.device("cpu")


@needs_no_cuda
def test_fake_torch_npu_without_torch_npu_namespace_is_not_an_npu(fake_torch_npu, monkeypatch):
    monkeypatch.delattr(torch, "npu", raising=False)
    assert dev.npu_available() is False
    assert dev.select_device() == torch.device("cpu")


@needs_no_cuda
def test_fake_npu_query_failure_warns_and_falls_back(fake_torch_npu, monkeypatch):
    monkeypatch.setattr(torch, "npu", _fake_npu(error=RuntimeError("drv error 507033")), raising=False)
    with pytest.warns(UserWarning, match="507033"):
        assert dev.select_device() == torch.device("cpu")


@needs_no_cuda
def test_broken_torch_npu_native_load_warns_and_falls_back(monkeypatch):
    real_import = importlib.import_module

    def broken(name, *args, **kwargs):
        if name == "torch_npu":
            raise OSError("libhccl.so: cannot open shared object file: No such file or directory")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(dev.importlib, "import_module", broken)
    with pytest.warns(UserWarning, match="libhccl.so"):
        assert dev.select_device() == torch.device("cpu")


@needs_no_cuda
def test_torch_npu_import_error_from_missing_cann_warns_and_falls_back(monkeypatch):
    """docs/npu.md: without CANN, `import torch_npu` raises ImportError("libhccl.so: ...").

    That is "torch_npu present but unusable": a warning naming the cause, then the CPU.
    """
    real_import = importlib.import_module

    def broken(name, *args, **kwargs):
        if name == "torch_npu":
            raise ImportError("libhccl.so: cannot open shared object file: No such file or directory")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(dev.importlib, "import_module", broken)
    with pytest.warns(UserWarning, match="libhccl.so"):
        assert dev.select_device() == torch.device("cpu")


@needs_no_cuda
def test_torch_npu_not_installed_is_silent(monkeypatch):
    real_import = importlib.import_module

    def missing(name, *args, **kwargs):
        if name == "torch_npu":
            raise ModuleNotFoundError("No module named 'torch_npu'", name="torch_npu")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(dev.importlib, "import_module", missing)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dev.select_device() == torch.device("cpu")


_FAKE_NPU_SCRIPT = textwrap.dedent(
    """
    import importlib.util, sys, types
    import torch

    # What the real torch_npu does on import: register "npu" as torch's privateuse1 device type
    # and expose a torch.npu module mirroring torch.cuda.
    torch.utils.rename_privateuse1_backend("npu")
    sys.modules["torch_npu"] = types.ModuleType("torch_npu")
    torch.npu = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 1)

    # Load device.py on its own (the package __init__ pulls in llm-compressor, slow to import).
    spec = importlib.util.spec_from_file_location("unipruning_device_under_test", sys.argv[1])
    device = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(device)

    print(device.select_device())
    print(device.select_device("npu"))
    print(device.select_device("npu:0"))
    """
)


@needs_no_cuda
def test_select_device_picks_fake_npu(tmp_path):
    """Run in a subprocess: registering the "npu" device type cannot be undone in this process."""
    script = tmp_path / "fake_npu.py"
    script.write_text(_FAKE_NPU_SCRIPT)
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, str(script), dev.__file__], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["npu", "npu", "npu:0"]


# --------------------------------------------------------------------------- PeakMemory and timed


def test_peak_memory_cpu_sees_a_large_allocation():
    cpu = torch.device("cpu")
    before = psutil.Process().memory_info().rss / 2**20
    with dev.PeakMemory(cpu) as peak:
        big = torch.ones(50 * 2**20, dtype=torch.float32)  # 200 MiB, pages touched
        time.sleep(0.05)
        del big
    assert peak.device_peak_mb is None
    assert peak.peak_mb == peak.rss_peak_mb
    assert peak.rss_peak_mb > 0
    assert peak.rss_peak_mb >= before + 150, (before, peak.rss_peak_mb)


def test_peak_memory_cpu_without_allocation_stays_near_start():
    cpu = torch.device("cpu")
    with dev.PeakMemory(cpu) as quiet:
        time.sleep(0.02)
    start = psutil.Process().memory_info().rss / 2**20
    assert 0 < quiet.peak_mb < start + 100


def test_timed_measures_a_sleep():
    with dev.timed(torch.device("cpu")) as result:
        assert result["seconds"] == 0.0
        time.sleep(0.2)
    assert 0.2 <= result["seconds"] < 2.0


def test_timed_sets_seconds_on_exception():
    with pytest.raises(KeyError):
        with dev.timed(torch.device("cpu")) as result:
            time.sleep(0.05)
            raise KeyError("boom")
    assert result["seconds"] >= 0.05


def test_cpu_synchronize_and_empty_cache_are_no_ops():
    cpu = torch.device("cpu")
    dev.synchronize(cpu)
    dev.empty_cache(cpu)
