"""Sparse checkpoint formats of compressed-tensors <= 0.14.0.1 (sparse-24-bitmask, sparse-bitmask).

One file per format (``dense``, ``sparse_24_bitmask``, ``sparse_bitmask``) registered in
``registry``; ``bitmask`` packs and unpacks the masks they share; ``state_dict`` compresses a
whole state dict and builds the config.json ``sparsity_config``; ``save`` writes a pruned
model's checkpoint (``save_sparse``), ``load`` reads one back (``load_sparse``); ``files``
writes every file atomically with per-tensor checksums and checks them on reading. No
llm-compressor import: this package also serves the vLLM plugin. See docs/checkpoint-format.md.
"""

from . import dense, sparse_24_bitmask, sparse_bitmask  # noqa: F401  (register the formats)
from .bitmask import pack_bitmask, row_popcounts, unpack_bitmask
from .files import DamagedFileError, read_safetensors, write_safetensors
from .load import load_sparse, load_sparse_state_dict, sparse_config_of
from .registry import (
    FORMATS,
    SUPPORTED_DTYPES,
    Codec,
    SparseFormatError,
    compress,
    decompress,
    get_codec,
    parse_shape,
    register_format,
    storage_bytes,
)
from .save import is_sparse, mark_sparse, save_sparse, write_sparse
from .sparse_24_bitmask import compress_sparse_24_bitmask, decompress_sparse_24_bitmask, mask_24
from .sparse_bitmask import compress_sparse_bitmask, decompress_sparse_bitmask
from .state_dict import compress_state_dict, compressed_module_names, decompress_state_dict, sparsity_config

__all__ = [
    "FORMATS",
    "SUPPORTED_DTYPES",
    "Codec",
    "DamagedFileError",
    "SparseFormatError",
    "compress",
    "compress_sparse_24_bitmask",
    "compress_sparse_bitmask",
    "compress_state_dict",
    "compressed_module_names",
    "decompress",
    "decompress_sparse_24_bitmask",
    "decompress_sparse_bitmask",
    "decompress_state_dict",
    "get_codec",
    "is_sparse",
    "load_sparse",
    "load_sparse_state_dict",
    "mark_sparse",
    "mask_24",
    "pack_bitmask",
    "parse_shape",
    "read_safetensors",
    "register_format",
    "row_popcounts",
    "save_sparse",
    "sparse_config_of",
    "sparsity_config",
    "storage_bytes",
    "unpack_bitmask",
    "write_safetensors",
    "write_sparse",
]
