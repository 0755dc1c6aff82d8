r"""Shift-invert: the eigenvalues of ``A`` nearest ``σ`` as the largest of ``(A − σI)^{-1}``.

``A y = λ y  ⟺  (A − σI)^{-1} y = ν y`` with ``ν = 1/(λ − σ)``, so the eigenvalues nearest ``σ`` are the
largest-magnitude ones of ``S = (A − σI)^{-1}`` and well separated there even when they are
clustered in ``A`` — scipy's ``eigsh(A, sigma=σ)`` convention (its ``mode='normal'``). Each product
``S V`` is an inner solve (:func:`.minres.minres_solve`, Lanczos–MINRES on the package's Lanczos
loop, batched over the block), preconditioned by the GP routine's pivoted-Cholesky split
preconditioner of ``K + (D − σ)`` when ``A = K + D`` (``AddedDiagLinearOperator``, e.g. a noisy
kernel matrix) with ``D − σ > 0``.

Eigenvectors: for a Ritz pair ``(ν, y)`` of ``S`` the product ``w = S y`` is one step of inverse
iteration, ``(A − σI) ŵ − ν^{-1} ŵ = −(S y − ν y)/(ν ‖w‖)``, so ``ŵ = w/‖w‖`` has an ``A``-residual
``≈ tol · |λ − σ|`` where ``y`` only has ``tol · ‖A − σI‖``. :func:`~lanczos_grad_gp.eigen.lanczos`
returns the Rayleigh–Ritz pairs of ``A`` on ``span(w_1, …, w_k)`` with TRUE residuals.

Cost: every outer step costs one inner solve, i.e. tens to hundreds of products with ``A``, against
one for plain ``which="SA"``/``"LA"``. Shift-invert pays off when the wanted eigenvalues are
interior (no plain mode reaches them) or clustered relative to the spread of the spectrum (plain
Lanczos then needs ``O(\sqrt{spread/gap})`` steps per eigenvalue, and restarts); on a
well-separated end of the spectrum plain mode is cheaper. ``diagnostics.num_matvecs`` counts
every product with ``A`` (``benchmarks/results/eigen_vs_peers.md`` has measured counts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from linear_operator.operators import AddedDiagLinearOperator, DiagLinearOperator
from torch import Tensor

from .. import settings
from .._compat import added_diag_parts
from ..core.preconditioners import Preconditioner, pivoted_cholesky_preconditioner
from .inputs import PreparedOperator
from .minres import minres_solve

__all__ = ["ShiftInvert", "shift_invert"]


@dataclass
class ShiftInvert:
    """The operator ``S = (A − σI)^{-1}`` by inner solves, with running statistics (mutable counters).

    Attributes:
        sigma: the shift; tol, max_iter: of each inner solve.
        preconditioner: the inner solves' preconditioner (``None``: none).
        matvecs: products with ``A`` so far (vectors); solves: inner solves (columns).
        worst_residual: largest relative residual of an inner solve; unconverged: columns that missed ``tol``.
    """

    op: PreparedOperator
    sigma: float
    tol: float
    max_iter: int
    preconditioner: Preconditioner | None
    matvecs: int = 0
    solves: int = 0
    worst_residual: float = 0.0
    unconverged: int = 0

    def shifted(self, X: Tensor) -> Tensor:
        """``(A − σI) X``."""
        return self.op.matmul(X) - self.sigma * X

    def __call__(self, X: Tensor) -> Tensor:
        """``S X`` for ``X`` ``(*b, n, c)``."""
        out = minres_solve(self.shifted, X, tol=self.tol, max_iter=self.max_iter, preconditioner=self.preconditioner)
        self.matvecs += int(out.iterations.sum())
        self.solves += out.iterations.numel()
        self.worst_residual = max(self.worst_residual, float(out.relative_residual.max()))
        self.unconverged += int((~out.converged).sum())
        return out.solution


def _preconditioner(op: PreparedOperator, sigma: float) -> Preconditioner | None:
    """Pivoted-Cholesky split preconditioner of ``K + (D − σ)`` when ``A = K + D`` with ``D − σ > 0``."""
    if op.linear_op is None or settings.max_preconditioner_size.value() == 0:
        return None
    parts = added_diag_parts(op.linear_op)
    if parts is None:
        return None
    base, diag = parts
    with torch.no_grad():
        d = diag.diagonal().detach() - sigma
        if not bool((d > 0).all()):
            return None
        shifted = AddedDiagLinearOperator(base.detach(), DiagLinearOperator(d))
        pc = pivoted_cholesky_preconditioner(
            shifted, settings.max_preconditioner_size.value(), settings.preconditioner_tol.value()
        )
    return pc if pc.rank > 0 else None


def shift_invert(op: PreparedOperator, sigma: float, *, tol: float, max_iter: int) -> ShiftInvert:
    """The :class:`ShiftInvert` operator of ``op`` at ``sigma`` (validated finite)."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma):
        raise ValueError(f"sigma must be a finite real number or None; got {sigma!r}.")
    return ShiftInvert(op, float(sigma), tol, max_iter, _preconditioner(op, float(sigma)))
