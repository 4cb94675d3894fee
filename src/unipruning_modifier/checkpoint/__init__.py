"""Sparse checkpoint formats of compressed-tensors <= 0.14.0.1 (sparse-24-bitmask, sparse-bitmask).

``codecs``: per-tensor compress / decompress (pure torch). ``state_dict``: model-level
compress / decompress of a state dict and the config.json ``sparsity_config``.
See docs/checkpoint-format.md.
"""

from .codecs import (
    FORMATS,
    SUPPORTED_DTYPES,
    Codec,
    SparseFormatError,
    compress,
    compress_sparse_24_bitmask,
    compress_sparse_bitmask,
    decompress,
    decompress_sparse_24_bitmask,
    decompress_sparse_bitmask,
    get_codec,
    mask_24,
    pack_bitmask,
    register_format,
    storage_bytes,
    unpack_bitmask,
)
from .state_dict import compress_state_dict, compressed_module_names, decompress_state_dict, sparsity_config

__all__ = [
    "FORMATS",
    "SUPPORTED_DTYPES",
    "Codec",
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
    "mask_24",
    "pack_bitmask",
    "register_format",
    "sparsity_config",
    "storage_bytes",
    "unpack_bitmask",
]
