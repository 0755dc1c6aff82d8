r"""Thick-restart block Lanczos with explicit Rayleigh–Ritz: the engine of :func:`~lanczos_grad_gp.eigen.lanczos`.

From an orthonormal block ``P_1`` (``b`` random columns) the block Lanczos process (Golub & Underwood
1977; Saad, *Numerical Methods for Large Eigenvalue Problems*, 2nd ed., §6.5) grows the basis of the
block Krylov space ``span(P_1, A P_1, A² P_1, …)`` one block at a time,

.. math::
    W_j = A P_j - Q_j Q_j^\top A P_j, \qquad P_{j+1} = \mathrm{orth}(W_j),

reorthogonalising fully against the whole basis ``Q_j`` (``O(ncv · n)`` per vector: the basis never
exceeds ``ncv`` vectors). A block of ``b`` vectors sees up to ``b`` copies of a repeated eigenvalue: a
single-vector Krylov space contains one vector per eigenspace, whatever the multiplicity. A deflated
column of ``W_j`` (rank loss, breakdown) is replaced by a random vector orthogonal to the basis
(:mod:`.basis`).

Ritz pairs come from :func:`.ritz.rayleigh_ritz` on the stored ``Q`` and ``AQ``; convergence uses
their TRUE residuals. When the basis is full (``ncv`` vectors) the ``keep`` most wanted Ritz vectors
``Y`` (with ``AY = AQ Z``, no matvec) are kept and the iteration continues from the residuals
``AY − YΘ`` of the most wanted unconverged pairs — in exact arithmetic these span the last ``W``, the
thick restart of Wu & Simon (2000) in block form. Any orthonormal basis with its products is a valid
start, which the verification step (:mod:`.verify`) uses to inject vectors found elsewhere.

A pair is converged when ``‖A y − θ y‖ ≤ tol · max(|θ|, ε^{2/3} ‖A‖) + 100 ε ‖A‖`` (the ARPACK rule on
the true residual plus a rounding floor), ``‖A‖`` estimated by the largest column norm of ``AQ``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .basis import orthonormalize
from .inputs import randn
from .ritz import RitzPairs, rayleigh_ritz

__all__ = ["KrylovOptions", "KrylovOutcome", "block_krylov", "residual_floor", "compute_dtype"]

MatmulFn = Callable[[Tensor], Tensor]


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """float64 for the small projected problems (float32 on MPS, which lacks float64)."""
    return dtype if device.type == "mps" else torch.float64


def residual_floor(values: Tensor, anorm: Tensor, tol: float, eps: float) -> Tensor:
    """The convergence threshold ``tol · max(|θ|, ε^{2/3}‖A‖) + 100 ε ‖A‖`` (``anorm`` ``(*b,)``)."""
    a = anorm.unsqueeze(-1).to(values.dtype)
    return tol * torch.maximum(values.abs(), eps ** (2.0 / 3.0) * a) + 100.0 * eps * a


@dataclass(frozen=True)
class KrylovOptions:
    """Options of one :func:`block_krylov` run (validated by the caller).

    Attributes:
        k: wanted pairs; block_size: ``b``; which: ``"LM" | "LA" | "SA"``; tol: relative tolerance.
        ncv: maximal basis size; keep: Ritz vectors kept at a restart (``k ≤ keep ≤ ncv − 1``).
        max_matvecs: budget of operator applications (vectors).
        full_reorth: reorthogonalise against the whole basis (else the kept vectors and two blocks).
        check_every: blocks between convergence checks (a check is forced at a restart / the end).
    """

    k: int
    block_size: int
    which: str
    tol: float
    ncv: int
    keep: int
    max_matvecs: int
    full_reorth: bool = True
    check_every: int = 1


@dataclass(frozen=True)
class KrylovOutcome:
    """Result of :func:`block_krylov` (``*b`` the operator's batch shape).

    Attributes:
        values: ``(*b, k)`` Ritz values (compute dtype), most wanted first.
        vectors, products: ``(*b, n, k)`` Ritz vectors ``Y`` and ``A Y`` (from the stored products).
        residuals: ``(*b, k)`` ``‖A y − θ y‖`` from the stored products.
        converged: ``(*b, k)`` per pair (frozen when all ``k`` converged for a batch entry).
        iterations: ``(*b,)`` operator applications until the entry's result was frozen (or the end).
        matvecs: total operator applications (vectors) of the run.
        ritz: the last Rayleigh–Ritz pairs; ritz_vectors / ritz_products: ``(*b, n, L')`` of its first pairs.
        anorm: ``(*b,)`` the estimate of ``‖A‖``.
    """

    values: Tensor
    vectors: Tensor
    products: Tensor
    residuals: Tensor
    converged: Tensor
    iterations: Tensor
    matvecs: int
    ritz: RitzPairs
    ritz_vectors: Tensor
    ritz_products: Tensor
    anorm: Tensor


def _apply(matmul: MatmulFn, P: Tensor) -> Tensor:
    AP = matmul(P)
    if not isinstance(AP, Tensor) or AP.shape != P.shape:
        shape = tuple(AP.shape) if isinstance(AP, Tensor) else type(AP).__name__
        raise ValueError(f"the operator must map a block of shape {tuple(P.shape)} to the same shape; got {shape}.")
    AP = AP.to(P.dtype)
    if not bool(torch.isfinite(AP).all()):
        raise ValueError("The operator produced NaN or Inf in a matrix-vector product.")
    return AP


def _residual_block(R: Tensor, conv: Tensor, width: int) -> Tensor:
    """``width`` residual columns of ``R`` (``(*b, n, l)``): unconverged pairs first, most wanted first."""
    l = R.shape[-1]
    rank = conv.to(torch.long) * l + torch.arange(l, device=R.device)  # unconverged (0·l + i) before converged
    order = rank.argsort(dim=-1)[..., :width]
    return R.gather(-1, order.unsqueeze(-2).expand(*R.shape[:-1], width))


def block_krylov(
    matmul: MatmulFn,
    shape: tuple[torch.Size, int, torch.dtype, torch.device],
    opts: KrylovOptions,
    gen: torch.Generator | None,
    *,
    start: tuple[Tensor, Tensor] | None = None,
    orthogonal_to: Tensor | None = None,
) -> KrylovOutcome:
    """Run the thick-restart block Lanczos iteration (module docstring).

    Args:
        matmul: ``X (*b, n, c) -> A X`` (no autograd graph).
        shape: ``(batch_shape, n, dtype, device)`` of the operator.
        opts: :class:`KrylovOptions`.
        gen: generator of the start block and of deflation replacements.
        start: an orthonormal basis ``(*b, n, m0)`` and its products to start from (else a random block).
        orthogonal_to: orthonormal ``(*b, n, d)`` vectors; the iteration runs in their complement.
    """
    batch, n, dtype, device = shape
    batch = tuple(batch)
    cdt = compute_dtype(dtype, device)
    eps = torch.finfo(dtype).eps
    k, b, which = opts.k, opts.block_size, opts.which
    room_n = n - (orthogonal_to.shape[-1] if orthogonal_to is not None else 0)  # dimensions available
    ncv = min(opts.ncv, room_n)
    empty = torch.zeros(*batch, n, 0, dtype=dtype, device=device)
    if start is None:
        Q, AQ = empty, empty
        anorm = torch.zeros(batch, dtype=dtype, device=device)
        P = orthonormalize(randn((*batch, n, min(b, ncv)), gen, dtype, device), orthogonal_to, ref=None, gen=gen)
    else:
        Q, AQ = start
        anorm = torch.linalg.vector_norm(AQ, dim=-2).amax(-1)
        P = None  # the first pass computes the start's Ritz pairs and continues from their residuals
    kept = Q.shape[-1]  # vectors kept at the last restart (the local reorthogonalization keeps them)
    out_vals = torch.zeros(*batch, k, dtype=cdt, device=device)
    out_vecs = torch.zeros(*batch, n, k, dtype=dtype, device=device)
    out_prod = torch.zeros_like(out_vecs)
    out_res = torch.full((*batch, k), float("inf"), dtype=dtype, device=device)
    out_conv = torch.zeros(*batch, k, dtype=torch.bool, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    iters = torch.zeros(batch, dtype=torch.long, device=device)
    total = 0
    since = 0
    AP = empty
    while True:
        if P is not None:
            AP = _apply(matmul, P)
            total += P.shape[-1]
            iters = iters + P.shape[-1] * (~done)
            Q, AQ = torch.cat([Q, P], -1), torch.cat([AQ, AP], -1)
            anorm = torch.maximum(anorm, torch.linalg.vector_norm(AP, dim=-2).amax(-1))
            since += 1
        m = Q.shape[-1]
        left = opts.max_matvecs - total
        width = min(b, ncv - m, left)  # room for another block in this cycle
        if P is not None and since < opts.check_every and width > 0:
            P = orthonormalize(AP, *_against(Q, kept, b, opts), orthogonal_to, ref=anorm, gen=gen)[..., :width]
            continue
        since = 0
        rr = rayleigh_ritz(Q, AQ, which, orthonormal=opts.full_reorth, compute_dtype=cdt)
        nvalid = int(rr.valid.sum(-1).min()) if rr.valid.numel() else rr.values.shape[-1]
        nres = min(max(nvalid, 1), max(k, opts.keep))
        Z = rr.coefficients[..., :nres].to(dtype)
        Y, AY = Q @ Z, AQ @ Z
        theta = rr.values[..., :nres]
        R = AY - Y * theta.to(dtype).unsqueeze(-2)
        res = torch.linalg.vector_norm(R, dim=-2)  # (*b, nres)
        conv = (res.to(cdt) <= residual_floor(theta, anorm, opts.tol, eps)) & rr.valid[..., :nres]
        if nres >= k:
            keep_old = done.unsqueeze(-1)
            out_vals = torch.where(keep_old, out_vals, theta[..., :k])
            out_vecs = torch.where(keep_old.unsqueeze(-2), out_vecs, Y[..., :k])
            out_prod = torch.where(keep_old.unsqueeze(-2), out_prod, AY[..., :k])
            out_res = torch.where(keep_old, out_res, res[..., :k])
            out_conv = torch.where(keep_old, out_conv, conv[..., :k])
            done = done | conv[..., :k].all(-1)
        # the whole available space spanned: the Ritz pairs are exact up to rounding, restarting cannot help
        if bool(done.all()) or left <= 0 or m >= room_n:
            return KrylovOutcome(out_vals, out_vecs, out_prod, out_res, out_conv, iters, total, rr, Y, AY, anorm)
        if P is not None and width > 0:  # a check between restarts: the next block is the usual W
            P = orthonormalize(AP, *_against(Q, kept, b, opts), orthogonal_to, ref=anorm, gen=gen)[..., :width]
            continue
        # thick restart (or the first pass from a given start): keep the most wanted Ritz vectors
        l = min(opts.keep, nres, ncv - 1) if m >= ncv else nres
        Yq, Rq = torch.linalg.qr(Y[..., :l])  # restore orthonormality lost to rounding over many restarts
        Q = Yq
        AQ = torch.linalg.solve_triangular(Rq, AY[..., :l], upper=True, left=False)
        kept = l
        width = min(b, ncv - l, left)
        cand = _residual_block(R[..., :l], conv[..., :l], min(width, l))
        if cand.shape[-1] < width:  # fewer kept vectors than a block: fill with random directions
            cand = torch.cat([cand, randn((*batch, n, width - cand.shape[-1]), gen, dtype, device)], -1)
        P = orthonormalize(cand, Q, orthogonal_to, ref=anorm, gen=gen)


def _against(Q: Tensor, kept: int, b: int, opts: KrylovOptions) -> tuple[Tensor, ...]:
    """The basis columns a new block is orthogonalised against: all, or the kept ones and the last two blocks."""
    if opts.full_reorth:
        return (Q,)
    m = Q.shape[-1]
    return Q[..., :kept], Q[..., max(kept, m - 2 * b) :]
