r"""Extreme eigenvalues and the condition number with residual bounds, robust to Lanczos breakdown.

One Lanczos run (Lanczos 1950; full reorthogonalization, Paige 1976) from a random vector gives
Ritz values ``θ_1 ≤ … ≤ θ_m``. By Cauchy interlacing ``λ_min ≤ θ_1`` and ``θ_m ≤ λ_max``; with
Ritz vectors ``y`` and TRUE residuals ``r = ‖A y − θ y‖`` some eigenvalue lies in
``[θ − r, θ + r]`` (Kahan–Parlett; Parlett, *The Symmetric Eigenvalue Problem*, Thm 4.5.1).
Together: ``λ_max ∈ [θ_m, θ_m + r_max]`` and ``λ_min ∈ [θ_1 − r_min, θ_1]`` — the outer ends
assume the extreme Ritz values approximate the extreme eigenvalues, which is what Lanczos
converges to first (Kaniel–Paige–Saad theory). Stopping: both relative Ritz residual estimates
``β_m |s_{m,i}| / |θ_i| ≤ tol``, checked every ``check_every`` steps through ``stop_fn``.

Breakdown: when the start vector lies in an invariant subspace ``K`` (``β_j ≈ 0`` after ``j < n``
steps), the Ritz values are exact eigenvalues of ``A|_K`` — and can be far from the extremes of
``A`` (an eigenvector start gives ``θ_1 = θ_m``, a "condition number" of 1). The run then restarts
from a fresh random vector orthogonal to every basis so far (``orthogonal_to``): ``K`` is invariant,
so ``A`` is block diagonal on ``K ⊕ K^⊥`` and the extremes of ``A`` are the extremes over all runs.
An end is ``converged`` when its TRUE residual is ``≤ tol · max(|θ|, ε^{2/3}‖A‖) + 100 ε ‖A‖`` and no
breakdown is left unresolved; for an unconverged end the outer bound is ``±inf`` (never a
rigorous-looking wrong interval) and a ``NumericalWarning`` is raised.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.lanczos import LanczosResult, lanczos_tridiag
from ..core.quadrature import ritz_decomposition
from ..diagnostics import warn_not_converged
from .basis import project_out
from .block import residual_floor
from .inputs import check_tol, holds_operator_fixed, prepare_operator, randn, resolve_generator
from .result import ConditionNumber, ExtremeEigenvalues

__all__ = ["extreme_eigenvalues", "condition_number"]


def _ends(res: LanczosResult) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``θ_min, θ_max`` (``(*b,)``), their ``T``-eigenvectors ``(*b, m, 2)`` and Ritz estimates ``(*b, 2)``."""
    ritz = ritz_decomposition(res)
    vals = ritz.values[..., 0, :]  # (*b, m) one start column
    S = ritz.vectors[..., 0, :, :]  # (*b, m, m)
    its = res.iterations[..., 0]
    used = torch.arange(S.shape[-1], device=its.device) < its.unsqueeze(-1)  # (*b, m) Ritz pairs off padding
    weight = (S.square() * used.to(S.dtype).unsqueeze(-1)).sum(-2) > 0.5  # (*b, m)
    big = torch.finfo(vals.dtype).max
    lo_i = torch.where(weight, vals, torch.full_like(vals, big)).argmin(-1)
    hi_i = torch.where(weight, vals, torch.full_like(vals, -big)).argmax(-1)
    idx = torch.stack([lo_i, hi_i], -1)  # (*b, 2)
    theta = vals.gather(-1, idx)
    S2 = S.gather(-1, idx.unsqueeze(-2).expand(*S.shape[:-1], 2))  # (*b, m, 2)
    last = (its - 1).clamp_min(0)
    s_last = S2.gather(-2, last.view(*last.shape, 1, 1).expand(*last.shape, 1, 2)).squeeze(-2)
    est = res.residual_norm[..., 0].to(vals.dtype).unsqueeze(-1) * s_last.abs()
    return theta[..., 0], theta[..., 1], S2, est


@holds_operator_fixed
def extreme_eigenvalues(
    operator: object,
    *,
    max_iter: int | None = None,
    tol: float = 1e-4,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    check_every: int = 10,
    v0: Tensor | None = None,
) -> ExtremeEigenvalues:
    """Estimate ``λ_min`` and ``λ_max`` with residual bounds (module docstring).

    Args:
        operator: symmetric LinearOperator, dense ``(*b, n, n)`` tensor, curvature operator or ``(matvec, n)`` tuple.
        max_iter: Lanczos steps over all restarts (``None``: ``min(n, 300)``).
        tol: relative residual at which an end counts as converged.
        seed, generator: randomness of the start and restart vectors (one or the other).
        check_every: steps between convergence checks.
        v0: optional start vector ``(*b, n)`` (default: random).
    """
    tol = check_tol(tol)
    op = prepare_operator(operator)
    n, batch, dtype = op.n, tuple(op.batch_shape), op.dtype
    if max_iter is None:
        max_iter = min(n, 300)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int; got {max_iter!r}.")
    gen = resolve_generator(seed, generator, op.device)
    if v0 is None:
        v = randn((*batch, n, 1), gen, dtype, op.device)
    else:
        if not isinstance(v0, Tensor) or v0.shape[-1] != n:
            raise ValueError(f"v0 must be a tensor of shape (*batch, {n}); got {getattr(v0, 'shape', v0)!r}.")
        v = v0.detach().to(dtype=dtype, device=op.device).expand(*batch, n).unsqueeze(-1)
        if not bool((torch.linalg.vector_norm(v, dim=-2) > 0).all()):
            raise ValueError("v0 must be a nonzero vector.")

    def stop_fn(partial: LanczosResult) -> Tensor:
        lo, hi, _, est = _ends(partial)
        scale = torch.stack([lo, hi], -1).abs()
        return (est <= tol * scale).all(-1, keepdim=True)

    basis = torch.zeros(*batch, n, 0, dtype=dtype, device=op.device)  # every run's Lanczos vectors
    theta = Y = None
    iters = torch.zeros(batch, dtype=torch.long, device=op.device)
    pending = torch.ones(batch, dtype=torch.bool, device=op.device)  # entries still to (re)start
    restarts = 0
    left = max_iter
    while True:
        res = lanczos_tridiag(
            op.matmul,
            v * pending.to(dtype).view(*batch, 1, 1),
            max_iter=left,
            reorthogonalize=True,
            stop_fn=stop_fn,
            check_every=check_every,
            allow_zero=True,
            orthogonal_to=basis if basis.shape[-1] else None,
        )
        lo, hi, S2, _ = _ends(res)
        Yr = res.basis[..., 0, :, :].mT @ S2.to(dtype)  # (*b, n, 2) Ritz vectors of θ_min, θ_max
        th = torch.stack([lo, hi], -1).to(dtype)
        ran = (res.iterations[..., 0] > 0).unsqueeze(-1)
        if theta is None or Y is None:
            theta, Y = th, Yr
        else:  # the extremes over all runs (each run lives in the complement of the previous invariant spaces)
            better = ran & torch.stack([th[..., 0] < theta[..., 0], th[..., 1] > theta[..., 1]], -1)
            theta = torch.where(better, th, theta)
            Y = torch.where(better.unsqueeze(-2), Yr, Y)
        iters = iters + res.iterations[..., 0]
        basis = torch.cat([basis, res.basis[..., 0, :, :].mT], -1)
        # an invariant Krylov space (breakdown, or a residual below tol: every Ritz pair converged) that is
        # not all of R^n: the extremes may lie outside it
        scale = torch.maximum(lo.abs(), hi.abs()).to(res.residual_norm.dtype)
        invariant = res.broke_down[..., 0] | (res.residual_norm[..., 0] <= tol * scale)
        pending = ran.squeeze(-1) & invariant & (iters < n)
        # one restart from a random vector in the complement suffices: its Krylov space reaches every
        # eigenspace of the complement (with probability 1), so if it breaks down too it has seen both ends
        left = max_iter - int(torch.where(pending, iters, torch.zeros_like(iters)).max())
        if restarts or not bool(pending.any()) or left <= 0:
            pending = pending & (restarts == 0)
            break
        restarts += 1
        v = project_out(randn((*batch, n, 1), gen, dtype, op.device), basis)
    r = torch.linalg.vector_norm(op.matmul(Y) - Y * theta.unsqueeze(-2), dim=-2)  # TRUE residuals
    eps = torch.finfo(dtype).eps
    anorm = theta.abs().amax(-1)
    conv = (r <= residual_floor(theta, anorm, tol, eps)) & ~pending.unsqueeze(-1)  # (*b, 2): min, max
    lo, hi = theta[..., 0], theta[..., 1]
    inf = torch.full_like(lo, float("inf"))
    if not bool(conv.all()):
        warn_not_converged(
            "eigen.extreme_eigenvalues",
            f"{int((~conv).sum())} extreme eigenvalue estimate(s) not converged after {int(iters.max())} steps; "
            "the outer bounds are +-inf there",
            "Raise max_iter or lower the tolerance demands.",
        )
    return ExtremeEigenvalues(
        lambda_max=hi,
        lambda_min=lo,
        lambda_max_bounds=torch.stack([hi, torch.where(conv[..., 1], hi + r[..., 1], inf)], -1),
        lambda_min_bounds=torch.stack([torch.where(conv[..., 0], lo - r[..., 0], -inf), lo], -1),
        residual_max=r[..., 1],
        residual_min=r[..., 0],
        iterations=iters,
        converged_max=conv[..., 1],
        converged_min=conv[..., 0],
        restarts=restarts,
    )


def condition_number(operator: object, **kwargs: object) -> ConditionNumber:
    """``κ(A) = λ_max/λ_min`` of a positive definite operator, with bounds.

    ``θ_max/θ_min`` is a rigorous lower bound (interlacing) and the estimate;
    ``(θ_max + r_max)/(θ_min − r_min)`` the upper bound (``inf`` if ``θ_min ≤ r_min`` or an end did not
    converge). Keyword arguments go to :func:`extreme_eigenvalues`.

    Raises:
        ValueError: a Ritz value ``θ_min ≤ 0`` proves the operator is not positive definite.
    """
    ext = extreme_eigenvalues(operator, **kwargs)  # type: ignore[arg-type]
    if not bool((ext.lambda_min > 0).all()):
        raise ValueError(
            f"condition_number needs a positive definite operator; found a Ritz value "
            f"{float(ext.lambda_min.min()):.3e} <= 0."
        )
    est = ext.lambda_max / ext.lambda_min
    denom = ext.lambda_min_bounds[..., 0]
    conv = ext.converged_max & ext.converged_min
    upper = torch.where(
        conv & (denom > 0),
        ext.lambda_max_bounds[..., 1] / denom.clamp_min(torch.finfo(denom.dtype).tiny),
        torch.full_like(est, float("inf")),
    )
    return ConditionNumber(estimate=est, lower=est, upper=upper, extremes=ext, converged=conv)
