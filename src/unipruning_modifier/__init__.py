"""UniPruning for llm-compressor: ``import unipruning_modifier`` registers UniPruningModifier.

After the import, recipes may name ``UniPruningModifier`` (YAML or objects) in ``oneshot``.
The compression side needs llm-compressor (``pip install unipruning-modifier[compress]``);
a serving environment (``[serve]``, vLLM) has no llm-compressor, so there the package imports
without the modifiers and only ``checkpoint`` and ``serving`` are usable.
"""

from importlib.util import find_spec

__version__ = "0.1.0"
__all__ = ["__version__"]

if find_spec("llmcompressor") is not None:
    from llmcompressor.modifiers.factory import ModifierFactory

    from .modifier import UniPruningModifier

    __all__ += ["UniPruningModifier"]
    ModifierFactory.register(UniPruningModifier.__name__, UniPruningModifier)
