r"""The forward-only gradient factors of Singh, Barros & Li (arXiv:2605.12801), as pure functions.

Hold the Lanczos basis ``Q`` of the forward pass fixed and differentiate the projected problem
``T(θ) = Q^T A(θ) Q`` (docs/mathematics.md, "The forward-only gradient"):

.. math::
    \partial_θ\, v^\top f(A) v \approx \sum_{ij} Γ_{ij}\, y_i^\top (\partial_θ A)\, y_j
    = \operatorname{tr}\big(Q M Q^\top \partial_θ A\big),\qquad
    Γ = F \circ (a a^\top),\quad M = S Γ S^\top,\quad a = \lVert v\rVert S^\top e_1,

with ``F`` the divided differences of ``f`` at the Ritz values (:mod:`.matfuncs`). ``M`` is a
small symmetric ``m × m`` matrix; with ``M = U D U^T`` (``|D|`` descending)

.. math::
    Q M Q^\top = (Q U D)(Q U)^\top = \text{left} \cdot \text{right}^\top ,

and dropping the trailing eigenvalues of ``M`` that carry a share ``≤ compress_tol`` of
``Σ|D|`` shrinks the factors handed to ``_bilinear_derivative`` (for ``f = 1/x``,
``M = −x x^T`` is exactly rank one). ``Σ|D| = ‖Γ‖_*`` is also the first-order sensitivity of the
value to a perturbation of ``A`` (``|δ value| ≤ ‖Γ‖_* ‖δA‖_2``), which the round-off floor of the
error estimates uses (:mod:`.engine`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .lanczos import LanczosResult
from .matfuncs import MatrixFunction
from .quadrature import RitzDecomposition

__all__ = ["GradientMatrix", "gradient_matrix", "gradient_factors", "factor_frobenius_norm"]


@dataclass(frozen=True)
class GradientMatrix:
    """Eigendecomposition ``M = U diag(D) U^T`` of the projected gradient matrix, ``|D|`` descending.

    Attributes:
        values: ``(*batch, k, m)`` eigenvalues ``D`` (compute dtype).
        vectors: ``(*batch, k, m, m)`` eigenvectors ``U``.
        nuclear: ``(*batch, k)`` ``Σ|D| = ‖Γ‖_*``.
    """

    values: Tensor
    vectors: Tensor
    nuclear: Tensor


def gradient_matrix(fn: MatrixFunction, ritz: RitzDecomposition) -> GradientMatrix:
    """``M = S (F ∘ a a^T) S^T`` of every column, diagonalised and sorted by ``|D|``."""
    F = fn.divided_differences(ritz.values)  # (*batch, k, m, m)
    a = ritz.weights
    gamma = F * (a.unsqueeze(-1) * a.unsqueeze(-2))
    gamma = torch.where(torch.isfinite(gamma), gamma, torch.zeros_like(gamma))  # unused (zero-weight) pairs
    S = ritz.vectors
    M = S @ gamma @ S.mT
    M = 0.5 * (M + M.mT)
    D, U = torch.linalg.eigh(M)  # (*batch, k, m), (*batch, k, m, m)
    order = D.abs().argsort(dim=-1, descending=True)
    D = D.gather(-1, order)
    U = U.gather(-1, order.unsqueeze(-2).expand_as(U))
    return GradientMatrix(D, U, D.abs().sum(-1))


def gradient_factors(
    grad: GradientMatrix, res: LanczosResult, *, compress_tol: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Factors ``(left, right)`` with ``Q M Q^T ≈ left @ right^T`` per column, and the dropped share.

    Returns ``left, right`` of shape ``(*batch, k, n, r)`` (basis dtype) and the dropped share
    ``Σ_dropped |D| / Σ |D|`` per column ``(*batch, k)``. ``r`` is the smallest rank whose dropped
    share is ``≤ compress_tol`` for every column (``compress_tol = 0`` keeps every nonzero direction).
    One host sync (the common rank), outside the Lanczos loop.
    """
    D, U, total = grad.values, grad.vectors, grad.nuclear.unsqueeze(-1)
    kept = torch.cumsum(D.abs(), dim=-1)
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    dropped = torch.cat([torch.ones_like(total), 1.0 - kept / safe_total], -1)  # share left out at rank 0..m
    dropped = torch.where(total > 0, dropped, torch.zeros_like(dropped)).clamp_min(0)
    need = (dropped > compress_tol).sum(-1).clamp_max(D.shape[-1])  # first r with dropped <= tol
    r = max(int(need.max()), 1) if need.numel() else 1
    dropped_share = dropped.gather(-1, torch.full_like(need, r).unsqueeze(-1)).squeeze(-1)
    W = U[..., :r].to(res.basis.dtype)  # (*batch, k, m, r)
    Dr = D[..., :r].to(res.basis.dtype)
    right = res.basis.mT @ W  # (*batch, k, n, r)
    left = right * Dr.unsqueeze(-2)
    return left, right, dropped_share


def factor_frobenius_norm(left: Tensor, right: Tensor) -> Tensor:
    """``‖left @ right^T‖_F`` per leading index without forming the product: ``tr((LᵀL)(RᵀR))^{1/2}``.

    ``left, right``: ``(*, n, r)`` -> ``(*)``. The Gram matrices are normalised by the largest
    column norm first, so the result neither underflows nor overflows.
    """
    sl = left.abs().amax((-2, -1), keepdim=True).clamp_min(torch.finfo(left.dtype).tiny)
    sr = right.abs().amax((-2, -1), keepdim=True).clamp_min(torch.finfo(right.dtype).tiny)
    gl = (left / sl).mT @ (left / sl)
    gr = (right / sr).mT @ (right / sr)
    sq = (gl * gr.mT).sum((-2, -1)).clamp_min(0)
    return sq.sqrt() * (sl * sr).squeeze(-1).squeeze(-1)
