r"""Rayleigh–Ritz on a stored basis: Ritz pairs and their TRUE residuals without extra matvecs.

The block Krylov iteration keeps the basis ``Q`` (``(*b, n, m)``) AND its products ``AQ``, so for
any basis — restarted, deflated, extended by a verification run — the projected matrix is
``H = Q^T (AQ)`` (symmetrised), its eigenpairs ``H z_i = θ_i z_i`` give Ritz vectors ``y_i = Q z_i``
and ``A y_i = (AQ) z_i``: the residuals ``‖A y_i − θ_i y_i‖`` are exact up to rounding, not the
Paige estimates ``β |e_m^T z_i|`` of a tridiagonal recurrence (which assume a Krylov structure that
restarts and rounding can break).

For a basis that is not orthonormal (``reorthogonalize=False``), ``G = Q^T Q = U diag(g) U^T`` and the
pencil ``(H, G)`` is solved on the directions with ``g > m ε max g`` (``X = U_+ g_+^{-1/2}``,
``eig(X^T H X)``): a Rayleigh–Ritz on ``span(Q)`` whatever its conditioning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RitzPairs", "rayleigh_ritz", "sort_key"]


def sort_key(theta: Tensor, which: str) -> Tensor:
    """Larger key = more wanted: ``|θ|`` (LM), ``θ`` (LA), ``−θ`` (SA)."""
    if which == "LM":
        return theta.abs()
    return theta if which == "LA" else -theta


@dataclass(frozen=True)
class RitzPairs:
    """Ritz pairs of ``span(Q)`` sorted most wanted first.

    Attributes:
        values: ``(*b, L)`` Ritz values (compute dtype), invalid ones last.
        coefficients: ``(*b, m, L)`` ``z_i`` with ``y_i = Q z_i`` (compute dtype).
        valid: ``(*b, L)`` the pair lives on a direction of ``span(Q)`` (always True for orthonormal ``Q``).
    """

    values: Tensor
    coefficients: Tensor
    valid: Tensor


def rayleigh_ritz(Q: Tensor, AQ: Tensor, which: str, *, orthonormal: bool, compute_dtype: torch.dtype) -> RitzPairs:
    """Ritz pairs of ``A`` on ``span(Q)`` from ``Q`` and ``AQ`` (module docstring)."""
    H = (Q.mT @ AQ).to(compute_dtype)  # (*b, m, m)
    H = 0.5 * (H + H.mT)
    m = H.shape[-1]
    if orthonormal:
        vals, Z = torch.linalg.eigh(H)
        valid = torch.ones_like(vals, dtype=torch.bool)
    else:
        G = (Q.mT @ Q).to(compute_dtype)
        g, U = torch.linalg.eigh(0.5 * (G + G.mT))
        keep = g > m * torch.finfo(Q.dtype).eps * g.amax(-1, keepdim=True)  # (*b, m)
        X = U * torch.where(keep, g.clamp_min(torch.finfo(g.dtype).tiny).rsqrt(), torch.zeros_like(g)).unsqueeze(-2)
        vals, Zx = torch.linalg.eigh(X.mT @ H @ X)
        valid = (Zx.square() * keep.to(Zx.dtype).unsqueeze(-1)).sum(-2) > 0.5
        Z = X @ Zx
    key = torch.where(valid, sort_key(vals, which), torch.full_like(vals, -float("inf")))
    order = key.argsort(dim=-1, descending=True, stable=True)
    return RitzPairs(
        values=vals.gather(-1, order),
        coefficients=Z.gather(-1, order.unsqueeze(-2).expand_as(Z)),
        valid=valid.gather(-1, order),
    )
