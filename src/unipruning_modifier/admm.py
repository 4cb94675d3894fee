"""ALPS layer-wise pruning (Meng, Behdin, Wang, Mazumder, NeurIPS 2024): ADMM, then PCG.

For one layer with weights W0 (out x in) and the Gram matrix H = X^T X of its calibration
inputs, ALPS looks for W that minimises the output error tr((W0 - W) H (W0 - W)^T) subject to
a sparsity budget, choosing the mask *by* the reconstruction rather than before it:

1. ``normalize``: H + damping * mean(diag H) * I, scaled to a unit diagonal (S^-1 H S^-1 with
   S = sqrt(diag)), the weights to W S. This makes the penalty rho scale-free, ranks weights
   by |W_ij| sqrt(H_jj) (Wanda's score) in every projection, and is the Jacobi preconditioner
   of the final conjugate gradients.
2. ``ridge_solver``: the W-step's (H + rho I)^-1, a Cholesky factor per rho (rho changes every
   few iterations); applied by two triangular solves, or as an explicit inverse for layers with
   at least as many rows as inputs, whichever costs less.
3. ``admm``: split W = D with D in the budget's set; W-step a ridge solve, D-step the
   projection (``project``: keep the largest |W + V / rho|), dual step V += rho (W - D).
   Every ``update_every`` iterations rho is raised by how far the support moved
   (``penalty_step``), which forces W and D together as the support settles.
4. ``pcg``: the weights re-fitted on the final support by conjugate gradients, warm-started
   from the ADMM iterate.

``alps`` runs the steps; each is a pure function of tensors, usable alone (the modifier's
reconstruction-aware mask uses ``admm`` and ``pcg`` with its own start, scores and targets).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .device import synchronize
from .masks import kept_count, nm_mask, row_mask, unstructured_mask
from .reconstruction import conjugate_gradients, dampen, dampen_cross
from .structure import parse_mask_structure

RHO_CAP = 1e6  # ALPS caps the penalty there


@dataclass(frozen=True)
class Budget:
    """What a projection keeps: ``sparsity`` pruned over the layer (or of every row with
    ``per_row``), or, when ``m`` > 0, ``n`` pruned of every ``m`` consecutive inputs of a row
    (llm-compressor's ``mask_structure`` "N:M")."""

    sparsity: float = 0.0
    n: int = 0
    m: int = 0
    per_row: bool = False

    @classmethod
    def parse(cls, sparsity: float | None = None, mask_structure: str = "0:0", per_row: bool = False) -> "Budget":
        """A budget from recipe fields: "N:M" wins over ``sparsity``."""
        n, m = parse_mask_structure(mask_structure)
        if m:
            return cls(sparsity=n / m, n=n, m=m)
        if sparsity is None or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
        return cls(sparsity=float(sparsity), per_row=per_row)

    def kept(self, shape: torch.Size) -> int:
        """How many weights of a layer of this shape the budget keeps."""
        rows, cols = shape
        if self.m:
            return rows * cols // self.m * (self.m - self.n)
        if self.per_row:
            return rows * kept_count(cols, self.sparsity)
        return kept_count(rows * cols, self.sparsity)


def project(values: torch.Tensor, budget: Budget, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Mask (True = kept) of the Euclidean projection onto the budget's set: the largest |values|
    (layer-wide, per row, or per group of M); ties go to the larger ``scores``, then the lower
    index, so the result is deterministic."""
    keys = [values.abs()] if scores is None else [values.abs(), scores.to(values.device, torch.float32)]
    if budget.m:
        return nm_mask(keys, budget.m - budget.n, budget.m)
    if budget.per_row:
        return row_mask(keys, budget.sparsity)
    return unstructured_mask(keys, budget.sparsity)


def normalize(gram: torch.Tensor, damping: float = 0.01, in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(S^-1 (H + damping * mean(diag H) I) S^-1, S) with S = the damped diagonal's square root:
    unit diagonal, fp32 (an fp32 ``gram`` overwritten ``in_place``). Weights go to that scale as
    W * S, back as W / S."""
    damped = dampen(gram.float(), damping, in_place)
    scale = damped.diagonal().sqrt()
    damped.div_(scale.unsqueeze(0)).div_(scale.unsqueeze(1))
    return damped, scale


def ridge_solver(hessian: torch.Tensor, rho: float, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """M -> M (H + rho I)^-1 for ``rows`` x in matrices M, from one Cholesky factor of H + rho I
    (fp32; fp64 where fp32 rounding breaks it), in^3 / 3 multiply-adds per rho. Applied by two
    triangular solves (rows x in^2), or, when ``rows`` >= in, through the explicit inverse formed
    once per rho (then one product per application), whichever costs less."""
    shifted = hessian.clone()
    shifted.diagonal().add_(rho)
    lower, info = torch.linalg.cholesky_ex(shifted)
    if int(info):
        lower = torch.linalg.cholesky(shifted.double()).to(hessian.dtype)
    del shifted
    if rows >= hessian.shape[0]:
        inverse = torch.cholesky_inverse(lower)
        return lambda matrix: matrix @ inverse

    def apply(matrix: torch.Tensor) -> torch.Tensor:
        # lower.T is a view that LAPACK reads transposed (no second in x in copy), and the second
        # solve overwrites the first's result: as fast, the same bits, one rows x in buffer less
        inner = torch.linalg.solve_triangular(lower.T, matrix, upper=True, left=False)
        return torch.linalg.solve_triangular(lower, inner, upper=False, left=False, out=inner)

    return apply


def penalty_step(rho: float, changed: int, kept: int, raised: bool) -> tuple[float, bool, str]:
    """ALPS's rule for rho, applied every few ADMM iterations from how many weights changed
    between kept and pruned since the last check (``changed``) out of the ``kept`` budget.

    The support moves a lot (> 10% / > 0.5% of kept): raise rho 1.3x / 1.2x. It moves a little:
    1.1x once rho has been raised; before that rho started too large (the iterate is stuck at
    its start), so divide it by 5 and "restart" from the initial point. It does not move:
    "stop" once rho has been raised, else divide by 5. Returns (rho, raised, action), rho
    capped at 1e6; action is "continue", "restart" or "stop".
    """
    action = "continue"
    if changed > 0.1 * kept:
        rho, raised = rho * 1.3, True
    elif changed > 0.005 * kept:
        rho, raised = rho * 1.2, True
    elif changed > 0:
        if raised:
            rho *= 1.1
        else:
            rho, action = rho / 5, "restart"
    elif raised:
        action = "stop"
    else:
        rho /= 5
    return min(rho, RHO_CAP), raised, action


class AdmmResult(NamedTuple):
    weight: torch.Tensor  # the last W-step iterate restricted to ``mask``
    mask: torch.Tensor  # bool, True = kept: the projection of that iterate
    iterations: int
    rho: float


def admm(
    weight: torch.Tensor,
    gram: torch.Tensor,
    budget: Budget,
    rhs: torch.Tensor | None = None,
    rho: float = 0.1,
    max_iterations: int = 300,
    update_every: int = 3,
    settle_after: int = 30,
    tolerance: float = 3e-4,
    initial_mask: torch.Tensor | None = None,
    initial_weight: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
) -> AdmmResult:
    """ADMM for min tr(W H W^T) - 2 tr(W rhs^T) s.t. W within ``budget`` (rhs = W0 H by default:
    the output error tr((W0 - W) H (W0 - W)^T)), all tensors in one scale (``normalize``'s for ALPS).

    The start D (and the point a "restart" goes
    back to) is ``initial_weight`` (default ``weight``) on ``initial_mask`` (default: its
    projection). ``scores`` break ties in every projection. Stops after ``max_iterations``, when
    the support stops moving once rho was raised, or when, after ``settle_after`` iterations,
    fewer than ``tolerance`` x kept weights changed over the last ``update_every`` iterations.
    Returns the projection of the last W-step iterate.
    """
    weight = weight.float()
    gram = gram.to(weight.device, torch.float32)
    rhs = weight @ gram if rhs is None else rhs.to(weight.device, torch.float32)
    kept = budget.kept(weight.shape)

    start = weight if initial_weight is None else initial_weight.to(weight.device, torch.float32)
    start_mask = project(start, budget, scores) if initial_mask is None else initial_mask.to(weight.device, torch.bool)

    # only the dual and each iteration's fresh split are changed in place, so the solution may
    # start as the weight itself and the start needs no copy (each out x in fp32 buffer is 180 MiB
    # for a 7B down_proj)
    solution, split, dual = weight, start * start_mask, torch.zeros_like(weight)
    support, previous = start_mask, start_mask
    ridge = ridge_solver(gram, rho, weight.shape[0])
    raised = False
    iteration = 0
    for iteration in range(1, max_iterations + 1):
        step = torch.add(rhs, split, alpha=rho).sub_(dual)
        del solution  # the last iterate goes before the W-step makes the next
        solution = ridge(step)
        del step
        split = torch.add(solution, dual, alpha=1.0 / rho)
        support = project(split, budget, scores)
        split.mul_(support)
        dual.add_(solution - split, alpha=rho)
        if iteration % update_every:
            continue
        changed = int(torch.count_nonzero(support != previous))
        previous = support
        new_rho, raised, action = penalty_step(rho, changed, kept, raised)
        if action == "stop":
            break
        if action == "restart":
            solution, split, dual = weight, start * start_mask, torch.zeros_like(weight)
        if new_rho != rho:
            rho, ridge = new_rho, None  # the old factor goes before the new one is made
            ridge = ridge_solver(gram, rho, weight.shape[0])
        if iteration > settle_after and changed < tolerance * kept:
            break
    mask = project(solution, budget, scores)
    return AdmmResult(solution * mask, mask, iteration, rho)


def pcg(
    gram: torch.Tensor,
    rhs: torch.Tensor,
    mask: torch.Tensor,
    start: torch.Tensor,
    max_iterations: int = 10,
    tolerance: float = 1e-4,
) -> tuple[torch.Tensor, int]:
    """For every row r, solve W_r,K H_KK = rhs_r,K with W_r,P = 0 (K: the row's kept inputs in
    ``mask``) by conjugate gradients with a Jacobi preconditioner (reconstruction.py), all rows
    at once, from ``start``; stops when every row's residual is below ``tolerance`` times its
    norm of ``rhs``. Returns (solution, iterations)."""
    keep = mask.to(start.device, torch.bool)
    gram = gram.to(start.device, torch.float32)
    solution = start.float() * keep
    residual = (rhs.float() - solution @ gram).mul_(keep)
    limit = tolerance * rhs.float().norm(dim=1, keepdim=True)
    return conjugate_gradients(gram, keep, solution, residual, limit, max_iterations)


def _now(device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) seconds, the device synchronised first."""
    synchronize(device)
    return time.perf_counter(), time.process_time()


class ScaledGram(NamedTuple):
    """XᵀX made ready for any number of layers that read the same input (q/k/v share one)."""

    hessian: torch.Tensor  # damped, unit diagonal (``normalize``)
    scale: torch.Tensor  # its diagonal's square root: weights go to this scale as W * scale
    target: torch.Tensor | None  # the dense-target matrix in the same scale, or None (= hessian)


def scale_gram(gram: torch.Tensor, damping: float = 0.01, cross: torch.Tensor | None = None, consume: bool = False) -> ScaledGram:
    """``normalize`` of the Gram matrix, and the target matrix when ``cross`` (C = XᵀD,
    D the dense model's inputs) makes the target the dense model's output (damped like H).
    ``consume``: fp32 ``gram`` and ``cross`` the caller no longer needs become the results (two
    in x in matrices fewer at once: 0.9 GiB for a 7B down_proj)."""
    gram = gram.float()
    target = None
    if cross is not None:
        target = dampen_cross(gram, cross.to(gram.device, torch.float32), damping, in_place=consume)
    hessian, scale = normalize(gram, damping, in_place=consume)
    if target is not None:
        target.div_(scale.unsqueeze(0)).div_(scale.unsqueeze(1))
    return ScaledGram(hessian, scale, target)


def right_hand_side(weight: torch.Tensor, scaled_gram: ScaledGram) -> torch.Tensor:
    """(W S) Tᵀ for ADMM and PCG in ``scale_gram``'s scale (T the target matrix, H without one):
    once a layer has it, the target matrix is no longer needed."""
    device = weight.device
    target = scaled_gram.hessian if scaled_gram.target is None else scaled_gram.target.T
    return (weight.float() * scaled_gram.scale.to(device)) @ target.to(device)


class AlpsResult(NamedTuple):
    weight: torch.Tensor  # fp32, pruned entries exactly 0
    mask: torch.Tensor  # bool, True = kept
    admm_iterations: int
    pcg_iterations: int
    rho: float  # the final penalty
    seconds: dict  # {"scale", "admm", "pcg"}: wall seconds of each step (device synchronised)
    cpu_seconds: dict  # the same steps in process CPU seconds


def solve(
    weight: torch.Tensor,
    scaled_gram: ScaledGram,
    budget: Budget,
    rho: float = 0.1,
    max_iterations: int = 300,
    update_every: int = 3,
    settle_after: int = 30,
    tolerance: float = 3e-4,
    pcg_iterations: int = 10,
    pcg_tolerance: float = 1e-4,
    initial_mask: torch.Tensor | None = None,
    initial_weight: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    rhs: torch.Tensor | None = None,
) -> AlpsResult:
    """``admm`` then ``pcg`` for one layer on a ``scale_gram``'d XᵀX; seconds of both steps.
    ``rhs``: ``right_hand_side``, when the caller has taken it already (and dropped the target).

    The defaults are ALPS's (rho 0.1, at most 300 iterations, rho updated every 3, settled below
    3e-4 x kept changes after 30, 10 PCG iterations to 1e-4). ``initial_mask`` /
    ``initial_weight`` (original scale) replace the magnitude start, ``scores`` break ties in
    the projections (see ``admm``).
    """
    device = weight.device
    wall, cpu = {}, {}
    clock = _now(device)

    def lap(step: str) -> None:
        nonlocal clock
        now = _now(device)
        wall[step], cpu[step] = now[0] - clock[0], now[1] - clock[1]
        clock = now

    scale = scaled_gram.scale.to(device)
    hessian = scaled_gram.hessian.to(device)
    scaled = weight.float() * scale
    rhs = right_hand_side(weight, scaled_gram) if rhs is None else rhs.to(device, torch.float32)
    if initial_mask is not None:
        initial_mask = initial_mask.to(device, torch.bool)
    start = None if initial_weight is None else initial_weight.to(device, torch.float32) * scale
    found = admm(scaled, hessian, budget, rhs, rho, max_iterations, update_every, settle_after, tolerance,
                 initial_mask, start, scores)
    del scaled, start  # not needed by the re-fit: one rows x in buffer fewer at its peak
    lap("admm")
    solution, refits = pcg(hessian, rhs, found.mask, found.weight, pcg_iterations, pcg_tolerance)
    solution = (solution / scale) * found.mask
    lap("pcg")
    return AlpsResult(solution, found.mask, found.iterations, refits, found.rho, wall, cpu)


def alps(
    weight: torch.Tensor,
    gram: torch.Tensor,
    budget: Budget,
    damping: float = 0.01,
    cross: torch.Tensor | None = None,
    **options,
) -> AlpsResult:
    """Prune one layer with ALPS: ``scale_gram`` (``normalize``), then ``solve``
    (``admm``, ``pcg``; ``options`` are its keywords, defaults ALPS's).

    ``cross`` (C = X^T D, D the dense model's inputs of the same tokens, damped like H) makes the
    target the dense model's output: min ||W0 D^T - W X^T||^2, whose right-hand side is W0 C^T in
    place of W0 H, in ADMM and PCG alike.
    """
    device = weight.device
    start = _now(device)
    scaled_gram = scale_gram(gram.to(device), damping, cross)
    done = _now(device)
    result = solve(weight, scaled_gram, budget, **options)
    result.seconds["scale"], result.cpu_seconds["scale"] = done[0] - start[0], done[1] - start[1]
    return result
