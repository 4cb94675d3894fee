"""2:4 sparse ``x @ W.T`` for small token counts: Triton kernels that read compressed weights.

Decode is memory-bound: a dense bf16 GEMV reads 2 bytes per weight; these kernels read the
layout of ``triton_24_layout`` (kept values + 4-bit group codes), 1.125 bytes per weight.

One program computes ``BLOCK_OUT`` outputs for ``BLOCK_N`` tokens over one of ``SPLIT_K``
slices of the input, ``BLOCK_G`` groups (4 * BLOCK_G inputs) per step, with coalesced row-major
loads of values and index words (software-pipelined ``num_stages`` deep when > 1). Two paths:

* gather (``_sparse24_gemv_kernel``, 1-8 tokens): flat [BLOCK_OUT * BLOCK_G] tiles (lanes along
  the row, 16-byte value loads). Each step's values and index words are loaded once and used
  for every token: one fp32 accumulator per token, each kept value multiplied by
  ``x[t, 4g + i]`` gathered by index from x (a few KB, served by L1/L2). No zeros are
  multiplied. 2-D / 3-D tiles here let Triton put a warp across rows (uncoalesced loads and a
  shared-memory layout conversion every step): 0.42-0.55x dense at one token, 0.65-0.81x at
  2-4 tokens on an H200, which is why the tiles are flat.
* dot (``_sparse24_dot_kernel``, 16+ tokens): the tile is expanded in registers into the four
  in-group column planes (``W[:, 4g + c]``, c = 0..3) and multiplied with the matching strided
  columns of x on the tensor cores (``tl.dot``, fp32 accumulation).

Split-K (to fill the GPU's multiprocessors with few output rows) writes fp32 partial sums that a
second small kernel adds in a fixed order, so results are deterministic (no atomics). Bias is
added in fp32 before the single rounding to the output dtype.

Triton is optional (CPU torch wheels do not bring it): ``triton_available()`` says why not.
CUDA tensors run compiled kernels; with ``TRITON_INTERPRET=1`` set before Triton is imported,
Triton's interpreter runs them on CPU tensors (the CI tests).
"""

from __future__ import annotations

import functools

import torch

from .triton_24_configs import BlockConfig, default_config
from .triton_24_layout import Sparse24Weight

try:  # CUDA builds of torch on Linux bring Triton; CPU builds do not.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = None

__all__ = ["interpreting", "matmul", "triton_available"]


def triton_available() -> tuple[bool, str]:
    """(usable, reason): whether Triton can be imported here."""
    if triton is None:
        return False, "triton is not installed"
    return True, f"triton {triton.__version__}"


# --------------------------------------------------------------------------------------------
# kernels (plain functions, wrapped by triton.jit / the interpreter on first use)
# --------------------------------------------------------------------------------------------
def _sparse24_dot_kernel(
    x_ptr,
    v_ptr,
    idx_ptr,
    b_ptr,
    y_ptr,
    n_tokens,
    in_features,
    out_features,
    stride_x,
    groups_per_split,
    HAS_BIAS: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """The tensor-core path (16+ tokens): y[t, r] (SPLIT_K == 1) or partial[k, t, r] (fp32).

    The [BLOCK_OUT, BLOCK_G] tile is expanded in registers into the four in-group column planes
    (``W[:, 4g + c]``, c = 0..3), each multiplied with the matching strided columns of x.
    """
    pid_out = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    rows = pid_out * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    tokens = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    token_ok = tokens < n_tokens
    lanes = tl.arange(0, BLOCK_G)
    value_lanes = tl.arange(0, 2 * BLOCK_G)
    word_lanes = tl.arange(0, BLOCK_G // 8)
    nibble_shifts = 4 * tl.arange(0, 8)
    value_rows = v_ptr + rows.to(tl.int64)[:, None] * (in_features // 2)
    index_rows = idx_ptr + rows.to(tl.int64)[:, None] * (in_features // 32)
    x_tokens = x_ptr + tokens.to(tl.int64) * stride_x
    acc = tl.zeros([BLOCK_OUT, BLOCK_N], dtype=tl.float32)
    g_begin = pid_k * groups_per_split
    for step in tl.range(0, groups_per_split, BLOCK_G, num_stages=NUM_STAGES):
        groups = g_begin + step + lanes
        # One contiguous [BO, 2 * BG] tile (vectorized, coalesced along the row), then the pairs.
        kept = tl.load(value_rows + (2 * (g_begin + step) + value_lanes)[None, :])
        v0, v1 = tl.split(tl.reshape(kept, [BLOCK_OUT, BLOCK_G, 2]))
        # [BO, BG / 8] contiguous words, 8 nibbles each, unpacked in registers to [BO, BG].
        words = tl.load(index_rows + ((g_begin + step) // 8 + word_lanes)[None, :])
        nibble = tl.reshape((words[:, :, None] >> nibble_shifts[None, None, :]) & 15, [BLOCK_OUT, BLOCK_G])
        i0 = nibble & 3
        i1 = nibble >> 2
        zero = tl.zeros_like(v0)
        for c in tl.static_range(4):
            if c == 0:
                plane = tl.where(i0 == 0, v0, zero)
            elif c == 3:
                plane = tl.where(i1 == 3, v1, zero)
            else:
                plane = tl.where(i0 == c, v0, tl.where(i1 == c, v1, zero))
            xc = tl.load(x_tokens[None, :] + (4 * groups + c)[:, None], mask=token_ok[None, :], other=0.0)
            if UPCAST_DOT:  # Triton's interpreter multiplies bf16 bit patterns as integers
                acc = tl.dot(plane.to(tl.float32), xc.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(plane, xc, acc)
    out = tl.trans(acc)  # [BLOCK_N, BLOCK_OUT]
    offsets = tokens.to(tl.int64)[:, None] * out_features + rows[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            out += tl.load(b_ptr + rows).to(tl.float32)[None, :]
        tl.store(y_ptr + offsets, out.to(y_ptr.dtype.element_ty), mask=token_ok[:, None])
    else:
        partial = y_ptr + pid_k.to(tl.int64) * n_tokens * out_features
        tl.store(partial + offsets, out, mask=token_ok[:, None])


def _sparse24_gemv_kernel(
    x_ptr,
    v_ptr,
    idx_ptr,
    b_ptr,
    y_ptr,
    n_tokens,
    in_features,
    out_features,
    stride_x,
    groups_per_split,
    HAS_BIAS: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    RUN: tl.constexpr,
):
    """The gather path for 1-8 tokens per program, on flat [BLOCK_OUT * BLOCK_G] tiles.

    Flat tiles leave Triton one layout (consecutive lanes on consecutive elements, 16-byte
    value loads) where a 2-D or 3-D gather tile let it put lanes across rows (uncoalesced,
    with shared-memory conversions). The tile is cut into runs of RUN groups of one row, rows
    interleaved: element e is group e % RUN of run e // (RUN * BLOCK_OUT), row
    (e // RUN) % BLOCK_OUT. RUN = BLOCK_G (64 or 128) puts a warp along one row (32 groups: its
    x gathers span 256 bytes, two cache lines); RUN = 16 puts it on 16 groups of two rows (one
    line), with the same loads and instructions. Each step loads the values and index words once and
    reuses them for every token: one flat fp32 accumulator per token (a tuple), x gathered by
    index per token.
    """
    pid_out = tl.program_id(0)
    pid_k = tl.program_id(1)
    token0 = tl.program_id(2) * BLOCK_N
    row0 = pid_out * BLOCK_OUT
    tile = tl.arange(0, BLOCK_OUT * BLOCK_G)
    value_offsets = tl.arange(0, 2 * BLOCK_OUT * BLOCK_G)
    word_offsets = tl.arange(0, BLOCK_OUT * BLOCK_G // 8)
    value_rows = (
        v_ptr
        + (row0 + value_offsets // (2 * RUN) % BLOCK_OUT).to(tl.int64) * (in_features // 2)
        + value_offsets // (2 * RUN * BLOCK_OUT) * (2 * RUN)
        + value_offsets % (2 * RUN)
    )
    word_rows = (
        idx_ptr
        + (row0 + word_offsets // (RUN // 8) % BLOCK_OUT).to(tl.int64) * (in_features // 32)
        + word_offsets // (RUN // 8 * BLOCK_OUT) * (RUN // 8)
        + word_offsets % (RUN // 8)
    )
    # Tokens past the last one read the last token's x (valid memory); their sums are not stored.
    x_rows = ()
    for t in tl.static_range(BLOCK_N):
        x_rows = x_rows + (x_ptr + tl.minimum(token0 + t, n_tokens - 1).to(tl.int64) * stride_x,)
    nibble_shifts = 4 * tl.arange(0, 8)
    acc = (tl.zeros([BLOCK_OUT * BLOCK_G], dtype=tl.float32),) * BLOCK_N
    g_begin = pid_k * groups_per_split
    for step in tl.range(0, groups_per_split, BLOCK_G, num_stages=NUM_STAGES):
        g_start = g_begin + step
        kept = tl.load(value_rows + 2 * g_start)
        v0, v1 = tl.split(tl.reshape(kept, [BLOCK_OUT * BLOCK_G, 2]))
        v0 = v0.to(tl.float32)
        v1 = v1.to(tl.float32)
        words = tl.load(word_rows + g_start // 8)
        nibble = tl.reshape((words[:, None] >> nibble_shifts[None, :]) & 15, [BLOCK_OUT * BLOCK_G])
        columns = 4 * (g_start + tile // (RUN * BLOCK_OUT) * RUN + tile % RUN)
        c0 = columns + (nibble & 3)
        c1 = columns + (nibble >> 2)
        summed = ()
        for t in tl.static_range(BLOCK_N):
            x0 = tl.load(x_rows[t] + c0).to(tl.float32)
            x1 = tl.load(x_rows[t] + c1).to(tl.float32)
            summed = summed + (acc[t] + v0 * x0 + v1 * x1,)
        acc = summed
    rows = row0 + tl.arange(0, BLOCK_OUT)
    for t in tl.static_range(BLOCK_N):
        token = token0 + t
        # A per-row mask, not a scalar one: Triton 3.9's interpreter rejects a scalar mask on a vector store.
        token_ok = tl.full([BLOCK_OUT], token, tl.int32) < n_tokens
        out = tl.sum(tl.sum(tl.reshape(acc[t], [BLOCK_G // RUN, BLOCK_OUT, RUN]), axis=2), axis=0)
        if SPLIT_K == 1:
            if HAS_BIAS:
                out += tl.load(b_ptr + rows).to(tl.float32)
            tl.store(y_ptr + token.to(tl.int64) * out_features + rows, out.to(y_ptr.dtype.element_ty), mask=token_ok)
        else:
            partial = y_ptr + (pid_k.to(tl.int64) * n_tokens + token) * out_features
            tl.store(partial + rows, out, mask=token_ok)


def _split_sum_kernel(p_ptr, b_ptr, y_ptr, numel, out_features, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """y = sum over k of partial[k] (+ bias), summed in k order: deterministic split-K."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < numel
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(SPLIT_K):
        acc += tl.load(p_ptr + k * numel + offsets, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offsets % out_features, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offsets, acc.to(y_ptr.dtype.element_ty), mask=ok)


@functools.cache
def _jitted():
    """(gather, dot, split-sum) kernels through ``triton.jit`` (the interpreter under TRITON_INTERPRET=1)."""
    # n_tokens is not specialized: n = 1 and n % 16 == 0 would otherwise each compile anew.
    return (
        triton.jit(_sparse24_gemv_kernel, do_not_specialize=["n_tokens"]),
        triton.jit(_sparse24_dot_kernel, do_not_specialize=["n_tokens"]),
        triton.jit(_split_sum_kernel),
    )


def interpreting() -> bool:
    """True when Triton was imported with TRITON_INTERPRET=1 (kernels then run on CPU tensors)."""
    return triton is not None and type(tl.zeros).__name__ == "InterpretedFunction"


# --------------------------------------------------------------------------------------------
# launch
# --------------------------------------------------------------------------------------------
def matmul(
    x: torch.Tensor, weight: Sparse24Weight, bias: torch.Tensor | None = None, config: BlockConfig | None = None
) -> torch.Tensor:
    """``x @ W.T + bias`` for x [..., in] with W given in the compressed layout.

    CUDA tensors run the compiled kernel; CPU tensors need Triton's interpreter (slow; for tests).
    """
    ok, reason = triton_available()
    if not ok:
        raise RuntimeError(f"the Triton 2:4 kernel is unavailable: {reason}")
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"the Triton 2:4 kernel runs on CUDA tensors, or on {x.device.type} tensors under Triton's interpreter "
            "(TRITON_INTERPRET=1 set before triton is imported)"
        )
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} inputs, the 2:4 weight {out_features}x{in_features} takes {in_features}")
    if x.dtype != weight.values.dtype:
        raise ValueError(f"x is {x.dtype}, the 2:4 weight is {weight.values.dtype}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias has shape {list(bias.shape)}, expected [{out_features}]")
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n_tokens = x2.shape[0]
    config = config or default_config(n_tokens, out_features, in_features)
    config.check(out_features, in_features)
    y = torch.empty(n_tokens, out_features, dtype=x.dtype, device=x.device)
    if n_tokens == 0:
        return y.reshape(*x.shape[:-1], out_features)
    gemv, dot, split_sum = _jitted()
    groups_per_split = in_features // 4 // config.split_k
    partial = y if config.split_k == 1 else torch.empty(config.split_k, n_tokens, out_features, dtype=torch.float32, device=x.device)
    grid = (out_features // config.block_out, config.split_k, triton.cdiv(n_tokens, config.block_n))
    args = (x2, weight.values, weight.indices, bias if bias is not None else y, partial, n_tokens, in_features, out_features)
    args += (x2.stride(0), groups_per_split)
    common = dict(
        HAS_BIAS=bias is not None, BLOCK_OUT=config.block_out, BLOCK_G=config.block_g, BLOCK_N=config.block_n, SPLIT_K=config.split_k
    )
    launch = dict(NUM_STAGES=config.num_stages, num_warps=config.num_warps, num_stages=config.num_stages)
    if config.dot:
        dot[grid](*args, **common, UPCAST_DOT=x.dtype == torch.bfloat16 and interpreting(), **launch)
    else:
        gemv[grid](*args, **common, **launch, RUN=config.run or config.block_g)
    if config.split_k > 1:
        numel = n_tokens * out_features
        block = 1024
        split_sum[(triton.cdiv(numel, block),)](
            partial,
            bias if bias is not None else y,
            y,
            numel,
            out_features,
            HAS_BIAS=bias is not None,
            SPLIT_K=config.split_k,
            BLOCK=block,
            num_warps=4,
        )
    return y.reshape(*x.shape[:-1], out_features)
