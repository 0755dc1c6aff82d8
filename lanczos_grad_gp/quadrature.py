r"""Lanczos quadrature and the forward-only gradient factors (pure functions).

Given a Lanczos run from ``v`` (``A Q = Q T + β_m q_{m+1} e_m^T``, ``T = S diag(λ) S^T``):

* value (Gauss quadrature, Golub & Meurant 2009): ``v^T f(A) v ≈ Σ_i a_i² f(λ_i)`` with
  ``a = ‖v‖ S^T e_1`` — never ``Y^T v``, which is wrong once ``Q`` lost orthogonality
  (DESIGN §2);
* ``f(A) v ≈ ‖v‖ Q f(T) e_1``, used for the gradient with respect to ``v``
  (``∂/∂v v^T f(A) v = 2 f(A) v``);
* forward-only gradient (Singh, Barros & Li, arXiv:2605.12801): hold ``Q`` fixed and
  differentiate ``T(θ) = Q^T A(θ) Q``:

  .. math::
      \partial_θ\, v^\top f(A) v \approx \sum_{ij} Γ_{ij}\, y_i^\top (\partial_θ A) y_j
      = \operatorname{tr}\big(Q M Q^\top \partial_θ A\big),\quad
      Γ = F \circ (a a^\top),\ M = S Γ S^\top,

  with ``F`` the divided differences of ``f`` at the Ritz values. ``M`` is symmetric, so
  ``Q M Q^T = (Q U D)(Q U)^T`` with ``M = U D U^T``; dropping the eigenvalues of ``M`` that
  carry a negligible share of ``Σ|D|`` shrinks the factors handed to
  ``_bilinear_derivative`` (for ``f = 1/x`` ``M = -x x^T`` is exactly rank one);
* residual of the matrix-function approximation, which controls both value and gradient
  error (paper, Thm 2; DESIGN §2 "which residual to trust"):
  ``ρ = β_m |e_m^T f(T) e_1| ‖v‖`` and its dimensionless relative form
  ``ρ / (‖v‖ ‖f(T) e_1‖ θ)`` (``θ`` the smallest Ritz value for positive-definite functions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from linear_operator.utils.errors import NotPSDError
from torch import Tensor

from .lanczos import LanczosResult
from .matfuncs import MatrixFunction

__all__ = [
    "RitzDecomposition",
    "ritz_decomposition",
    "check_domain",
    "quadrature",
    "function_residual",
    "apply_function",
    "f_T_e1",
    "gradient_factors",
]


@dataclass(frozen=True)
class RitzDecomposition:
    """Eigendecomposition of the Lanczos tridiagonals, in the compute dtype (≥ float64 on CPU/CUDA).

    Attributes:
        values: ``(*batch, k, m)`` Ritz values ``λ``, ascending.
        vectors: ``(*batch, k, m, m)`` eigenvectors ``S`` of ``T``.
        weights: ``(*batch, k, m)`` quadrature weights ``a = ‖v‖ S^T e_1``.
    """

    values: Tensor
    vectors: Tensor
    weights: Tensor


def _compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    # The m x m eigenproblems are tiny: solve them in float64 unless the device lacks it.
    return dtype if device.type == "mps" else torch.float64


def ritz_decomposition(res: LanczosResult) -> RitzDecomposition:
    """Ritz values, vectors and Gauss weights of every column's ``T``."""
    cdt = _compute_dtype(res.alpha.dtype, res.alpha.device)
    T = res.tridiag().to(cdt)
    values, vectors = torch.linalg.eigh(T)
    weights = res.start_norm.to(cdt).unsqueeze(-1) * vectors[..., 0, :]
    return RitzDecomposition(values, vectors, weights)


def check_domain(fn: MatrixFunction, ritz: RitzDecomposition, name: str = "A") -> None:
    """Raise ``NotPSDError`` when ``fn`` needs a positive definite operator and a Ritz value is ≤ 0.

    Ritz values lie in the convex hull of the spectrum, so a nonpositive one proves (up to
    round-off) that the operator is not positive definite. One host sync.
    """
    if not fn.requires_positive or ritz.values.numel() == 0:  # empty batch: nothing to check
        return
    lam_min = ritz.values[..., 0].min()
    if not bool(lam_min > 0):
        raise NotPSDError(
            f"f={fn.name!r} needs a positive definite operator, but Lanczos found a Ritz value "
            f"{float(lam_min):.3e} <= 0 for {name}: {name} is indefinite or singular. "
            "Add jitter/noise to the diagonal or use float64."
        )


def quadrature(fn: MatrixFunction, ritz: RitzDecomposition) -> Tensor:
    """Gauss-quadrature value ``Σ_i a_i² f(λ_i)``: ``(*batch, k)``."""
    w2 = ritz.weights.square()
    fl = torch.where(w2 > 0, fn.f(ritz.values), torch.zeros_like(w2))
    return (w2 * fl).sum(-1)


def f_T_e1(fn: MatrixFunction, ritz: RitzDecomposition) -> Tensor:
    """``f(T) e_1 = S (f(λ) ∘ S^T e_1)``: ``(*batch, k, m)`` (zero-weight Ritz pairs skipped)."""
    s0 = ritz.vectors[..., 0, :]
    fl = torch.where(s0 != 0, fn.f(ritz.values), torch.zeros_like(s0))
    return (ritz.vectors @ (fl * s0).unsqueeze(-1)).squeeze(-1)


def function_residual(fn: MatrixFunction, ritz: RitzDecomposition, res: LanczosResult) -> tuple[Tensor, Tensor]:
    """Absolute residual ``ρ = β_m |e_m^T f(T) e_1| ‖v‖`` and its dimensionless relative form.

    ``ρ`` is the norm of the residual-type correction of ``f(A) v ≈ ‖v‖ Q f(T) e_1`` (for
    ``f = 1/x`` exactly the CG residual ``‖v − A x_m‖``). It carries the units of ``A``; the
    relative form divides by ``‖v‖ ‖f(T) e_1‖`` and by the spectral scale that turns a residual
    into an error: the smallest Ritz value ``θ_min`` for functions of positive definite operators
    (``‖A^{-1} r‖ ≤ ‖r‖ / λ_min``), the largest ``|θ|`` otherwise. It is therefore invariant to
    scaling ``A`` and ``v``. ``e_m`` is each column's own last step. Returns two ``(*batch, k)``
    tensors in the compute dtype; zero for columns that broke down or never started.
    """
    fe1 = f_T_e1(fn, ritz)
    idx = (res.iterations - 1).clamp_min(0).unsqueeze(-1)
    last = fe1.gather(-1, idx).squeeze(-1).abs()
    beta = res.residual_norm.to(fe1.dtype)
    absolute = beta * last * res.start_norm.to(fe1.dtype)
    used = ritz.weights != 0
    big = torch.finfo(fe1.dtype).max
    if fn.requires_positive:
        scale = torch.where(used, ritz.values.abs(), torch.full_like(ritz.values, big)).amin(-1)
    else:
        scale = torch.where(used, ritz.values.abs(), torch.zeros_like(ritz.values)).amax(-1)
    denom = torch.linalg.vector_norm(fe1, dim=-1) * scale
    ok = (denom > 0) & (denom < big)
    relative = torch.where(ok, beta * last / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    return absolute, relative


def apply_function(fn: MatrixFunction, ritz: RitzDecomposition, res: LanczosResult) -> Tensor:
    """``f(A) v ≈ ‖v‖ Q f(T) e_1``: ``(*batch, n, k)`` in the basis dtype."""
    fe1 = (f_T_e1(fn, ritz) * res.start_norm.to(ritz.values.dtype).unsqueeze(-1)).to(res.basis.dtype)
    return (fe1.unsqueeze(-2) @ res.basis).squeeze(-2).mT


def gradient_factors(
    fn: MatrixFunction,
    ritz: RitzDecomposition,
    res: LanczosResult,
    *,
    compress_tol: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward-only gradient factors ``(left, right)`` with ``Q M Q^T = left @ right^T`` per column.

    Returns ``left, right`` of shape ``(*batch, k, n, r)`` (basis dtype) and the dropped
    share ``Σ_dropped |D| / Σ |D|`` per column ``(*batch, k)``. ``r`` is the smallest rank
    whose dropped share is ``≤ compress_tol`` for every column (``compress_tol = 0`` keeps
    every nonzero direction).
    """
    F = fn.divided_differences(ritz.values)  # (*batch, k, m, m)
    a = ritz.weights
    gamma = F * (a.unsqueeze(-1) * a.unsqueeze(-2))
    S = ritz.vectors
    M = S @ gamma @ S.mT
    M = 0.5 * (M + M.mT)
    D, U = torch.linalg.eigh(M)  # (*batch, k, m), (*batch, k, m, m)
    order = D.abs().argsort(dim=-1, descending=True)
    D = D.gather(-1, order)
    U = U.gather(-1, order.unsqueeze(-2).expand_as(U))
    mass = D.abs()
    total = mass.sum(-1, keepdim=True)
    # share of |D| left out when keeping the first r directions, r = 0..m
    kept = torch.cumsum(mass, dim=-1)
    dropped = torch.cat(
        [torch.ones_like(total), 1.0 - kept / torch.where(total > 0, total, torch.ones_like(total))], -1
    )
    dropped = torch.where(total > 0, dropped, torch.zeros_like(dropped))
    dropped = dropped.clamp_min(0)
    need = (dropped > compress_tol).sum(-1).clamp_max(D.shape[-1])  # first r with dropped <= tol
    r = max(int(need.max()), 1) if need.numel() else 1  # one host sync, outside the Lanczos loop
    dropped_share = dropped.gather(-1, torch.full_like(need, r).unsqueeze(-1)).squeeze(-1)
    W = U[..., :r].to(res.basis.dtype)  # (*batch, k, m, r)
    Dr = D[..., :r].to(res.basis.dtype)
    right = res.basis.mT @ W  # (*batch, k, n, r)
    left = right * Dr.unsqueeze(-2)
    return left, right, dropped_share
