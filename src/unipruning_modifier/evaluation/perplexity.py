"""Perplexity of a causal LM on a token stream, in non-overlapping windows."""

from __future__ import annotations

import math

import torch
from tqdm import tqdm


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    window: int = 1024,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> float:
    """exp(mean next-token NLL) over consecutive non-overlapping windows of the token stream.

    Each window predicts its tokens 2..window from the ones before it (no context across
    windows), in fp32 accumulation; a trailing partial window is dropped.
    """
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    count = tokens.numel() // window
    if count == 0:
        raise ValueError(f"evaluation text has {tokens.numel()} tokens, fewer than one window of {window}")
    windows = tokens[: count * window].reshape(count, window)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    batches = range(0, count, batch_size)
    for start in tqdm(batches, desc="perplexity", disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total_nll / total_tokens)
