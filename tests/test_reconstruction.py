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


@pytest.mark.parametrize(("features", "first_block"), [(400, 256), (1000, 384)], ids=["2-blocks", "3-blocks"])
def test_gram_of_wide_inputs_is_computed_on_blocks_and_mirrored(features, first_block):
    """Past 384 inputs XᵀX is accumulated on its upper block triangle (2 and 3 blocks here); the
    running mean still matches the fp64 product, and the mirrored blocks are exact transposes."""
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(2, 60 + b, features, generator=g) for b in range(3)]
    gram, count = None, 0
    for batch in batches:
        gram, count = accumulate_gram(batch, gram, count)
    flat = torch.cat([b.reshape(-1, features) for b in batches]).double()
    torch.testing.assert_close(gram.double(), flat.T @ flat / count, rtol=1e-5, atol=1e-6)
    assert torch.equal(gram[:first_block, first_block:], gram[first_block:, :first_block].T)


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


def dense_and_drifted(seed=0):
    """A layer's dense-model inputs D and the drifted inputs X the pruned earlier layers give."""
    weight, dense = layer(seed=seed)
    g = torch.Generator().manual_seed(seed + 11)
    mixing = torch.eye(dense.shape[1]) + 0.1 * torch.randn(dense.shape[1], dense.shape[1], generator=g)
    drifted = dense @ mixing + 0.1 * torch.randn(dense.shape, generator=g)  # mostly predictable drift
    return weight, dense, drifted


def test_cross_matrix_is_the_running_mean_of_paired_outer_products():
    _, dense, drifted = dense_and_drifted()
    cross, count = None, 0
    for x, d in zip(drifted.split(256), dense.split(256)):
        cross, count = accumulate_gram(x.reshape(2, 128, -1), cross, count, paired=d.reshape(2, 128, -1))
    torch.testing.assert_close(cross, drifted.T @ dense / dense.shape[0], rtol=1e-4, atol=1e-3)


def test_cross_equal_to_gram_is_the_plain_refit():
    weight, x = layer()
    gram, _ = accumulate_gram(x)
    mask = unstructured_mask([torch.rand(weight.shape, generator=torch.Generator().manual_seed(3))], 0.5)
    torch.testing.assert_close(
        least_squares(weight, gram, mask, cross=gram.clone(), tolerance=1e-8, max_iterations=500),
        least_squares(weight, gram, mask, tolerance=1e-8, max_iterations=500),
        rtol=1e-4, atol=1e-5,
    )


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_dense_target_refit_matches_exact_solve_and_beats_plain_refit_on_dense_outputs(structure):
    weight, dense, drifted = dense_and_drifted()
    gram, _ = accumulate_gram(drifted)
    cross, _ = accumulate_gram(drifted, paired=dense)
    scores = [torch.rand(weight.shape, generator=torch.Generator().manual_seed(5))]
    mask = unstructured_mask(scores, 0.6) if structure == "unstructured" else nm_mask(scores, 2, 4)
    fitted = least_squares(weight, gram, mask, cross=cross, max_iterations=500, tolerance=1e-10)
    exact = exact_solve(weight, gram, mask, cross=cross)
    assert torch.all(fitted[~mask] == 0)
    torch.testing.assert_close(fitted.double(), exact, rtol=1e-3, atol=5e-4)  # weights ~1, fp32 CG

    def dense_output_error(candidate):
        return float(((dense @ weight.T - drifted @ candidate.T) ** 2).mean())

    plain = least_squares(weight, gram, mask, max_iterations=500, tolerance=1e-10)
    assert dense_output_error(fitted) < 0.8 * dense_output_error(plain)
