"""The recipe fields that choose a mask from a saliency, and their checks.

``MaskSettings`` is a pydantic model with no torch or llm-compressor import: UniPruningModifier
inherits its fields, and ``unipruning extract`` builds its options from them, so the two cannot
drift. Everything here is what can change without calibrating again (see saliency_file.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from .structure import parse_mask_structure

__all__ = ["Allocation", "MaskSettings", "NMOrder", "field_help"]

Allocation = Literal["layer", "row", "global", "owl"]
NMOrder = Literal["gamma", "first_step"]


class MaskSettings(BaseModel):
    """Which weights a saliency keeps.

    :param sparsity: fraction of weights to prune per target layer, or a list with one value
        per decoder layer (sequential target). Implied by mask_structure for N:M.
    :param mask_structure: unstructured (or 0:0), or N:M: prune N weights in each group of M
        consecutive inputs, as llm-compressor's Wanda and SparseGPT read it (2:4 and 4:8 keep half;
        1:4 prunes a quarter).
    :param allocation: unstructured budget: layer (the same sparsity in every layer), row (in every
        output row), global (one threshold over all target layers, each clamped to sparsity +/- clamp)
        or owl (outlier-weighted: decoder layers whose saliency has more outliers keep more; the
        mean over layers is sparsity).
    :param clamp: largest deviation of a layer's sparsity from the target under allocation global.
    :param owl_lambda: under allocation owl, the decoder-layer sparsities span 2 * owl_lambda.
    :param owl_threshold: under allocation owl, a weight is an outlier when its mean anchor exceeds
        this multiple of its decoder layer's mean.
    :param nm_order: N:M ranking, gamma (|Gamma|) or first_step (earliest entry in the path).

    llm-compressor's spelling of OWL is accepted too: ``sparsity_profile: owl`` is allocation owl,
    ``owl_m`` is owl_threshold and ``owl_lmbda`` is owl_lambda.
    """

    sparsity: float | list[float] | None = None
    mask_structure: str = "0:0"
    allocation: Allocation = "layer"
    clamp: float = Field(default=0.1, ge=0, le=1)
    owl_lambda: float = Field(default=0.08, ge=0, lt=1)
    owl_threshold: float = Field(default=5.0, gt=0)
    nm_order: NMOrder = "gamma"

    @model_validator(mode="before")
    @classmethod
    def _accept_llmcompressor_owl_spelling(cls, data):
        """sparsity_profile / owl_m / owl_lmbda (SparsityModifierBase's fields) as our OWL fields."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for theirs, ours in (("owl_m", "owl_threshold"), ("owl_lmbda", "owl_lambda")):
            if theirs in data:
                if ours in data:
                    raise ValueError(f"give {ours} or llm-compressor's spelling {theirs}, not both")
                data[ours] = data.pop(theirs)
        if "sparsity_profile" in data:
            profile = data.pop("sparsity_profile")
            if profile is not None:
                if str(profile).lower() != "owl":
                    raise ValueError(f"sparsity_profile {profile!r}: the only profile is 'owl' (allocation: owl)")
                if data.get("allocation", "owl") != "owl":
                    raise ValueError(f"sparsity_profile 'owl' contradicts allocation {data['allocation']!r}")
                data["allocation"] = "owl"
        return data

    @field_validator("sparsity")
    @classmethod
    def _check_sparsity(cls, value):
        values = value if isinstance(value, list) else [value]
        if value is not None and (not values or any(not 0.0 <= v < 1.0 for v in values)):
            raise ValueError(f"sparsity must be in [0, 1) (a float or a non-empty list), got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_structure(self):
        n, m = self.nm
        if m:
            implied = n / m
            if isinstance(self.sparsity, list) or (self.sparsity is not None and abs(self.sparsity - implied) > 1e-6):
                raise ValueError(
                    f"sparsity {self.sparsity!r} contradicts mask_structure {self.mask_structure!r}, "
                    f"which prunes {implied:g} of every layer; leave sparsity out for N:M"
                )
            if self.allocation != "layer":
                raise ValueError(
                    f"allocation {self.allocation!r} applies to unstructured masks only; "
                    f"mask_structure {self.mask_structure!r} fixes the budget of every group"
                )
        elif self.sparsity is None:
            raise ValueError("sparsity is required for unstructured masks (a float in [0, 1) or a per-layer list)")
        if isinstance(self.sparsity, list) and self.allocation in ("global", "owl"):
            raise ValueError(f"allocation {self.allocation!r} takes one sparsity, not a per-layer list")
        return self

    @property
    def nm(self) -> tuple[int, int]:
        """(N, M) of an N:M structure, (0, 0) when unstructured."""
        return parse_mask_structure(self.mask_structure)

    @property
    def order(self) -> NMOrder:
        """The ranking of the keys: N:M may rank by first_step, everything else by |Gamma|."""
        return self.nm_order if self.nm[1] else "gamma"


def field_help(model: type[BaseModel], name: str) -> str:
    """The ``:param name:`` text of the model's docstring, on one line."""
    lines = (model.__doc__ or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith(f":param {name}:")), None)
    if start is None:
        return ""
    text = [lines[start].strip().removeprefix(f":param {name}:")]
    for line in lines[start + 1 :]:
        if not line.strip() or line.strip().startswith(":"):
            break
        text.append(line.strip())
    return " ".join(part.strip() for part in text)
