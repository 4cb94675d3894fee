"""UniPruning for llm-compressor: ``import unipruning_modifier`` registers our modifiers.

After the import, recipes may name ``UniPruningModifier`` and ``MaskedGPTQModifier`` (GPTQ that
keeps the pruning mask) in ``oneshot``, as YAML or objects.
The compression side needs llm-compressor (``pip install unipruning-modifier[compress]``);
a serving environment (``[serve]``, vLLM) has no llm-compressor, so there the package imports
without the modifiers and only ``checkpoint`` and ``serving`` are usable.
"""

from importlib.util import find_spec

from .version import __version__

__all__ = ["__version__"]

if find_spec("llmcompressor") is not None:
    try:
        from llmcompressor.modifiers.factory import ModifierFactory

        from .masked_gptq import MaskedGPTQModifier
        from .modifier import UniPruningModifier
    except ImportError as error:  # e.g. llm-compressor beside vLLM's compressed-tensors pin
        import warnings

        warnings.warn(
            f"llm-compressor is installed but does not import ({error}); only unipruning_modifier.checkpoint "
            "and unipruning_modifier.serving are usable in this environment",
            stacklevel=2,
        )
    else:
        __all__ += ["MaskedGPTQModifier", "UniPruningModifier"]
        for _modifier in (UniPruningModifier, MaskedGPTQModifier):
            ModifierFactory.register(_modifier.__name__, _modifier)
