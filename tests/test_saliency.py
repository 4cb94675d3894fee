"""Local saliency metrics (the anchors S_b): exact values on small hand-computed tensors."""

from __future__ import annotations

import math
import typing
from fractions import Fraction

import pytest
import torch

from unipruning_modifier import saliency


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- activation energy


def test_activation_energy_is_mean_of_squares_over_tokens():
    # two tokens, two features: [(1 + 9) / 2, (4 + 16) / 2]
    x = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    assert torch.equal(saliency.activation_energy(x), torch.tensor([5.0, 10.0]))


def test_activation_energy_flattens_leading_dims_and_returns_fp32():
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) - 11.0
    expected = x.reshape(6, 4).pow(2).sum(dim=0) / 6
    got = saliency.activation_energy(x.to(torch.bfloat16))  # small integers: exact in bf16
    assert got.dtype == torch.float32
    assert got.shape == (4,)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- wanda


def test_wanda_score_is_abs_weight_times_sqrt_energy():
    w = torch.tensor([[1.0, -2.0], [-3.0, 4.0]])
    s = torch.tensor([4.0, 9.0])
    got = saliency.wanda_score(w.abs(), s)
    assert torch.equal(got, torch.tensor([[2.0, 6.0], [6.0, 12.0]]))


def test_wanda_local_saliency_is_normalised_wanda_score():
    w = torch.tensor([[1.0, -2.0], [-3.0, 4.0]])
    s = torch.tensor([4.0, 9.0])
    raw = torch.tensor([[2.0, 6.0], [6.0, 12.0]])  # mean 6.5
    got = saliency.local_saliency("wanda", w, s)
    torch.testing.assert_close(got, raw / 6.5, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- ria


def test_ria_score_matches_hand_computation():
    # |W| = [[1, 2], [3, 4]]: column sums [4, 6], row sums [3, 7]; sqrt(s) = [2, 3]
    w = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    s = torch.tensor([4.0, 9.0])
    expected = torch.tensor(
        [
            [(1 / 4 + 1 / 3) * 2, (2 / 6 + 2 / 3) * 3],
            [(3 / 4 + 3 / 7) * 2, (4 / 6 + 4 / 7) * 3],
        ]
    )
    torch.testing.assert_close(expected, torch.tensor([[7 / 6, 3.0], [33 / 14, 26 / 7]]))
    got = saliency.ria_score(w.abs(), s)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)

    normalised = saliency.local_saliency("ria", w, s)
    torch.testing.assert_close(normalised, expected / expected.mean(), rtol=1e-6, atol=0)


def test_ria_exponent_is_applied_to_energy():
    w = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # every relative term = 1/2 + 1/2 = 1
    s = torch.tensor([16.0, 81.0])
    got = saliency.ria_score(w, s, exponent=0.25)
    assert torch.equal(got, torch.tensor([[2.0, 3.0], [2.0, 3.0]]))


def test_ria_explicit_sums_are_used():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    s = torch.ones(2)
    got = saliency.ria_score(w, s, column_sums=torch.tensor([2.0, 4.0]), row_sums=torch.tensor([1.0, 8.0]))
    expected = torch.tensor([[1 / 2 + 1 / 1, 2 / 4 + 2 / 1], [3 / 2 + 3 / 8, 4 / 4 + 4 / 8]])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_stochastic_ria_with_beta_one_equals_ria_on_square_weight():
    # Integer-valued |W| keeps every sum exact whatever order the subset is summed in.
    w = torch.randint(-9, 10, (6, 6), generator=_gen(0)).float()
    w[w == 0] = 1.0
    s = torch.rand(6, generator=_gen(1)) + 0.1
    for exponent in (0.35, 0.5):
        stochastic = saliency.stochastic_ria_score(w.abs(), s, exponent=exponent, beta=1.0, generator=_gen(3))
        assert torch.equal(stochastic, saliency.ria_score(w.abs(), s, exponent=exponent))
        a = saliency.local_saliency("stochastic_ria", w, s, exponent=exponent, beta=1.0, generator=_gen(4))
        b = saliency.local_saliency("ria", w, s, exponent=exponent)
        assert torch.equal(a, b)


def test_stochastic_ria_with_small_beta_differs_from_ria():
    w = torch.randn(32, 32, generator=_gen(0))
    s = torch.rand(32, generator=_gen(1)) + 0.1
    a = saliency.local_saliency("stochastic_ria", w, s, exponent=0.5, beta=0.2, generator=_gen(2))
    b = saliency.local_saliency("ria", w, s, exponent=0.5)
    assert not torch.allclose(a, b)


def test_default_exponents():
    assert saliency.DEFAULT_EXPONENTS == {"stochastic_ria": 0.35, "ria": 0.5, "wanda": 0.5}
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    s = torch.tensor([4.0, 9.0])
    torch.testing.assert_close(
        saliency.local_saliency("ria", w, s), saliency.local_saliency("ria", w, s, exponent=0.5)
    )
    assert not torch.allclose(saliency.local_saliency("ria", w, s), saliency.local_saliency("ria", w, s, exponent=0.35))


# --------------------------------------------------------------------------- normalise


def test_normalise_gives_unit_mean():
    score = torch.rand(17, 23, generator=_gen(0)) * 37.0  # every metric's score is >= 0
    out = saliency.normalise(score)
    assert out is score  # in place
    assert math.isclose(float(out.mean()), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("metric", ["wanda", "ria", "stochastic_ria"])
def test_scores_are_non_negative(metric):
    """normalise divides by the plain mean, which is mean |S| only because no score is negative."""
    weight = torch.randn(16, 32, generator=_gen(1))
    energy = torch.rand(32, generator=_gen(2))
    score = saliency.local_saliency(metric, weight, energy, generator=_gen(3))
    assert bool((score >= 0).all())


def test_normalise_keeps_zeros():
    score = torch.zeros(3, 4)
    assert torch.equal(saliency.normalise(score), torch.zeros(3, 4))


@pytest.mark.parametrize("metric", typing.get_args(saliency.Metric))
def test_local_saliency_is_normalised_fp32(metric):
    w = (torch.randn(24, 40, generator=_gen(0)) * 0.02).to(torch.bfloat16)
    s = torch.rand(40, generator=_gen(1)) * 5
    out = saliency.local_saliency(metric, w, s, generator=_gen(2))
    assert out.dtype == torch.float32
    assert out.shape == w.shape
    assert math.isclose(float(out.abs().mean()), 1.0, rel_tol=1e-5)
    assert bool((out >= 0).all())


# --------------------------------------------------------------------------- determinism


def test_stochastic_ria_same_seed_identical_different_seed_differs():
    w = torch.randn(64, 48, generator=_gen(0))
    s = torch.rand(48, generator=_gen(1)) + 0.1
    a = saliency.local_saliency("stochastic_ria", w, s, generator=_gen(7))
    b = saliency.local_saliency("stochastic_ria", w, s, generator=_gen(7))
    c = saliency.local_saliency("stochastic_ria", w, s, generator=_gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_stochastic_ria_draws_new_subsets_per_call():
    w = torch.randn(64, 48, generator=_gen(0))
    s = torch.rand(48, generator=_gen(1)) + 0.1
    g = _gen(7)
    first = saliency.local_saliency("stochastic_ria", w, s, generator=g)
    second = saliency.local_saliency("stochastic_ria", w, s, generator=g)
    assert not torch.equal(first, second)


def test_stochastic_ria_uses_subset_sums():
    """The column sums run over tau random rows and the row sums over tau random columns."""
    w = torch.rand(10, 20, generator=_gen(0)) + 0.5
    s = torch.rand(20, generator=_gen(1)) + 0.1
    beta = 0.3
    tau = saliency.subset_size(10, 20, beta)
    assert tau == 3
    g = _gen(5)
    rows = torch.randperm(10, generator=g)[:tau]
    cols = torch.randperm(20, generator=g)[:tau]
    expected = saliency.ria_score(w, s, 0.35, w[rows].sum(0), w[:, cols].sum(1))
    got = saliency.stochastic_ria_score(w, s, exponent=0.35, beta=beta, generator=_gen(5))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- subset size


@pytest.mark.parametrize(
    "out_features, in_features, beta, expected",
    [
        (100, 50, 0.2, 10),
        (4096, 11008, 0.2, 819),
        (11008, 4096, 0.2, 819),
        (3, 5, 0.2, 1),  # floor(0.6) = 0 -> at least one
        (1, 1, 0.01, 1),
        (7, 5, 1.0, 5),
        (10, 10, 0.35, 3),
    ],
)
def test_subset_size_formula(out_features, in_features, beta, expected):
    assert saliency.subset_size(out_features, in_features, beta) == expected


@pytest.mark.parametrize("beta, n", [(0.29, 100), (0.57, 100), (0.58, 100)])
def test_subset_size_is_exact_for_decimal_beta(beta, n):
    """tau = floor(beta * n) in exact arithmetic: 0.29 * 100 is 29, not 28.999999999999996."""
    expected = max(1, math.floor(Fraction(str(beta)) * n))
    assert saliency.subset_size(n, n, beta) == expected


# --------------------------------------------------------------------------- errors


def test_unknown_metric_raises_naming_allowed_metrics():
    w = torch.ones(2, 2)
    with pytest.raises(ValueError) as info:
        saliency.local_saliency("sparsegpt", w, torch.ones(2))
    message = str(info.value)
    assert "sparsegpt" in message
    for metric in ("stochastic_ria", "ria", "wanda"):
        assert metric in message
