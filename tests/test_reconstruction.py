"""Least-squares re-fit of the kept weights: matches the exact per-row solve, keeps the mask."""

from __future__ import annotations

import pytest
import torch

from unipruning_modifier.masks import nm_mask, unstructured_mask
from unipruning_modifier.reconstruction import (
    accumulate_gram,
    dampen,
    exact_solve,
    least_squares,
    reconstruction_error,
)


def layer(out=48, inp=96, tokens=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g) * 0.3 + torch.eye(inp)
    x = torch.randn(tokens, inp, generator=g) @ mix
    x[:, :3] *= 20  # outlier features, as in LLM activations
    return torch.randn(out, inp, generator=g), x


def test_gram_is_the_running_mean_of_outer_products():
    _, x = layer()
    gram, count = None, 0
    for chunk in x.split(256):  # batches shaped [samples, tokens, features]
        gram, count = accumulate_gram(chunk.reshape(2, 128, x.shape[1]), gram, count)
    assert count == x.shape[0]
    torch.testing.assert_close(gram, x.T @ x / x.shape[0], rtol=1e-4, atol=1e-3)


def test_dampen_adds_fraction_of_mean_diagonal_and_fixes_dead_inputs():
    gram = torch.diag(torch.tensor([2.0, 0.0, 4.0]))
    damped = dampen(gram, 0.1)
    # dead input gets 1, then mean diag (2+1+4)/3 * 0.1 is added everywhere
    torch.testing.assert_close(damped.diagonal(), torch.tensor([2.0, 1.0, 4.0]) + 7.0 / 30)
    assert gram[1, 1] == 0  # input not modified


@pytest.mark.parametrize("structure", ["unstructured", "2:4", "4:8"])
@pytest.mark.parametrize("seed", [0, 1])
def test_conjugate_gradients_match_the_exact_solve(structure, seed):
    weight, x = layer(seed=seed)
    gram, _ = accumulate_gram(x)
    scores = [torch.rand(weight.shape, generator=torch.Generator().manual_seed(seed + 7))]
    if structure == "unstructured":
        mask = unstructured_mask(scores, 0.6)
    else:
        n, m = map(int, structure.split(":"))
        mask = nm_mask(scores, n, m)
    fitted = least_squares(weight, gram, mask, damping=0.01, max_iterations=500, tolerance=1e-10)
    exact = exact_solve(weight, gram, mask, damping=0.01)
    assert torch.all(fitted[~mask] == 0)
    torch.testing.assert_close(fitted.double(), exact, rtol=1e-3, atol=1e-4)
    masked_error = reconstruction_error(weight, weight * mask, gram)
    assert reconstruction_error(weight, fitted, gram) < 0.9 * masked_error


def test_rows_with_nothing_kept_stay_zero():
    weight, x = layer(out=4, inp=16)
    gram, _ = accumulate_gram(x)
    mask = torch.ones_like(weight, dtype=torch.bool)
    mask[1] = False
    fitted = least_squares(weight, gram, mask)
    assert torch.all(fitted[1] == 0) and torch.isfinite(fitted).all()


def test_full_mask_returns_the_original_weights():
    weight, x = layer(out=8, inp=32)
    gram, _ = accumulate_gram(x)
    fitted = least_squares(weight, gram, torch.ones_like(weight, dtype=torch.bool))
    torch.testing.assert_close(fitted, weight)
