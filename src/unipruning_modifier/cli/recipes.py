"""Recipes for ``--recipe``: a YAML file, or the name of one shipped in the package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .common import UsageError

__all__ = ["BUILTIN_RECIPES", "builtin_names", "load_recipe", "resolve_recipe"]

BUILTIN_RECIPES = resources.files("unipruning_modifier") / "recipes"


def builtin_names() -> list[str]:
    """Names of the shipped recipes (``uni_24``, ``uni_unstructured_50``...)."""
    return sorted(p.name.removesuffix(".yaml") for p in BUILTIN_RECIPES.iterdir() if p.name.endswith(".yaml"))


def resolve_recipe(value: str) -> str:
    """A recipe file path, or the name of a built-in recipe."""
    path = Path(value)
    if path.is_file():
        return str(path)
    builtin = BUILTIN_RECIPES / f"{value.removesuffix('.yaml')}.yaml"
    if builtin.is_file():
        return str(builtin)
    raise UsageError(f"--recipe {value!r}: no such file, and not a built-in recipe ({', '.join(builtin_names())})")


def load_recipe(path: str):
    """Parse a recipe and instantiate its modifiers, so bad fields fail before the model loads."""
    from llmcompressor.recipe import Recipe

    try:
        recipe = Recipe.create_instance(path)
    except Exception as error:
        raise UsageError(f"--recipe {path}: {error}") from error
    if not recipe.modifiers:
        raise UsageError(
            f"--recipe {path} defines no modifiers: top-level keys must end in '_stage' and the next "
            "level in '_modifiers' (see recipes/uni_24.yaml)"
        )
    return recipe
