"""UniPruning for llm-compressor: ``import unipruning_modifier`` registers our modifiers.

After the import, recipes may name ``UniPruningModifier`` and ``MaskedGPTQModifier`` (GPTQ that
keeps the pruning mask) in ``oneshot``, as YAML or objects, and ``from_pretrained`` loads our
sparse checkpoints. The import itself is light (no torch, transformers or llm-compressor):
both take effect when llm-compressor / transformers are imported (registration.py), and the two
classes are imported on first access (``from unipruning_modifier import UniPruningModifier``).
The compression side needs llm-compressor (``pip install unipruning-modifier[compress]``); a
serving environment (``[serve]``, vLLM) has none, and there only ``checkpoint`` and ``serving``
are usable.
"""

from importlib.util import find_spec

from . import registration
from .version import __version__

__all__ = ["MaskedGPTQModifier", "UniPruningModifier", "__version__"]


def __getattr__(name: str):
    if name in ("MaskedGPTQModifier", "UniPruningModifier"):
        return registration.modifiers()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if find_spec("llmcompressor") is not None:
    registration.after_import("llmcompressor", registration.register_modifiers)
if find_spec("transformers") is not None:
    registration.after_import("transformers.quantizers.auto", registration.enable_from_pretrained)
