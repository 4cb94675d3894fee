"""Mask extraction: structure parsing, N:M, unstructured (layer / row), rankings, global budget."""

from __future__ import annotations

import math
import re

import pytest
import torch

from unipruning_modifier import masks
from unipruning_modifier.structure import parse_mask_structure


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _distinct(shape, seed: int) -> torch.Tensor:
    """Distinct values in random order (no ties anywhere)."""
    n = math.prod(shape)
    return (torch.randperm(n, generator=_gen(seed)).float() + 1.0).reshape(shape)


# --------------------------------------------------------------------------- parse_mask_structure


@pytest.mark.parametrize(
    "text, expected",
    [
        ("unstructured", (0, 0)),
        (" Unstructured ", (0, 0)),
        ("0:0", (0, 0)),
        ("2:4", (2, 4)),
        (" 4 : 8 ", (4, 8)),
        ("1:4", (1, 4)),
        ("16:32", (16, 32)),
    ],
)
def test_parse_mask_structure_accepts(text, expected):
    assert parse_mask_structure(text) == expected


@pytest.mark.parametrize("text", ["3:2", "0:4", "4:4", "abc", "2:", "2-4", "-2:4", "2:4:8", ""])
def test_parse_mask_structure_rejects_naming_the_value(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_mask_structure(text)


# --------------------------------------------------------------------------- kept_count


@pytest.mark.parametrize(
    "total, sparsity, expected",
    [(91, 0.3, 64), (91, 0.5, 46), (91, 0.77, 21), (100, 0.5, 50), (100, 0.7, 30), (10, 0.0, 10), (10, 1.0, 0), (7, 0.99, 1)],
)
def test_kept_count(total, sparsity, expected):
    assert masks.kept_count(total, sparsity) == expected


# --------------------------------------------------------------------------- N:M


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_mask_keeps_the_n_largest_of_every_group(n, m):
    rows, cols = 6, 4 * m
    score = torch.randn(rows, cols, generator=_gen(n * 10 + m))
    mask = masks.nm_mask([score.abs()], n, m)
    assert mask.dtype == torch.bool and mask.shape == (rows, cols)
    grouped_mask = mask.reshape(rows, cols // m, m)
    grouped = score.abs().reshape(rows, cols // m, m)
    assert bool((grouped_mask.sum(-1) == n).all())
    kept_min = torch.where(grouped_mask, grouped, torch.full_like(grouped, math.inf)).amin(-1)
    dropped_max = torch.where(~grouped_mask, grouped, torch.full_like(grouped, -math.inf)).amax(-1)
    assert bool((kept_min > dropped_max).all())


def test_nm_mask_hand_example():
    score = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.5, 0.1, 0.9, 0.7]])
    expected = torch.tensor([[False, True, True, False, False, False, True, True]])
    assert torch.equal(masks.nm_mask([score], 2, 4), expected)
    assert torch.equal(
        masks.nm_mask([score], 4, 8), torch.tensor([[True, True, True, True, False, False, False, False]])
    )
    assert torch.equal(
        masks.nm_mask([score], 1, 4), torch.tensor([[False, True, False, False, False, False, True, False]])
    )


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 4), (4, 8), (1, 2)])
@pytest.mark.parametrize("levels", [2, 5, 100000])
@pytest.mark.parametrize("nkeys", [1, 2, 3])
def test_nm_mask_pairwise_ranks_equal_the_stable_sort(n, m, levels, nkeys):
    """Groups of up to 8 are ranked by pairwise comparisons: the same mask as the stable
    lexicographic sort, ties (few levels) included."""
    gen = _gen(levels + 10 * nkeys + m)
    keys = [torch.randint(0, levels, (16, 8 * m), generator=gen).float() for _ in range(nkeys)]
    grouped = [k.reshape(16, 8, m) for k in keys]
    expected = masks._keep_first(grouped, n, dim=-1).reshape(16, 8 * m)
    assert torch.equal(masks.nm_mask(keys, n, m), expected)


@pytest.mark.parametrize("cols, m", [(6, 4), (12, 8), (5, 4)])
def test_nm_mask_rejects_cols_not_multiple_of_m(cols, m):
    with pytest.raises(ValueError, match=str(cols)):
        masks.nm_mask([torch.rand(3, cols)], 2, m)


# --------------------------------------------------------------------------- unstructured / row


@pytest.mark.parametrize("shape", [(7, 13), (1, 1), (3, 5), (16, 16)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 0.9, 1.0])
def test_unstructured_mask_hits_kept_count_exactly_and_keeps_the_largest(shape, sparsity):
    score = _distinct(shape, seed=shape[0] * 31 + shape[1])
    mask = masks.unstructured_mask([score], sparsity)
    keep = masks.kept_count(score.numel(), sparsity)
    assert mask.shape == shape and mask.dtype == torch.bool
    assert int(mask.sum()) == keep
    flat = score.reshape(-1)
    expected = torch.zeros(flat.numel(), dtype=torch.bool)
    expected[flat.topk(keep).indices] = True
    assert torch.equal(mask.reshape(-1), expected)


def test_unstructured_mask_7x13_literal_counts():
    score = torch.rand(7, 13, generator=_gen(0))
    assert [int(masks.unstructured_mask([score], p).sum()) for p in (0.3, 0.5, 0.77)] == [64, 46, 21]


def test_unstructured_mask_explicit_keep():
    score = _distinct((4, 5), 0)
    assert int(masks.unstructured_mask([score], keep=7).sum()) == 7
    assert int(masks.unstructured_mask([score], keep=0).sum()) == 0


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_row_mask_keeps_kept_count_per_row(sparsity):
    score = _distinct((7, 13), 1)
    mask = masks.row_mask([score], sparsity)
    keep = masks.kept_count(13, sparsity)
    assert mask.sum(dim=1).tolist() == [keep] * 7
    for r in range(7):
        expected = torch.zeros(13, dtype=torch.bool)
        expected[score[r].topk(keep).indices] = True
        assert torch.equal(mask[r], expected)


# --------------------------------------------------------------------------- ties and rankings


def test_ties_of_primary_key_broken_by_second_key():
    primary = torch.zeros(9, 11)  # everything tied (e.g. Gamma zero everywhere)
    secondary = _distinct((9, 11), 2)
    mask = masks.unstructured_mask([primary, secondary], 0.5)
    keep = masks.kept_count(99, 0.5)
    expected = secondary.reshape(-1) > secondary.reshape(-1).sort(descending=True).values[keep]
    assert torch.equal(mask.reshape(-1), expected)


def test_primary_key_dominates_second_key():
    g = _gen(3)
    primary = (torch.rand(10, 10, generator=g) < 0.3).float()  # 0/1: a few "non-zero Gamma" entries
    secondary = _distinct((10, 10), 4)
    n_primary = int(primary.sum())
    keep = n_primary + 10
    mask = masks.unstructured_mask([primary, secondary], keep=keep)
    assert bool(mask[primary == 1].all())
    rest = secondary[primary == 0]
    threshold = rest.sort(descending=True).values[9]
    assert torch.equal(mask[primary == 0], rest >= threshold)


def test_row_and_nm_masks_break_ties_with_second_key():
    primary = torch.ones(3, 8)
    secondary = _distinct((3, 8), 5)
    nm = masks.nm_mask([primary, secondary], 2, 4)
    assert torch.equal(nm, masks.nm_mask([secondary], 2, 4))
    row = masks.row_mask([primary, secondary], 0.5)
    assert torch.equal(row, masks.row_mask([secondary], 0.5))


def test_rank_descending_is_lexicographic_and_stable():
    g = _gen(6)
    n = 200
    keys = [torch.randint(0, 3, (n,), generator=g).float() for _ in range(3)]
    order = masks.rank_descending(keys).tolist()
    k = [key.tolist() for key in keys]
    expected = sorted(range(n), key=lambda i: (-k[0][i], -k[1][i], -k[2][i], i))
    assert order == expected


def test_rank_descending_along_rows():
    g = _gen(7)
    keys = [torch.randint(0, 2, (5, 12), generator=g).float(), torch.randint(0, 4, (5, 12), generator=g).float()]
    order = masks.rank_descending(keys, dim=-1)
    for r in range(5):
        k0, k1 = keys[0][r].tolist(), keys[1][r].tolist()
        expected = sorted(range(12), key=lambda i: (-k0[i], -k1[i], i))
        assert order[r].tolist() == expected


def test_rank_descending_single_key():
    key = torch.tensor([0.5, 3.0, -1.0, 3.0, 2.0])
    assert masks.rank_descending([key]).tolist() == [1, 3, 4, 0, 2]


# --------------------------------------------------------------------------- first_step ordering


def test_first_step_key_orders_earliest_first_never_last():
    first = torch.tensor([3, 0, -1, 7, 1], dtype=torch.int32)
    key = masks.first_step_key(first)
    assert masks.rank_descending([key]).tolist() == [1, 4, 0, 3, 2]


def test_saliency_keys_first_step_nm_order():
    gamma = torch.tensor(
        [
            [0.9, 0.1, 5.0, 0.2, 0.5, 0.9, 0.1, 0.2, -0.3, 0.1, 0.5, -0.7],
        ]
    )
    first = torch.tensor([[3, 1, -1, 1, -1, -1, 0, -1, 2, 2, 2, 2]], dtype=torch.int32)
    keys = masks.saliency_keys(gamma, first_step=first, nm_order="first_step")
    assert len(keys) == 2
    mask = masks.nm_mask(keys, 2, 4)
    expected = torch.tensor(
        [
            [
                False, True, False, True,  # the two entered at step 1, though 0.9 and 5.0 are larger
                False, True, True, False,  # step 0 first, then the largest |Gamma| among the -1s
                False, False, True, True,  # all at step 2: |Gamma| decides
            ]
        ]
    )
    assert torch.equal(mask, expected)
    # plain |Gamma| order for comparison
    plain = masks.nm_mask(masks.saliency_keys(gamma), 2, 4)
    assert torch.equal(plain[0, :4], torch.tensor([True, False, True, False]))


def test_saliency_keys_first_step_then_gamma_then_anchor():
    gamma = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.3, -0.3])
    anchor = torch.tensor([1.0, 2.0, -3.0, 0.5, 0.1, 0.2])
    first = torch.tensor([-1, -1, -1, 4, 2, 2], dtype=torch.int32)
    keys = masks.saliency_keys(gamma, anchor, first, nm_order="first_step")
    assert len(keys) == 3
    # step 2 (two tied on |Gamma| -> anchor 0.2 before 0.1), step 4, then -1s by |anchor|
    assert masks.rank_descending(keys).tolist() == [5, 4, 3, 2, 1, 0]


def test_saliency_keys_default_is_abs_gamma_then_abs_anchor():
    gamma = torch.tensor([-2.0, 1.0, 0.0, 0.0])
    anchor = torch.tensor([0.0, 0.0, -5.0, 3.0])
    keys = masks.saliency_keys(gamma, anchor)
    assert torch.equal(keys[0], gamma.abs()) and torch.equal(keys[1], anchor.abs())
    assert masks.rank_descending(keys).tolist() == [0, 1, 2, 3]


def test_saliency_keys_errors():
    gamma = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="first_step"):
        masks.saliency_keys(gamma, nm_order="first_step")
    with pytest.raises(ValueError, match="earliest"):
        masks.saliency_keys(gamma, nm_order="earliest")


# --------------------------------------------------------------------------- global allocation


def _layers(seed: int, shapes, scale=None):
    g = _gen(seed)
    out = {}
    for i, shape in enumerate(shapes):
        s = torch.randn(shape, generator=g)
        if scale is not None:
            s = s * scale[i]
        out[f"layer{i}"] = s
    return out


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 0.9])
@pytest.mark.parametrize("clamp", [None, 0.1, 0.25])
def test_global_allocation_total_is_exact(sparsity, clamp):
    scores = _layers(0, [(7, 13), (16, 16), (5, 3), (32, 8)], scale=[1.0, 3.0, 0.2, 1.0])
    total = sum(s.numel() for s in scores.values())
    keep = masks.global_allocation(scores, sparsity, clamp)
    assert list(keep) == list(scores)
    assert sum(keep.values()) == masks.kept_count(total, sparsity)
    for name, k in keep.items():
        assert 0 <= k <= scores[name].numel()


def test_global_allocation_clamp_binds_when_one_layer_dominates():
    g = _gen(1)
    big = torch.rand(10, 10, generator=g) * 100 + 100  # in [100, 200]
    small = torch.rand(10, 10, generator=g) + 1  # in [1, 2]
    scores = {"big": big, "small": small}
    # without a clamp the global threshold keeps all of "big" and none of "small"
    assert masks.global_allocation(scores, 0.5) == {"big": 100, "small": 0}
    # with a clamp of 0.1 every layer's sparsity stays in [0.4, 0.6]
    assert masks.global_allocation(scores, 0.5, clamp=0.1) == {"big": 60, "small": 40}
    assert masks.global_allocation(scores, 0.5, clamp=0.25) == {"big": 75, "small": 25}


@pytest.mark.parametrize("sparsity, clamp", [(0.5, 0.1), (0.6, 0.05), (0.3, 0.2)])
def test_global_allocation_layer_sparsity_stays_inside_clamp(sparsity, clamp):
    """Odd sizes: every layer's sparsity 1 - keep/numel must lie in [p - clamp, p + clamp]."""
    g = _gen(2)
    scores = {
        "a": torch.rand(7, 13, generator=g) * 100,  # dominates: pushed to its lowest sparsity
        "b": torch.rand(9, 11, generator=g),
        "c": torch.rand(5, 17, generator=g) * 0.01,  # pushed to its highest sparsity
    }
    total = sum(s.numel() for s in scores.values())
    keep = masks.global_allocation(scores, sparsity, clamp)
    assert sum(keep.values()) == masks.kept_count(total, sparsity)
    for name, k in keep.items():
        layer_sparsity = 1 - k / scores[name].numel()
        assert sparsity - clamp - 1e-9 <= layer_sparsity <= sparsity + clamp + 1e-9, (name, k, layer_sparsity)


def test_global_allocation_ties_at_threshold_give_exact_total():
    scores = {"a": torch.full((10,), 0.5), "b": torch.full((20,), 0.5), "c": torch.full((40,), 0.5)}
    for sparsity in (0.3, 0.5, 0.77):
        keep = masks.global_allocation(scores, sparsity)
        assert sum(keep.values()) == masks.kept_count(70, sparsity)
        keep = masks.global_allocation(scores, sparsity, clamp=0.2)
        assert sum(keep.values()) == masks.kept_count(70, sparsity)
        for name, k in keep.items():
            n = scores[name].numel()
            assert masks.kept_count(n, min(1.0, sparsity + 0.2)) <= k <= n - math.ceil(round((sparsity - 0.2) * n, 6))


def test_global_allocation_ties_mixed_with_distinct_values():
    # 30 values above the tie, 40 tied values, 30 below; keep 50 -> 20 of the tied ones
    above = torch.linspace(10, 20, 30)
    tied = torch.full((40,), 5.0)
    below = torch.linspace(0.1, 1, 30)
    all_values = torch.cat([above, tied, below])[torch.randperm(100, generator=_gen(3))]
    scores = {"a": all_values[:37], "b": all_values[37:]}
    keep = masks.global_allocation(scores, 0.5)
    assert sum(keep.values()) == 50
    for name, k in keep.items():
        s = scores[name]
        assert int((s > 5).sum()) <= k <= int((s >= 5).sum())


def test_global_allocation_ignores_sign():
    scores = _layers(4, [(6, 6), (3, 9)])
    negated = {k: -v for k, v in scores.items()}
    absolute = {k: v.abs() for k, v in scores.items()}
    assert masks.global_allocation(scores, 0.6) == masks.global_allocation(absolute, 0.6)
    assert masks.global_allocation(negated, 0.6) == masks.global_allocation(absolute, 0.6)


@pytest.mark.parametrize("clamp", [0.0, -0.1])
def test_global_allocation_impossible_clamp_raises(clamp):
    # clamp 0 on two layers of 3: each must keep exactly ceil(1.5) = 2, but the total is ceil(3) = 3
    scores = {"a": torch.rand(3), "b": torch.rand(3)}
    with pytest.raises(ValueError, match="unreachable"):
        masks.global_allocation(scores, 0.5, clamp=clamp)


def _brute_force_bounds(scores, sparsity):
    rounded = {n: s.abs().to(torch.bfloat16).float().reshape(-1) for n, s in scores.items()}
    everything = torch.cat(list(rounded.values()))
    target = masks.kept_count(everything.numel(), sparsity)
    threshold = everything.sort(descending=True).values[target - 1]
    return {n: (int((r > threshold).sum()), int((r >= threshold).sum())) for n, r in rounded.items()}, target


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.77, 0.95])
def test_global_allocation_matches_brute_force_top_k_up_to_ties(sparsity):
    # different magnitudes per layer and many bf16 ties (fp32 values rounded to 8 mantissa bits)
    scores = _layers(5, [(7, 13), (16, 16), (5, 3), (32, 8), (11, 11)], scale=[1.0, 2.0, 0.5, 1e-3, 40.0])
    bounds, target = _brute_force_bounds(scores, sparsity)
    keep = masks.global_allocation(scores, sparsity, clamp=1.0)
    assert sum(keep.values()) == target
    for name, k in keep.items():
        low, high = bounds[name]
        assert low <= k <= high, (name, k, low, high)


@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.9])
def test_global_allocation_matches_brute_force_exactly_without_ties(sparsity):
    # distinct bf16 bit patterns over a wide dynamic range: the global top-k is unique
    codes = torch.randperm(0x7F00, generator=_gen(6))[:600] + 1
    values = codes.to(torch.int16).view(torch.bfloat16).float()
    scores = {"a": values[:91].reshape(7, 13), "b": values[91:347].reshape(16, 16), "c": -values[347:]}
    bounds, target = _brute_force_bounds(scores, sparsity)
    keep = masks.global_allocation(scores, sparsity, clamp=1.0)
    assert keep == {name: high for name, (low, high) in bounds.items()}
    # no ties: only the threshold value itself sits in [low, high]
    assert sum(high for low, high in bounds.values()) == target
    assert sum(high - low for low, high in bounds.values()) == 1
    assert keep == masks.global_allocation(scores, sparsity)  # clamp None behaves like 1.0


@pytest.mark.parametrize("levels", [3, 50, 100000, None])
@pytest.mark.parametrize("nkeys", [1, 2, 3])
@pytest.mark.parametrize("total", [5000, 70000], ids=["small", "bracketed"])
def test_top_mask_1d_equals_the_stable_sort(levels, nkeys, total):
    """The threshold path keeps exactly what the full lexicographic sort keeps, ties (few
    levels) included, below and above the size where kth_largest brackets."""
    from unipruning_modifier.masks import _keep_first, top_mask_1d

    gen = torch.Generator().manual_seed((levels or 7) + nkeys)
    draw = (lambda: torch.rand(total, generator=gen)) if levels is None else (lambda: torch.randint(0, levels, (total,), generator=gen).float())
    keys = [draw() for _ in range(nkeys)]
    for keep in (0, 1, 777, total // 2, total - 1, total):
        assert torch.equal(top_mask_1d(keys, keep), _keep_first(keys, keep)), keep


@pytest.mark.parametrize("kind", ["normal", "ties", "constant", "skewed"])
def test_kth_largest_is_exact_on_large_inputs(kind):
    """The sample-bracket route returns exactly what a full kthvalue does, at every rank,
    ties and a constant input included."""
    from unipruning_modifier.masks import _BRACKET_FROM, kth_largest

    gen = torch.Generator().manual_seed(7)
    total = _BRACKET_FROM + 12345
    values = {
        "normal": lambda: torch.randn(total, generator=gen).abs(),
        "ties": lambda: torch.randint(0, 20, (total,), generator=gen).float(),
        "constant": lambda: torch.full((total,), 0.5),
        "skewed": lambda: torch.randn(total, generator=gen).exp().pow(4) * (torch.arange(total) % 512 == 0),
    }[kind]()
    for keep in (1, 2, 100, total // 3, total // 2, total - 100, total - 1, total):
        threshold, all_ties_fit = kth_largest(values, keep)
        assert torch.equal(threshold, values.kthvalue(total - keep + 1).values), keep
        assert not all_ties_fit or int((values >= threshold).sum()) == keep, keep


def test_kth_largest_falls_back_when_the_sample_misses(monkeypatch):
    """A sample that brackets the wrong place (here: one made of the largest values only) still
    gives the exact answer, by searching the whole input."""
    from unipruning_modifier import masks

    values = torch.randn(masks._BRACKET_FROM, generator=torch.Generator().manual_seed(3))
    top = values.argsort(descending=True)[: masks._BRACKET_SAMPLE]
    monkeypatch.setattr(masks.torch, "randint", lambda *args, **kwargs: top)
    for keep in (10, values.numel() // 2):
        assert torch.equal(masks.kth_largest(values, keep)[0], values.kthvalue(values.numel() - keep + 1).values)


# --------------------------------------------------------------------------- OWL allocation
def test_owl_sparsity_gives_layers_with_more_outliers_a_lower_sparsity():
    g = torch.Generator().manual_seed(0)
    anchors, groups = {}, {}
    for block, outliers in enumerate((0.0, 0.01, 0.04)):
        for part in ("q", "down"):
            values = torch.rand(32, 64, generator=g)
            values.view(-1)[: int(outliers * values.numel())] = 50.0  # far above 5x the mean
            anchors[f"layers.{block}.{part}"] = values
            groups[f"layers.{block}.{part}"] = f"layers.{block}"
    sparsity = masks.owl_sparsity(anchors, groups, 0.7, lam=0.08, threshold=5.0)
    per_block = [sparsity[f"layers.{b}.q"] for b in range(3)]
    assert all(sparsity[f"layers.{b}.q"] == sparsity[f"layers.{b}.down"] for b in range(3))
    assert per_block[0] > per_block[1] > per_block[2]  # more outliers, fewer weights pruned
    assert per_block[0] - per_block[2] == pytest.approx(0.16)
    assert sum(per_block) / 3 == pytest.approx(0.7)


def test_owl_sparsity_without_outlier_differences_is_uniform_and_checks_bounds():
    anchors = {"a": torch.ones(4, 4), "b": torch.ones(4, 4)}
    assert masks.owl_sparsity(anchors, {"a": "0", "b": "1"}, 0.5) == {"a": 0.5, "b": 0.5}
    skewed = {"a": torch.ones(4, 4), "b": torch.tensor([100.0] + [1.0] * 15).view(4, 4)}
    with pytest.raises(ValueError, match="owl lambda 0.5"):
        masks.owl_sparsity(skewed, {"a": "0", "b": "1"}, 0.9, lam=0.5)
