"""The Triton 2:4 kernel: layout conversion, and the kernel against the exact product.

Without CUDA the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, set by
conftest.py before triton is imported) on CPU tensors; with CUDA, compiled on the GPU. Tests
that need Triton skip cleanly without it.
"""

from __future__ import annotations

import pytest
import torch

from unipruning_modifier.checkpoint import SparseFormatError, compress_sparse_24_bitmask
from unipruning_modifier.serving import kernels, measure, triton_24, triton_24_configs, triton_24_layout
from unipruning_modifier.serving.triton_24_configs import BlockConfig, default_config
from unipruning_modifier.serving.triton_24_layout import Sparse24Weight

from .test_checkpoint_codecs import make_24

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not triton_24.triton_available()[0] or (DEVICE == "cpu" and not triton_24.interpreting()),
    reason=triton_24.triton_available()[1] if not triton_24.triton_available()[0] else "Triton's interpreter is off",
)


def within_rounding(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """|out - exact| <= one ulp of out's dtype at |exact|, plus fp32-accumulation slack.

    The slack, 2^-20 * sum |x_k w_k|, covers any fp32 summation order; what is left is the one
    rounding to fp16/bf16, i.e. "equal to the dense result within bf16 rounding".
    """
    exact = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    if bias is not None:
        exact, scale = exact + bias.double(), scale + bias.double().abs()
    info = torch.finfo(out.dtype)
    ulp = info.eps * torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(info.tiny))))
    return bool(((out.double() - exact).abs() <= ulp + 2.0**-20 * scale).all())


# ---------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------
def test_nibble_table():
    table = triton_24_layout.nibble_table()
    pairs = {0b0011: (0, 1), 0b0101: (0, 2), 0b1001: (0, 3), 0b0110: (1, 2), 0b1010: (1, 3), 0b1100: (2, 3)}
    for lo in range(16):
        for hi in range(16):
            got = int(table[lo | hi << 4])
            if lo in pairs and hi in pairs:
                (a, b), (c, d) = pairs[lo], pairs[hi]
                assert got == (a | b << 2) | (c | d << 2) << 4
            else:
                assert got == 0xFF


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 64), (48, 192), (32, 1024)])
def test_layout_round_trip(dtype, shape):
    w = make_24(*shape, dtype, seed=shape[1])
    sparse = Sparse24Weight.from_dense(w)
    assert sparse.shape == shape
    assert sparse.values.shape == (shape[0], shape[1] // 2) and sparse.values.dtype == dtype
    assert sparse.indices.shape == (shape[0], shape[1] // 32) and sparse.indices.dtype == torch.int32
    assert torch.equal(sparse.to_dense().view(torch.int16), w.view(torch.int16))
    tensors = compress_sparse_24_bitmask(w)
    from_checkpoint = Sparse24Weight.from_bitmask(tensors["compressed"], tensors["bitmask"])
    assert torch.equal(from_checkpoint.values.view(torch.int16), tensors["compressed"].view(torch.int16))
    assert torch.equal(from_checkpoint.indices, sparse.indices)


def test_layout_keeps_zeros_among_the_kept():
    """A group with fewer than 2 nonzeros still stores 2 values (zeros), as sparse-24-bitmask does."""
    w = make_24(16, 64, torch.bfloat16, seed=1)
    w[3, :8] = 0
    w[5, 4:6] = torch.tensor([0.0, 1.5])
    assert torch.equal(Sparse24Weight.from_dense(w).to_dense(), w)


@pytest.mark.parametrize(
    "shape, dtype, match",
    [
        ((16, 96), torch.bfloat16, "in % 64"),
        ((24, 64), torch.bfloat16, "out % 16"),
        ((16, 64), torch.float32, "float16 / bfloat16"),
    ],
)
def test_layout_refuses(shape, dtype, match):
    assert not triton_24_layout.layout_supported(*shape, dtype)[0]
    with pytest.raises(ValueError, match=match):
        Sparse24Weight.from_dense(torch.zeros(shape, dtype=dtype), name="mlp.down_proj")


def test_layout_refuses_non_24():
    w = make_24(16, 64, torch.bfloat16)
    w[2, 0:3] = 1.0
    with pytest.raises(SparseFormatError, match="not 2:4"):
        Sparse24Weight.from_dense(w)
    tensors = compress_sparse_24_bitmask(make_24(16, 64, torch.bfloat16))
    tensors["bitmask"][7, 3] = 0b00010111  # a group with 3 kept inputs
    with pytest.raises(ValueError, match="row 7, columns 24-31"):
        Sparse24Weight.from_bitmask(tensors["compressed"], tensors["bitmask"], name="q_proj")


# ---------------------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 8, 9, 16, 64, 300])
@pytest.mark.parametrize("shape", [(16, 64), (4096, 14336), (14336, 4096), (4096, 11008), (28672, 8192)])
def test_default_config_fits(n, shape):
    config = default_config(n, *shape)
    config.check(*shape)
    assert config.dot == (n > 8)
    assert config.block_n >= min(n, 64)


@pytest.mark.parametrize(
    "config, match",
    [
        (BlockConfig(block_out=32), "block_out 32"),
        (BlockConfig(block_g=64, split_k=2), "block_g 64 \\* split_k 2"),
        (BlockConfig(block_g=12), "multiple of 8"),
        (BlockConfig(block_n=8, dot=True), "dot path"),
        (BlockConfig(block_n=16), "gather path takes block_n 1-8"),
        (BlockConfig(block_g=64, run=12), "run 12 must be a multiple of 8"),
        (BlockConfig(block_g=32, run=64), "dividing block_g 32"),
        (BlockConfig(16, 16, 16, 1, True, run=16), "gather path only"),
    ],
)
def test_config_refusals(config, match):
    with pytest.raises(ValueError, match=match):
        config.check(48, 256)


def test_config_list_round_trip():
    config = BlockConfig(64, 32, 16, 2, True, 8, 3)
    assert BlockConfig.from_list(config.as_list()) == config
    assert config.describe() == "dot 64x32 n16 sk2 w8 s3"
    assert BlockConfig.from_list([16, 128, 1, 1, 0, 8, 3]) == BlockConfig(16, 128, 1, 1, False, 8, 3, 0)  # results before run
    assert BlockConfig(16, 128, 4, 2, False, 8, 3, 16).describe() == "gather 16x128 n4 sk2 w8 s3 r16"


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 64])
@pytest.mark.parametrize("shape", [(16, 64), (4096, 14336), (14336, 4096), (4096, 11008), (28672, 8192)])
def test_candidate_configs(n, shape):
    candidates = triton_24_configs.candidate_configs(n, *shape)
    assert candidates[0] == default_config(n, *shape)
    assert len(set(candidates)) == len(candidates) <= 8
    for config in candidates:
        config.check(*shape)
        assert config.block_n == candidates[0].block_n and config.dot == (n > 8)
    if n <= 8 and shape[1] % 1024 == 0:  # 128 groups x split-K 2 fit: all eight
        assert len(candidates) == 8


# ---------------------------------------------------------------------------------------------
# the kernel
# ---------------------------------------------------------------------------------------------
CASES = [  # (n tokens, config); shape 64 x 256 (64 groups)
    (1, BlockConfig(16, 16, 1, 1, False)),
    (1, BlockConfig(32, 32, 1, 2, False)),
    (2, BlockConfig(16, 64, 2, 1, False)),
    (3, BlockConfig(16, 16, 4, 4, False)),  # one token past the end, split-K
    (5, BlockConfig(16, 32, 8, 2, False)),
    (8, BlockConfig(16, 16, 4, 1, False)),  # two token blocks
    (7, BlockConfig(64, 16, 8, 1, False)),
    (1, BlockConfig(32, 32, 1, 1, False, run=8)),  # rows interleaved in runs of 8 groups
    (4, BlockConfig(16, 32, 4, 2, False, run=16)),
    (6, BlockConfig(16, 32, 8, 1, False, run=16)),
    (5, BlockConfig(16, 16, 16, 1, True)),
    (16, BlockConfig(32, 32, 16, 2, True)),
    (37, BlockConfig(64, 16, 32, 1, True)),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, config", CASES, ids=[f"n{n}-{'dot' if c.dot else 'gather'}-sk{c.split_k}-r{c.run}" for n, c in CASES])
def test_kernel_matches_exact_product(dtype, n, config):
    gen = torch.Generator().manual_seed(n)
    w = make_24(64, 256, dtype, seed=n).to(DEVICE)
    x = torch.randn(n, 256, generator=gen).to(DEVICE, dtype)
    bias = torch.randn(64, generator=gen).to(DEVICE, dtype)
    sparse = Sparse24Weight.from_dense(w)
    for b in (None, bias):
        out = triton_24.matmul(x, sparse, b, config)
        assert out.shape == (n, 64) and out.dtype == dtype
        assert within_rounding(out.cpu(), x.cpu(), w.cpu(), None if b is None else b.cpu())
        dense = torch.nn.functional.linear(x, w, b)
        assert within_rounding(dense.cpu(), x.cpu(), w.cpu(), None if b is None else b.cpu())
    assert torch.equal(triton_24.matmul(x, sparse, bias, config), out)  # deterministic, split-K too


@needs_triton
def test_kernel_default_config_and_shapes():
    """3-D input, a strided x, and the default configuration for the token count."""
    w = make_24(48, 128, torch.bfloat16, seed=4).to(DEVICE)
    sparse = Sparse24Weight.from_dense(w)
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16, device=DEVICE)[..., ::2]
    out = triton_24.matmul(x, sparse)
    assert out.shape == (2, 3, 48)
    assert within_rounding(out.reshape(6, 48).cpu(), x.reshape(6, 128).cpu(), w.cpu())
    assert triton_24.matmul(x[:0], sparse).shape == (0, 3, 48)


@needs_triton
def test_kernel_refusals():
    sparse = Sparse24Weight.from_dense(make_24(16, 64, torch.bfloat16).to(DEVICE))
    with pytest.raises(ValueError, match="takes 64"):
        triton_24.matmul(torch.zeros(1, 128, dtype=torch.bfloat16, device=DEVICE), sparse)
    with pytest.raises(ValueError, match="x is torch.float16"):
        triton_24.matmul(torch.zeros(1, 64, dtype=torch.float16, device=DEVICE), sparse)
    with pytest.raises(ValueError, match="bias has shape"):
        triton_24.matmul(torch.zeros(1, 64, dtype=torch.bfloat16, device=DEVICE), sparse, torch.zeros(8, device=DEVICE))
    with pytest.raises(ValueError, match="does not fit a 16x64"):
        triton_24.matmul(torch.zeros(1, 64, dtype=torch.bfloat16, device=DEVICE), sparse, None, BlockConfig(32, 16))


# ---------------------------------------------------------------------------------------------
# the plugin's op with the Triton branch
# ---------------------------------------------------------------------------------------------
def op_args(w: torch.Tensor, choice: str):
    sparse = Sparse24Weight.from_dense(w)
    n_buckets = len(kernels.N_BUCKETS)
    configs = [v for n in kernels.N_BUCKETS for v in default_config(n, *w.shape).as_list()]
    return (None, None, sparse.values, sparse.indices), [kernels.KERNELS.index(choice)] * n_buckets, configs


@needs_triton
def test_op_triton_branch_eager_and_compiled():
    w = make_24(32, 128, torch.float16, seed=6).to(DEVICE)
    bias = torch.randn(32, dtype=torch.float16, device=DEVICE)
    weights, choices, configs = op_args(w, "triton_24")
    n_buckets = len(kernels.N_BUCKETS)

    def call(x):
        return kernels.sparse24_linear(x, *weights, bias, 32, choices, [0] * n_buckets, configs)

    compiled = torch.compile(call, backend="eager", fullgraph=True)
    for n in (1, 5, 20):
        x = torch.randn(n, 128, dtype=torch.float16, device=DEVICE)
        want = triton_24.matmul(x, Sparse24Weight(weights[2], weights[3]), bias)
        assert torch.equal(call(x), want)
        assert torch.equal(compiled(x), want)


# ---------------------------------------------------------------------------------------------
# GPU only: Llama-sized layers, CUDA graphs, torch.compile
# ---------------------------------------------------------------------------------------------
cuda_triton = pytest.mark.skipif(not kernels.triton_kernel_available()[0], reason=kernels.triton_kernel_available()[1])


@cuda_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 14336), (14336, 4096), (28672, 8192)])
def test_gpu_llama_shapes_within_rounding(dtype, shape):
    w = measure.random_24(*shape, dtype, "cuda", seed=shape[0])
    sparse = Sparse24Weight.from_dense(w)
    bias = torch.randn(shape[0], device="cuda", dtype=dtype)
    for n in (1, 2, 4, 8, 16, 64):
        x = torch.randn(n, shape[1], device="cuda", dtype=dtype)
        out = triton_24.matmul(x, sparse, bias)
        assert within_rounding(out, x, w, bias), (n, dtype, shape)
        assert within_rounding(torch.nn.functional.linear(x, w, bias), x, w, bias)


@cuda_triton
def test_gpu_op_under_cuda_graph_and_compile():
    """The plugin's op (Triton for every n) replays in a CUDA graph and compiles with fullgraph."""
    w = measure.random_24(1024, 2048, torch.bfloat16, "cuda", seed=1)
    bias = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    layer = kernels.Sparse24Linear.from_dense(w, "triton")
    assert layer is not None and layer.dense is None and layer.packed is None
    for n in (1, 8, 32):
        static_x = torch.randn(n, 2048, device="cuda", dtype=torch.bfloat16)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(static_x, bias)  # compile / warm up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = layer(static_x, bias)
        fresh = torch.randn_like(static_x)
        static_x.copy_(fresh)
        graph.replay()
        assert torch.equal(static_out, layer(fresh, bias))
    compiled = torch.compile(lambda x: layer(x, bias), fullgraph=True, dynamic=True)
    overhead = torch.compile(lambda x: layer(x, bias), mode="reduce-overhead", fullgraph=True)
    for n in (1, 5, 40):
        x = torch.randn(n, 2048, device="cuda", dtype=torch.bfloat16)
        want = layer(x, bias)
        assert torch.equal(compiled(x), want)
        for _ in range(3):  # cudagraph trees record, then replay
            assert torch.equal(overhead(x).clone(), want)
