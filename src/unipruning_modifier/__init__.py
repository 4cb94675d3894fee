"""UniPruning for llm-compressor: ``import unipruning_modifier`` registers UniPruningModifier.

After the import, recipes may name ``UniPruningModifier`` (YAML or objects) in ``oneshot``.
"""

from llmcompressor.modifiers.factory import ModifierFactory

from .modifier import UniPruningModifier

__version__ = "0.1.0"
__all__ = ["UniPruningModifier", "__version__"]

ModifierFactory.register(UniPruningModifier.__name__, UniPruningModifier)
