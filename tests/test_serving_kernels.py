"""The plugin's pure-torch parts: kernel decision rule, the 2:4 op, tensor-parallel slicing.

GPU tests (cuSPARSELt) skip without CUDA; everything else runs on CPU.
"""

from __future__ import annotations

import pytest
import torch

from unipruning_modifier.checkpoint import SparseFormatError, compress, decompress
from unipruning_modifier.serving import cusparselt, kernels, measure
from unipruning_modifier.serving.sparsity import (
    claims_checkpoint,
    decompress_part,
    parse_sparsity_config,
    slice_columns,
    slice_rows,
)

from .test_checkpoint_codecs import make_24, make_unstructured

cuda_24 = pytest.mark.skipif(not kernels.kernel_available()[0], reason=kernels.kernel_available()[1])


def row(n: int, dense: float, triton: float | None = None, cslt: float | None = None) -> dict:
    return {"n": n, "dense_ms": dense, "triton_24_ms": triton, "cslt_ms": cslt}


@pytest.mark.parametrize(
    "rows, want",
    [
        ([row(1, 1.0, 0.7, 30.0), row(16, 1.0, 0.9, 20.0), row(64, 1.0, 1.2, 9.0)], ["triton_24", "triton_24", "dense"]),
        ([row(4096, 1.0, None, 0.8), row(16384, 4.0, None, 2.6)], ["cslt", "cslt"]),  # H100 down_proj rows
        ([row(16, 1.0, 1.0), row(64, 1.0, None, 1.0)], ["dense", "dense"]),  # a tie keeps dense
        ([row(1, 1.0, 0.5, 0.4)], ["cslt"]),  # the fastest of the three
        ([row(1, 1.0, 1.01, 1.2), row(2, 1.0)], ["dense", "dense"]),
    ],
)
def test_choose_kernels(rows, want):
    assert kernels.choose_kernels(rows) == want


def test_choose_kernels_margin():
    assert kernels.choose_kernels([row(1, 1.0, 0.95), row(2, 1.0, 0.9, 0.85)], margin=1.1) == ["dense", "cslt"]


@pytest.mark.parametrize("n, index", [(1, 0), (2, 1), (3, 2), (16, 4), (17, 5), (64, 6), (65, 7), (1000, 8), (4096, 9), (10**6, 10)])
def test_bucket_index(n, index):
    assert kernels.bucket_index(n) == index


def test_describe():
    d = kernels.KernelDecision(["triton_24"] * 5 + ["dense"] * 4 + ["cslt"] * 2, reason="r")
    assert d.describe() == "triton_24 for n 1-16, dense for n 17-1024, cslt for n >= 1025 (r)"
    assert kernels.KernelDecision(["dense"] * 11, reason="r").describe() == "dense (r)"
    assert kernels.KernelDecision(["cslt"] * 11, reason="r").describe() == "cslt for every n (r)"
    one = kernels.KernelDecision(["triton_24"] + ["dense"] * 10, reason="r")
    assert one.describe() == "triton_24 for n = 1, dense for n >= 2 (r)"


@pytest.mark.parametrize(
    "shape, dtype, ok",
    [
        ((4096, 4096), torch.bfloat16, True),
        ((4096, 11008), torch.float16, True),
        ((4096, 4104), torch.bfloat16, False),
        ((40, 4096), torch.bfloat16, False),
        ((4096, 4096), torch.float32, False),
        ((4096, 4096), torch.int8, False),
    ],
)
def test_shape_supported(shape, dtype, ok):
    got, reason = cusparselt.shape_supported(*shape, dtype)
    assert got is ok and reason


def test_kernel_mode(monkeypatch):
    monkeypatch.delenv("UNIPRUNING_SPARSE_KERNEL", raising=False)
    assert kernels.kernel_mode() == "auto"
    monkeypatch.setenv("UNIPRUNING_SPARSE_KERNEL", " Always ")
    assert kernels.kernel_mode() == "always"
    monkeypatch.setenv("UNIPRUNING_SPARSE_KERNEL", "triton")
    assert kernels.kernel_mode() == "triton"
    monkeypatch.setenv("UNIPRUNING_SPARSE_KERNEL", "fast")
    with pytest.raises(ValueError, match="UNIPRUNING_SPARSE_KERNEL"):
        kernels.kernel_mode()


def test_small_layers_skip_the_algorithm_search(monkeypatch):
    """The search crashed cuSPARSELt on a 256x512 fp16 weight (H100): small layers never call it."""

    def refuse(*args, **kwargs):
        raise AssertionError("search called")

    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", refuse, raising=False)
    assert cusparselt.search_algorithm(None, None, 256, 512) == 0
    assert cusparselt.search_algorithm(None, None, 4096, cusparselt.SEARCH_MIN_DIM - 16) == 0
    with pytest.raises(AssertionError, match="search called"):
        cusparselt.search_algorithm(torch.zeros(1), torch.zeros(8, 1024), 1024, 1024)


def test_measure_shape_times_each_config_and_keeps_the_fastest(monkeypatch):
    """Several configs per bucket: each timed once, the fastest timed again for the row (fake clock)."""
    from unipruning_modifier.serving.triton_24_configs import BlockConfig, default_config

    slow, fast = BlockConfig(16, 16, 1), BlockConfig(16, 16, 1, 2)
    speeds = {slow: [2.0], fast: [0.5, 0.7]}  # the winner's second timing goes into the row
    monkeypatch.setattr(measure, "rotation_copies", lambda weight: 1)
    monkeypatch.setattr(measure.triton_24, "matmul", lambda x, t, bias, config: config)

    def fake_time_ms(calls, iters, graph):
        out = calls[0]()
        return speeds.setdefault(out, [1.1]).pop(0) if isinstance(out, BlockConfig) else 1.0

    monkeypatch.setattr(measure, "time_ms", fake_time_ms)
    weight = measure.random_24(16, 64, torch.bfloat16, "cpu")
    rows = measure.measure_shape(weight, (1, 2), candidates=("dense", "triton_24"), triton_configs={1: [slow, fast]})
    assert rows[0]["triton_24_ms"] == 0.7 and rows[0]["triton_config"] == fast.as_list()
    assert rows[0]["triton_tried"] == [[slow.as_list(), 2.0], [fast.as_list(), 0.5]]
    assert rows[1]["triton_config"] == default_config(2, 16, 64).as_list() and rows[1]["triton_tried"] is None
    assert rows[0]["dense_ms"] == 1.0 and rows[0]["cslt_ms"] is None


def test_decide_uses_the_measured_configs(monkeypatch):
    """decide() hands candidate configs per decode bucket to the measurement and keeps what won."""
    from unipruning_modifier.serving.triton_24_configs import BlockConfig, candidate_configs

    won = BlockConfig(16, 64, 1, 2, False, 4, 3)
    seen = {}

    def fake_measure(weight, buckets, candidates, triton_configs):
        seen.update(candidates=candidates, configs=triton_configs)
        rows = []
        for n in buckets:
            row = {"n": n, "dense_ms": 1.0, "triton_24_ms": None, "triton_config": None, "cslt_ms": None, "alg_id": 0}
            if n in triton_configs:
                row.update(triton_24_ms=0.8 if n == 1 else 1.2, triton_config=(won if n == 1 else triton_configs[n][0]).as_list())
            rows.append(row)
        return rows

    monkeypatch.setattr(kernels, "measure_shape", fake_measure)
    monkeypatch.setattr(kernels, "random_24", lambda *args: None)
    monkeypatch.setattr(kernels, "kernel_available", lambda device: (False, "no cuSPARSELt"))
    monkeypatch.setattr(kernels, "triton_kernel_available", lambda device: (True, "triton"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake GPU")
    monkeypatch.setattr(kernels, "_DECISIONS", {})
    decision = kernels.decide(torch.empty(4096, 14336, dtype=torch.bfloat16, device="meta"), "auto")
    assert seen["candidates"] == ("dense", "triton_24")
    assert seen["configs"] == {n: candidate_configs(n, 4096, 14336) for n in (1, 2, 4, 8, 16, 32, 64)}
    assert decision.choices == ["triton_24"] + ["dense"] * (N_B - 1)
    assert decision.triton_configs[0] == won.as_list()
    assert decision.triton_configs[1] == candidate_configs(2, 4096, 14336)[0].as_list()
    text = decision.describe()
    assert "triton_24 for n = 1" in text and "n=1 gather 16x64 n1 sk2 w4 s3" in text and text.endswith(" s)")


def test_cpu_weights_stay_dense():
    weight = measure.random_24(64, 64, torch.bfloat16, "cpu")
    decision = kernels.decide(weight, "auto")
    assert not decision.sparse and decision.describe().startswith("dense (")
    for mode in ("always", "cusparselt", "triton"):
        assert kernels.Sparse24Linear.from_dense(weight, mode) is None
    assert not kernels.decide(weight, "off").sparse


def test_random_24_is_24():
    w = measure.random_24(32, 64, torch.float16, "cpu", seed=3)
    assert ((w.view(32, -1, 4) != 0).sum(-1) == 2).all()


N_B = len(kernels.N_BUCKETS)


def test_op_dense_branch_and_compile():
    """Where the choice is dense the op is F.linear on the dense weight, also under torch.compile."""
    x = torch.randn(3, 5, 32)
    w, b = torch.randn(48, 32), torch.randn(48)
    want = torch.nn.functional.linear(x, w, b)
    args = (w, None, None, None, b, 48, [0] * N_B, [0] * N_B, [0] * (8 * N_B))
    got = kernels.sparse24_linear(x, *args)
    torch.testing.assert_close(got, want)
    compiled = torch.compile(lambda x: kernels.sparse24_linear(x, *args), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), want)


def test_op_fake_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(7, 2, 32)
        out = kernels.sparse24_linear(
            x, None, torch.empty(10, dtype=torch.int8), None, None, None, 48, [2] * N_B, [0] * N_B, [0] * (8 * N_B)
        )
    assert out.shape == (7, 2, 48)


# ---------------------------------------------------------------------------------------------
# tensor-parallel slicing of the compressed tensors
# ---------------------------------------------------------------------------------------------
DTYPES = [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8]


def dense_of(fmt, tensors):
    return decompress_part(fmt, tensors) if isinstance(tensors, dict) else tensors


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["sparse-24-bitmask", "sparse-bitmask"])
@pytest.mark.parametrize("start, size", [(0, 16), (16, 8), (5, 11), (31, 1), (0, 32), (7, 0)])
def test_slice_rows(fmt, dtype, start, size):
    w = make_24(32, 48, dtype, seed=1) if fmt == "sparse-24-bitmask" else make_unstructured(32, 48, dtype, seed=1)
    tensors = compress(w, fmt)
    part = slice_rows(fmt, tensors, start, size)
    assert set(part) == set(tensors)
    got = decompress(part, fmt)  # row_offsets are validated by the codec
    assert torch.equal(got.view(torch.uint8), decompress(tensors, fmt)[start : start + size].view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("start, size", [(0, 24), (24, 24), (8, 16), (0, 48)])
def test_slice_columns_24_by_bytes(dtype, start, size):
    w = make_24(16, 48, dtype, seed=2)
    tensors = compress(w, "sparse-24-bitmask")
    part = slice_columns("sparse-24-bitmask", tensors, start, size)
    assert isinstance(part, dict) and part["bitmask"].shape == (16, size // 8)
    want = decompress(tensors, "sparse-24-bitmask")[:, start : start + size]
    assert torch.equal(decompress(part, "sparse-24-bitmask").view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("start, size", [(20, 20), (4, 8), (0, 12)])
def test_slice_columns_24_refuses_inside_a_byte(start, size):
    tensors = compress(make_24(16, 40, torch.bfloat16, seed=3), "sparse-24-bitmask")
    with pytest.raises(SparseFormatError, match="multiples of 8"):
        slice_columns("sparse-24-bitmask", tensors, start, size, name="down_proj")


def test_slice_columns_bitmask_decompresses():
    w = make_unstructured(16, 40, torch.bfloat16, seed=4)
    part = slice_columns("sparse-bitmask", compress(w, "sparse-bitmask"), 20, 20)
    assert isinstance(part, torch.Tensor) and torch.equal(part, w[:, 20:40])


def test_slice_bounds():
    tensors = compress(make_24(8, 16, torch.bfloat16, seed=5), "sparse-24-bitmask")
    with pytest.raises(SparseFormatError, match="outside"):
        slice_rows("sparse-24-bitmask", tensors, 4, 8)
    with pytest.raises(SparseFormatError, match="missing"):
        slice_rows("sparse-24-bitmask", {"shape": tensors["shape"]}, 0, 1)


# ---------------------------------------------------------------------------------------------
# which checkpoints the plugin claims
# ---------------------------------------------------------------------------------------------
SPARSE = {"format": "sparse-24-bitmask", "sparsity_structure": "2:4", "targets": ["Linear"], "ignore": ["lm_head"]}


@pytest.mark.parametrize(
    "config, claimed",
    [
        ({"quant_method": "compressed-tensors", "sparsity_config": SPARSE}, True),
        ({"quant_method": "compressed-tensors", "sparsity_config": dict(SPARSE, format="dense")}, True),
        ({"quant_method": "compressed-tensors", "sparsity_config": {}}, False),
        ({"quant_method": "compressed-tensors", "sparsity_config": dict(SPARSE, targets=[])}, False),
        ({"quant_method": "compressed-tensors"}, False),
        ({"quant_method": "fp8", "sparsity_config": SPARSE}, False),
        (None, False),
    ],
)
def test_claims_checkpoint(config, claimed):
    assert claims_checkpoint(config) is claimed


def test_parse_sparsity_config():
    spec = parse_sparsity_config({"sparsity_config": dict(SPARSE, format="Sparse_24_Bitmask", ignore="lm_head")})
    assert (spec.format, spec.structure, spec.targets, spec.ignore, spec.compressed) == (
        "sparse-24-bitmask",
        "2:4",
        ["Linear"],
        ["lm_head"],
        True,
    )
    assert not parse_sparsity_config({"sparsity_config": dict(SPARSE, format="dense")}).compressed
    assert parse_sparsity_config({}) is None
    with pytest.raises(SparseFormatError, match="unknown sparse format"):
        parse_sparsity_config({"sparsity_config": dict(SPARSE, format="marlin-24")})
    with pytest.raises(SparseFormatError, match="needs sparsity_structure"):
        parse_sparsity_config({"sparsity_config": dict(SPARSE, sparsity_structure="unstructured")})


# ---------------------------------------------------------------------------------------------
# GPU: cuSPARSELt
# ---------------------------------------------------------------------------------------------
@cuda_24
@pytest.mark.parametrize("mode", ["always", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 16, 200, 1024])
def test_sparse_kernel_matches_dense(mode, dtype, n):
    w = measure.random_24(256, 512, dtype, "cuda", seed=n)
    layer = kernels.Sparse24Linear.from_dense(w, mode)
    assert layer is not None and layer.dense is None
    x = torch.randn(n, 512, device="cuda", dtype=dtype)
    b = torch.randn(256, device="cuda", dtype=dtype)
    torch.testing.assert_close(layer(x, b), torch.nn.functional.linear(x, w, b), rtol=2e-2, atol=2e-1)


@cuda_24
def test_decision_is_measured_and_cached():
    w = measure.random_24(512, 512, torch.bfloat16, "cuda")
    first = kernels.decide(w, "auto")
    assert kernels.decide(w, "auto") is first
    assert [r["n"] for r in first.rows] == list(kernels.N_BUCKETS)
    assert all(r["dense_ms"] > 0 and r["cslt_ms"] > 0 for r in first.rows)
    assert all((r["triton_24_ms"] is not None) == (r["n"] <= measure.TRITON_MAX_N) for r in first.rows)
    assert first.choices == kernels.choose_kernels(first.rows, kernels.PICK_MARGIN)
