"""LayerCalibration and InputStatistics: one calibration step per batch, Gram matrices once per input."""

from __future__ import annotations

import dataclasses

import torch

from unipruning_modifier.layer_calibration import (
    CalibrationSettings,
    InputStatistics,
    LayerCalibration,
    RefitSettings,
    finish_layers,
)
from unipruning_modifier.reconstruction import accumulate_gram, exact_solve

SETTINGS = CalibrationSettings("wanda", None, 0.2, 0.1, 0.001, 0, track_first_step=False, gram=True)


def test_linears_reading_one_input_share_its_gram_matrices():
    torch.manual_seed(0)
    shared = InputStatistics()
    q = LayerCalibration("q", torch.Size([8, 16]), torch.device("cpu"), SETTINGS, shared)
    k = LayerCalibration("k", torch.Size([4, 16]), torch.device("cpu"), SETTINGS, shared)
    alone = LayerCalibration("v", torch.Size([4, 16]), torch.device("cpu"), SETTINGS)
    gram, tokens = None, 0
    for _ in range(3):
        x = torch.randn(2, 5, 16)
        for calibration, weight in ((q, torch.randn(8, 16)), (k, torch.randn(4, 16)), (alone, torch.randn(4, 16))):
            calibration.observe(weight, x)
        gram, tokens = accumulate_gram(x, gram, tokens)
    assert q.gram is k.gram and alone.gram is not q.gram
    torch.testing.assert_close(q.gram, gram)
    torch.testing.assert_close(alone.gram, gram)
    assert shared.batches == 3 and shared.tokens == tokens == 30


def test_finish_returns_the_record_and_refit_solves_the_least_squares_problem():
    torch.manual_seed(1)
    calibration = LayerCalibration("w", torch.Size([6, 12]), torch.device("cpu"), SETTINGS)
    weight = torch.randn(6, 12)
    for _ in range(4):
        calibration.observe(weight, torch.randn(3, 7, 12))
    record = calibration.finish()
    assert not calibration.calibrating and record.gamma.shape == (6, 12) and record.steps == 4
    mask = torch.rand(6, 12) > 0.5
    fitted, kept = calibration.refit(weight, mask, RefitSettings("least_squares", 0.01, 500, 1e-9, 0.0, 20, 0.1), None)
    assert kept is mask
    expected = exact_solve(weight, calibration.gram, mask, 0.01)
    torch.testing.assert_close(fitted.double(), expected, rtol=1e-4, atol=1e-5)


def test_deferred_holds_no_state_while_calibrating_and_finishes_bit_for_bit_the_same():
    torch.manual_seed(2)
    weight = torch.randn(6, 12)
    batches = [torch.randn(3, 7, 12) * (1 + b) for b in range(5)]
    settings = CalibrationSettings("stochastic_ria", None, 0.2, 0.1, 0.3, 0, track_first_step=True, gram=False)
    stepped = LayerCalibration("w", weight.shape, torch.device("cpu"), settings)
    deferred = LayerCalibration("w", weight.shape, torch.device("cpu"), dataclasses.replace(settings, deferred=True))
    for inputs in batches:
        stepped.observe(weight, inputs)
        deferred.observe(weight, inputs)
    assert deferred.saliency is None and deferred.calibrating  # energies only: 4 bytes per input per batch
    ours, theirs = stepped.finish(), deferred.finish(weight)
    for a, b in zip((ours.gamma, ours.anchor_mean, ours.first_step), (theirs.gamma, theirs.anchor_mean, theirs.first_step)):
        assert torch.equal(a, b)
    assert ours.steps == theirs.steps == 5 and not deferred.calibrating


def test_finish_layers_finishes_each_layer_only_when_its_record_is_asked_for():
    settings = dataclasses.replace(SETTINGS, deferred=True)
    modules = {name: torch.nn.Linear(12, 6, bias=False) for name in ("a", "b")}
    layers = {name: LayerCalibration(name, torch.Size([6, 12]), torch.device("cpu"), settings) for name in modules}
    for name, calibration in layers.items():
        calibration.observe(modules[name].weight.detach(), torch.randn(2, 3, 12))
    records = finish_layers(layers, modules, settings, torch.device("cpu"))
    name, record = next(records)
    assert name == "a" and record.steps == 1
    assert not layers["a"].calibrating and layers["b"].calibrating
    assert [name for name, _ in records] == ["b"] and not layers["b"].calibrating
