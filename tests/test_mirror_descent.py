"""Mirror-descent state: soft threshold, quantile threshold, one-step and multi-step bookkeeping."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from unipruning_modifier import mirror_descent as md
from unipruning_modifier.mirror_descent import SaliencyState, mirror_descent_step


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _lower_order_statistic(values: torch.Tensor, q: float) -> float:
    """sorted(values)[ceil(q * n) - 1] with q read as the decimal it is written as."""
    flat = values.reshape(-1).float().sort().values
    k = max(1, math.ceil(Fraction(str(q)) * flat.numel()))
    return float(flat[k - 1])


# --------------------------------------------------------------------------- soft threshold


def test_soft_threshold_values():
    z = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.25, 3.0])
    got = md.soft_threshold(z, 1.0)
    assert torch.equal(got, torch.tensor([-2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25, 2.0]))
    # signs: negative stays negative, nothing flips
    assert bool((got * z >= 0).all())


def test_soft_threshold_zero_is_identity_and_shape_preserved():
    z = torch.tensor([[-2.5, 0.0], [4.0, -0.125]])
    assert torch.equal(md.soft_threshold(z, 0.0), z)
    assert torch.equal(md.soft_threshold(z, 10.0), torch.zeros(2, 2))


# --------------------------------------------------------------------------- quantile threshold


@pytest.mark.parametrize("q", [0.001, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999])
@pytest.mark.parametrize("n", [1, 2, 7, 37, 1000])
def test_quantile_threshold_exact_lower_order_statistic(q, n):
    values = torch.randn(n, generator=_gen(n))
    assert md.quantile_threshold(values, q) == _lower_order_statistic(values, q)


def test_quantile_threshold_hand_values():
    values = torch.tensor([[5.0, 1.0], [4.0, 2.0], [3.0, 6.0]])  # sorted 1..6
    assert md.quantile_threshold(values, 0.5) == 3.0  # ceil(3) = 3rd smallest
    assert md.quantile_threshold(values, 0.51) == 4.0  # ceil(3.06) = 4th
    assert md.quantile_threshold(values, 0.1) == 1.0  # ceil(0.6) = 1st
    assert md.quantile_threshold(values, 0.99) == 6.0


def test_quantile_threshold_is_exact_for_decimal_q():
    """The 0.07-quantile of 100 values is the 7th smallest (0.07 * 100 is 7.000000000000001 in floats)."""
    values = torch.arange(1, 101, dtype=torch.float32).flip(0)
    assert md.quantile_threshold(values, 0.07) == 7.0


def test_quantile_threshold_zero_returns_zero():
    values = torch.rand(50, generator=_gen(0)) + 3.0
    assert md.quantile_threshold(values, 0.0) == 0.0
    assert md.quantile_threshold(torch.empty(0), 0.5) == 0.0


@pytest.mark.parametrize("q", [1.0, 1.5, -0.01, -1.0])
def test_quantile_threshold_rejects_q_outside_unit_interval(q):
    with pytest.raises(ValueError, match="quantile"):
        md.quantile_threshold(torch.rand(10), q)


def test_quantile_threshold_sampled_estimate_is_close_and_deterministic():
    values = torch.rand(20_000, generator=_gen(0))
    q = 0.3
    true = _lower_order_statistic(values, q)
    kwargs = dict(exact_limit=1_000, sample_size=4_000)
    a = md.quantile_threshold(values, q, generator=_gen(11), **kwargs)
    b = md.quantile_threshold(values, q, generator=_gen(11), **kwargs)
    c = md.quantile_threshold(values, q, generator=_gen(12), **kwargs)
    assert a == b
    assert a != c
    # uniform data: standard error of the sample quantile is sqrt(q(1-q)/n) ~ 0.007
    assert abs(a - true) < 0.03
    assert abs(c - true) < 0.03


def test_quantile_threshold_sample_is_drawn_with_replacement_from_generator():
    values = torch.randn(5_000, generator=_gen(0))
    g = _gen(3)
    index = torch.randint(values.numel(), (300,), generator=g)
    expected = _lower_order_statistic(values[index], 0.4)
    got = md.quantile_threshold(values, 0.4, generator=_gen(3), exact_limit=4_999, sample_size=300)
    assert got == expected


def test_quantile_threshold_at_limit_is_exact():
    values = torch.randn(1_000, generator=_gen(0))
    got = md.quantile_threshold(values, 0.3, generator=_gen(3), exact_limit=1_000, sample_size=10)
    assert got == _lower_order_statistic(values, 0.3)


# --------------------------------------------------------------------------- state


def test_zeros_state():
    state = SaliencyState.zeros((3, 4), "cpu")
    assert state.z.dtype == torch.float32 and torch.equal(state.z, torch.zeros(3, 4))
    assert state.first_step.dtype == torch.int32 and bool((state.first_step == -1).all())
    assert state.anchor_mean.dtype == torch.float32 and torch.equal(state.anchor_mean, torch.zeros(3, 4))
    assert state.threshold == 0.0 and state.steps == 0
    assert torch.equal(state.gamma, torch.zeros(3, 4))


# --------------------------------------------------------------------------- one step


@pytest.mark.parametrize("kappa", [0.01, 0.37, 1.0, 3.0])
def test_first_step_from_zeros_gives_kappa_times_anchor(kappa):
    anchor = torch.randn(9, 11, generator=_gen(0))
    anchor[0, 0] = 0.0
    state = SaliencyState.zeros(anchor.shape, "cpu")
    mirror_descent_step(state, anchor, kappa=kappa, lam=0.0)
    assert torch.equal(state.z, kappa * anchor)
    assert state.threshold == 0.0
    assert torch.equal(state.gamma, kappa * anchor)
    expected_first = torch.where(anchor != 0, 0, -1).to(torch.int32)
    assert torch.equal(state.first_step, expected_first)
    assert torch.equal(state.anchor_mean, anchor)
    assert state.steps == 1


def test_step_accepts_other_dtypes_and_keeps_fp32_state():
    anchor = torch.tensor([[1.0, -2.0], [0.5, 4.0]], dtype=torch.bfloat16)
    state = SaliencyState.zeros((2, 2), "cpu")
    mirror_descent_step(state, anchor, kappa=0.5, lam=0.0)
    assert state.z.dtype == torch.float32
    assert torch.equal(state.z, torch.tensor([[0.5, -1.0], [0.25, 2.0]]))


def test_gamma_is_soft_threshold_of_z_at_threshold():
    anchor = torch.randn(20, 30, generator=_gen(1))
    state = SaliencyState.zeros(anchor.shape, "cpu")
    mirror_descent_step(state, anchor, kappa=0.1, lam=0.4)
    expected_t = _lower_order_statistic((0.1 * anchor).abs(), 0.4)
    assert state.threshold == expected_t
    assert torch.equal(state.gamma, md.soft_threshold(state.z, state.threshold))
    # exactly 60% strictly above the 40% lower order statistic (values are distinct)
    assert int((state.gamma != 0).sum()) == 600 - 240
    assert torch.equal(state.first_step == 0, state.gamma != 0)


# --------------------------------------------------------------------------- hand-traced multi-step run


def test_hand_traced_three_steps():
    """kappa = 1, lam = 0.5 on 4 weights: threshold = 2nd smallest |z|.

    step 0: S=[4,3,2,1]  z=[4,3,2,1]   t=2  Gamma=[2,1,0,0]   enter {0,1}
    step 1: S=[0,0,0,5]  z=[2,2,2,6]   t=2  Gamma=[0,0,0,4]   enter {3}  (0 and 1 drop out, keep step 0)
    step 2: S=[0,0,10,0] z=[2,2,12,2]  t=2  Gamma=[0,0,10,0]  enter {2}
    """
    state = SaliencyState.zeros((4,), "cpu")
    anchors = [
        torch.tensor([4.0, 3.0, 2.0, 1.0]),
        torch.tensor([0.0, 0.0, 0.0, 5.0]),
        torch.tensor([0.0, 0.0, 10.0, 0.0]),
    ]
    expected = [
        ([4.0, 3.0, 2.0, 1.0], [2.0, 1.0, 0.0, 0.0], [0, 0, -1, -1]),
        ([2.0, 2.0, 2.0, 6.0], [0.0, 0.0, 0.0, 4.0], [0, 0, -1, 1]),
        ([2.0, 2.0, 12.0, 2.0], [0.0, 0.0, 10.0, 0.0], [0, 0, 2, 1]),
    ]
    for step, (anchor, (z, gamma, first)) in enumerate(zip(anchors, expected)):
        mirror_descent_step(state, anchor, kappa=1.0, lam=0.5)
        assert state.steps == step + 1
        assert state.threshold == 2.0
        assert torch.equal(state.z, torch.tensor(z))
        assert torch.equal(state.gamma, torch.tensor(gamma))
        assert torch.equal(state.first_step, torch.tensor(first, dtype=torch.int32))
    torch.testing.assert_close(state.anchor_mean, torch.stack(anchors).mean(0), rtol=1e-6, atol=0)


def test_negative_z_enters_and_never_entered_stays_minus_one():
    state = SaliencyState.zeros((5,), "cpu")
    # |z| after step 0: [5, 1, 1, 1, 1] -> lam 0.8 -> t = 1 -> only index 0 enters (negative)
    mirror_descent_step(state, torch.tensor([-5.0, 1.0, 1.0, 1.0, 1.0]), kappa=1.0, lam=0.8)
    assert torch.equal(state.first_step, torch.tensor([0, -1, -1, -1, -1], dtype=torch.int32))
    assert torch.equal(state.gamma, torch.tensor([-4.0, 0.0, 0.0, 0.0, 0.0]))
    # step 1: z = [-5+4, 1, 1, 1, 1] + [0, 0, 0, 0, 3] = [-1, 1, 1, 1, 4]; t = 1; index 4 enters
    mirror_descent_step(state, torch.tensor([0.0, 0.0, 0.0, 0.0, 3.0]), kappa=1.0, lam=0.8)
    assert torch.equal(state.z, torch.tensor([-1.0, 1.0, 1.0, 1.0, 4.0]))
    assert torch.equal(state.first_step, torch.tensor([0, -1, -1, -1, 1], dtype=torch.int32))


def test_first_step_bookkeeping_on_random_run():
    """first_step[i] is the first step at which |z_i| > t, whatever happens afterwards."""
    shape = (16, 24)
    state = SaliencyState.zeros(shape, "cpu")
    g = _gen(0)
    observed = torch.full(shape, -1, dtype=torch.int32)
    anchors = []
    previous_first = state.first_step.clone()
    for step in range(12):
        anchor = torch.randn(shape, generator=g).abs()
        anchor[torch.rand(shape, generator=g) < 0.5] = 0.0  # sparse anchors: entries enter at different steps
        anchors.append(anchor)
        mirror_descent_step(state, anchor, kappa=0.05, lam=0.7, generator=g)
        above = state.z.abs() > state.threshold
        observed = torch.where((observed < 0) & above, torch.full_like(observed, step), observed)
        assert torch.equal(state.first_step, observed)
        # entries, once set, are never overwritten
        set_before = previous_first >= 0
        assert torch.equal(state.first_step[set_before], previous_first[set_before])
        previous_first = state.first_step.clone()
        assert state.steps == step + 1
    steps_seen = set(state.first_step.unique().tolist())
    assert len(steps_seen - {-1}) >= 3  # entries really entered at several different steps
    torch.testing.assert_close(state.anchor_mean, torch.stack(anchors).mean(0), rtol=1e-5, atol=1e-6)


def test_untracked_first_step_leaves_the_rest_of_the_state_bit_identical():
    """Skipping first_step (the default order needs it not) must not change z, Gamma or the anchor mean."""
    shape = (32, 48)
    tracked = SaliencyState.zeros(shape, "cpu")
    untracked = SaliencyState.zeros(shape, "cpu", track_first_step=False)
    assert untracked.first_step is None
    g1, g2, data = _gen(5), _gen(5), _gen(6)
    for _ in range(6):
        anchor = torch.randn(shape, generator=data).abs()
        mirror_descent_step(tracked, anchor, kappa=0.1, lam=0.3, generator=g1)
        mirror_descent_step(untracked, anchor, kappa=0.1, lam=0.3, generator=g2)
    assert untracked.first_step is None
    assert torch.equal(tracked.z, untracked.z) and torch.equal(tracked.anchor_mean, untracked.anchor_mean)
    assert torch.equal(tracked.gamma, untracked.gamma) and tracked.steps == untracked.steps


def test_anchor_mean_is_arithmetic_mean_of_anchors():
    anchors = [torch.full((2, 3), float(v)) for v in (1, 2, 3, 4, 10)]
    state = SaliencyState.zeros((2, 3), "cpu")
    for a in anchors:
        mirror_descent_step(state, a, kappa=0.01, lam=0.001)
    torch.testing.assert_close(state.anchor_mean, torch.full((2, 3), 4.0), rtol=1e-6, atol=0)
    assert state.steps == 5


# --------------------------------------------------------------------------- determinism with sampling


def _sampled_run(seed: int, steps: int = 3) -> SaliencyState:
    shape = (1_001, 1_000)  # 1,001,000 entries > EXACT_QUANTILE_LIMIT: the quantile is sampled
    assert shape[0] * shape[1] > md.EXACT_QUANTILE_LIMIT
    anchors_gen = _gen(123)
    generator = _gen(seed)
    state = SaliencyState.zeros(shape, "cpu")
    for _ in range(steps):
        anchor = torch.rand(shape, generator=anchors_gen)
        mirror_descent_step(state, anchor, kappa=0.01, lam=0.3, generator=generator)
    return state


def test_multi_step_run_is_deterministic_under_fixed_seed():
    a = _sampled_run(0)
    b = _sampled_run(0)
    c = _sampled_run(1)
    assert a.threshold == b.threshold
    assert torch.equal(a.z, b.z)
    assert torch.equal(a.first_step, b.first_step)
    assert torch.equal(a.anchor_mean, b.anchor_mean)
    assert a.steps == b.steps == 3
    # a different seed samples a different quantile estimate ...
    assert a.threshold != c.threshold
    # ... close to the exact one
    exact = _lower_order_statistic(a.z.abs(), 0.3)
    assert abs(a.threshold - exact) < 0.02 * exact
