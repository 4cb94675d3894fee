"""``from_pretrained`` for our sparse checkpoints, through transformers' compressed-tensors quantizer.

A checkpoint we write says ``quant_method: compressed-tensors`` with a ``sparsity_config``
(checkpoint-format.md), which transformers 5 reads with its compressed-tensors integration; that
integration no longer knows the sparse formats. transformers' quantizer registries refuse a second
entry for a method, so ``install`` replaces the two entries of "compressed-tensors" with
subclasses of transformers' own classes (registration.py calls it when transformers' quantizer
module is imported). The subclasses change nothing for a checkpoint without ``sparsity_config``:

- ``CompressedTensorsConfig`` takes the ``sparsity_config`` out before compressed-tensors parses
  the rest, refusing a format we do not read by name (SparseFormatError).
- ``SparseCompressedTensorsHfQuantizer``, before the weights load (the model on the meta
  device), gives every module whose checkpoint tensors are compressed (``P.bitmask`` in a shard's
  header) parameters shaped like those tensors instead of ``weight``, so transformers' loader
  fills them as any other; after loading it checks them against the shard's checksums and
  decompresses each into ``weight`` (in the dtype transformers chose for it), then hands over to
  compressed-tensors for quantized weights. An unquantized model comes back as a plain model
  (zeros in dense weights, no quantization config), as from ``load_sparse``.
"""

from __future__ import annotations

import torch
from transformers.quantizers import auto
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizer_compressed_tensors import CompressedTensorsHfQuantizer
from transformers.utils import quantization_config as hf_config

from .files import check_header, recorded_checksums, verify_tensor
from .registry import FORMATS, SparseFormatError, get_codec, standardize_format

__all__ = ["CompressedTensorsConfig", "SparseCompressedTensorsHfQuantizer", "install"]

METHOD = "compressed-tensors"
_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I16": torch.int16, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "F32": torch.float32,
    "I64": torch.int64, "F64": torch.float64,
}


class CompressedTensorsConfig(hf_config.CompressedTensorsConfig):
    """transformers' CompressedTensorsConfig plus the ``sparsity_config`` of our formats. Same
    class name: transformers compares config classes by name when a user passes one to
    ``from_pretrained`` (e.g. ``CompressedTensorsConfig(dequantize=True)``)."""

    def __init__(self, *args, sparsity_config: dict | None = None, **kwargs):
        if sparsity_config is not None:
            format = sparsity_config.get("format") if isinstance(sparsity_config, dict) else None
            if not isinstance(format, str) or standardize_format(format) not in FORMATS:
                raise SparseFormatError(
                    f"quantization_config.sparsity_config: unknown sparse format {format!r} "
                    f"(unipruning_modifier reads {sorted(FORMATS)})"
                )
        self.sparsity_config = sparsity_config
        super().__init__(*args, **kwargs)

    def post_init(self):
        if self.sparsity_config is not None and not self.is_quantized:  # dense once decompressed
            self.dequantize, self.use_optimized_inference = True, False
            return
        super().post_init()


class SparseCompressedTensorsHfQuantizer(CompressedTensorsHfQuantizer):
    """transformers' compressed-tensors quantizer, which also decompresses sparse modules."""

    def __init__(self, quantization_config: CompressedTensorsConfig, **kwargs):
        self._sparse: dict[str, tuple[torch.dtype, str, dict]] = {}  # module -> (weight dtype, shard, its checksums)
        if quantization_config.is_quantized:
            super().__init__(quantization_config, **kwargs)
        else:  # sparse only: no compressed-tensors compressor to build
            HfQuantizer.__init__(self, quantization_config, **kwargs)
            quantization_config.post_init()
            self.quantization_config = quantization_config

    def validate_environment(self, *args, **kwargs):
        if self.quantization_config.is_quantized:
            super().validate_environment(*args, **kwargs)
        else:
            self.use_fp8_kernel = False

    def _process_model_before_weight_loading(self, model, **kwargs):
        if self.quantization_config.is_quantized:
            super()._process_model_before_weight_loading(model, **kwargs)
        sparse = getattr(self.quantization_config, "sparsity_config", None)
        if sparse is not None and get_codec(sparse["format"]).format != "dense":
            self._sparse = _compressed_layout(model, kwargs.get("checkpoint_files") or [], get_codec(sparse["format"]))

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self._sparse:
            codec = get_codec(self.quantization_config.sparsity_config["format"])
            for name, (dtype, shard, checksums) in self._sparse.items():
                module = model.get_submodule(name)
                tensors = {p: module._parameters.pop(p).data for p in codec.param_names if p in module._parameters}
                for param, tensor in tensors.items():
                    verify_tensor(shard, f"{name}.{param}", tensor.cpu(), checksums)
                weight = codec.decompress(tensors, name=name)
                weight = weight.to(dtype) if weight.is_floating_point() else weight  # as transformers casts a stored weight
                module.weight = torch.nn.Parameter(weight, requires_grad=weight.is_floating_point())
            self._sparse = {}
        if self.quantization_config.is_quantized:
            super()._process_model_after_weight_loading(model, **kwargs)
        return model


def _compressed_layout(model, checkpoint_files, codec) -> dict[str, tuple[torch.dtype, str, dict]]:
    """Replace ``weight`` of every module stored compressed by meta parameters shaped like its
    stored tensors (read from the shard headers, which are checked); module -> (the weight's
    dtype, its shard, the shard's checksums)."""
    found = {}
    for shard in checkpoint_files:
        header = check_header(shard)
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        checksums = recorded_checksums(shard, header.get("__metadata__"), entries)
        for key in entries:
            if not key.endswith(".bitmask"):
                continue
            name = key.removesuffix(".bitmask")
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise SparseFormatError(f"{shard}: tensor {key!r} belongs to no module of {type(model).__name__}") from None
            codec.require({p: None for p in codec.param_names if f"{name}.{p}" in entries}, name)
            found[name] = (module.weight.dtype, str(shard), checksums)
            del module.weight
            for param in codec.param_names:
                entry = entries[f"{name}.{param}"]
                empty = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]], device="meta")
                module.register_parameter(param, torch.nn.Parameter(empty, requires_grad=False))
    return found


def install() -> None:
    """Make "compressed-tensors" checkpoints load through the subclasses above."""
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[METHOD] = CompressedTensorsConfig
    auto.AUTO_QUANTIZER_MAPPING[METHOD] = SparseCompressedTensorsHfQuantizer
