"""The sparse checkpoint formats by name, and what every format's codec checks.

A format is one ``Codec`` subclass in its own file (``dense.py``, ``sparse_24_bitmask.py``,
``sparse_bitmask.py``), registered with ``@register_format(name)`` as compressed-tensors <= 0.14
registered its compressors; ``get_codec(name)`` finds it. Pure torch, device-agnostic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "FORMATS",
    "SUPPORTED_DTYPES",
    "Codec",
    "SparseFormatError",
    "compress",
    "decompress",
    "get_codec",
    "parse_shape",
    "register_format",
    "standardize_format",
    "storage_bytes",
]


class SparseFormatError(ValueError):
    """A tensor cannot be compressed to, or decompressed from, a sparse checkpoint format."""


SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float8_e4m3fn,
    torch.int8,
)


def fail(name: str | None, message: str) -> SparseFormatError:
    """A SparseFormatError naming the tensor."""
    label = f"sparse tensor {name!r}" if name else "sparse tensor"
    return SparseFormatError(f"{label}: {message}")


def check_dtype(dtype: torch.dtype, name: str | None, what: str = "weight") -> None:
    if dtype not in SUPPORTED_DTYPES:
        supported = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise fail(name, f"{what} dtype {dtype} is not supported (supported: {supported})")


def check_weight(weight: torch.Tensor, name: str | None) -> None:
    """A 2-D [out, in] tensor of a supported dtype."""
    if not isinstance(weight, torch.Tensor):
        raise fail(name, f"expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise fail(name, f"only 2-D [out, in] weights can be compressed, got shape {list(weight.shape)}")
    check_dtype(weight.dtype, name)


def check_values(compressed: Any, dtype: torch.dtype | None, name: str | None) -> None:
    """Stored values: a tensor of a supported dtype (``dtype`` when given)."""
    if not isinstance(compressed, torch.Tensor):
        raise fail(name, f"compressed must be a torch.Tensor, got {type(compressed).__name__}")
    check_dtype(compressed.dtype, name, "compressed")
    if dtype is not None and compressed.dtype != dtype:
        raise fail(name, f"compressed values are stored as {compressed.dtype}, expected {dtype}")


def check_bitmask(bitmask: Any, rows: int, cols: int, name: str | None) -> None:
    """A uint8 [rows, ceil(cols / 8)] bitmask."""
    if not isinstance(bitmask, torch.Tensor):
        raise fail(name, f"bitmask must be a torch.Tensor, got {type(bitmask).__name__}")
    if bitmask.dtype != torch.uint8:
        raise fail(name, f"bitmask must be uint8, got {bitmask.dtype}")
    expected = (rows, (cols + 7) // 8)
    if tuple(bitmask.shape) != expected:
        raise fail(
            name,
            f"bitmask has shape {list(bitmask.shape)}, expected {list(expected)} "
            f"= [out, ceil(in/8)] for the dense shape [{rows}, {cols}]",
        )


def parse_shape(shape: Any, name: str | None = None) -> tuple[int, int]:
    """(out, in) from a stored shape tensor ([2, 1] or [2]), a list/tuple or a torch.Size."""
    if isinstance(shape, torch.Tensor):
        if shape.is_floating_point() or shape.is_complex() or shape.dtype == torch.bool:
            raise fail(name, f"shape must be an integer tensor, got dtype {shape.dtype}")
        values = shape.detach().flatten().cpu().tolist()
    else:
        try:
            values = [int(v) for v in shape]
        except (TypeError, ValueError):
            raise fail(name, f"shape must hold two integers [out, in], got {shape!r}") from None
    if len(values) != 2 or any(v < 0 for v in values):
        raise fail(name, f"shape must hold two non-negative integers [out, in], got {values}")
    return int(values[0]), int(values[1])


class Codec:
    """A sparse checkpoint format: the tensors it stores per module and how to (de)compress."""

    format: str = ""
    param_names: tuple[str, ...] = ()
    sparsity_structure: str | None = None  # the only structure the format can hold, if any

    def compress(self, weight: torch.Tensor, name: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decompress(
        self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None, name: str | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def require(self, tensors: Mapping[str, torch.Tensor], name: str | None, optional: Sequence[str] = ()) -> None:
        """Refuse a module whose tensors lack one of the format's (non-optional) params."""
        missing = [p for p in self.param_names if p not in tensors and p not in optional]
        if missing:
            raise fail(name, f"{self.format} needs {list(self.param_names)}, missing {missing}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(format={self.format!r})"


FORMATS: dict[str, Codec] = {}


def standardize_format(fmt: str) -> str:
    """"Sparse_24_Bitmask" -> "sparse-24-bitmask" (compressed-tensors' lookup normalisation)."""
    return str(fmt).replace("_", "-").replace(" ", "-").lower()


def register_format(name: str):
    """Class decorator: register an instance of the codec under ``name``."""

    def wrap(cls: type[Codec]) -> type[Codec]:
        key = standardize_format(name)
        if key in FORMATS:
            raise ValueError(f"sparse format {key!r} is already registered")
        cls.format = key
        FORMATS[key] = cls()
        return cls

    return wrap


def get_codec(fmt: str, name: str | None = None) -> Codec:
    """The codec registered as ``fmt``; SparseFormatError listing the known ones otherwise."""
    if not isinstance(fmt, str) or standardize_format(fmt) not in FORMATS:
        raise fail(name, f"unknown sparse format {fmt!r} (known: {sorted(FORMATS)})")
    return FORMATS[standardize_format(fmt)]


def compress(weight: torch.Tensor, format: str, name: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
    """Compress one weight with the codec registered as ``format``."""
    return get_codec(format, name).compress(weight, name, **kwargs)


def decompress(
    tensors: Mapping[str, torch.Tensor], format: str, dtype: torch.dtype | None = None, name: str | None = None
) -> torch.Tensor:
    """Dense weight from the tensors of one module (keys without the module prefix)."""
    return get_codec(format, name).decompress(tensors, dtype=dtype, name=name)


def storage_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes the tensors occupy (element size x count), as compressed-tensors reported them."""
    return sum(t.element_size() * t.numel() for t in tensors.values())
