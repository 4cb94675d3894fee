"""Measuring a pruned model: perplexity, sparsity, and lm-eval-harness tasks (``harness``,
imported on demand: it needs the ``[eval]`` extra)."""

from .perplexity import perplexity
from .sparsity import layer_sparsity, total_sparsity

__all__ = ["layer_sparsity", "perplexity", "total_sparsity"]
