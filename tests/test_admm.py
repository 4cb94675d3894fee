"""ALPS solver (admm.py) on small random layers: budgets, optimality, determinism."""

from __future__ import annotations

import itertools

import pytest
import torch

from unipruning_modifier.admm import Budget, admm, alps, normalize, pcg, penalty_step, project, ridge_solver
from unipruning_modifier.reconstruction import dampen, exact_solve, least_squares, reconstruction_error

BUDGETS = [Budget(0.5), Budget(0.7), Budget(0.6, per_row=True), Budget.parse(mask_structure="2:4"),
           Budget.parse(mask_structure="1:4")]


def layer(out: int = 24, inputs: int = 32, tokens: int = 256, seed: int = 0):
    """Weights and the Gram matrix of correlated inputs with uneven scales, like an LLM's."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(inputs, inputs, generator=generator) / inputs**0.5 + torch.eye(inputs)
    x = torch.randn(tokens, inputs, generator=generator) @ mixing
    x *= torch.rand(inputs, generator=generator) * 3 + 0.1
    weight = torch.randn(out, inputs, generator=generator)
    return weight, x.T @ x / tokens


def damped_error(weight, candidate, gram, damping=0.01):
    return reconstruction_error(weight, candidate, dampen(gram, damping))


@pytest.mark.parametrize("budget", BUDGETS, ids=str)
def test_budget_hit_exactly(budget):
    weight, gram = layer()
    result = alps(weight, gram, budget)
    assert int(result.mask.sum()) == budget.kept(weight.shape)
    assert torch.equal(result.weight != 0, result.mask)
    if budget.m:
        kept = result.mask.reshape(weight.shape[0], -1, budget.m).sum(-1)
        assert bool((kept == budget.m - budget.n).all())
    if budget.per_row:
        assert bool((result.mask.sum(1) == result.mask.sum(1)[0]).all())


def test_parse():
    assert Budget.parse(mask_structure="2:4") == Budget(0.5, 2, 4)
    assert Budget.parse(0.7) == Budget(0.7)
    assert Budget.parse(0.7, per_row=True).kept(torch.Size([3, 10])) == 9
    with pytest.raises(ValueError):
        Budget.parse(1.0)


@pytest.mark.parametrize("budget", BUDGETS, ids=str)
def test_never_worse_than_magnitude_plus_least_squares(budget):
    """ALPS's mask and weights beat the (|W| sqrt(H_jj)) mask re-fitted exactly, on the damped objective."""
    for seed in range(3):
        weight, gram = layer(seed=seed)
        result = alps(weight, gram, budget)
        hessian, scale = normalize(gram)
        baseline = exact_solve(weight, gram, project(weight * scale, budget))
        assert damped_error(weight, result.weight, gram) <= damped_error(weight, baseline, gram) * (1 + 1e-6)


def test_pcg_matches_direct_solve():
    weight, gram = layer()
    mask = project(weight, Budget(0.6))
    hessian = dampen(gram, 0.01)
    solution, iterations = pcg(hessian, weight @ hessian, mask, weight, max_iterations=200, tolerance=1e-9)
    assert iterations < 200
    torch.testing.assert_close(solution.double(), exact_solve(weight, gram, mask), rtol=1e-4, atol=1e-4)


def test_pcg_with_a_dense_target():
    """A given right-hand side W0 C^T gives reconstruction.py's re-fit with ``cross``."""
    weight, gram = layer()
    _, cross = layer(seed=1)
    mask = project(weight, Budget.parse(mask_structure="2:4"))
    hessian = dampen(gram, 0.01)
    from unipruning_modifier.reconstruction import dampen_cross

    rhs = weight @ dampen_cross(gram, cross, 0.01).T
    solution, _ = pcg(hessian, rhs, mask, weight * mask, max_iterations=200, tolerance=1e-9)
    torch.testing.assert_close(solution.double(), exact_solve(weight, gram, mask, cross=cross), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(solution, least_squares(weight, gram, mask, cross=cross, tolerance=1e-9),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("budget", [Budget(0.5), Budget(0.5, per_row=True), Budget.parse(mask_structure="2:4")], ids=str)
def test_projection_is_the_nearest_point_of_the_budget(budget):
    """Brute force over every support of a 2 x 4 tensor: ``project`` keeps the closest one."""
    values = torch.randn(2, 4, generator=torch.Generator().manual_seed(5))
    best = None
    for kept in itertools.combinations(range(8), budget.kept(values.shape)):
        mask = torch.zeros(8, dtype=torch.bool)
        mask[list(kept)] = True
        mask = mask.reshape(2, 4)
        feasible = project(torch.where(mask, 1.0, 0.0), budget)
        if torch.equal(feasible, mask):
            distance = float((values * ~mask).square().sum())
            best = (distance, mask) if best is None or distance < best[0] else best
    assert torch.equal(project(values, budget), best[1])


@pytest.mark.parametrize("budget", BUDGETS, ids=str)
def test_weights_are_the_least_squares_fit_of_their_support(budget):
    """On a tiny layer the final PCG converges within its 10 iterations: the weights are the exact
    (direct solve) re-fit on the support ADMM chose."""
    weight, gram = layer(out=4, inputs=8, tokens=64)
    result = alps(weight, gram, budget, pcg_tolerance=1e-7)
    torch.testing.assert_close(result.weight.double(), exact_solve(weight, gram, result.mask), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [8, 32, 40], ids=lambda rows: f"rows{rows}")
def test_ridge_solver(rows):
    """Both ways of applying (H + rho I)^-1 (triangular solves for rows < in, the explicit
    inverse otherwise) equal the fp64 inverse."""
    _, gram = layer()
    hessian, _ = normalize(gram)
    matrix = torch.randn(rows, 32, generator=torch.Generator().manual_seed(1))
    expected = matrix.double() @ torch.linalg.inv(hessian.double() + 0.3 * torch.eye(32, dtype=torch.float64))
    torch.testing.assert_close(ridge_solver(hessian, 0.3, rows)(matrix).double(), expected, rtol=1e-4, atol=1e-5)


def test_ridge_solver_refactors_in_fp64_when_fp32_fails(monkeypatch):
    """A failed fp32 Cholesky factor (reported by cholesky_ex) is redone in fp64."""
    _, gram = layer()
    hessian, _ = normalize(gram)
    matrix = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    factor = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda m: (factor(m)[0] * float("nan"), torch.tensor(1)))
    expected = matrix.double() @ torch.linalg.inv(hessian.double() + 0.3 * torch.eye(32, dtype=torch.float64))
    torch.testing.assert_close(ridge_solver(hessian, 0.3, 8)(matrix).double(), expected, rtol=1e-4, atol=1e-5)


def test_penalty_step():
    assert penalty_step(1.0, 20, 100, False) == (1.3, True, "continue")
    assert penalty_step(1.0, 1, 100, True) == pytest.approx((1.2, True, "continue"))
    assert penalty_step(1.0, 0, 1000, True)[2] == "stop"
    assert penalty_step(1.0, 1, 1000, False) == (0.2, False, "restart")
    assert penalty_step(1.0, 0, 1000, False) == (0.2, False, "continue")
    assert penalty_step(9e5, 500, 1000, True)[0] == 1e6


def test_deterministic():
    weight, gram = layer()
    first, second = alps(weight, gram, Budget(0.7)), alps(weight, gram, Budget(0.7))
    assert torch.equal(first.weight, second.weight) and first.admm_iterations == second.admm_iterations


def test_initial_mask_scores_and_iteration_cap():
    weight, gram = layer()
    budget = Budget(0.5)
    hessian, scale = normalize(gram)
    start = project(weight, budget)  # plain |W|, not ALPS's |W| sqrt(H_jj)
    stuck = admm(weight * scale, hessian, budget, max_iterations=0, initial_mask=start)
    assert stuck.iterations == 0 and torch.equal(stuck.mask, project(weight * scale, budget))
    result = alps(weight, gram, budget, initial_mask=start, scores=torch.rand(weight.shape), max_iterations=6)
    assert result.admm_iterations <= 6 and int(result.mask.sum()) == budget.kept(weight.shape)
    # scores decide among equal magnitudes
    ties = torch.ones(2, 4)
    assert torch.equal(project(ties, Budget(0.5), scores=torch.arange(8.0).reshape(2, 4)),
                       torch.tensor([[False] * 4, [True] * 4]))


def test_dense_target_moves_the_refit():
    weight, gram = layer()
    _, other = layer(seed=3)
    plain = alps(weight, gram, Budget(0.5))
    blended = alps(weight, gram, Budget(0.5), cross=gram + 0.3 * (other - gram))
    assert int(blended.mask.sum()) == int(plain.mask.sum())
    assert not torch.allclose(plain.weight, blended.weight)
