r"""Orthonormal blocks for the block Krylov iteration: projections and deflation by random replacement.

A new block ``W`` (``(*b, n, p)``) is orthonormalised column by column by classical Gram–Schmidt twice
(CGS2: "twice is enough", Giraud, Langou & Rozložník 2005) against the basis and the columns already
accepted. A column whose norm after projection is ``≤ 10 √n ε · ref`` is rounding noise: the block
Krylov space is (numerically) invariant in that direction, a *deflation* or *breakdown*. It is
replaced by a fresh random vector projected against everything, so the iteration continues in the
orthogonal complement instead of dividing by a tiny norm — the step that lets the method find the
further copies of a repeated eigenvalue after a breakdown.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .inputs import randn

__all__ = ["project_out", "orthonormalize", "dependence_tol"]


def dependence_tol(n: int, dtype: torch.dtype) -> float:
    """``10 √n ε``: a projected norm below this times the operator scale is rounding noise."""
    return 10.0 * math.sqrt(n) * torch.finfo(dtype).eps


def project_out(W: Tensor, *bases: Tensor | None, passes: int = 2) -> Tensor:
    """``W`` with its components along the (orthonormal) columns of every basis removed, ``passes`` times."""
    for _ in range(passes):
        for Q in bases:
            if Q is not None and Q.shape[-1]:
                W = W - Q @ (Q.mT @ W)
    return W


def orthonormalize(
    W: Tensor,
    *bases: Tensor | None,
    ref: Tensor | None,
    gen: torch.Generator | None,
) -> Tensor:
    """Orthonormal ``(*b, n, p)`` block spanning ``W``'s columns beyond ``bases`` (module docstring).

    Args:
        W: ``(*b, n, p)`` candidate columns.
        bases: orthonormal ``(*b, n, m_i)`` blocks (or ``None``) to orthogonalise against.
        ref: ``(*b,)`` operator scale for the dependence test (``None``: each column's own norm).
        gen: generator of the random replacements.

    The caller guarantees ``p + Σ m_i ≤ n`` (room for ``p`` new directions).
    """
    *batch, n, p = W.shape
    tol = dependence_tol(n, W.dtype)
    tiny = torch.finfo(W.dtype).tiny
    new = W[..., :0]
    for j in range(p):
        w = W[..., j : j + 1]
        scale = torch.linalg.vector_norm(w, dim=-2, keepdim=True) if ref is None else ref.view(*batch, 1, 1)
        w = project_out(w, *bases, new)
        nrm = torch.linalg.vector_norm(w, dim=-2, keepdim=True)
        bad = ~(nrm > tol * scale)  # also catches NaN-free zero columns
        if bool(bad.any()):
            r = project_out(randn((*batch, n, 1), gen, W.dtype, W.device), *bases, new)
            r = r / torch.linalg.vector_norm(r, dim=-2, keepdim=True).clamp_min(tiny)
            r = project_out(r, *bases, new, passes=1)
            w = torch.where(bad, r, w)
            nrm = torch.linalg.vector_norm(w, dim=-2, keepdim=True)
        new = torch.cat([new, w / nrm.clamp_min(tiny)], -1)
    return new
