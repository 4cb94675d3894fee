"""Launch configurations of the Triton 2:4 kernel (pure Python, no Triton).

A ``BlockConfig`` fixes tile sizes, the inner path (gather or tensor-core dot), split-K and
Triton's warps / stages; ``default_config`` picks one that fits a shape. Kept apart from the
kernels so that the plugin's rule can store, compare and log configurations without Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BlockConfig", "default_config"]


@dataclass(frozen=True)
class BlockConfig:
    """One launch configuration: tile sizes, inner path, split-K and Triton's warps / stages."""

    block_out: int = 16
    block_g: int = 64
    block_n: int = 1
    split_k: int = 1
    dot: bool = False
    num_warps: int = 4
    num_stages: int = 2

    def as_list(self) -> list[int]:
        return [self.block_out, self.block_g, self.block_n, self.split_k, int(self.dot), self.num_warps, self.num_stages]

    @classmethod
    def from_list(cls, items) -> BlockConfig:
        bo, bg, bn, sk, dot, warps, stages = (int(v) for v in items)
        return cls(bo, bg, bn, sk, bool(dot), warps, stages)

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
        if problems:
            raise ValueError(f"block config {self} does not fit a {out_features}x{in_features} weight: " + "; ".join(problems))


def default_config(n_tokens: int, out_features: int, in_features: int) -> BlockConfig:
    """A configuration that fits the shape: gather up to 8 tokens, tensor-core dot above.

    One token: 16 rows x 128 groups, 8 warps, 3 stages, no split-K; the sweep on an H200
    (benchmarks/results/h200-decode-sweep.jsonl) found it within 7% of each Llama shape's best.
    """
    groups = in_features // 4
    if n_tokens <= 1:
        if groups % 128 == 0:
            return BlockConfig(16, 128, 1, 1, False, 8, 3)
        return BlockConfig(16, next(g for g in (64, 32, 16) if groups % g == 0), 1, 1, False, 4, 3)
    block_n = 1 << (n_tokens - 1).bit_length()
    dot = block_n > 8
    block_n = min(max(block_n, 16), 64) if dot else block_n
    block_out = 64 if dot and out_features % 64 == 0 else (32 if dot and out_features % 32 == 0 else 16)
    block_g = next(g for g in (64, 32, 16) if groups % g == 0)
    return BlockConfig(block_out, block_g, block_n, 1, dot, 4, 2)
