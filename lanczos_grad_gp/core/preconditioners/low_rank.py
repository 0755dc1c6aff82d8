r"""Low-rank-plus-diagonal split preconditioner for ``K = K_θ + D`` (docs/mathematics.md, "The GP marginal likelihood").

With a rank-``k`` pivoted Cholesky factor ``L`` of ``K_θ`` (Harbrecht et al. 2012, as in
GPyTorch) and the diagonal ``D`` (noise),

.. math::
    P = L L^\top + D = C C^\top,\qquad C = D^{1/2} (I + M M^\top)^{1/2},\ M = D^{-1/2} L.

With the thin SVD ``M = U diag(s) V^T``, ``(I + M M^T)^{-1/2} = I + U(diag((1+s²)^{-1/2}) - I)U^T``,
so ``C^{-1} x`` costs ``O(n k)`` and ``log det P = Σ log d_i + Σ log(1 + s_i²)``. Lanczos runs on
the symmetric operator ``B = C^{-1} K C^{-T}``:

* ``r^T K^{-1} r = (C^{-1} r)^T B^{-1} (C^{-1} r)``,
* ``log det K = log det P + log det B``,
* with ``P`` detached, ``∂ log det B = tr(B^{-1} C^{-1} ∂K C^{-T}) = tr(K^{-1} ∂K)``: the gradient
  is exact in expectation, and the Ritz vectors map back by ``C^{-T}``.

The factor is computed under ``no_grad``. Its pivots ``π`` and the factor ``L`` itself are kept (the
Nyström interpolation ``R = L L_π^{-1} = K_θ[:, π] K_θ[π, π]^{-1}`` is formed only when needed), so that
``P(θ) = K_θ[:, π] K_θ[π,π]^{-1} K_θ[π, :] + D(θ)`` with the pivots fixed can be differentiated at
``O(n k²)``: the variance-reduced log-determinant gradient of
:mod:`lanczos_grad_gp.core.preconditioners.control_variate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from ..._compat import added_diag_parts
from .pivoted_cholesky import CHECK_EVERY, pivoted_cholesky

__all__ = ["LowRankPlusDiagPreconditioner", "SplitPreconditioner", "pivoted_cholesky_preconditioner"]


@dataclass(frozen=True)
class LowRankPlusDiagPreconditioner:
    """``P = C C^T`` with ``C = D^{1/2}(I + M M^T)^{1/2}``; identity when ``rank == 0`` and ``d ≡ 1``.

    Attributes:
        inv_sqrt_diag: ``(*batch, n)`` ``D^{-1/2}``.
        U: ``(*batch, n, k)`` left singular vectors of ``M = D^{-1/2} L``.
        scale: ``(*batch, k)`` ``(1 + s²)^{-1/2} - 1``.
        logdet: ``(*batch)`` ``log det P``.
        rank: ``k``.
        pivots: ``(*batch, k)`` pivots ``π`` of the pivoted Cholesky factor (``None``: no low-rank part).
        factor: ``(*batch, n, k)`` the pivoted-Cholesky factor ``L`` (``L[π]`` is lower triangular).
        remainder_ratio: ``(*batch)`` ``tr(K_θ − L L^T) / tr(D)``: how much of the kernel the
            factor leaves to the noise (0 for a full-rank factor).
        U_t: ``(*batch, k, n)`` a row-major copy of ``U^T`` on CPU, where BLAS applies ``U^T x`` from it
            about 3x faster than from the transposed view (the preconditioner is applied twice per
            Lanczos step); ``None``: the view ``U.mT`` (GPU, whose GEMMs take either layout).
        kind: how ``U`` was found: ``"pivoted_cholesky"`` or ``"nystrom"`` (:mod:`.nystrom`);
            ``"identity"`` for ``P = I``.
    """

    inv_sqrt_diag: Tensor | None
    U: Tensor | None
    scale: Tensor | None
    logdet: Tensor
    rank: int
    pivots: Tensor | None = None
    factor: Tensor | None = None
    remainder_ratio: Tensor | None = None
    U_t: Tensor | None = None
    kind: str = "pivoted_cholesky"

    def _core(self, x: Tensor) -> Tensor:
        # (I + M M^T)^{-1/2} x for x (*batch, n, c)
        if self.U is None:
            return x
        U_t = self.U_t if self.U_t is not None else self.U.mT  # (*batch, k, n)
        return x + self.U @ (self.scale.unsqueeze(-1) * (U_t @ x))

    def inv_root(self, x: Tensor) -> Tensor:
        """``C^{-1} x = (I + M M^T)^{-1/2} D^{-1/2} x``."""
        if self.inv_sqrt_diag is not None:
            x = x * self.inv_sqrt_diag.unsqueeze(-1)
        return self._core(x)

    def inv_root_t(self, x: Tensor) -> Tensor:
        """``C^{-T} x = D^{-1/2} (I + M M^T)^{-1/2} x``."""
        x = self._core(x)
        if self.inv_sqrt_diag is not None:
            x = x * self.inv_sqrt_diag.unsqueeze(-1)
        return x

    def inv_diagonal(self) -> Tensor | None:
        """``diag(P^{-1})`` (``(*batch, n)``): ``d^{-1} (1 + Σ_j U_j² ((1 + s_j)² − 1))``, ``None`` for ``P = I``."""
        if self.inv_sqrt_diag is None:
            return None
        inv_d = self.inv_sqrt_diag.square()
        if self.U is None:
            return inv_d
        # (I + U S U^T)^2 = I + U (2 S + S^2) U^T with S = diag(scale)
        return inv_d * (1.0 + (self.U.square() * (self.scale * (2.0 + self.scale)).unsqueeze(-2)).sum(-1))


#: the first release's name
SplitPreconditioner = LowRankPlusDiagPreconditioner


def noise_split(A: LinearOperator) -> tuple[LinearOperator, Tensor] | None:
    """``(K_θ, d)`` (detached; ``d``: ``(*batch, n)``) for ``A = K_θ + diag(d)`` with ``d > 0``, else ``None``.

    ``None`` also for an empty batch: the split preconditioners then fall back to the identity.
    """
    parts = added_diag_parts(A)
    if parts is None or A.batch_shape.numel() == 0:
        return None
    base, diag = parts
    d = diag.diagonal().detach()
    d = d.expand(*A.batch_shape, A.shape[-1]) if d.shape[:-1] != A.batch_shape else d
    if not bool((d > 0).all()):
        return None
    return base.detach(), d


def _fallback_rank(diag: Tensor, L: Tensor, tight: Tensor, loose: Tensor, check_every: int = CHECK_EVERY) -> int:
    """Rank at which the pivoted Cholesky with the ``loose`` error tolerance would have stopped, given the
    factor ``L`` (``(*batch, n, k)``) it built towards ``tight``; ``k`` if ``tight`` or no ``loose`` check is met.

    The factorization checks ``tr(K − L_{:j} L_{:j}ᵀ) ≤ tol`` (for every batch entry) after every
    ``check_every`` columns and at ``k``; the remainder after ``j`` columns is ``tr(K) − Σ_{i ≤ j} ‖L_i‖²``.
    """
    k = L.shape[-1]
    remainder = diag.sum(-1, keepdim=True) - L.square().sum(-2).cumsum(-1)  # (*batch, k) after j + 1 columns
    if k < check_every or bool((remainder[..., -1] <= tight).all()):  # no check before k, or tight met
        return k
    checks = torch.arange(check_every, k + 1, check_every, device=L.device)  # (c,) ranks at the checks
    met = remainder.index_select(-1, checks - 1) <= loose.unsqueeze(-1)  # (*batch, c)
    met = met.reshape(-1, met.shape[-1]).all(0)  # (c,) met in every batch entry
    first = met.nonzero()
    return int(checks[first[0, 0]]) if first.numel() else k


def identity_preconditioner(A: LinearOperator) -> LowRankPlusDiagPreconditioner:
    """``P = I`` (``C^{-1} = I``, ``log det P = 0``, rank 0)."""
    zero = torch.zeros(A.batch_shape, dtype=A.dtype, device=A.device)
    return LowRankPlusDiagPreconditioner(None, None, None, zero, 0, kind="identity")


def pivoted_cholesky_preconditioner(
    A: LinearOperator,
    max_rank: int,
    trace_tol: float,
    *,
    abandon_short: bool = False,
    fallback_tol: float | None = None,
) -> LowRankPlusDiagPreconditioner | None:
    """Build the split preconditioner of ``A`` (identity unless ``A = K + D`` with diagonal ``D``).

    Args:
        A: the covariance operator, typically ``AddedDiagLinearOperator(kernel, noise)``.
        max_rank: maximal pivoted-Cholesky rank (0: no low-rank part, only the diagonal split).
        trace_tol: stop when ``tr(K - L L^T) ≤ trace_tol · n · min(D)``.
        abandon_short: return ``None`` as soon as the factor is projected to end, at ``max_rank``, with
            a remainder ratio ``ρ = tr(K − L Lᵀ) / tr(D) > 1`` (and above the trace tolerance): the
            regime where neither the trace tolerance nor the variance-reduced gradient can be reached
            (:func:`~.pivoted_cholesky.pivoted_cholesky`'s ``abandon_above``).
        fallback_tol: a looser tolerance to fall back to when ``trace_tol`` is not reached within
            ``max_rank``: the factor is then cut to the rank at which the factorization run with
            ``fallback_tol`` would have stopped (the greedy order makes it the leading columns), so a
            tolerance tightened where it can be reached changes nothing where it cannot.
    """
    with torch.no_grad():
        split = noise_split(A)
        if split is None:
            return identity_preconditioner(A)
        base, d = split
        inv_sqrt_d = d.rsqrt()
        logdet = d.log().sum(-1)
        n = A.shape[-1]
        rank = min(max_rank, n)
        if rank == 0:
            return LowRankPlusDiagPreconditioner(inv_sqrt_d, None, None, logdet, 0)
        error_tol = trace_tol * n * d.amin(-1)
        abandon_above = torch.maximum(d.sum(-1), error_tol) if abandon_short else None
        out = pivoted_cholesky(base, rank, error_tol=error_tol, return_pivots=True, abandon_above=abandon_above)
        if out is None:
            return None
        L, pivots = out
        # In low precision on a numerically rank-deficient kernel (near-duplicate inputs) a late
        # pivot can go nonpositive and NaN-fill the remaining columns; on an exactly low-rank kernel
        # the residual diagonal reaches 0 and later columns are 0. Keep the leading columns with a
        # finite, positive pivot (a valid lower-rank factor) instead of dropping preconditioning.
        L_pp = L.gather(-2, pivots.unsqueeze(-2)).squeeze(-2)  # (*batch, k): L[π_j, j] = sqrt(d_p)
        good = torch.isfinite(L).all(-2) & (L_pp > 0)  # (*batch, k)
        good = good.flatten(0, -2).all(0) if good.dim() > 1 else good
        k_ok = int(good.long().cumprod(0).sum())
        if k_ok == 0:
            return LowRankPlusDiagPreconditioner(inv_sqrt_d, None, None, logdet, 0)
        L, pivots = L[..., :k_ok], pivots[..., :k_ok]
        if fallback_tol is not None and fallback_tol > trace_tol and k_ok == rank < n:
            k_fb = _fallback_rank(base.diagonal(), L, trace_tol * n * d.amin(-1), fallback_tol * n * d.amin(-1))
            L, pivots = L[..., :k_fb], pivots[..., :k_fb]
        remainder = (base.diagonal() - L.square().sum(-1)).clamp_min(0).sum(-1)  # (*batch) tr(K - L L^T)
        remainder_ratio = remainder / d.sum(-1)
        M = L * inv_sqrt_d.unsqueeze(-1)  # (*batch, n, k)
        # Thin SVD via QR (orthonormal U to working precision, also in float32, so that the applied
        # C^{-1} and log det P stay consistent): M = Q R, R = W diag(s) V^T, U = Q W.
        Q, R = torch.linalg.qr(M)
        W, s, _ = torch.linalg.svd(R)
        U = Q @ W
        s2 = s.square()
        scale = (1.0 + s2).rsqrt() - 1.0
        logdet = logdet + torch.log1p(s2).sum(-1)
        U_t = U.mT.contiguous() if U.device.type == "cpu" else None
        return LowRankPlusDiagPreconditioner(inv_sqrt_d, U, scale, logdet, L.shape[-1], pivots, L, remainder_ratio, U_t)
