"""Where ranking keys become masks: per-layer sparsity, N:M, and the global and OWL budgets.

``MaskPolicy.build`` turns the recipe's mask fields (mask_fields.MaskSettings) and the model's
target and decoder layers into a sparsity per target layer; ``layer_mask`` masks one layer from
its keys (layer / row budget, N:M), ``masks`` masks every layer of a set of saliency records at
once (needed by the global and OWL budgets, which compare layers). The math is in masks.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .admm import Budget
from .mask_fields import MaskSettings
from .masks import (
    global_allocation,
    histogram_allocation,
    kept_count,
    nm_mask,
    owl_histogram_sparsity,
    owl_sparsity,
    row_mask,
    saliency_keys,
    unstructured_mask,
)
from .structure import kept_per_group

__all__ = ["MaskPolicy", "decoder_layer_of"]


def decoder_layer_of(targets, decoder_layers: list[str]) -> dict[str, str]:
    """Target name -> the decoder layer holding it; itself if none does."""
    return {name: next((layer for layer in decoder_layers if name.startswith(layer + ".")), name) for name in targets}


@dataclass
class MaskPolicy:
    """How the target layers of one model are masked."""

    settings: MaskSettings
    decoder_layers: list[str]  # in model order
    sparsity: dict[str, float]  # per target layer
    groups: dict[str, str]  # target layer -> decoder layer (the OWL groups)

    @classmethod
    def build(cls, settings: MaskSettings, targets: list[str], decoder_layers: list[str]) -> "MaskPolicy":
        """The policy for these target layer names; ValueError when a per-layer sparsity list does
        not match the decoder layers."""
        groups = decoder_layer_of(targets, decoder_layers)
        n, m = settings.nm
        if m:
            sparsity = {name: n / m for name in targets}
        elif not isinstance(settings.sparsity, list):
            sparsity = {name: float(settings.sparsity) for name in targets}
        else:
            if len(decoder_layers) != len(settings.sparsity):
                raise ValueError(
                    f"UniPruningModifier: sparsity has {len(settings.sparsity)} values but the model has "
                    f"{len(decoder_layers)} decoder layers"
                )
            index = {layer: i for i, layer in enumerate(decoder_layers)}
            sparsity = {}
            for name, layer in groups.items():
                if layer not in index:
                    raise ValueError(
                        f"UniPruningModifier: {name} is in no decoder layer, so a per-layer sparsity list cannot cover it"
                    )
                sparsity[name] = float(settings.sparsity[index[layer]])
        return cls(settings, decoder_layers, sparsity, groups)

    @property
    def needs_all_layers(self) -> bool:
        """The global and OWL budgets compare every layer's saliency before any mask."""
        return self.settings.allocation in ("global", "owl")

    def keys(self, saliency) -> list[torch.Tensor]:
        """Ranking keys, most significant first (masks.saliency_keys), of one layer's saliency: a
        mirror_descent.SaliencyState or a saliency_file.LayerSaliency."""
        return saliency_keys(saliency.gamma.float(), saliency.anchor_mean.float(), saliency.first_step, self.settings.order)

    def budget(self, name: str, mask: torch.Tensor) -> Budget:
        """The budget ``mask`` was chosen under (N:M, per row, or its layer-wide count), for a
        re-fit that may move the support within it (admm.py)."""
        n, m = self.settings.nm
        if m:
            return Budget(sparsity=n / m, n=n, m=m)
        if self.settings.allocation == "row":
            return Budget(sparsity=self.sparsity[name], per_row=True)
        return Budget(sparsity=1.0 - int(torch.count_nonzero(mask)) / mask.numel())

    def layer_mask(self, name: str, keys: list[torch.Tensor]) -> torch.Tensor:
        """The keep-mask of one layer under the layer / row budget or N:M."""
        n, m = self.settings.nm
        if m:
            return nm_mask(keys, kept_per_group(n, m), m)
        if self.settings.allocation == "row":
            return row_mask(keys, self.sparsity[name])
        return unstructured_mask(keys, self.sparsity[name])

    def masks(self, records: Mapping) -> dict[str, torch.Tensor]:
        """Keep-masks of every layer of ``records`` (name -> saliency_file.LayerSaliency)."""
        if not self.needs_all_layers:
            return {name: self.layer_mask(name, self.keys(record)) for name, record in records.items()}
        # every layer's keys are held at once: bf16 on the CPU
        keys = {name: [k.to("cpu", torch.bfloat16) for k in self.keys(record)] for name, record in records.items()}
        if self.settings.allocation == "owl":
            anchors = {name: k[1] for name, k in keys.items()}
            s = self.settings
            sparsity = owl_sparsity(anchors, self.groups, float(s.sparsity), s.owl_lambda, s.owl_threshold)
            return {name: unstructured_mask([x.float() for x in k], sparsity[name]) for name, k in keys.items()}
        keep = global_allocation({name: k[0] for name, k in keys.items()}, float(self.settings.sparsity), self.settings.clamp)
        return {name: unstructured_mask([x.float() for x in k], keep=keep[name]) for name, k in keys.items()}

    def file_masks(self, encoded: Mapping) -> dict[str, torch.Tensor]:
        """Keep-masks of every layer of a saliency file (name -> saliency_encoding.EncodedSaliency):
        the same budgets as ``masks``; which weights fill them follows saliency_encoding.py."""
        n, m = self.settings.nm
        if m:
            return {name: e.nm_mask(kept_per_group(n, m), m, self.settings.order) for name, e in encoded.items()}
        if self.settings.allocation == "row":
            return {name: e.row_mask(kept_count(e.shape[1], self.sparsity[name])) for name, e in encoded.items()}
        if self.settings.allocation == "global":
            histograms = {name: e.gamma_counts() for name, e in encoded.items()}
            keep = histogram_allocation(histograms, float(self.settings.sparsity), self.settings.clamp)
        else:
            sparsity = self.sparsity
            if self.settings.allocation == "owl":
                s = self.settings
                histograms = {name: e.anchor_counts() for name, e in encoded.items()}
                sparsity = owl_histogram_sparsity(histograms, self.groups, float(s.sparsity), s.owl_lambda, s.owl_threshold)
            keep = {name: kept_count(e.shape[0] * e.shape[1], sparsity[name]) for name, e in encoded.items()}
        return {name: e.layer_mask(keep[name]) for name, e in encoded.items()}
