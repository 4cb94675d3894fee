"""Serving pruned checkpoints with vLLM (``pip install "unipruning-modifier[serve]"``).

``plugin.register`` is vLLM's entry point (group ``vllm.general_plugins``); ``sparsity`` and
``kernels`` are plain torch; ``vllm_config`` holds the vLLM classes and imports vLLM. Nothing
here imports llm-compressor. See docs/serving.md.
"""

from .plugin import METHOD_NAME, register

__all__ = ["METHOD_NAME", "register"]
