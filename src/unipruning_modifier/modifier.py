"""UniPruningModifier: recipe fields, their checks and llm-compressor lifecycle hooks.

Each hook hands its work to one place: layer_calibration.py (what a target Linear accumulates
per batch, and its re-fit), mask_policy.py (keys to masks, every budget), dense_stream.py (the
dense model's activations for ``dense_target``), block_feedback.py, block_tuning.py,
saliency_file.py. The math
is in saliency.py, mirror_descent.py, masks.py and reconstruction.py; docs/architecture.md
follows one layer's weight through all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from compressed_tensors.utils import match_name, match_named_modules
from llmcompressor.core import Event, State
from llmcompressor.modifiers.modifier import Modifier
from llmcompressor.modifiers.utils.hooks import HooksMixin
from llmcompressor.utils.pytorch.module import infer_sequential_targets
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator
from transformers import PreTrainedModel

from . import distributed
from .block_feedback import block_feedback
from .block_tuning import BlockTuning
from .checkpoint import mark_sparse
from .dense_stream import DenseStream, check_chain
from .layer_calibration import CalibrationSettings, InputStatistics, LayerCalibration, RefitSettings, finish_layers
from .mask_fields import MaskSettings
from .mask_policy import MaskPolicy
from .registration import register
from .saliency import Metric
from .saliency_file import STORAGE_DTYPES, LayerSaliency, check_matches, load_saliency, model_fingerprint, read_metadata, save_saliency
from .structure import structure_name
from .version import __version__

__all__ = ["UniPruningModifier"]


class UniPruningModifier(Modifier, MaskSettings):
    """Prune with UniPruning: mirror-descent saliency anchored to a local metric.

    Weights are never changed except by zeroing the pruned ones at the end of each layer's
    calibration (``allocation: global`` / ``owl`` wait for the end of calibration, because the
    budget needs every layer's saliency), unless ``reconstruct`` re-fits the kept ones.

    Sample recipe:

    ```yaml
    sparsity_stage:
      sparsity_modifiers:
        UniPruningModifier:
          mask_structure: "2:4"
          targets: ["Linear"]
          ignore: ["re:.*lm_head"]
    ```

    The mask fields (sparsity, mask_structure, allocation, clamp, owl_lambda, owl_threshold,
    nm_order) are documented in mask_fields.MaskSettings.

    :param targets: module names, "re:" patterns or class names to prune (embeddings and
        ``lm_head`` only when a target names them).
    :param ignore: modules to leave dense, same syntax as ``targets``.
    :param metric: local anchor: "stochastic_ria" (default), "ria" or "wanda".
    :param kappa: mirror-descent step size.
    :param lam: quantile of |z| used as the soft threshold (elastic-net strength).
    :param beta: fraction of a row/column summed by ``stochastic_ria``.
    :param exponent: activation exponent a of the metric (None: 0.35 stochastic_ria, 0.5 else).
    :param block_feedback: strength s of the block-local feedback (0: off; block_feedback.py):
        each batch's anchors scaled by 1 + s * tanh(-g / mean|g|), g the gradient of the decoder
        layer's output error w.r.t. its current masks.
    :param block_feedback_every: take the feedback on every k-th batch only.
    :param block_tune_epochs: after each decoder layer's masks and re-fit, this many epochs of
        Adam on its kept weights against its output (0: off; block_tuning.py), the target
        (1 - a) f(X; W0) + a f(D; W0) with a = block_tune_target.
    :param block_tune_lr: Adam's learning rate of the block tuning.
    :param block_tune_target: weight a of the dense model's output f(D; W0) in the block
        tuning's target; D comes from the dense stream, so it needs dense_target above 0
        (without it the target is the layer's own output f(X; W0)).
    :param seed: seed of the stochastic sums and quantile samples.
    :param reconstruct: "none" (weights only masked), "least_squares" (re-fit the kept weights to
        the layer's calibration outputs, reconstruction.py) or "admm" (from the saliency's mask, let
        the reconstruction choose the support within the same budget, then re-fit, admm.py).
    :param admm_iterations: ADMM iterations of reconstruct "admm" (the saliency's mask is its start).
    :param admm_rho: the ADMM penalty it starts with (on the unit-diagonal scale of XᵀX).
    :param damping: fraction of mean(diag H) added to H's diagonal for the re-fit.
    :param reconstruct_iterations: cap on conjugate-gradient iterations (None: by layer width).
    :param reconstruct_tolerance: the re-fit stops when every row's residual fell to this
        fraction of its start.
    :param dense_target: weight a of the dense model's outputs in the re-fit's target
        (1 - a) * W0 X + a * W0 D (D: the dense model's inputs, dense_stream.py).
    :param dense_target_every: run the dense stream on every k-th batch only (k times less of its
        work; XᵀD is then the mean over those batches).
    :param calibration_inputs: "pruned": each decoder layer is masked once calibrated, so later
        layers calibrate on pruned inputs; "dense": all on the dense model, masks at the end.
    :param save_saliency: write every layer's saliency to this file at the end of calibration
        (implies calibration_inputs "dense").
    :param load_saliency: prune from a saliency file of this model instead of calibrating.
    :param saliency_dtype: "float32" or "bfloat16": the precision in which a dense calibration
        holds every layer's saliency until the end (bfloat16 halves that memory; masks, and the
        ranks a saved file keeps, then follow the bf16 values).

    Combinations that cannot work (e.g. dense_target without least_squares, or with allocation
    global) are refused when the recipe is parsed; the README's field table has the details.
    """

    requires_calibration_data: bool = True

    targets: list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=list)
    metric: Metric = "stochastic_ria"
    kappa: float = Field(default=0.01, gt=0)
    lam: float = Field(default=0.001, ge=0, lt=1)
    beta: float = Field(default=0.2, gt=0, le=1)
    exponent: float | None = Field(default=None, ge=0)
    block_feedback: float = Field(default=0.0, ge=0, le=1)
    block_feedback_every: int = Field(default=1, ge=1)
    block_tune_epochs: int = Field(default=0, ge=0)
    block_tune_lr: float = Field(default=3e-4, gt=0)
    block_tune_target: float = Field(default=0.6, ge=0, le=1)
    seed: int = 0
    reconstruct: Literal["none", "least_squares", "admm"] = "none"
    admm_iterations: int = Field(default=20, ge=1)
    admm_rho: float = Field(default=0.1, gt=0)
    damping: float = Field(default=0.01, ge=0)
    reconstruct_iterations: int | None = Field(default=None, ge=1)
    reconstruct_tolerance: float = Field(default=3e-3, gt=0, lt=1)
    dense_target: float = Field(default=0.0, ge=0, le=1)
    dense_target_every: int = Field(default=1, ge=1)
    calibration_inputs: Literal["pruned", "dense"] = "pruned"
    save_saliency: str | None = None
    load_saliency: str | None = None
    saliency_dtype: Literal["float32", "bfloat16"] = "float32"

    _targets: dict[str, torch.nn.Module] = PrivateAttr(default_factory=dict)
    _names: dict[torch.nn.Module, str] = PrivateAttr(default_factory=dict)
    _policy: MaskPolicy | None = PrivateAttr(default=None)
    _layers: dict[str, LayerCalibration] = PrivateAttr(default_factory=dict)
    _waiting: dict[str, LayerSaliency] = PrivateAttr(default_factory=dict)
    _inputs_seen: list[tuple[torch.Tensor, InputStatistics, str]] = PrivateAttr(default_factory=list)
    _decoder_layers: dict[torch.nn.Module, str] = PrivateAttr(default_factory=dict)
    _stream: DenseStream | None = PrivateAttr(default=None)
    _dense_inputs: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)  # this batch's (or SAME_INPUTS), until calibrated
    _feedback_runs: int = PrivateAttr(default=0)
    _tuning: BlockTuning | None = PrivateAttr(default=None)
    _pruned: set[str] = PrivateAttr(default_factory=set)
    _fingerprint: str | None = PrivateAttr(default=None)

    # ------------------------------------------------------------------ recipe checks

    @field_validator("targets", "ignore", mode="before")
    @classmethod
    def _as_list(cls, value):
        """A single string is one pattern (llm-compressor would iterate its characters)."""
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _saliency_file_modes(cls, data):
        """save_saliency calibrates on dense inputs; load_saliency needs no calibration data."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("save_saliency") and not data.get("load_saliency"):
            if data.get("calibration_inputs", "dense") != "dense":
                raise ValueError(
                    "save_saliency needs calibration_inputs 'dense': with 'pruned' inputs the saliency of later "
                    "layers depends on the sparsity of earlier ones, so the file would serve one setting only"
                )
            data["calibration_inputs"] = "dense"
        if data.get("load_saliency"):
            data["requires_calibration_data"] = False
        return data

    @model_validator(mode="after")
    def _check_combinations(self) -> "UniPruningModifier":
        if self.save_saliency and self.load_saliency:
            raise ValueError("save_saliency and load_saliency exclude each other (load_saliency does not calibrate)")
        if self.load_saliency and self.reconstruct != "none":
            raise ValueError(
                f"load_saliency prunes without calibration, so reconstruct {self.reconstruct!r} (which "
                "needs the calibration inputs of every layer) is not possible; use reconstruct: none"
            )
        if self.load_saliency and self.block_tune_epochs:
            raise ValueError(f"block_tune_epochs {self.block_tune_epochs} needs calibration; load_saliency prunes without it")
        if self.block_tune_epochs and "block_tune_target" in self.model_fields_set and self.block_tune_target > 0 and not self.dense_target:
            raise ValueError(
                f"block_tune_target {self.block_tune_target} aims the block tuning at the dense model's outputs, "
                "which the dense stream of dense_target provides: set dense_target above 0, or block_tune_target 0"
            )
        if self.dense_target > 0 and self.reconstruct == "none":
            raise ValueError(f"dense_target {self.dense_target} needs reconstruct least_squares or admm; got reconstruct 'none'")
        for feature in ("dense_target", "block_feedback", "block_tune_epochs"):
            if getattr(self, feature) > 0:
                if self.calibration_inputs == "dense":
                    raise ValueError(
                        f"{feature} {getattr(self, feature)} needs layers masked as they are calibrated: "
                        "calibration_inputs 'pruned' and no save_saliency; got calibration_inputs 'dense'"
                    )
                if self.allocation in ("global", "owl"):
                    raise ValueError(
                        f"{feature} {getattr(self, feature)} needs layers masked as they are calibrated: allocation "
                        f"'layer' or 'row' (global and owl mask at the end); got allocation {self.allocation!r}"
                    )
        return self

    # ------------------------------------------------------------------ targets

    def target_modules(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """Target Linear layers by name; embeddings and lm_head only when a target names them."""
        embeddings = {getattr(model, getter, lambda: None)() for getter in ("get_input_embeddings", "get_output_embeddings")}
        found = {}
        for name, module in match_named_modules(model, self.targets, self.ignore):
            if not isinstance(module, torch.nn.Linear):
                continue
            if module in embeddings and not any(match_name(name, t) for t in self.targets):
                continue
            found[name] = module
        return found

    def resolve(self, model: torch.nn.Module, sequential_targets=None) -> tuple[dict[str, torch.nn.Module], MaskPolicy]:
        """Target layers and their mask policy, after checking they fit the recipe.

        Raises ValueError naming the layer (N:M on an input size that is not a multiple of M, a
        per-layer list that does not match the decoder layers, no target at all).
        """
        targets = self.target_modules(model)
        if not targets:
            raise ValueError(f"UniPruningModifier: targets {self.targets} (ignore {self.ignore}) match no Linear layer")
        _, m = self.nm
        for name, module in targets.items():
            if m and module.in_features % m:
                raise ValueError(
                    f"UniPruningModifier: layer {name} has {module.in_features} inputs, not a multiple "
                    f"of {m} required by mask_structure {self.mask_structure!r}; add it to ignore"
                )
        layers = [name for name, _ in match_named_modules(model, infer_sequential_targets(model, sequential_targets))]
        return targets, MaskPolicy.build(self, list(targets), layers)

    # ------------------------------------------------------------------ lifecycle

    def on_initialize(self, state: State, **kwargs) -> bool:
        sequential_targets = kwargs.get("sequential_targets")
        self._targets, self._policy = self.resolve(state.model, sequential_targets)
        self._names = {module: name for name, module in self._targets.items()}
        modules = dict(state.model.named_modules())
        self._decoder_layers = {modules[name]: name for name in self._policy.decoder_layers}
        if distributed.active() and self.block_feedback > 0:
            raise ValueError("block_feedback needs each batch's masks from all earlier batches, so it runs in one process only")
        first_batch = 0 if self.load_saliency else distributed.first_batch(kwargs.get("calib_data"))
        if self.dense_target > 0:
            check_chain(self._policy.decoder_layers)
            self._stream = DenseStream(
                len(self._decoder_layers), every=self.dense_target_every, first_batch=first_batch,
                keep_last=self.block_tune_epochs > 0,
            )
        if self.block_tune_epochs > 0:
            kept = self._stream.takes if self._stream is not None else None  # batches with a dense output
            self._tuning = BlockTuning(self.block_tune_epochs, self.block_tune_lr, self.block_tune_target, kept)
        if self.save_saliency:
            folder = Path(self.save_saliency).expanduser().resolve().parent
            if not folder.is_dir():
                raise ValueError(f"save_saliency {self.save_saliency!r}: folder {folder} does not exist")
            self._fingerprint = model_fingerprint(self._targets)
        if self.load_saliency:
            info = read_metadata(self.load_saliency)
            linear = {n: m for n, m in modules.items() if isinstance(m, torch.nn.Linear)}
            check_matches(info, list(self._targets), linear, self.load_saliency)
            records, _ = load_saliency(self.load_saliency, list(self._targets), info=info)
            logger.info(f"UniPruning: masks from {self.load_saliency} ({len(records)} layers), no calibration")
            steps = {} if self._policy.needs_all_layers else {name: record.steps for name, record in records.items()}
            self._apply_masks(self._policy.file_masks(records), steps)
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        for module in self._names:
            self.register_hook(module, self._calibrate, "forward")
        for layer in self._decoder_layers:
            if self._stream is not None:
                self.register_hook(layer, self._run_dense, "forward_pre", with_kwargs=True)
                if self._layer_index(layer) == 0:
                    self.register_hook(layer, self._keep_dense_output, "forward")
            if self.block_feedback > 0 and self._targets_in(layer):
                self.register_hook(layer, self._run_feedback, "forward_pre", with_kwargs=True)
            if self._tuning is not None and self._targets_in(layer):
                self._tuning.watch(self._decoder_layers[layer], layer, self._targets_in(layer))
                self.register_hook(layer, self._tuning.keep_call, "forward_pre", with_kwargs=True)
                self.register_hook(layer, self._tuning.keep_output, "forward")

    def _calibrate(self, module: torch.nn.Module, args, _output):
        """Forward hook of a target Linear: one calibration step of this layer on this batch."""
        name = self._names[module]
        self._calibration(name, module, args[0]).observe(module.weight, args[0], self._dense_inputs.pop(name, None))

    def _run_dense(self, layer: torch.nn.Module, args, kwargs):
        """Forward pre-hook of a decoder layer: the same batch through the dense model first,
        unseen by any hook; the Linear layers' dense inputs wait for their calibration step."""
        with HooksMixin.disable_hooks():
            self._dense_inputs.update(self._stream.run(self._layer_index(layer), layer, args, kwargs, self._targets_in(layer)))

    def _keep_dense_output(self, _layer: torch.nn.Module, _args, output):
        """Forward hook of the first decoder layer: its calibration output is the dense model's."""
        self._stream.keep_output(output)

    def _run_feedback(self, layer: torch.nn.Module, args, kwargs):
        """Forward pre-hook of a decoder layer: anchor factors for this batch from the layer's
        output error under the current masks (none on the first batch: no saliency yet)."""
        linears = self._targets_in(layer)
        calibrations = [self._layers.get(name) for name in linears.values()]
        if not all(c is not None and c.calibrating for c in calibrations):
            return
        if (calibrations[0].saliency.steps - 1) % self.block_feedback_every:  # steps = this batch's index
            return
        masks = {module: self._policy.layer_mask(name, self._policy.keys(self._layers[name].saliency)) for module, name in linears.items()}
        with HooksMixin.disable_hooks():
            factors = block_feedback(layer, args, kwargs, masks, self.block_feedback)
        for module, factor in factors.items():
            self._layers[linears[module]].feedback = factor
        self._feedback_runs += 1

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs):
        self._finish_calibrated_layers()
        self._tune_masked_layers()

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self._finish_calibrated_layers()
        self._tune_masked_layers()
        if self.save_saliency and self._waiting and distributed.world()[0] == 0:  # identical on every rank
            self._write_saliency(state.model)
        if self._waiting:
            records, self._waiting = self._waiting, {}
            self._apply_masks(self._policy.masks(records))
        self.remove_hooks()
        self._stream, self._dense_inputs, self._tuning = None, {}, None
        if self.block_feedback > 0 and self._pruned:
            if self._feedback_runs:
                logger.info(f"UniPruning: block_feedback ran {self._feedback_runs} times (decoder layer x batch)")
            else:
                logger.warning(
                    "UniPruning: block_feedback never ran (no decoder layer was called as a whole with more than "
                    "one batch; it needs the decoder layers as sequential targets)"
                )

    def on_finalize(self, state: State, **kwargs) -> bool:
        self.remove_hooks()
        if self._pruned and isinstance(state.model, PreTrainedModel):
            mark_sparse(state.model, sorted(self._pruned), structure_name(*self.nm), self.targets, self.ignore)
        missed = sorted(set(self._targets) - self._pruned)
        self._layers, self._waiting, self._stream, self._inputs_seen, self._dense_inputs = {}, {}, None, [], {}
        if missed:
            raise RuntimeError(
                f"UniPruningModifier: {len(missed)} target layers saw no calibration data and were not "
                f"pruned: {missed[:5]}{' ...' if len(missed) > 5 else ''}"
            )
        return True

    # ------------------------------------------------------------------ helpers of the hooks

    def _calibration(self, name: str, module: torch.nn.Module, inputs: torch.Tensor) -> LayerCalibration:
        """The layer's calibration state, made at its first batch on that batch's device; Linears
        given the very same input tensor at their first batch share its InputStatistics."""
        if name not in self._layers:
            settings = self.calibration_settings()
            statistics, group = next(((stats, group) for tensor, stats, group in self._inputs_seen if tensor is inputs), (None, name))
            if settings.gram and statistics is None:
                statistics = InputStatistics()
                self._inputs_seen.append((inputs, statistics, name))  # held, so no other tensor takes its id
            self._layers[name] = LayerCalibration(name, module.weight.shape, inputs.device, settings, statistics, group)
        return self._layers[name]

    def calibration_settings(self) -> CalibrationSettings:
        """What each layer's calibration step needs; first_step is tracked only where a mask (N:M
        first_step order) or a saliency record uses it."""
        return CalibrationSettings(
            self.metric, self.exponent, self.beta, self.kappa, self.lam, self.seed,
            track_first_step=self.order == "first_step" or self.calibration_inputs == "dense",
            gram=self.reconstruct != "none", deferred=self.block_feedback == 0,
        )

    def _targets_in(self, layer: torch.nn.Module) -> dict[torch.nn.Module, str]:
        """The target Linear layers inside a decoder layer (module -> name)."""
        prefix = self._decoder_layers[layer] + "."
        return {module: name for module, name in self._names.items() if name.startswith(prefix)}

    def _layer_index(self, layer: torch.nn.Module) -> int:
        return list(self._decoder_layers).index(layer)

    def _finish_calibrated_layers(self) -> None:
        """Reduce the layers calibrated since the last call (on any rank) across ranks, then mask and
        write them one round at a time, one Linear per rank per round (or keep their saliency until
        every layer is calibrated, for a saliency file or a global budget). A record is dropped as
        soon as its mask is taken, so one round's saliency is held at a time."""
        self._inputs_seen = []
        records = finish_layers(self._layers, self._targets, self.calibration_settings(), distributed.device())
        if self.calibration_inputs == "dense" or self._policy.needs_all_layers:
            dtype = STORAGE_DTYPES[self.saliency_dtype] if self.calibration_inputs == "dense" else torch.bfloat16
            for name, record in records:
                self._waiting[name] = record.to("cpu", dtype)
                self._layers[name].offload()
            return
        ranks = distributed.world()[1]
        masks, steps = {}, {}
        for name, record in records:
            masks[name], steps[name] = self._policy.layer_mask(name, self._policy.keys(record)), record.steps
            del record
            if len(masks) == ranks:
                self._apply_masks(masks, steps)
                masks, steps = {}, {}
        if masks:
            self._apply_masks(masks, steps)

    def _tune_masked_layers(self) -> None:
        """Block tuning of each decoder layer whose target Linears are all masked (block_tuning.py)."""
        if self._tuning is not None:
            stream = self._stream
            self._tuning.tune_ready(self._pruned, lambda layer, batch: stream.output(self._layer_index(layer), batch) if stream else None)

    def _write_saliency(self, model: torch.nn.Module) -> None:
        settings = ("metric", "kappa", "lam", "beta", "exponent", "seed", "targets", "ignore", "calibration_inputs")
        metadata = {
            "model": getattr(getattr(model, "config", None), "_name_or_path", None),
            "fingerprint": self._fingerprint,
            "calibration": {key: getattr(self, key) for key in settings},
            "unipruning_modifier": __version__,
        }
        save_saliency(self.save_saliency, self._waiting, metadata)
        logger.info(f"UniPruning: saliency of {len(self._waiting)} layers written to {self.save_saliency}")

    def _apply_masks(self, masks: dict[str, torch.Tensor], steps: dict[str, int | None] | None = None) -> None:
        """Zero the pruned weights. Kept weights keep their original values bit for bit, unless
        ``reconstruct`` re-fits them to the layer's calibration outputs. ``steps``: the
        calibration batches behind each layer's own mask, for the log."""
        refit = RefitSettings(
            self.reconstruct, self.damping, self.reconstruct_iterations, self.reconstruct_tolerance, self.dense_target,
            self.admm_iterations, self.admm_rho,
        )
        calibrations = {name: self._layers.pop(name, None) for name in masks}

        def pruned(name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            mask, calibration = masks[name].to(weight.device), calibrations[name]
            if calibration is None or calibration.statistics is None:
                return weight.masked_fill(~mask, 0), mask
            if calibration.statistics.drift_tokens == 0 and self.dense_target > 0:
                logger.warning(f"UniPruning {name}: no dense-model inputs (not inside a decoder layer); re-fit to the layer's own outputs")
            fitted, mask = calibration.refit(weight, mask, refit, self._policy.budget(name, mask))
            return fitted.to(weight.dtype).masked_fill(~mask, 0), mask

        written = distributed.write_weights({name: self._targets[name] for name in masks}, pruned)
        for name, mask in written.items():
            self._pruned.add(name)
            achieved = 1.0 - int(torch.count_nonzero(mask)) / mask.numel()
            batches = (steps or {}).get(name)
            logger.info(f"UniPruning {name}: sparsity {achieved:.4f}{f' from {batches} batches' if batches is not None else ''}")


register(UniPruningModifier)
