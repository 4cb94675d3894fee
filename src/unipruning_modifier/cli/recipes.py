"""Recipes for ``--recipe``: a YAML file, or the name of one shipped in the package; and
``unipruning recipes``, which lists the shipped ones."""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from .common import HelpFormatter, UsageError, add_output_options

__all__ = [
    "BUILTIN_RECIPES", "add_parser", "builtin_names", "check_fits", "describe", "load_recipe", "print_summary", "resolve_recipe",
    "run",
]

BUILTIN_RECIPES = resources.files("unipruning_modifier") / "recipes"


def builtin_names() -> list[str]:
    """Names of the shipped recipes (``uni_24``, ``uni_unstructured_50``...)."""
    return sorted(p.name.removesuffix(".yaml") for p in BUILTIN_RECIPES.iterdir() if p.name.endswith(".yaml"))


def describe(name: str) -> str:
    """The first sentence of a shipped recipe's leading comment."""
    text = (BUILTIN_RECIPES / f"{name}.yaml").read_text(encoding="utf-8")
    comment = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    sentence = " ".join(comment).split(". ")[0].strip()
    return sentence.removesuffix(".") + "." if sentence else ""


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "recipes", help="list the built-in recipes (names for --recipe)", formatter_class=HelpFormatter,
        description="List the recipes shipped in the package, one line each: the name to give to --recipe and what it does.",
    )
    add_output_options(parser)
    parser.set_defaults(run=run, report=print_summary)


def run(args: argparse.Namespace) -> dict:
    return {"recipes": {name: describe(name) for name in builtin_names()}, "folder": str(BUILTIN_RECIPES)}


def print_summary(result: dict) -> None:
    width = max(len(name) for name in result["recipes"])
    for name, description in result["recipes"].items():
        print(f"{name:<{width}}  {description}")
    print(f"(YAML files in {result['folder']}; unipruning prune --recipe NAME or --recipe FILE)")


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


def check_fits(modifiers, model, flag: str) -> list[str]:
    """The target layers of the UniPruningModifiers among ``modifiers``, after checking every
    modifier against ``model``'s layer shapes (the meta-device skeleton is enough): N:M and
    per-layer sparsity lists, and the group size of any quantization stage.
    """
    import torch
    from compressed_tensors.quantization import QuantizationStrategy
    from compressed_tensors.utils import match_named_modules

    from ..modifier import UniPruningModifier

    targets: set[str] = set()
    for modifier in modifiers:
        if isinstance(modifier, UniPruningModifier):
            try:
                targets.update(modifier.resolve(model)[0])
            except ValueError as error:
                raise UsageError(f"{flag}: {error}") from None
        if not hasattr(modifier, "resolve_quantization_config") or getattr(modifier, "bypass_divisibility_checks", False):
            continue
        for scheme in modifier.resolve_quantization_config().config_groups.values():
            weights = scheme.weights
            if weights is None or weights.group_size is None or weights.strategy not in (
                QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP
            ):
                continue
            size = int(weights.group_size)
            bad = [
                f"{name} ({module.in_features} inputs)"
                for name, module in match_named_modules(model, scheme.targets, modifier.ignore)
                if isinstance(module, torch.nn.Linear) and module.in_features >= size and module.in_features % size
            ]
            if bad:
                raise UsageError(
                    f"{flag}: {type(modifier).__name__} quantizes weights in groups of {size} inputs, which does not "
                    f"divide {len(bad)} layer(s) of this model: {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}; "
                    "use a group size that divides them, or add them to that modifier's ignore"
                )
    return sorted(targets)
