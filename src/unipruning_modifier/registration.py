"""What ``import unipruning_modifier`` sets up in llm-compressor and transformers, deferred until
each of them is imported.

llm-compressor takes ~10 s to import and transformers ~1.5 s (torch included), so the package
imports neither: ``after_import`` runs a function right after a module's first import finishes
(at once when it is already imported). Two such functions are installed by the package:

- ``register_modifiers``, after ``llmcompressor``: imports our modifier modules, each of which
  names its class to llm-compressor's ModifierFactory (``register``). Any recipe parsing imports
  llm-compressor first, so a recipe naming UniPruningModifier or MaskedGPTQModifier finds it.
- ``enable_from_pretrained``, after ``transformers.quantizers.auto``: lets ``from_pretrained``
  read our sparse checkpoints (checkpoint/from_pretrained.py).
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings
from collections.abc import Callable
from importlib import import_module
from types import ModuleType

__all__ = ["MODIFIERS", "after_import", "enable_from_pretrained", "modifiers", "register", "register_modifiers"]

_WAITING: dict[str, list[Callable[[ModuleType], None]]] = {}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of a waited-for module so that the waiting
    functions run once its code has executed."""

    def find_spec(self, name, path=None, target=None):
        if name not in _WAITING:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        execute = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            for function in _WAITING.pop(name, []):
                _run(function, module)

        loader.exec_module = exec_module  # this spec's own loader instance
        return spec


def _run(function: Callable[[ModuleType], None], module: ModuleType) -> None:
    """A failing set-up warns instead of breaking the import of the other library."""
    try:
        function(module)
    except Exception as error:  # noqa: BLE001
        warnings.warn(f"unipruning_modifier: setting up {module.__name__} failed ({type(error).__name__}: {error})", stacklevel=2)


def after_import(name: str, function: Callable[[ModuleType], None]) -> None:
    """Run ``function(module)`` once module ``name`` is imported: now if it already is."""
    if name in sys.modules:
        _run(function, sys.modules[name])
        return
    _WAITING.setdefault(name, []).append(function)
    if not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


MODIFIERS = {"UniPruningModifier": "modifier", "MaskedGPTQModifier": "masked_gptq"}  # class -> its module


def modifiers() -> dict[str, type]:
    """Our modifier classes by name (imports llm-compressor)."""
    return {name: getattr(import_module(f"{__package__}.{module}"), name) for name, module in MODIFIERS.items()}


def register(modifier: type) -> None:
    """Name a modifier class to llm-compressor's ModifierFactory (recipes find it by class name);
    each modifier module calls this as its last line."""
    from llmcompressor.modifiers.factory import ModifierFactory

    ModifierFactory.register(modifier.__name__, modifier)


def register_modifiers(_llmcompressor: ModuleType | None = None) -> None:
    """Import our modifier modules, which register themselves. When one of them is the module
    whose import brought llm-compressor in, it is still executing: it registers on finishing.
    llm-compressor beside vLLM's compressed-tensors pin does not import: then only
    ``checkpoint`` and ``serving`` are usable, which a warning says."""
    try:
        for module in MODIFIERS.values():
            import_module(f"{__package__}.{module}")
    except ImportError as error:
        warnings.warn(
            f"llm-compressor is installed but does not import ({error}); only unipruning_modifier.checkpoint "
            "and unipruning_modifier.serving are usable in this environment",
            stacklevel=2,
        )


def enable_from_pretrained(_quantizers: ModuleType | None = None) -> None:
    """``AutoModelForCausalLM.from_pretrained`` reads our sparse checkpoints from now on."""
    from .checkpoint.from_pretrained import install

    install()
