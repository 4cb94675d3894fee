"""Launch configurations of the Triton 2:4 kernel (pure Python, no Triton).

A ``BlockConfig`` fixes tile sizes, the inner path (gather or tensor-core dot), split-K and
Triton's warps / stages. ``default_config`` picks one that fits a shape; ``candidate_configs``
lists the few that the plugin times at load for each decode bucket (the best one differs by
shape: on an H200 the one-token sweep's best was 15-17% faster than the default on
4096x14336 / 14336x4096). Kept apart from the kernels so that the rule can store, compare and
log configurations without Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GATHER_MAX_N", "BlockConfig", "candidate_configs", "default_config"]

# The gather path keeps one fp32 accumulator per token in registers: 8 tokens at most.
GATHER_MAX_N = 8


@dataclass(frozen=True)
class BlockConfig:
    """One launch configuration: tile sizes, inner path, split-K and Triton's warps / stages.

    ``run`` (gather path): groups of one row on consecutive lanes before the next row's, 0 for
    all of ``block_g``; 16 puts a warp on 16 groups of two rows, so that its x gathers fall in
    one cache line (see ``triton_24._sparse24_gemv_kernel``).
    """

    block_out: int = 16
    block_g: int = 64
    block_n: int = 1
    split_k: int = 1
    dot: bool = False
    num_warps: int = 4
    num_stages: int = 2
    run: int = 0

    def as_list(self) -> list[int]:
        return [self.block_out, self.block_g, self.block_n, self.split_k, int(self.dot), self.num_warps, self.num_stages, self.run]

    @classmethod
    def from_list(cls, items) -> BlockConfig:
        """From ``as_list()``; lists of 7 (results written before ``run`` existed) mean run 0."""
        bo, bg, bn, sk, dot, warps, stages, run = (int(v) for v in [*items, 0][:8])
        return cls(bo, bg, bn, sk, bool(dot), warps, stages, run)

    def describe(self) -> str:
        """Short form for logs, e.g. ``gather 16x128 n4 sk2 w8 s3``."""
        path = "dot" if self.dot else "gather"
        run = f" r{self.run}" if self.run else ""
        return f"{path} {self.block_out}x{self.block_g} n{self.block_n} sk{self.split_k} w{self.num_warps} s{self.num_stages}{run}"

    def check(self, out_features: int, in_features: int) -> None:
        """Refuse a configuration that does not tile this shape (or that tl.dot cannot run)."""
        groups = in_features // 4
        problems = []
        if out_features % self.block_out:
            problems.append(f"out {out_features} % block_out {self.block_out} != 0")
        if groups % (self.block_g * self.split_k):
            problems.append(f"in/4 = {groups} groups % (block_g {self.block_g} * split_k {self.split_k}) != 0")
        if self.block_g % 8:
            problems.append(f"block_g {self.block_g} is not a multiple of 8 (one index word)")
        if self.dot and min(self.block_out, self.block_g, self.block_n) < 16:
            problems.append("the dot path needs block_out, block_g and block_n >= 16")
        if not self.dot and not 1 <= self.block_n <= GATHER_MAX_N:
            problems.append(f"the gather path takes block_n 1-{GATHER_MAX_N}, not {self.block_n}")
        if self.run and (self.dot or self.run % 8 or self.block_g % self.run):
            problems.append(f"run {self.run} must be a multiple of 8 dividing block_g {self.block_g}, gather path only")
        if problems:
            raise ValueError(f"block config {self} does not fit a {out_features}x{in_features} weight: " + "; ".join(problems))


def _fits(config: BlockConfig, out_features: int, in_features: int) -> bool:
    try:
        config.check(out_features, in_features)
    except ValueError:
        return False
    return True


def default_config(n_tokens: int, out_features: int, in_features: int) -> BlockConfig:
    """A configuration that fits the shape: gather up to 8 tokens, tensor-core dot above.

    Gather: 16 rows x 128 groups (64, 32 or 16 where 128 does not divide in/4), all tokens of
    the bucket in one program, 8 warps, 3 stages, no split-K. For one token the H200 sweep
    (benchmarks/results/h200-decode-sweep.jsonl) found it within 7% of the best on 28672x8192,
    8192x28672 and 4096x4096, 15-17% behind on 4096x14336 / 14336x4096.
    """
    groups = in_features // 4
    block_n = 1 << max(0, n_tokens - 1).bit_length()
    if block_n <= GATHER_MAX_N:
        block_g = next(g for g in (128, 64, 32, 16) if groups % g == 0)
        return BlockConfig(16, block_g, block_n, 1, False, 8 if block_g == 128 else 4, 3)
    block_n = min(block_n, 64)
    block_out = 64 if out_features % 64 == 0 else (32 if out_features % 32 == 0 else 16)
    block_g = next(g for g in (64, 32, 16) if groups % g == 0)
    return BlockConfig(block_out, block_g, block_n, 1, True, 4, 2)


def candidate_configs(n_tokens: int, out_features: int, in_features: int) -> list[BlockConfig]:
    """The configurations the plugin times at load for a bucket of n tokens, default first.

    Gather buckets (n <= 8): 16 x 128 groups with 8 warps and 16 x 64 with 4 warps, each
    without and with a 2-way split-K (more programs for layers with few rows), 3 stages, each
    with warps along one row and with runs of 16 groups over two rows: eight configs. The best
    of the H200 one-token sweep on each Llama shape was among the first four (run 16 was not
    measured yet). Dot buckets: the default only (the tensor-core path lost to dense at every n
    in the H200 runs).
    """
    default = default_config(n_tokens, out_features, in_features)
    if default.dot:
        return [default]
    bn = default.block_n
    tiles = [(16, 128, 8), (16, 64, 4)]
    tried = [BlockConfig(bo, bg, bn, sk, False, w, 3, run) for run in (0, 16) for bo, bg, w in tiles for sk in (1, 2)]
    return [default] + [c for c in tried if c != default and _fits(c, out_features, in_features)]
