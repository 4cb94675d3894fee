"""Per-tensor codecs and state-dict compression of the legacy sparse checkpoint formats.

References are written independently in numpy (np.packbits(..., bitorder="little")); the
byte-for-byte comparison with compressed-tensors 0.14.0.1 itself is test_checkpoint_compat.py.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from unipruning_modifier.checkpoint import (
    FORMATS,
    SparseFormatError,
    compress,
    compress_sparse_24_bitmask,
    compress_sparse_bitmask,
    compress_state_dict,
    decompress,
    decompress_sparse_24_bitmask,
    decompress_sparse_bitmask,
    decompress_state_dict,
    get_codec,
    mask_24,
    pack_bitmask,
    sparsity_config,
    storage_bytes,
    unpack_bitmask,
)
from unipruning_modifier.checkpoint import sparse_24_bitmask as codecs

DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp8": torch.float8_e4m3fn,
    "int8": torch.int8,
}
INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32}


# ------------------------------------------------------------------------------------------
# builders and numpy references
# ------------------------------------------------------------------------------------------
def raw(t: torch.Tensor) -> np.ndarray:
    """The bytes of a tensor as an integer numpy array (works for fp8 / bf16)."""
    t = t.detach().cpu().contiguous()
    if t.dtype in (torch.uint8, torch.int64):
        return t.numpy()
    return t.view(INT_VIEW[t.element_size()]).numpy()


def nonzero_values(shape, dtype, gen) -> torch.Tensor:
    """Values with |v| away from zero (no underflow to 0 after the cast); int8 covers -128..127."""
    if dtype == torch.int8:
        v = torch.randint(1, 129, shape, generator=gen) * (torch.randint(0, 2, shape, generator=gen) * 2 - 1)
        return v.clamp(-128, 127).to(torch.int8)
    mag = torch.rand(shape, generator=gen) * 1.5 + 0.5
    sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    return (mag * sign).to(dtype)


def make_24(rows, cols, dtype, seed=0) -> torch.Tensor:
    """Exactly 2 nonzeros in every group of 4 (random positions)."""
    gen = torch.Generator().manual_seed(seed)
    w = nonzero_values((rows, cols), dtype, gen)
    order = torch.rand(rows, cols // 4, 4, generator=gen).argsort(-1)
    keep = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(-1, order[..., :2], True)
    return torch.where(keep.reshape(rows, cols), w, torch.zeros((), dtype=dtype))


def make_unstructured(rows, cols, dtype, sparsity=0.6, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = nonzero_values((rows, cols), dtype, gen)
    keep = torch.rand(rows, cols, generator=gen) >= sparsity
    return torch.where(keep, w, torch.zeros((), dtype=dtype))


def nonzero_mask_np(w: torch.Tensor) -> np.ndarray:
    if w.dtype == torch.float8_e4m3fn:
        return (raw(w) & 0x7F) != 0
    if w.dtype in (torch.bfloat16, torch.float16):
        return w.float().numpy() != 0
    return w.numpy() != 0


def reference_24(w: torch.Tensor) -> dict[str, np.ndarray]:
    """For a weight with exactly 2 nonzeros per group: the mask is the nonzeros."""
    mask = nonzero_mask_np(w)
    rows, cols = w.shape
    assert (mask.reshape(rows, cols // 4, 4).sum(-1) == 2).all()
    return {
        "compressed": raw(w)[mask].reshape(rows, cols // 2),
        "bitmask": np.packbits(mask, axis=-1, bitorder="little"),
        "shape": np.array([[rows], [cols]], dtype=np.int64),
    }


def reference_bitmask(w: torch.Tensor) -> dict[str, np.ndarray]:
    mask = nonzero_mask_np(w)
    counts = mask.sum(-1).astype(np.int64)
    return {
        "compressed": raw(w)[mask],
        "bitmask": np.packbits(mask, axis=-1, bitorder="little"),
        "shape": np.array(w.shape, dtype=np.int64),
        "row_offsets": np.cumsum(counts) - counts,
    }


def assert_bytes_equal(ours: dict[str, torch.Tensor], ref: dict[str, np.ndarray]):
    assert set(ours) == set(ref)
    for key, expected in ref.items():
        got = raw(ours[key])
        assert got.dtype == expected.dtype, key
        assert got.shape == expected.shape, key
        np.testing.assert_array_equal(got, expected, err_msg=key)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(raw(a), raw(b))


# ------------------------------------------------------------------------------------------
# round trips and byte equality
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", [(16, 64), (5, 12), (3, 4)])
def test_24_round_trip_and_bytes(dtype, shape):
    w = make_24(*shape, dtype, seed=shape[1])
    out = compress_sparse_24_bitmask(w, "layer.q_proj")
    assert out["compressed"].dtype == dtype and out["compressed"].shape == (shape[0], shape[1] // 2)
    assert out["bitmask"].dtype == torch.uint8 and out["bitmask"].shape == (shape[0], (shape[1] + 7) // 8)
    assert out["shape"].dtype == torch.int64 and out["shape"].shape == (2, 1)
    assert_bytes_equal(out, reference_24(w))
    dense = decompress_sparse_24_bitmask(out["compressed"], out["bitmask"], out["shape"], dtype, "layer.q_proj")
    assert same(dense, w)
    assert same(decompress(out, "sparse-24-bitmask", name="x"), w)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", [(16, 64), (5, 13), (7, 1), (4, 9)])
def test_bitmask_round_trip_and_bytes(dtype, shape):
    w = make_unstructured(*shape, dtype, seed=shape[1])
    out = compress_sparse_bitmask(w, "layer.up_proj")
    assert out["compressed"].dim() == 1 and out["compressed"].dtype == dtype
    assert out["bitmask"].shape == (shape[0], (shape[1] + 7) // 8)  # ceil(in/8) for odd widths
    assert out["shape"].dtype == torch.int64 and out["shape"].shape == (2,)
    assert out["row_offsets"].dtype == torch.int64 and out["row_offsets"].shape == (shape[0],)
    assert_bytes_equal(out, reference_bitmask(w))
    dense = decompress_sparse_bitmask(
        out["compressed"], out["bitmask"], out["shape"], dtype, row_offsets=out["row_offsets"], name="layer.up_proj"
    )
    assert same(dense, w)
    assert same(decompress(out, "sparse_bitmask"), w)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_24_groups_with_fewer_nonzeros_are_lossless(dtype):
    # all-zero groups and single-nonzero groups: the stored zeros come from the tie rule
    w = make_24(8, 32, dtype, seed=3)
    w[0] = 0
    w[1, ::4] = 0
    w[2, 1::2] = 0
    out = compress_sparse_24_bitmask(w, "t")
    mask = unpack_bitmask(out["bitmask"], 32)
    assert (mask.view(8, 8, 4).sum(-1) == 2).all()
    assert same(decompress_sparse_24_bitmask(out["compressed"], out["bitmask"], out["shape"], name="t"), w)


def test_unstructured_edge_values():
    # -0.0 counts as zero (comes back as +0.0), NaN / inf are kept, fp8 all 256 bit patterns
    w = torch.tensor([[0.0, -0.0, float("nan"), 1.0, float("inf"), -2.0, 0.0, 3.0, -0.0]])
    out = compress_sparse_bitmask(w, "t")
    assert out["compressed"].numel() == 5
    back = decompress_sparse_bitmask(out["compressed"], out["bitmask"], out["shape"], name="t")
    assert torch.equal(torch.isnan(back), torch.isnan(w))
    assert back[0, 1].item() == 0 and not torch.signbit(back[0, 1])
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.int8).view(torch.float8_e4m3fn).view(16, 16)
    out = compress_sparse_bitmask(every, "fp8")
    assert out["compressed"].numel() == 254  # all but +0.0 and -0.0
    back = decompress_sparse_bitmask(out["compressed"], out["bitmask"], out["shape"], name="fp8")
    expected = every.view(torch.int8).clone()
    expected[(expected & 0x7F) == 0] = 0
    assert torch.equal(back.view(torch.int8), expected)


@pytest.mark.parametrize("fmt", ["sparse-24-bitmask", "sparse-bitmask"])
@pytest.mark.parametrize("shape", [(0, 8), (4, 0), (0, 0), (1, 4)])
def test_empty_and_tiny_shapes(fmt, shape):
    w = torch.zeros(shape, dtype=torch.bfloat16)
    out = compress(w, fmt, name="t")
    assert out["bitmask"].shape == (shape[0], (shape[1] + 7) // 8)
    assert same(decompress(out, fmt, name="t"), w)


@pytest.mark.parametrize("prune", [False, True])
def test_non_contiguous_weight(prune):
    w = make_24(32, 16, torch.float16, seed=9).t().contiguous().t()  # [32, 16], column-major strides
    assert not w.is_contiguous()
    ref = compress_sparse_24_bitmask(w.contiguous(), "t", prune=prune)
    out = compress_sparse_24_bitmask(w, "t", prune=prune)
    for key in ref:
        assert same(out[key], ref[key]), key
    bm = compress_sparse_bitmask(w, "t")
    assert same(decompress(bm, "sparse-bitmask"), w.contiguous())


def test_pack_unpack_match_numpy():
    gen = torch.Generator().manual_seed(0)
    for cols in (1, 7, 8, 9, 16, 23, 64):
        mask = torch.rand(6, cols, generator=gen) < 0.5
        packed = pack_bitmask(mask)
        np.testing.assert_array_equal(packed.numpy(), np.packbits(mask.numpy(), axis=-1, bitorder="little"))
        assert torch.equal(unpack_bitmask(packed, cols), mask)


# ------------------------------------------------------------------------------------------
# 2:4 selection rule (compressed-tensors' topk tie-breaking, dtype quirks)
# ------------------------------------------------------------------------------------------
def topk_mask_like_ct(w: torch.Tensor) -> torch.Tensor:
    """compressed-tensors 0.14.0.1 get_24_bytemasks, written out (CPU topk)."""
    t = w.cpu()
    if t.dtype == torch.float8_e4m3fn:
        t = t.view(torch.int8)
    groups = t.reshape(-1, 4).abs()
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(2, dim=1).indices, True)
    return mask.view(w.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int64])
def test_tie_table_matches_cpu_topk(dtype):
    levels = [0.0, 1.0, 2.0, 3.0] + ([float("nan")] if dtype.is_floating_point else [])
    groups = torch.tensor(list(itertools.product(levels, repeat=4)), dtype=torch.float32).to(dtype)
    want = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(2, dim=1).indices, True)
    codes_ = codecs._tie_codes(groups.view(-1, 1, 4)).view(-1).long()
    table = torch.tensor(codecs._TIE_TABLE)
    got = ((table[codes_].unsqueeze(-1) >> torch.arange(4)) & 1).bool()
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_strict_path_equals_full_ranking_on_24_weights(dtype):
    # the strict (default) path ranks by zero / nonzero classes only; on a 2:4 weight it must
    # agree with the full compressed-tensors ranking, signed zeros and empty groups included
    gen = torch.Generator().manual_seed(7)
    w = make_24(64, 64, dtype, seed=7)
    bits = w.view(INT_VIEW[w.element_size()])  # fp8 has no masked_fill: write the bits
    bits[torch.rand(64, 64, generator=gen) < 0.3] = 0
    if dtype.is_floating_point:  # turn half of the zeros into -0.0
        zeros = torch.from_numpy(~nonzero_mask_np(w))
        bits[zeros & (torch.rand(64, 64, generator=gen) < 0.5)] = torch.tensor(-0.0).to(dtype).view(bits.dtype).item()
        assert torch.signbit(w.float()[zeros]).any()
    strict = compress_sparse_24_bitmask(w, "t")
    full = compress_sparse_24_bitmask(w, "t", prune=True)
    for key in strict:
        assert same(strict[key], full[key]), key
    if dtype != torch.int8:
        mask = topk_mask_like_ct(w)
        np.testing.assert_array_equal(strict["bitmask"].numpy(), np.packbits(mask.numpy(), axis=-1, bitorder="little"))


def test_pack_bitmask_every_byte():
    flags = torch.tensor([[(v >> j) & 1 for j in range(8)] for v in range(256)], dtype=torch.bool)
    assert pack_bitmask(flags).view(-1).tolist() == list(range(256))
    wide = flags.reshape(16, 128)
    np.testing.assert_array_equal(pack_bitmask(wide).numpy(), np.packbits(wide.numpy(), axis=-1, bitorder="little"))


def test_tie_rule_is_not_lowest_index_first():
    # documented surprises of CPU topk: an all-zero group keeps columns 2 and 3
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    assert mask_24(w).tolist() == [[False, False, True, True, True, False, True, False, False, False, True, True]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_prune_mode_equals_ct_topk(dtype):
    # small integers force many ties; dense groups exercise the full ranking
    gen = torch.Generator().manual_seed(1)
    w = (torch.randint(-3, 4, (64, 64), generator=gen).float() * 0.5).to(dtype)
    w[:, 8:16] = 0
    if dtype == torch.float32:
        w[3, 5] = float("nan")
        w[4, :4] = float("nan")
    out = compress_sparse_24_bitmask(w, "t", prune=True)
    mask = topk_mask_like_ct(w)
    np.testing.assert_array_equal(out["bitmask"].numpy(), np.packbits(mask.numpy(), axis=-1, bitorder="little"))
    np.testing.assert_array_equal(raw(out["compressed"]), raw(w)[mask.numpy()].reshape(64, 32))


def test_fp8_ranking_follows_int8_view():
    # compressed-tensors ranks fp8 by abs(int8 view): -8.0 (0xD0 -> |-48| = 48) loses to
    # -0.5 (0xB0 -> 80) and to 1.0 (0x38 -> 56), so the largest magnitude is dropped
    w = torch.tensor([[-8.0, -0.5, 1.0, 0.0]]).to(torch.float8_e4m3fn)
    assert mask_24(w).tolist() == [[False, True, True, False]]
    assert topk_mask_like_ct(w).tolist() == [[False, True, True, False]]


def test_int8_minus_128_is_kept():
    # compressed-tensors' int8 abs() leaves -128 at -128 (below 0) and drops it; we keep it
    w = torch.tensor([[-128, 0, 0, 5, 0, -128, 0, 0]], dtype=torch.int8)
    out = compress_sparse_24_bitmask(w, "t")
    assert out["compressed"].tolist() == [[-128, 5, -128, 0]]
    assert torch.equal(decompress_sparse_24_bitmask(out["compressed"], out["bitmask"], out["shape"], name="t"), w)
    assert not topk_mask_like_ct(w)[0, 0]  # what compressed-tensors would have stored


def test_not_24_refused_unless_prune():
    w = torch.ones(2, 8)
    with pytest.raises(SparseFormatError, match=r"'model.layers.0.mlp.up_proj'.*not 2:4 sparse.*row 0, columns 0-3"):
        compress_sparse_24_bitmask(w, "model.layers.0.mlp.up_proj")
    out = compress_sparse_24_bitmask(w, "x", prune=True)
    assert out["compressed"].shape == (2, 4)


# ------------------------------------------------------------------------------------------
# size
# ------------------------------------------------------------------------------------------
def test_24_bf16_bytes_ratio():
    w = make_24(256, 512, torch.bfloat16)
    out = compress_sparse_24_bitmask(w, "t")
    ratio = (storage_bytes({k: out[k] for k in ("compressed", "bitmask")})) / (w.numel() * w.element_size())
    assert ratio == pytest.approx(0.5 + 1 / 16)  # half the values + 1 bit per weight / 16 bits
    assert ratio <= 0.6
    with_shape = storage_bytes(out) / (w.numel() * w.element_size())
    assert with_shape < 0.563


# ------------------------------------------------------------------------------------------
# errors name the tensor
# ------------------------------------------------------------------------------------------
NAME = "model.layers.3.self_attn.o_proj"


@pytest.fixture
def c24():
    return compress_sparse_24_bitmask(make_24(8, 32, torch.bfloat16), NAME)


@pytest.fixture
def cbm():
    return compress_sparse_bitmask(make_unstructured(8, 20, torch.float16), NAME)


def test_error_bitmask_shape(c24, cbm):
    with pytest.raises(SparseFormatError, match=rf"{NAME}.*bitmask has shape \[8, 3\], expected \[8, 4\]"):
        decompress_sparse_24_bitmask(c24["compressed"], torch.zeros(8, 3, dtype=torch.uint8), c24["shape"], name=NAME)
    with pytest.raises(SparseFormatError, match=rf"{NAME}.*bitmask has shape"):
        decompress_sparse_bitmask(cbm["compressed"], cbm["bitmask"][:-1], cbm["shape"], name=NAME)
    with pytest.raises(SparseFormatError, match=rf"{NAME}.*bitmask must be uint8"):
        decompress_sparse_bitmask(cbm["compressed"], cbm["bitmask"].view(torch.int8), cbm["shape"], name=NAME)


def test_error_popcount_mismatch(c24, cbm):
    with pytest.raises(SparseFormatError, match=rf"{NAME}.*compressed holds \d+ values but the bitmask has \d+ set bits"):
        decompress_sparse_bitmask(cbm["compressed"][:-1], cbm["bitmask"], cbm["shape"], name=NAME)
    bitmask = c24["bitmask"].clone()
    bitmask[0, 0] &= 0xF0  # clear the bits of the first group
    with pytest.raises(SparseFormatError, match=rf"{NAME}.*compressed holds 128 values but the bitmask has 126"):
        decompress_sparse_24_bitmask(c24["compressed"], bitmask, c24["shape"], name=NAME)
    with pytest.raises(SparseFormatError, match=rf"{NAME}.*compressed has shape \[8, 15\], expected \[8, 16\]"):
        decompress_sparse_24_bitmask(c24["compressed"][:, :15], c24["bitmask"], c24["shape"], name=NAME)


def test_error_group_with_three_bits(c24):
    bitmask = c24["bitmask"].clone()
    bitmask[2, 1] = 0b00000111 | (bitmask[2, 1] & 0xF0)  # 3 bits in group 2 of row 2
    low = int(bitmask[2, 0]) & 0x0F
    bitmask[2, 0] = (bitmask[2, 0] & 0xF0) | (low & (low - 1))  # drop one bit elsewhere: popcount kept
    assert int(unpack_bitmask(bitmask, 32).sum()) == 128
    with pytest.raises(SparseFormatError, match=rf"{NAME}.*more than 2 set bits.*row 2, columns 8-11"):
        decompress_sparse_24_bitmask(c24["compressed"], bitmask, c24["shape"], name=NAME)


def test_error_unknown_format(c24):
    with pytest.raises(SparseFormatError, match=rf"{NAME}.*unknown sparse format 'sparse-42-bitmask'"):
        decompress(c24, "sparse-42-bitmask", name=NAME)
    with pytest.raises(SparseFormatError, match=rf"{NAME}.*unknown sparse format"):
        compress(torch.zeros(2, 4), "marlin-24", name=NAME)
    with pytest.raises(SparseFormatError, match="unknown sparse format"):
        compress_state_dict({"a.weight": torch.zeros(2, 4)}, ["a"], "nope")


def test_error_other_checks(c24, cbm):
    with pytest.raises(SparseFormatError, match=rf"{NAME}.*stored as torch.bfloat16, expected torch.float16"):
        decompress_sparse_24_bitmask(c24["compressed"], c24["bitmask"], c24["shape"], torch.float16, name=NAME)
    with pytest.raises(SparseFormatError, match=rf"{NAME}.*row_offsets do not match"):
        decompress_sparse_bitmask(
            cbm["compressed"], cbm["bitmask"], cbm["shape"], row_offsets=cbm["row_offsets"] + 1, name=NAME
        )
    with pytest.raises(SparseFormatError, match=rf"{NAME}.*multiple of 4"):
        compress_sparse_24_bitmask(torch.zeros(2, 6), NAME)
    with pytest.raises(SparseFormatError, match=rf"{NAME}.*float64 is not supported"):
        compress_sparse_bitmask(torch.zeros(2, 8, dtype=torch.float64), NAME)
    with pytest.raises(SparseFormatError, match=rf"{NAME}.*2-D"):
        compress_sparse_bitmask(torch.zeros(8), NAME)
    with pytest.raises(SparseFormatError, match=rf"{NAME}.*shape must hold two"):
        decompress_sparse_bitmask(cbm["compressed"], cbm["bitmask"], torch.tensor([8, 20, 1]), name=NAME)
    with pytest.raises(SparseFormatError, match=rf"{NAME}.*missing \['bitmask'\]"):
        decompress({"compressed": c24["compressed"], "shape": c24["shape"]}, "sparse-24-bitmask", name=NAME)
    assert issubclass(SparseFormatError, ValueError)


# ------------------------------------------------------------------------------------------
# registry, state dicts, config
# ------------------------------------------------------------------------------------------
def test_registry():
    assert set(FORMATS) == {"dense", "sparse-24-bitmask", "sparse-bitmask"}
    assert get_codec("Sparse_24_Bitmask") is FORMATS["sparse-24-bitmask"]
    assert FORMATS["sparse-24-bitmask"].param_names == ("shape", "compressed", "bitmask")
    assert FORMATS["sparse-bitmask"].param_names == ("shape", "compressed", "bitmask", "row_offsets")
    w = torch.randn(2, 4)
    assert compress(w, "dense")["weight"] is w


def llama_like_state_dict(dtype=torch.bfloat16):
    sd = {"model.embed_tokens.weight": torch.randn(32, 16).to(dtype)}
    for i in range(2):
        p = f"model.layers.{i}"
        sd[f"{p}.self_attn.q_proj.weight"] = make_24(16, 16, dtype, seed=i)
        sd[f"{p}.self_attn.q_proj.weight_scale"] = torch.rand(16, 1)
        sd[f"{p}.self_attn.q_proj.input_scale"] = torch.rand(1)
        sd[f"{p}.self_attn.q_proj.weight_zero_point"] = torch.zeros(16, 1, dtype=torch.int8)
        sd[f"{p}.mlp.down_proj.weight"] = make_24(16, 32, dtype, seed=10 + i)
        sd[f"{p}.mlp.down_proj.bias"] = torch.randn(16).to(dtype)
        sd[f"{p}.input_layernorm.weight"] = torch.ones(16, dtype=dtype)
    sd["lm_head.weight"] = torch.randn(32, 16).to(dtype)
    return sd


@pytest.mark.parametrize("fmt", ["sparse-24-bitmask", "sparse-bitmask"])
def test_state_dict_round_trip(fmt):
    sd = llama_like_state_dict()
    modules = [k[: -len(".weight")] for k in sd if k.endswith(("q_proj.weight", "down_proj.weight"))]
    out = compress_state_dict(sd, modules, fmt)
    params = FORMATS[fmt].param_names
    expected_keys = []
    for k in sd:
        if k.endswith(".weight") and k[: -len(".weight")] in modules:
            expected_keys += [f"{k[:-len('.weight')]}.{p}" for p in params]
        else:
            expected_keys.append(k)
    assert list(out) == expected_keys
    for k in sd:
        if k in out:
            assert out[k] is sd[k]  # passed through untouched
    back = decompress_state_dict(out, fmt)
    assert list(back) == list(sd)
    for k in sd:
        assert same(back[k], sd[k]), k
    assert decompress_state_dict(out, fmt, dtype=torch.bfloat16).keys() == sd.keys()


def test_state_dict_dense_is_noop():
    sd = llama_like_state_dict()
    out = compress_state_dict(sd, ["model.layers.0.self_attn.q_proj"], "dense")
    assert out == sd and out is not sd
    assert decompress_state_dict(sd, "dense") == sd


def test_state_dict_errors():
    sd = llama_like_state_dict()
    with pytest.raises(SparseFormatError, match="'model.layers.9.mlp.down_proj'.*no 'model.layers.9.mlp.down_proj.weight'"):
        compress_state_dict(sd, ["model.layers.9.mlp.down_proj"], "sparse-24-bitmask")
    with pytest.raises(SparseFormatError, match="'lm_head'.*not 2:4 sparse"):
        compress_state_dict(sd, ["lm_head"], "sparse-24-bitmask")
    assert "lm_head.compressed" in compress_state_dict(sd, ["lm_head"], "sparse-24-bitmask", prune=True)
    out = compress_state_dict(sd, ["model.layers.0.mlp.down_proj"], "sparse-24-bitmask")
    broken = {k: v for k, v in out.items() if k != "model.layers.0.mlp.down_proj.compressed"}
    with pytest.raises(SparseFormatError, match=r"'model.layers.0.mlp.down_proj'.*missing \['compressed'\]"):
        decompress_state_dict(broken, "sparse-24-bitmask")
    both = dict(out, **{"model.layers.0.mlp.down_proj.weight": torch.zeros(16, 32)})
    with pytest.raises(SparseFormatError, match="'model.layers.0.mlp.down_proj'.*both"):
        decompress_state_dict(both, "sparse-24-bitmask")
    bm = compress_state_dict(sd, ["model.layers.0.mlp.down_proj"], "sparse-bitmask")
    with pytest.raises(SparseFormatError, match="'model.layers.0.mlp.down_proj'.*row_offsets.*another sparse format"):
        decompress_state_dict(bm, "sparse-24-bitmask")
    bad = dict(out)
    bad["model.layers.0.mlp.down_proj.bitmask"] = out["model.layers.0.mlp.down_proj.bitmask"][:, :2]
    with pytest.raises(SparseFormatError, match="'model.layers.0.mlp.down_proj'.*bitmask has shape"):
        decompress_state_dict(bad, "sparse-24-bitmask")


def test_sparsity_config():
    cfg = sparsity_config("sparse-24-bitmask", 0.4921, "2:4", ["Linear"], ["lm_head"])
    assert cfg == {
        "format": "sparse-24-bitmask",
        "global_sparsity": 0.4921,
        "sparsity_structure": "2:4",
        "targets": ["Linear"],
        "ignore": ["lm_head"],
        "registry_requires_subclass": False,
    }
    assert list(cfg) == ["format", "global_sparsity", "sparsity_structure", "targets", "ignore", "registry_requires_subclass"]
    cfg = sparsity_config("sparse_bitmask", 0.5, None, "Linear", None)
    assert cfg["sparsity_structure"] == "unstructured" and cfg["targets"] == ["Linear"] and cfg["ignore"] == []
    assert sparsity_config("dense", 0.5, "2:4", ["Linear"], [])["format"] == "dense"
    with pytest.raises(SparseFormatError, match="'2:4' sparsity only"):
        sparsity_config("sparse-24-bitmask", 0.5, "unstructured", ["Linear"], [])
    with pytest.raises(SparseFormatError, match="global_sparsity"):
        sparsity_config("sparse-bitmask", 1.5, "unstructured", ["Linear"], [])
    with pytest.raises(SparseFormatError, match="unknown sparse format"):
        sparsity_config("marlin-24", 0.5, "2:4", ["Linear"], [])


# ------------------------------------------------------------------------------------------
# CUDA: same bytes as on the CPU, outputs stay on the device
# ------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cuda_matches_cpu(dtype):
    gen = torch.Generator().manual_seed(5)
    dense = (torch.randint(-3, 4, (64, 96), generator=gen).float() * 0.5).to(dtype)
    for fmt, kwargs in (("sparse-24-bitmask", {"prune": True}), ("sparse-bitmask", {})):
        cpu = compress(dense, fmt, name="t", **kwargs)
        gpu = compress(dense.cuda(), fmt, name="t", **kwargs)
        for key in cpu:
            assert gpu[key].is_cuda, key
            assert same(gpu[key], cpu[key]), (fmt, key)
        back = decompress(gpu, fmt, name="t")
        assert back.is_cuda and same(back, decompress(cpu, fmt, name="t"))
