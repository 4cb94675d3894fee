"""Optional weight reconstruction after the mask: least squares on the kept weights.

Given W0 (out x in), the Gram matrix H = X^T X of the layer's calibration inputs and a mask,
find W supported on the mask that minimises ||(W0 - W) X^T||^2, i.e. for every row r

    W_r,K = argmin (w - W0_r) H (w - W0_r)^T  with w_P = 0,
    H_KK w_K = H_K: W0_r^T     (K kept, P pruned inputs of that row).

All rows are solved at once by conjugate gradients on the mask-restricted operator
w -> mask * (w H): each iteration is one (out x in) @ (in x in) product, so the cost is
O(iterations * out * in^2), one Gram matrix in memory, and no per-row factorisation (the exact
per-row solve costs O(out * k^3) and does not scale to 7B-class layers). `exact_solve` is the
reference used by the tests.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def accumulate_gram(inputs: torch.Tensor, gram: torch.Tensor | None = None, count: int = 0) -> tuple[torch.Tensor, int]:
    """Running mean of x x^T over tokens: returns (H, tokens seen). H is fp32 [in, in]."""
    flat = inputs.reshape(-1, inputs.shape[-1]).float()
    tokens = flat.shape[0]
    if gram is None:
        gram = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float32, device=flat.device)
    total = count + tokens
    gram.mul_(count / total).addmm_(flat.T, flat, alpha=1.0 / total)
    return gram, total


def all_reduce_gram(gram: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """Token-weighted mean of the ranks' Gram matrices (no-op without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return gram, count
    total = torch.tensor([float(count)], device=gram.device)
    dist.all_reduce(total)
    gram.mul_(count / max(float(total.item()), 1.0))
    dist.all_reduce(gram)
    return gram, int(total.item())


def dampen(gram: torch.Tensor, fraction: float) -> torch.Tensor:
    """H + fraction * mean(diag H) * I (a copy); dead inputs (zero diagonal) get a unit diagonal."""
    damped = gram.clone()
    diagonal = damped.diagonal()
    dead = diagonal == 0
    diagonal[dead] = 1.0
    diagonal.add_(fraction * diagonal.mean())
    return damped


def least_squares(
    weight: torch.Tensor,
    gram: torch.Tensor,
    mask: torch.Tensor,
    damping: float = 0.01,
    max_iterations: int = 200,
    tolerance: float = 1e-6,
) -> torch.Tensor:
    """Kept weights re-fitted to the layer's calibration outputs; pruned ones exactly 0.

    Conjugate gradients per row (all rows in parallel) on H_KK w_K = (W0 H)_K, started from the
    masked original weights, with a Jacobi preconditioner; stops when every row's residual
    norm fell below ``tolerance`` times its initial norm. Returns fp32.
    """
    w0 = weight.float()
    keep = mask.to(w0.device, torch.float32)
    hessian = dampen(gram.to(w0.device, torch.float32), damping)
    inverse_diagonal = 1.0 / hessian.diagonal()

    solution = w0 * keep
    residual = ((w0 - solution) @ hessian) * keep  # = (b - A x0) restricted to the mask
    preconditioned = residual * inverse_diagonal
    direction = preconditioned.clone()
    rz = (residual * preconditioned).sum(dim=1, keepdim=True)
    start = residual.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    for _ in range(max_iterations):
        if bool((residual.norm(dim=1, keepdim=True) <= tolerance * start).all()):
            break
        product = (direction @ hessian) * keep
        curvature = (direction * product).sum(dim=1, keepdim=True)
        step = torch.where(curvature > 0, rz / curvature.clamp_min(1e-30), torch.zeros_like(rz))
        solution.addcmul_(step, direction)
        residual.addcmul_(step, product, value=-1)
        preconditioned = residual * inverse_diagonal
        rz_next = (residual * preconditioned).sum(dim=1, keepdim=True)
        direction.mul_(torch.where(rz > 0, rz_next / rz.clamp_min(1e-30), torch.zeros_like(rz))).add_(preconditioned)
        rz = rz_next
    return solution * keep


def exact_solve(weight: torch.Tensor, gram: torch.Tensor, mask: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """Row-by-row direct solve of the same problem (O(out * k^3)); for tests and small layers."""
    w0 = weight.double()
    hessian = dampen(gram.double(), damping)
    result = torch.zeros_like(w0)
    for row in range(w0.shape[0]):
        kept = mask[row].nonzero().squeeze(1)
        if kept.numel() == 0:
            continue
        rhs = (w0[row] @ hessian)[kept]
        result[row, kept] = torch.linalg.solve(hessian[kept][:, kept], rhs)
    return result


def reconstruction_error(weight: torch.Tensor, candidate: torch.Tensor, gram: torch.Tensor) -> float:
    """tr((W0 - W) H (W0 - W)^T): the layer's mean squared output error on calibration inputs."""
    delta = (weight.double() - candidate.double())
    return float(((delta @ gram.double()) * delta).sum())


def default_iterations(in_features: int) -> int:
    """A generous cap on CG iterations for a layer of this width."""
    return max(50, min(400, int(4 * math.sqrt(in_features))))
