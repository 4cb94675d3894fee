"""UniPruningModifier: recipe fields and llm-compressor lifecycle hooks.

The math lives in saliency.py (anchors), mirror_descent.py (state and update), masks.py
(mask extraction) and reconstruction.py (the optional re-fit); this class validates the recipe,
hooks the target Linear layers (and, for ``dense_target`` and ``block_feedback``, the decoder
layers, see dense_stream.py and block_feedback.py), feeds each calibration batch to the mirror
descent and applies the final masks.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Literal

import torch
from compressed_tensors.utils import (
    align_module_device,
    match_name,
    match_named_modules,
    update_offload_parameter,
)
from llmcompressor.core import Event, State
from llmcompressor.modifiers.modifier import Modifier
from llmcompressor.modifiers.utils.hooks import HooksMixin
from llmcompressor.utils.pytorch.module import infer_sequential_targets
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator
from transformers import PreTrainedModel

from .block_feedback import block_feedback
from .checkpoint import mark_sparse
from .dense_stream import DenseStream
from .masks import (
    global_allocation,
    nm_mask,
    owl_sparsity,
    parse_mask_structure,
    row_mask,
    saliency_keys,
    unstructured_mask,
)
from .mirror_descent import SaliencyState, all_reduce_state, mirror_descent_step
from .reconstruction import accumulate_gram, all_reduce_gram, default_iterations, least_squares
from .saliency import activation_energy, local_saliency
from .saliency_file import DTYPES, LayerSaliency, check_matches, load_saliency, model_fingerprint, read_metadata, save_saliency

__all__ = ["UniPruningModifier"]


class UniPruningModifier(Modifier):
    """Prune with UniPruning: mirror-descent saliency anchored to a local metric.

    Weights are never changed except by zeroing the pruned ones at the end of each layer's
    calibration (``allocation: global`` waits for the end of calibration, because the budget
    needs every layer's saliency).

    Sample recipe:

    ```yaml
    sparsity_stage:
      sparsity_modifiers:
        UniPruningModifier:
          mask_structure: "2:4"
          targets: ["Linear"]
          ignore: ["re:.*lm_head"]
    ```

    :param sparsity: fraction of weights to prune per target layer, or a list with one value
        per decoder layer (sequential target). Implied by ``mask_structure`` for N:M.
    :param mask_structure: "unstructured" / "0:0", or "N:M" (keep N weights in each group of M
        consecutive inputs), e.g. "2:4", "4:8".
    :param targets: module names, "re:" patterns or class names to prune. The model's input and
        output embeddings (``lm_head``) are pruned only when a target names them.
    :param ignore: modules to leave dense, same syntax as ``targets``.
    :param metric: local anchor: "stochastic_ria" (default), "ria" or "wanda".
    :param kappa: mirror-descent step size.
    :param lam: quantile of |z| used as the soft threshold (elastic-net strength).
    :param beta: fraction of a row/column summed by ``stochastic_ria``.
    :param exponent: activation exponent a of the metric (None: 0.35 stochastic_ria, 0.5 else).
    :param allocation: unstructured budget "layer", "row", "global" (one threshold over all
        target layers, each clamped to sparsity +/- ``clamp``) or "owl" (outlier-weighted: decoder
        layers whose saliency has more outliers keep more; the mean over layers is ``sparsity``).
    :param clamp: largest deviation of a layer's sparsity from the target under "global".
    :param owl_lambda: under "owl", the decoder-layer sparsities span 2 * owl_lambda (max - min).
    :param owl_threshold: a weight is an outlier under "owl" when its mean anchor exceeds this
        multiple of its decoder layer's mean.
    :param block_feedback: strength s of the block-local feedback (0: off). Before each batch
        runs through a decoder layer, the layer's output error against its dense output on the
        same input, under the current masks, is differentiated w.r.t. the masks, and each
        weight's anchor is scaled by 1 + s * tanh(-g / mean|g|) (block_feedback.py). Costs a
        forward and a backward of the layer per batch; needs the decoder layers as sequential
        targets, calibration_inputs "pruned" and allocation "layer" or "row" (the masks it
        differentiates are the layer's own budget).
    :param block_feedback_every: take the feedback on every k-th batch only; the batches in
        between take none (k times cheaper; re-using the last factors instead was worse than
        no feedback at all).
    :param nm_order: N:M ranking, "gamma" (|Gamma|) or "first_step" (earliest entry in the path).
    :param seed: seed of the stochastic sums and quantile samples.
    :param reconstruct: "none" (default: weights only masked) or "least_squares": after the
        mask, re-fit the kept weights of each layer to its calibration outputs (needs the
        layer's input Gram matrix, in x in fp32, while the layer is calibrated).
    :param damping: fraction of mean(diag H) added to H's diagonal for the re-fit.
    :param reconstruct_iterations: cap on conjugate-gradient iterations (None: by layer width).
    :param reconstruct_tolerance: the re-fit stops when every row's residual fell to this
        fraction of its start (3e-3 reaches the exact solve's error to 5 digits on uni-tiny-28m).
    :param dense_target: weight a of the dense model's outputs in the re-fit's target. The re-fit
        aims at (1 - a) * W0 X + a * W0 D, X the inputs the layer now gets from the pruned earlier
        layers and D the same tokens' inputs in the dense model: 0 (default) re-fits the layer
        to its own outputs, larger values also correct part of the error the earlier layers left.
        Above 0 the modifier runs each decoder layer a second time per batch on the dense
        model's activations, which it keeps beside the pipeline's (one layer's worth, on CPU),
        and holds a second in x in matrix per layer. Needs reconstruct "least_squares", the
        sequential pipeline with decoder layers as sequential targets (the default),
        calibration_inputs "pruned" and allocation "layer" or "row" (otherwise nothing is
        pruned before the end, so X = D).
    :param calibration_inputs: "pruned" (default): each decoder layer is masked as soon as it is
        calibrated, so later layers calibrate on pruned inputs; "dense": every layer calibrates
        on the dense model's activations and all masks are applied at the end of calibration,
        so the saliency does not depend on the sparsity and one calibration serves any setting.
    :param save_saliency: write every layer's saliency to this safetensors file at the end of
        calibration (implies calibration_inputs "dense"); ``unipruning extract`` or
        ``load_saliency`` prune from it later without calibrating.
    :param load_saliency: prune from a saliency file instead of calibrating (no data needed);
        the file must come from this model (same layers, shapes and weights).
    :param saliency_dtype: "float32" (default) or "bfloat16" storage of the saved saliency;
        masks are taken from the stored values either way.
    """

    requires_calibration_data: bool = True

    sparsity: float | list[float] | None = None
    mask_structure: str = "0:0"
    targets: list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=list)
    metric: Literal["stochastic_ria", "ria", "wanda"] = "stochastic_ria"
    kappa: float = Field(default=0.01, gt=0)
    lam: float = Field(default=0.001, ge=0, lt=1)
    beta: float = Field(default=0.2, gt=0, le=1)
    exponent: float | None = Field(default=None, ge=0)
    allocation: Literal["layer", "row", "global", "owl"] = "layer"
    clamp: float = Field(default=0.1, ge=0, le=1)
    owl_lambda: float = Field(default=0.08, ge=0, lt=1)
    owl_threshold: float = Field(default=5.0, gt=0)
    block_feedback: float = Field(default=0.0, ge=0, le=1)
    block_feedback_every: int = Field(default=1, ge=1)
    nm_order: Literal["gamma", "first_step"] = "gamma"
    seed: int = 0
    reconstruct: Literal["none", "least_squares"] = "none"
    damping: float = Field(default=0.01, ge=0)
    reconstruct_iterations: int | None = Field(default=None, ge=1)
    reconstruct_tolerance: float = Field(default=3e-3, gt=0, lt=1)
    dense_target: float = Field(default=0.0, ge=0, le=1)
    calibration_inputs: Literal["pruned", "dense"] = "pruned"
    save_saliency: str | None = None
    load_saliency: str | None = None
    saliency_dtype: Literal["float32", "bfloat16"] = "float32"

    _n: int = PrivateAttr(default=0)
    _m: int = PrivateAttr(default=0)
    _names: dict[torch.nn.Module, str] = PrivateAttr(default_factory=dict)
    _modules: dict[str, torch.nn.Module] = PrivateAttr(default_factory=dict)
    _layer_sparsity: dict[str, float] = PrivateAttr(default_factory=dict)
    _groups: dict[str, str] = PrivateAttr(default_factory=dict)
    _states: dict[str, SaliencyState] = PrivateAttr(default_factory=dict)
    _generators: dict[str, torch.Generator] = PrivateAttr(default_factory=dict)
    _deferred: dict[str, list[torch.Tensor]] = PrivateAttr(default_factory=dict)
    _grams: dict[str, tuple[torch.Tensor, int]] = PrivateAttr(default_factory=dict)
    _crosses: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)
    _decoder_layers: list[str] = PrivateAttr(default_factory=list)
    _stream: DenseStream | None = PrivateAttr(default=None)
    _layer_index: dict[torch.nn.Module, int] = PrivateAttr(default_factory=dict)
    _dense_inputs: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)
    _calibration_hooks: set = PrivateAttr(default_factory=set)
    _block_targets: dict[torch.nn.Module, list[str]] = PrivateAttr(default_factory=dict)
    _feedback: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)
    _feedback_runs: int = PrivateAttr(default=0)
    _pruned: set[str] = PrivateAttr(default_factory=set)
    _records: dict[str, LayerSaliency] = PrivateAttr(default_factory=dict)
    _fingerprint: str | None = PrivateAttr(default=None)

    @field_validator("targets", "ignore", mode="before")
    @classmethod
    def _as_list(cls, value):
        """A single string is one pattern (llm-compressor would iterate its characters)."""
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("sparsity")
    @classmethod
    def _check_sparsity(cls, value):
        values = value if isinstance(value, list) else [value]
        if value is not None and (not values or any(not 0.0 <= v < 1.0 for v in values)):
            raise ValueError(f"sparsity must be in [0, 1) (a float or a non-empty list), got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_structure(self) -> "UniPruningModifier":
        self._n, self._m = parse_mask_structure(self.mask_structure)
        if self._m:
            implied = 1.0 - self._n / self._m
            if isinstance(self.sparsity, list) or (
                self.sparsity is not None and abs(self.sparsity - implied) > 1e-6
            ):
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

    @model_validator(mode="after")
    def _check_sequential_features(self) -> "UniPruningModifier":
        """dense_target and block_feedback work on layers masked as they are calibrated."""
        if self.dense_target > 0 and self.reconstruct == "none":
            raise ValueError(f"dense_target {self.dense_target} needs reconstruct: least_squares; got reconstruct 'none'")
        for feature in ("dense_target", "block_feedback"):
            if getattr(self, feature) > 0:
                self._check_masked_while_calibrating(feature)
        return self

    def _check_masked_while_calibrating(self, feature: str) -> None:
        conflicts = {
            "calibration_inputs": (
                self.calibration_inputs == "dense" or bool(self.save_saliency),
                "calibration_inputs 'pruned' and no save_saliency",
            ),
            "allocation": (self.allocation in ("global", "owl"), "allocation 'layer' or 'row' (global and owl mask at the end)"),
        }
        for field, (conflict, allowed) in conflicts.items():
            if conflict:
                raise ValueError(
                    f"{feature} {getattr(self, feature)} needs layers masked as they are calibrated: {allowed}; "
                    f"got {field} {getattr(self, field)!r}"
                )

    @model_validator(mode="after")
    def _check_saliency_files(self) -> "UniPruningModifier":
        if self.save_saliency and self.load_saliency:
            raise ValueError("save_saliency and load_saliency exclude each other (load_saliency does not calibrate)")
        if self.save_saliency:
            if self.calibration_inputs == "pruned" and "calibration_inputs" in self.model_fields_set:
                raise ValueError(
                    "save_saliency needs calibration_inputs 'dense': with 'pruned' inputs the saliency of later "
                    "layers depends on the sparsity of earlier ones, so the file would serve one setting only"
                )
            self.__dict__["calibration_inputs"] = "dense"
            parent = Path(self.save_saliency).expanduser().resolve().parent
            if not parent.is_dir():
                raise ValueError(f"save_saliency {self.save_saliency!r}: folder {parent} does not exist")
        if self.load_saliency:
            if self.reconstruct != "none":
                raise ValueError(
                    f"load_saliency prunes without calibration, so reconstruct {self.reconstruct!r} (which "
                    "needs the calibration inputs of every layer) is not possible; use reconstruct: none"
                )
            read_metadata(self.load_saliency)
            self.__dict__["requires_calibration_data"] = False
        return self

    def target_modules(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """Target Linear layers by name; embeddings and lm_head only when a target names them."""
        embeddings = set()
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            module = getattr(model, getter, lambda: None)()
            if module is not None:
                embeddings.add(module)
        found = {}
        for name, module in match_named_modules(model, self.targets, self.ignore):
            if not isinstance(module, torch.nn.Linear):
                continue
            if module in embeddings and not any(match_name(name, t) for t in self.targets):
                continue
            found[name] = module
        return found

    def check_model(
        self, model: torch.nn.Module, sequential_targets=None
    ) -> tuple[dict[str, torch.nn.Module], dict[str, float]]:
        """Target layers and their sparsity, after checking they fit the recipe.

        Raises ValueError naming the layer (N:M on an input size that is not a multiple of M, a
        per-layer list that does not match the decoder layers, no target at all).
        """
        targets = self.target_modules(model)
        if not targets:
            raise ValueError(f"UniPruningModifier: targets {self.targets} (ignore {self.ignore}) match no Linear layer")
        if self._m:
            for name, module in targets.items():
                if module.in_features % self._m:
                    raise ValueError(
                        f"UniPruningModifier: layer {name} has {module.in_features} inputs, not a multiple "
                        f"of {self._m} required by mask_structure {self.mask_structure!r}; add it to ignore"
                    )
        return targets, self._sparsity_per_module(model, targets, sequential_targets)

    def on_initialize(self, state: State, **kwargs) -> bool:
        targets, self._layer_sparsity = self.check_model(state.model, kwargs.get("sequential_targets"))
        self._decoder_layers = self._decoder_layer_names(state.model, kwargs.get("sequential_targets"))
        if self.dense_target > 0:
            self._check_layers_chain(self._decoder_layers)
        self._groups = self._layer_of(targets, self._decoder_layers)
        self._modules = targets
        self._names = {module: name for name, module in targets.items()}
        if self.save_saliency:
            self._fingerprint = model_fingerprint(targets)
        if self.load_saliency:
            linear = {n: m for n, m in state.model.named_modules() if isinstance(m, torch.nn.Linear)}
            check_matches(read_metadata(self.load_saliency), list(targets), linear, self.load_saliency)
            records, _ = load_saliency(self.load_saliency, list(targets))
            logger.info(f"UniPruning: masks from {self.load_saliency} ({len(records)} layers), no calibration")
            self._mask_from_records(records)
        return True

    @staticmethod
    def _decoder_layer_names(model, sequential_targets) -> list[str]:
        """Names of the decoder layers (sequential targets), in model order."""
        return [name for name, _ in match_named_modules(model, infer_sequential_targets(model, sequential_targets))]

    @staticmethod
    def _check_layers_chain(layers: list[str]) -> None:
        """dense_target feeds each sequential target's output to the next one, which is right for
        the decoder layers (``prefix.0`` .. ``prefix.N-1``), not for e.g. attention / MLP targets."""
        parts = [name.rpartition(".") for name in layers]
        prefixes = {prefix for prefix, _, _ in parts}
        if not layers or len(prefixes) != 1 or [index for _, _, index in parts] != [str(i) for i in range(len(layers))]:
            shown = ", ".join(layers[:3]) + (" ..." if len(layers) > 3 else "")
            raise ValueError(
                f"UniPruningModifier: dense_target needs the decoder layers as sequential targets (one list, "
                f"each layer's output the next one's input); got {shown or 'none'}"
            )

    @staticmethod
    def _layer_of(targets, layers: list[str]) -> dict[str, str]:
        """Target name -> the decoder layer holding it; itself if none does."""
        return {name: next((layer for layer in layers if name.startswith(layer + ".")), name) for name in targets}

    def _sparsity_per_module(self, model, targets, sequential_targets) -> dict[str, float]:
        if self._m:
            return {name: 1.0 - self._n / self._m for name in targets}
        if not isinstance(self.sparsity, list):
            return {name: float(self.sparsity) for name in targets}
        layers = self._decoder_layer_names(model, sequential_targets)
        if len(layers) != len(self.sparsity):
            raise ValueError(
                f"UniPruningModifier: sparsity has {len(self.sparsity)} values but the model has "
                f"{len(layers)} decoder layers"
            )
        index = {layer: i for i, layer in enumerate(layers)}
        result = {}
        for name, layer in self._layer_of(targets, layers).items():
            if layer not in index:
                raise ValueError(f"UniPruningModifier: {name} is in no decoder layer, so a per-layer sparsity list cannot cover it")
            result[name] = float(self.sparsity[index[layer]])
        return result

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        self._calibration_hooks = {self.register_hook(module, self._calibrate, "forward") for module in self._names}
        modules = dict(state.model.named_modules())
        if self.dense_target > 0:
            self._stream = DenseStream(len(self._decoder_layers))
            self._layer_index = {modules[name]: i for i, name in enumerate(self._decoder_layers)}
            for layer in self._layer_index:
                self.register_hook(layer, self._run_dense, "forward_pre", with_kwargs=True)
        if self.block_feedback > 0:
            for layer_name in self._decoder_layers:
                names = [name for name, layer in self._groups.items() if layer == layer_name]
                if names:
                    self._block_targets[modules[layer_name]] = names
                    self.register_hook(modules[layer_name], self._run_feedback, "forward_pre", with_kwargs=True)

    def _run_feedback(self, module: torch.nn.Module, args, kwargs):
        """Forward pre-hook of a decoder layer: anchor factors for this batch from the layer's
        output error under the current masks (none on the first batch: no saliency yet)."""
        names = self._block_targets[module]
        if not all(name in self._states for name in names):
            return
        if (self._states[names[0]].steps - 1) % self.block_feedback_every:  # steps = this batch's index
            return
        masks = {}
        for name in names:
            saliency = self._states[name]
            keys = saliency_keys(saliency.gamma, saliency.anchor_mean, saliency.first_step, self._order)
            masks[self._modules[name]] = self._layer_mask(name, keys)
        with HooksMixin.disable_hooks():
            factors = block_feedback(module, args, kwargs, masks, self.block_feedback)
        self._feedback.update({self._names[linear]: factor for linear, factor in factors.items()})
        self._feedback_runs += 1

    def _run_dense(self, module: torch.nn.Module, args, kwargs):
        """Forward pre-hook of a decoder layer: the same batch through the dense model first; only
        this modifier's Linear hooks run meanwhile (they keep the dense inputs)."""
        with HooksMixin.disable_hooks(keep=self._calibration_hooks):
            self._stream.run(self._layer_index[module], module, args, kwargs)

    def _calibrate(self, module: torch.nn.Module, args, _output):
        """Forward hook: one mirror-descent step of this layer on this batch (during the dense
        stream's run: only keep the dense input for the re-fit)."""
        name = self._names[module]
        inputs = args[0]
        if self._stream is not None and self._stream.running:
            self._dense_inputs[name] = inputs
            return
        if name not in self._states:
            self._states[name] = SaliencyState.zeros(module.weight.shape, inputs.device, self._tracks_first_step)
            self._generators[name] = torch.Generator().manual_seed(self.seed + zlib.crc32(name.encode()))
        generator = self._generators[name]
        anchor = local_saliency(
            self.metric,
            module.weight,
            activation_energy(inputs),
            exponent=self.exponent,
            beta=self.beta,
            generator=generator,
        )
        factor = self._feedback.pop(name, None)
        if factor is not None:
            anchor = anchor * factor.to(anchor.device)
        mirror_descent_step(self._states[name], anchor, self.kappa, self.lam, generator)
        if self.reconstruct != "none":
            gram, count = self._grams.get(name, (None, 0))
            dense = self._dense_inputs.pop(name, None)
            if dense is not None:
                self._crosses[name], _ = accumulate_gram(inputs, self._crosses.get(name), count, paired=dense)
            self._grams[name] = accumulate_gram(inputs, gram, count)

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs):
        self._finish_calibrated_layers()

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self._finish_calibrated_layers()
        if self._records:
            if self.save_saliency:
                self._write_saliency(state.model)
            records, self._records = self._records, {}
            self._mask_from_records(records)
        if self._deferred:
            self._apply_global_budget()
        self.remove_hooks()
        self._stream = None
        if self.block_feedback > 0 and self._feedback_runs == 0 and self._pruned:
            logger.warning(
                "UniPruning: block_feedback never ran (no decoder layer was called as a whole with more than "
                "one batch; it needs the decoder layers as sequential targets)"
            )

    def _finish_calibrated_layers(self) -> None:
        """Reduce across ranks, then mask each calibrated layer (or keep its keys for "global")."""
        for name in list(self._states):
            saliency = self._states.pop(name)
            self._generators.pop(name)
            self._feedback.pop(name, None)
            all_reduce_state(saliency)
            if name in self._crosses:
                self._crosses[name], _ = all_reduce_gram(self._crosses[name], self._grams[name][1])
            if name in self._grams:
                self._grams[name] = all_reduce_gram(*self._grams[name])
            deferred = self.calibration_inputs == "dense" or self._needs_all_layers
            if deferred and name in self._grams:
                gram, count = self._grams[name]
                self._grams[name] = (gram.cpu(), count)
            if self.calibration_inputs == "dense":
                record = LayerSaliency(saliency.gamma, saliency.anchor_mean, saliency.first_step, saliency.steps)
                self._records[name] = record.to("cpu", DTYPES[self.saliency_dtype])
                continue
            keys = saliency_keys(saliency.gamma, saliency.anchor_mean, saliency.first_step, self._order)
            if self._needs_all_layers:
                self._deferred[name] = [k.to("cpu", torch.bfloat16) for k in keys]
                continue
            self._apply_mask(name, self._layer_mask(name, keys), saliency.steps)

    @property
    def _tracks_first_step(self) -> bool:
        """first_step is kept only where a mask (N:M "first_step" order) or a saliency record uses it."""
        return self._order == "first_step" or self.calibration_inputs == "dense"  # save_saliency implies dense

    @property
    def _order(self) -> str:
        return self.nm_order if self._m else "gamma"

    def _layer_mask(self, name: str, keys: list[torch.Tensor]) -> torch.Tensor:
        sparsity = self._layer_sparsity[name]
        if self._m:
            return nm_mask(keys, self._n, self._m)
        if self.allocation == "row":
            return row_mask(keys, sparsity)
        return unstructured_mask(keys, sparsity)

    def _mask_from_records(self, records: dict[str, LayerSaliency]) -> None:
        """Mask every layer from its (stored or just calibrated) saliency: the one path shared by
        ``calibration_inputs: dense`` and ``load_saliency``, so both give the same masks."""
        if self._needs_all_layers:
            self._deferred = {n: [k.to("cpu", torch.bfloat16) for k in r.keys(self._order)] for n, r in records.items()}
            self._apply_global_budget()
            return
        for name, record in records.items():
            self._apply_mask(name, self._layer_mask(name, record.keys(self._order)), record.steps)

    def _write_saliency(self, model: torch.nn.Module) -> None:
        from . import __version__

        settings = ("metric", "kappa", "lam", "beta", "exponent", "seed", "targets", "ignore", "calibration_inputs")
        metadata = {
            "model": getattr(getattr(model, "config", None), "_name_or_path", None),
            "fingerprint": self._fingerprint,
            "calibration": {key: getattr(self, key) for key in settings},
            "unipruning_modifier": __version__,
        }
        save_saliency(self.save_saliency, self._records, metadata, self.saliency_dtype)
        logger.info(f"UniPruning: saliency of {len(self._records)} layers written to {self.save_saliency}")

    @property
    def _needs_all_layers(self) -> bool:
        """The "global" and "owl" budgets need every layer's saliency before any mask."""
        return self.allocation in ("global", "owl")

    def _apply_global_budget(self) -> None:
        """Masks for "global" (one threshold on |Gamma|) or "owl" (per-decoder-layer sparsity
        from the outlier ratio of the mean anchors, the second ranking key)."""
        if self.allocation == "owl":
            anchors = {n: keys[1] for n, keys in self._deferred.items()}
            sparsity = owl_sparsity(anchors, self._groups, float(self.sparsity), self.owl_lambda, self.owl_threshold)
            masks = {n: unstructured_mask([k.float() for k in keys], sparsity[n]) for n, keys in self._deferred.items()}
        else:
            keep = global_allocation({n: keys[0] for n, keys in self._deferred.items()}, float(self.sparsity), self.clamp)
            masks = {n: unstructured_mask([k.float() for k in keys], keep=keep[n]) for n, keys in self._deferred.items()}
        for name, mask in masks.items():
            self._apply_mask(name, mask, None)
        self._deferred = {}

    def _apply_mask(self, name: str, mask: torch.Tensor, steps: int | None) -> None:
        """Zero the pruned weights. Kept weights keep their original values bit for bit, unless
        ``reconstruct`` re-fits them to the layer's calibration outputs."""
        gram, _ = self._grams.pop(name, (None, 0))
        cross = self._crosses.pop(name, None)
        if gram is not None and cross is None and self.dense_target > 0:
            logger.warning(f"UniPruning {name}: no dense-model inputs (not inside a decoder layer); re-fit to the layer's own outputs")
        module = self._modules[name]
        with torch.no_grad(), align_module_device(module):
            weight = module.weight
            mask = mask.to(weight.device)
            if gram is None:
                pruned = weight.masked_fill(~mask, 0)
            else:
                iterations = self.reconstruct_iterations or default_iterations(weight.shape[1])
                fitted = least_squares(
                    weight, gram.to(weight.device), mask, self.damping, iterations, self.reconstruct_tolerance,
                    cross=None if cross is None else torch.lerp(gram, cross, self.dense_target).to(weight.device),
                )
                pruned = fitted.to(weight.dtype).masked_fill(~mask, 0)
        update_offload_parameter(module, "weight", pruned)
        self._pruned.add(name)
        achieved = 1.0 - mask.sum().item() / mask.numel()
        batches = f" from {steps} batches" if steps is not None else ""
        logger.info(f"UniPruning {name}: sparsity {achieved:.4f}{batches}")

    def on_finalize(self, state: State, **kwargs) -> bool:
        self.remove_hooks()
        if self._pruned and isinstance(state.model, PreTrainedModel):
            structure = f"{self._n}:{self._m}" if self._m else "unstructured"
            mark_sparse(state.model, sorted(self._pruned), structure, self.targets, self.ignore)
        missed = sorted(set(self._names.values()) - self._pruned)
        self._states, self._generators, self._deferred, self._grams, self._records = {}, {}, {}, {}, {}
        self._crosses, self._dense_inputs, self._stream, self._layer_index = {}, {}, None, {}
        self._block_targets, self._feedback = {}, {}
        if missed:
            raise RuntimeError(
                f"UniPruningModifier: {len(missed)} target layers saw no calibration data and were not "
                f"pruned: {missed[:5]}{' ...' if len(missed) > 5 else ''}"
            )
        return True
