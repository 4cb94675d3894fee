"""Accelerator selection in one place: CUDA, then Ascend NPU (torch_npu), then CPU.

Nothing else in the package names a device type; it asks this module. A ``torch_npu`` that is
installed but unusable (no CANN toolkit, no device) means "no NPU": a warning, never a crash.
"""

from __future__ import annotations

import importlib
import threading
import time
import warnings
from contextlib import contextmanager

import psutil
import torch

DEVICE_TYPES = ("cuda", "npu", "cpu")


def npu_available() -> bool:
    """True when torch_npu imports and reports at least one device."""
    try:
        importlib.import_module("torch_npu")
    except Exception as error:  # without CANN: ImportError libhccl.so, or anything from its loader
        if not (isinstance(error, ModuleNotFoundError) and error.name == "torch_npu"):
            warnings.warn(f"torch_npu is installed but failed to load ({error}); not using an NPU")
        return False
    npu = getattr(torch, "npu", None)
    try:
        return bool(npu is not None and npu.is_available() and npu.device_count() > 0)
    except Exception as error:
        warnings.warn(f"torch_npu loaded but cannot query devices ({error}); not using an NPU")
        return False


def select_device(requested: str | None = None) -> torch.device:
    """The device to run on: ``requested`` if given ("cuda", "cuda:1", "npu", "cpu"), else the best."""
    if requested:
        kind, _, index = requested.partition(":")
        if kind not in DEVICE_TYPES or (index and not index.isdigit()):
            raise ValueError(f"device must be one of {DEVICE_TYPES} (optionally ':index'), got {requested!r}")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} requested but CUDA is not available")
        if kind == "npu" and not npu_available():  # importing torch_npu registers the "npu" type
            raise ValueError(f"device {requested!r} requested but no Ascend NPU is usable")
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if npu_available():
        return torch.device("npu")
    return torch.device("cpu")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor to ``device`` without making the host wait for the device."""
    if tensor.device == device or device.type == "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _backend(device: torch.device):
    """torch.cuda or torch.npu for accelerator devices, None for the CPU."""
    return getattr(torch, device.type, None) if device.type in ("cuda", "npu") else None


def synchronize(device: torch.device) -> None:
    backend = _backend(device)
    if backend is not None:
        backend.synchronize(device)


def empty_cache(device: torch.device) -> None:
    backend = _backend(device)
    if backend is not None:
        backend.empty_cache()


class PeakMemory:
    """Peak memory of a block, in MiB: accelerator allocations, and process RSS on any device.

    The RSS peak is sampled every ``interval`` seconds in a thread (there is no resettable
    high-water mark for the CPU), so it can miss spikes shorter than that.
    """

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device = device
        self.interval = interval
        self.rss_peak_mb = 0.0
        self.device_peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.rss_peak_mb = max(self.rss_peak_mb, process.memory_info().rss / 2**20)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        backend = _backend(self.device)
        if backend is not None:
            synchronize(self.device)
            backend.reset_peak_memory_stats(self.device)
        self.rss_peak_mb = psutil.Process().memory_info().rss / 2**20
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        backend = _backend(self.device)
        if backend is not None:
            synchronize(self.device)
            self.device_peak_mb = backend.max_memory_allocated(self.device) / 2**20
        self._stop.set()
        self._thread.join()
        self.rss_peak_mb = max(self.rss_peak_mb, psutil.Process().memory_info().rss / 2**20)

    @property
    def peak_mb(self) -> float:
        """The figure to report: accelerator peak where there is one, else peak RSS."""
        return self.device_peak_mb if self.device_peak_mb is not None else self.rss_peak_mb


@contextmanager
def timed(device: torch.device):
    """Yield a dict whose "seconds" is set to the block's wall time (device synchronised) and
    "cpu_seconds" to the process's CPU time over it (all threads; comparable across runs on a
    shared machine where wall time is not)."""
    result = {"seconds": 0.0, "cpu_seconds": 0.0}
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        yield result
    finally:
        synchronize(device)
        result["seconds"] = time.perf_counter() - start
        result["cpu_seconds"] = time.process_time() - cpu_start
