r"""Lanczos–MINRES: ``X = M^{-1} B`` for a symmetric, possibly indefinite ``M``, on the package's Lanczos loop.

The solves of shift-invert (:mod:`.shift_invert`, ``M = A − σI``) run on
:func:`lanczos_grad_gp.core.lanczos.lanczos_tridiag`, batched over the columns of ``B``. With a
symmetric positive definite preconditioner ``P = C C^T`` (the GP routine's pivoted-Cholesky
split preconditioner, :mod:`lanczos_grad_gp.core.preconditioners`) the loop runs on the symmetric
``M̃ = C^{-1} M C^{-T}`` from ``b̃ = C^{-1} b``, and ``x = C^{-T} x̃``. After ``m`` steps
``M̃ Q_m = Q_{m+1} T̄_m`` with the ``(m+1) × m`` tridiagonal ``T̄_m``; MINRES (Paige & Saunders 1975)
takes ``x̃_m = Q_m y_m``,

.. math::
    y_m = \arg\min_y \lVert \lVert b̃\rVert e_1 - T̄_m y \rVert, \qquad
    \lVert b̃ - M̃ x̃_m\rVert = \lVert \lVert b̃\rVert e_1 - T̄_m y_m\rVert,

which, unlike the Galerkin (CG) solution ``T_m^{-1} e_1``, is defined and monotone for indefinite
``M̃``. The small least-squares problems are solved every ``check_every`` steps for the stopping
test ``‖b̃ − M̃ x̃‖ ≤ tol ‖b̃‖``; memory is the Lanczos basis, ``O(n · m · c)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.lanczos import LanczosResult, lanczos_tridiag
from ..core.preconditioners import Preconditioner

__all__ = ["SolveResult", "minres_solve"]


@dataclass(frozen=True)
class SolveResult:
    """Output of :func:`minres_solve` for ``B`` of shape ``(*b, n, c)``.

    Attributes:
        solution: ``(*b, n, c)`` ``X ≈ M^{-1} B``.
        iterations: ``(*b, c)`` Lanczos steps (one product with ``M`` per step and column).
        relative_residual: ``(*b, c)`` ``‖b̃ − M̃ x̃‖ / ‖b̃‖`` of the (preconditioned) system.
        converged: ``(*b, c)`` relative residual ``≤ tol``.
    """

    solution: Tensor
    iterations: Tensor
    relative_residual: Tensor
    converged: Tensor


def _least_squares(res: LanczosResult) -> tuple[Tensor, Tensor]:
    """MINRES coefficients ``y`` ``(*b, c, m)`` (float64) and relative residuals ``(*b, c)``."""
    m = res.num_steps
    its = res.iterations  # (*b, c)
    cdt = torch.float64 if res.alpha.device.type != "mps" else res.alpha.dtype
    steps = torch.arange(m, device=its.device)
    used = steps < its.unsqueeze(-1)  # (*b, c, m)
    alpha = torch.where(used, res.alpha.to(cdt), torch.ones_like(res.alpha, dtype=cdt))  # padding: identity
    Tbar = torch.zeros(*its.shape, m + 1, m, dtype=cdt, device=its.device)
    Tbar[..., :m, :] = torch.diag_embed(alpha)
    if m > 1:
        off = res.beta.to(cdt)
        Tbar[..., 1:m, : m - 1] += torch.diag_embed(off)
        Tbar[..., : m - 1, 1:m] += torch.diag_embed(off)
    last = (its - 1).clamp_min(0)  # the extra row holds β_m at the column of the last step
    row = torch.zeros(*its.shape, m, dtype=cdt, device=its.device)
    row.scatter_(-1, last.unsqueeze(-1), res.residual_norm.to(cdt).unsqueeze(-1))
    Tbar[..., m, :] = row
    rhs = torch.zeros(*its.shape, m + 1, 1, dtype=cdt, device=its.device)
    rhs[..., 0, 0] = 1.0  # the unit start vector: scaled by ‖b̃‖ afterwards
    Qf, Rf = torch.linalg.qr(Tbar)  # (m+1, m) reduced: full column rank (β > 0 inside, identity padding)
    y = torch.linalg.solve_triangular(Rf, Qf.mT @ rhs, upper=True)
    rel = torch.linalg.vector_norm(rhs - Tbar @ y, dim=(-2, -1))
    return y.squeeze(-1), rel


def minres_solve(
    matmul: Callable[[Tensor], Tensor],
    B: Tensor,
    *,
    tol: float,
    max_iter: int,
    preconditioner: Preconditioner | None = None,
    check_every: int = 10,
) -> SolveResult:
    """``X ≈ M^{-1} B`` by (preconditioned) Lanczos–MINRES (module docstring).

    Args:
        matmul: ``X (*b, n, c) -> M X`` (no graph), ``M`` symmetric.
        B: ``(*b, n, c)`` right-hand sides.
        tol: relative residual of the (preconditioned) system at which a column stops.
        max_iter: cap on Lanczos steps per column.
        preconditioner: ``C`` of an SPD ``P = C C^T ≈ M`` (``inv_root``/``inv_root_t``), or ``None``.
        check_every: steps between stopping tests.
    """
    if preconditioner is not None:
        pc = preconditioner

        def op(X: Tensor) -> Tensor:
            return pc.inv_root(matmul(pc.inv_root_t(X)))

        rhs = pc.inv_root(B)
    else:
        op, rhs = matmul, B

    def stop(partial: LanczosResult) -> Tensor:
        return _least_squares(partial)[1] <= tol

    res = lanczos_tridiag(op, rhs, max_iter=max_iter, stop_fn=stop, check_every=check_every, allow_zero=True)
    y, rel = _least_squares(res)
    y = (y * res.start_norm.to(y.dtype).unsqueeze(-1)).to(B.dtype)  # (*b, c, m)
    X = (y.unsqueeze(-2) @ res.basis).squeeze(-2).mT  # (*b, n, c): Q_m y per column
    if preconditioner is not None:
        X = preconditioner.inv_root_t(X)
    rel = rel.to(B.dtype)
    return SolveResult(X, res.iterations, rel, rel <= tol)
