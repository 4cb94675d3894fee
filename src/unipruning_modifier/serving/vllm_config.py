"""vLLM side of the plugin: a CompressedTensorsConfig that reads sparse checkpoints again.

``SparseCompressedTensorsConfig`` is vLLM's own compressed-tensors config with the sparsity
check replaced: layers matched by ``sparsity_config`` targets (minus ignore) in a sparse format
get ``SparseLinearMethod``; every other layer, and ``format: "dense"`` sparsity (W4A16), goes
through vLLM's code unchanged.

``SparseLinearMethod`` registers ``compressed`` / ``bitmask`` / ``shape`` (/ ``row_offsets``)
parameters whose loader keeps this rank's slice of every shard (q/k/v, gate/up) as it arrives,
and, in ``process_weights_after_loading``, decompresses them to the dense weight. Quantized
layers (FP8 / INT8 W8A8) wrap vLLM's own scheme: it creates the weight and scales, the weight
is filled by decompression, then the scheme's own processing and kernels run. Unquantized 2:4
layers on a GPU may use the cuSPARSELt kernel (``kernels.py``) where it measured faster;
everything else runs vLLM's dense path. The choice is logged per layer.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
    CompressedTensorsConfig,
)
from vllm.model_executor.layers.quantization.compressed_tensors.utils import (
    find_matched_target,
    should_ignore_layer,
)
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.parameter import ModelWeightParameter

from ..checkpoint import SparseFormatError, get_codec
from . import kernels
from .sparsity import SparsitySpec, decompress_part, parse_sparsity_config, slice_columns, slice_rows

__all__ = ["SparseCompressedTensorsConfig", "SparseLinearMethod"]

logger = init_logger("vllm.plugins.unipruning_sparse")

_PARAM_DTYPES = {"shape": torch.int64, "bitmask": torch.uint8, "row_offsets": torch.int64}


class SparseCompressedTensorsConfig(CompressedTensorsConfig):
    """compressed-tensors config that serves sparse-24-bitmask / sparse-bitmask layers."""

    sparsity: SparsitySpec | None = None

    @classmethod
    def _parse_sparsity_config(cls, config: dict[str, Any]):
        """Validate the sparsity_config instead of raising vLLM's deprecation error."""
        spec = parse_sparsity_config(config)
        if spec is None:
            return {}, []
        return {target: spec for target in spec.targets}, spec.ignore

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SparseCompressedTensorsConfig:
        obj = super().from_config(config)
        obj.sparsity = parse_sparsity_config(config)
        return obj

    def apply_vllm_mapper(self, hf_to_vllm_mapper):
        super().apply_vllm_mapper(hf_to_vllm_mapper)
        if self.sparsity is not None:
            mapped = lambda names: [  # noqa: E731
                hf_to_vllm_mapper._map_name(t) if "." in t and not t.startswith("re:") else t for t in names
            ]
            self.sparsity.targets = [t for t in mapped(self.sparsity.targets) if t is not None]
            self.sparsity.ignore = [t for t in mapped(self.sparsity.ignore) if t is not None]

    def is_sparse_layer(self, layer: torch.nn.Module, prefix: str) -> bool:
        """True when ``prefix`` is a sparsity target (not ignored) stored in a sparse format."""
        spec = self.sparsity
        if spec is None or not spec.compressed:
            return False
        if should_ignore_layer(prefix, ignore=spec.ignore, fused_mapping=self.packed_modules_mapping):
            return False
        return (
            find_matched_target(
                layer_name=prefix, module=layer, targets=spec.targets, fused_mapping=self.packed_modules_mapping
            )
            is not None
        )

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, ParallelLMHead) and self.is_sparse_layer(layer, prefix):
            raise NotImplementedError(
                f"{prefix}: a {self.sparsity.format} lm_head / embedding is not supported; "
                "keep lm_head in the sparsity_config ignore list"
            )
        if isinstance(layer, LinearBase) and self.is_sparse_layer(layer, prefix):
            if self.transform_config is not None:
                raise NotImplementedError(f"{prefix}: transforms together with {self.sparsity.format} are not supported")
            scheme = self.get_scheme(layer=layer, layer_name=prefix)
            if scheme is not None:
                layer.scheme = scheme
            return SparseLinearMethod(self, self.sparsity.format, scheme, prefix)
        return super().get_quant_method(layer, prefix)


def _row_blocks(layer: LinearBase, shard_id, rows: int) -> list[tuple[int, int, int]]:
    """(source start, size, destination offset) of the output rows this rank keeps.

    Mirrors vLLM's loaders: QKV (kv heads replicated when tp > kv heads), merged gate/up,
    plain column-parallel, and fused-on-disk q/k/v or gate/up (shard id None).
    """
    tp_rank, tp_size = layer.tp_rank, layer.tp_size
    if isinstance(layer, QKVParallelLinear):
        if shard_id is None:
            hs, vhs = layer.head_size, layer.v_head_size
            q, kv = layer.total_num_heads * hs, layer.total_num_kv_heads * hs
            fused = [("q", 0), ("k", q), ("v", q + kv)]
            blocks = []
            for sid, base in fused:
                for start, size, dest in _row_blocks(layer, sid, rows):
                    blocks.append((base + start, size, dest))
            return blocks
        size = layer._get_shard_size_mapping(shard_id)
        shard_rank = tp_rank if shard_id == "q" else tp_rank // layer.num_kv_head_replicas
        return [(shard_rank * size, size, layer._get_shard_offset_mapping(shard_id))]
    if isinstance(layer, MergedColumnParallelLinear):
        if shard_id is None or isinstance(shard_id, tuple):
            ids = list(range(len(layer.output_sizes))) if shard_id is None else list(shard_id)
            blocks, base = [], 0
            for i in ids:
                for start, size, dest in _row_blocks(layer, i, rows):
                    blocks.append((base + start, size, dest))
                base += layer.output_sizes[i]
            return blocks
        size = layer.output_sizes[shard_id] // tp_size
        return [(tp_rank * size, size, sum(layer.output_sizes[:shard_id]) // tp_size)]
    if isinstance(layer, ColumnParallelLinear):
        size = layer.output_size_per_partition
        return [(tp_rank * size, size, 0)]
    return [(0, rows, 0)]


class SparseLinearMethod(LinearMethodBase):
    """Loads a sparse-format linear layer, then runs it dense, through a scheme, or on cuSPARSELt."""

    def __init__(self, config: SparseCompressedTensorsConfig, fmt: str, scheme, prefix: str):
        self.config = config
        self.format = fmt
        self.codec = get_codec(fmt)
        self.scheme = scheme
        self.prefix = prefix
        self.dense_method = UnquantizedLinearMethod() if scheme is None else None

    # ------------------------------------------------------------------ loading
    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ):
        weight_loader = extra_weight_attrs.get("weight_loader")
        if self.scheme is not None:
            self.scheme.create_weights(
                layer=layer,
                input_size=input_size,
                input_size_per_partition=input_size_per_partition,
                output_partition_sizes=output_partition_sizes,
                output_size=output_size,
                params_dtype=params_dtype,
                weight_loader=weight_loader,
            )
            template = getattr(layer, "weight", None)
            if not isinstance(template, torch.nn.Parameter) or template.dtype not in (torch.float8_e4m3fn, torch.int8):
                raise NotImplementedError(
                    f"{self.prefix}: {self.format} with scheme {type(self.scheme).__name__} is not supported "
                    "(sparse formats hold FP8 / INT8 W8A8 or unquantized weights)"
                )
            del layer.weight
            template.data = torch.empty(0, dtype=template.dtype, device=template.device)
            stored_dtype = template.dtype
        else:
            template = ModelWeightParameter(
                data=torch.empty(0, dtype=params_dtype), input_dim=1, output_dim=0, weight_loader=weight_loader
            )
            stored_dtype = params_dtype
        layer.__dict__["_ups_template"] = template
        layer.__dict__["_ups_parts"] = {}
        layer.__dict__["_ups_pending"] = {}
        layer.__dict__["_ups_geometry"] = (sum(output_partition_sizes), input_size_per_partition, params_dtype)
        device = template.device
        for name in self.codec.param_names:
            dtype = _PARAM_DTYPES.get(name, stored_dtype)
            param = torch.nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False)
            param.weight_loader = self._make_loader(layer, name)
            layer.register_parameter(name, param)

    def _make_loader(self, layer: torch.nn.Module, name: str):
        def load(param: torch.nn.Parameter, loaded: torch.Tensor, shard_id=None):
            key = shard_id if not isinstance(shard_id, list) else tuple(shard_id)
            pending = layer.__dict__["_ups_pending"].setdefault(key, {})
            pending[name] = loaded
            if all(p in pending for p in self.codec.param_names):
                del layer.__dict__["_ups_pending"][key]
                self._keep_shard(layer, key, pending, param.device)

        return load

    def _keep_shard(self, layer, shard_id, tensors: dict, device: torch.device) -> None:
        """Slice this rank's rows / columns of one loaded shard, still compressed where possible."""
        rows, cols = self.codec_dims(tensors, shard_id)
        parts = layer.__dict__["_ups_parts"]
        col_slice = None
        if isinstance(layer, RowParallelLinear) and layer.tp_size > 1:
            size = layer.input_size_per_partition
            col_slice = (layer.tp_rank * size, size)
        for start, size, dest in _row_blocks(layer, shard_id, rows):
            part = slice_rows(self.format, tensors, start, size, name=self.prefix) if (start, size) != (0, rows) else tensors
            if col_slice is not None:
                part = slice_columns(self.format, part, *col_slice, name=self.prefix)
            if isinstance(part, torch.Tensor):
                part = part.to(device=device, copy=True)
            else:
                part = {k: v.to(device=device if k != "shape" else "cpu", copy=True) for k, v in part.items()}
            parts[dest] = (size, part)

    def codec_dims(self, tensors: dict, shard_id) -> tuple[int, int]:
        shape = tensors["shape"].flatten().tolist()
        if len(shape) != 2:
            raise SparseFormatError(f"{self.prefix} (shard {shard_id!r}): shape tensor holds {shape}, expected [out, in]")
        return int(shape[0]), int(shape[1])

    def _assemble(self, layer: torch.nn.Module) -> torch.Tensor:
        """The rank's dense weight [sum(output partitions), input partition] from the kept parts."""
        out_rows, in_cols, _ = layer.__dict__["_ups_geometry"]
        pending = layer.__dict__["_ups_pending"]
        if pending:
            missing = {k: sorted(set(self.codec.param_names) - set(v)) for k, v in pending.items()}
            raise SparseFormatError(f"{self.prefix}: incomplete {self.format} tensors per shard: {missing}")
        parts = sorted(layer.__dict__["_ups_parts"].items())
        offset, blocks = 0, []
        for dest, (size, part) in parts:
            if dest != offset:
                break
            dense = decompress_part(self.format, part, name=self.prefix)
            blocks.append(dense)
            offset += size
        if offset != out_rows or not blocks:
            loaded = [(dest, size) for dest, (size, _) in parts]
            raise SparseFormatError(
                f"{self.prefix}: the checkpoint's {self.format} tensors cover output rows {loaded} "
                f"(offset, size) of {out_rows}; is every shard of this module stored compressed?"
            )
        weight = torch.cat(blocks, dim=0) if len(blocks) > 1 else blocks[0]
        if weight.shape[1] != in_cols:
            raise SparseFormatError(f"{self.prefix}: decompressed weight has {weight.shape[1]} inputs, expected {in_cols}")
        return weight

    # ------------------------------------------------------------------ after loading
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        weight = self._assemble(layer)
        for name in self.codec.param_names:
            delattr(layer, name)
        template = layer.__dict__.pop("_ups_template")
        _, _, params_dtype = layer.__dict__.pop("_ups_geometry")
        del layer.__dict__["_ups_parts"], layer.__dict__["_ups_pending"]
        if self.scheme is not None:
            if weight.dtype != template.dtype:
                raise SparseFormatError(f"{self.prefix}: stored values are {weight.dtype}, the scheme expects {template.dtype}")
            template.data = weight
            layer.register_parameter("weight", template)
            self.scheme.process_weights_after_loading(layer)
            self._log(layer, f"decompressed to dense, then {type(self.scheme).__name__}", weight)
            return
        weight = weight.to(params_dtype)  # the serving dtype: logged below
        template.data = weight
        layer.register_parameter("weight", template)
        sparse = None
        if self.format == "sparse-24-bitmask":
            sparse = kernels.Sparse24Linear.from_dense(layer.weight.data)
            decision = kernels.decide(layer.weight.data) if sparse is None else sparse.decision
            path = decision.describe()
        else:
            path = "dense (unstructured sparsity has no kernel)"
        if sparse is not None:
            layer.__dict__["_ups_kernel"] = sparse
            if sparse.dense is None:
                del layer.weight
        else:
            self.dense_method.process_weights_after_loading(layer)
        self._log(layer, path, weight)

    def _log(self, layer, path: str, weight: torch.Tensor) -> None:
        key = (tuple(weight.shape), weight.dtype, path)
        seen = self.config.__dict__.setdefault("_ups_logged", set())
        (logger.debug if key in seen else logger.info)(
            "unipruning-sparse %s [%s %dx%d %s]: %s",
            self.prefix,
            self.format,
            weight.shape[0],
            weight.shape[1],
            str(weight.dtype).removeprefix("torch."),
            path,
        )
        seen.add(key)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.scheme is not None:
            return self.scheme.apply_weights(layer, x, bias=bias)
        sparse = layer.__dict__.get("_ups_kernel")
        if sparse is not None:
            return sparse(x, bias)
        return self.dense_method.apply(layer, x, bias)


register_weight_loader_v2_supported_method(SparseLinearMethod)
