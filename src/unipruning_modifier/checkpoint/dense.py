"""dense: the weight stored as it is (zeros included); a no-op codec, so every format has one."""

from __future__ import annotations

from .registry import Codec, fail, register_format

__all__ = ["DenseCodec"]


@register_format("dense")
class DenseCodec(Codec):
    param_names = ("weight",)

    def compress(self, weight, name=None, **kwargs):
        return {"weight": weight}

    def decompress(self, tensors, dtype=None, name=None):
        self.require(tensors, name)
        weight = tensors["weight"]
        if dtype is not None and weight.dtype != dtype:
            raise fail(name, f"weight is stored as {weight.dtype}, expected {dtype}")
        return weight
