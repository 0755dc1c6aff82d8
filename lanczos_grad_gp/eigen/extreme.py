r"""Extreme eigenvalues and the condition number with residual bounds.

One Lanczos run (Lanczos 1950; full reorthogonalization, Paige 1976) from a random vector gives
Ritz values ``θ_1 ≤ … ≤ θ_m``. By Cauchy interlacing ``λ_min ≤ θ_1`` and ``θ_m ≤ λ_max``; with
Ritz vectors ``y`` and TRUE residuals ``r = ‖A y − θ y‖`` some eigenvalue lies in
``[θ − r, θ + r]`` (Kahan–Parlett; Parlett, *The Symmetric Eigenvalue Problem*, Thm 4.5.1).
Together: ``λ_max ∈ [θ_m, θ_m + r_max]`` and ``λ_min ∈ [θ_1 − r_min, θ_1]`` — the outer ends
assume the extreme Ritz values approximate the extreme eigenvalues, which is what Lanczos
converges to first (Kaniel–Paige–Saad theory). Stopping: both relative Ritz residual estimates
``β_m |s_{m,i}| / |θ_i| ≤ tol``, checked every ``check_every`` steps through ``stop_fn``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.lanczos import LanczosResult, lanczos_tridiag
from ..core.quadrature import ritz_decomposition
from .inputs import check_tol, prepare_operator, randn, resolve_generator
from .result import ConditionNumber, ExtremeEigenvalues

__all__ = ["extreme_eigenvalues", "condition_number"]


def _ends(res: LanczosResult) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``θ_min, θ_max`` (``(*b,)``), their ``T``-eigenvectors ``(*b, m)`` and Ritz estimates ``(*b, 2)``."""
    ritz = ritz_decomposition(res)
    vals = ritz.values[..., 0, :]  # (*b, m) one start column
    S = ritz.vectors[..., 0, :, :]  # (*b, m, m)
    idx = (res.iterations[..., 0] - 1).clamp_min(0)
    last = S.gather(-2, idx.view(*idx.shape, 1, 1).expand(*idx.shape, 1, S.shape[-1])).squeeze(-2)  # (*b, m)
    beta = res.residual_norm[..., 0].to(vals.dtype)
    est = beta.unsqueeze(-1) * torch.stack([last[..., 0], last[..., -1]], -1).abs()
    return vals[..., 0], vals[..., -1], torch.stack([S[..., :, 0], S[..., :, -1]], -1), est


def extreme_eigenvalues(
    operator: object,
    *,
    max_iter: int | None = None,
    tol: float = 1e-4,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    check_every: int = 10,
) -> ExtremeEigenvalues:
    """Estimate ``λ_min`` and ``λ_max`` with residual bounds (module docstring).

    Args:
        operator: symmetric LinearOperator, dense ``(*b, n, n)`` tensor, or ``(matvec, n)`` tuple.
        max_iter: Lanczos steps (``None``: ``min(n, 300)``).
        tol: relative Ritz residual at which both ends count as converged.
        seed, generator: randomness of the start vector (one or the other).
        check_every: steps between convergence checks.
    """
    tol = check_tol(tol)
    op = prepare_operator(operator)
    n = op.n
    if max_iter is None:
        max_iter = min(n, 300)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int; got {max_iter!r}.")
    gen = resolve_generator(seed, generator, op.device)
    v0 = randn((*op.batch_shape, n, 1), gen, op.dtype, op.device)

    def stop_fn(partial: LanczosResult) -> Tensor:
        lo, hi, _, est = _ends(partial)
        scale = torch.stack([lo, hi], -1).abs()
        return (est <= tol * scale).all(-1, keepdim=True)

    res = lanczos_tridiag(
        op.matmul, v0, max_iter=max_iter, reorthogonalize=True, stop_fn=stop_fn, check_every=check_every
    )
    lo, hi, S2, _ = _ends(res)
    Y = res.basis[..., 0, :, :].mT @ S2.to(op.dtype)  # (*b, n, 2) Ritz vectors of θ_min, θ_max
    theta = torch.stack([lo, hi], -1).to(op.dtype)  # (*b, 2)
    r = torch.linalg.vector_norm(op.matmul(Y) - Y * theta.unsqueeze(-2), dim=-2)  # TRUE residuals
    lo, hi = theta[..., 0], theta[..., 1]
    return ExtremeEigenvalues(
        lambda_max=hi,
        lambda_min=lo,
        lambda_max_bounds=torch.stack([hi, hi + r[..., 1]], -1),
        lambda_min_bounds=torch.stack([lo - r[..., 0], lo], -1),
        residual_max=r[..., 1],
        residual_min=r[..., 0],
        iterations=res.iterations[..., 0],
    )


def condition_number(operator: object, **kwargs: object) -> ConditionNumber:
    """``κ(A) = λ_max/λ_min`` of a positive definite operator, with bounds.

    ``θ_max/θ_min`` is a rigorous lower bound (interlacing) and the estimate;
    ``(θ_max + r_max)/(θ_min − r_min)`` the upper bound (``inf`` if ``θ_min ≤ r_min``).
    Keyword arguments go to :func:`extreme_eigenvalues`.

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
    denom = ext.lambda_min - ext.residual_min
    upper = torch.where(
        denom > 0,
        (ext.lambda_max + ext.residual_max) / denom.clamp_min(torch.finfo(denom.dtype).tiny),
        torch.full_like(est, float("inf")),
    )
    return ConditionNumber(estimate=est, lower=est, upper=upper, extremes=ext)
