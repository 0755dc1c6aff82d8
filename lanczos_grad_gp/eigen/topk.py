r"""Top-``k`` eigenpairs by thick-restart Lanczos.

Lanczos (1950) builds an orthonormal basis ``Q`` of the Krylov space
``span(v, Av, …, A^{m-1} v)`` with ``A Q = Q T + r e_m^\top``, ``T`` tridiagonal. The Ritz pairs
``(θ_i, Q s_i)`` of ``T = S diag(θ) S^\top`` approximate the outer eigenpairs of ``A`` and
``‖A Q s_i − θ_i Q s_i‖ = ‖r‖ |s_{m,i}|`` (Paige 1976) costs nothing to evaluate.

Thick restart (Wu & Simon 2000; Saad, *Numerical Methods for Large Eigenvalue Problems*,
2nd ed., §8.4): after a cycle, keep the ``l`` most wanted Ritz vectors ``Y = Q S_l`` and
continue from ``q = r/‖r‖``. Because ``A Y = Y Θ + r s^\top`` with ``s = S_l^\top e_m``, the new
projected matrix is an arrowhead plus a tridiagonal,

.. math::
    H = \begin{pmatrix} Θ & c\,e_1^\top \\ e_1 c^\top & T' \end{pmatrix},\qquad c = ‖r‖\, s,

where ``T'`` is the Lanczos tridiagonal of ``A`` restricted to ``span(Y)^⊥`` from ``q``
(``span(Y) ⊕ K_j(PAP, q) = span(Y) ⊕ K_j(A, q)``, ``P = I − Y Y^\top``). The loop is the
package's one Lanczos loop, :func:`lanczos_grad_gp.lanczos.lanczos_tridiag`, with
``orthogonal_to=Y`` (every new vector is explicitly orthogonalised against ``Y``; projecting
only the matmul is unstable, the recurrence then amplifies ``Y``-components like a Lanczos
polynomial outside the spectrum); the basis size stays
``≤ ncv`` so full reorthogonalization costs ``O(ncv · n)`` per step.

Stopping: pair ``i`` is converged when ``‖r‖ |z_{last,i}| ≤ tol · max(|θ_i|, ε^{2/3} ‖H‖)``
(the ARPACK rule, relative residual), checked every ``check_every`` steps through
``stop_fn`` (one host sync per check, none per step) and at the end of each cycle.
Reported residuals are TRUE ``‖A y_i − λ_i y_i‖`` from one extra batched matmul.

Limitation (shared with ARPACK): a single-vector Krylov method sees one vector per exactly
repeated eigenvalue; a multiplicity is found after a breakdown (restart from a fresh random
vector orthogonal to ``Y``) or, slowly, through rounding. Clusters of distinct eigenvalues
converge.

Example:
    >>> import torch
    >>> from lanczos_grad_gp.eigen import lanczos
    >>> X = torch.randn(200, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> A = X @ X.T
    >>> res = lanczos(A, k=3, tol=1e-10, seed=0)
    >>> bool(torch.allclose(res.eigenvalues, torch.linalg.eigvalsh(A).flip(0)[:3]))
    True
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from ..core.lanczos import LanczosResult, lanczos_tridiag
from .grad import differentiable_eigenvalues
from .inputs import PreparedOperator, check_k, check_tol, prepare_operator, randn, resolve_generator
from .result import EigenResult

__all__ = ["lanczos", "Which", "sort_key", "check_which"]

Which = Literal["LM", "LA", "SA"]


def check_which(which: object) -> str:
    if which not in get_args(Which):
        raise ValueError(f"which must be one of {get_args(Which)}; got {which!r}.")
    return str(which)


def sort_key(theta: Tensor, which: str) -> Tensor:
    """Larger key = more wanted: ``|θ|`` (LM), ``θ`` (LA), ``−θ`` (SA)."""
    if which == "LM":
        return theta.abs()
    return theta if which == "LA" else -theta


def _compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    return dtype if device.type == "mps" else torch.float64


class _Projected:
    """Projected arrowhead/tridiagonal eigenproblem of one cycle (all ``(*b, …)`` in float64).

    Attributes:
        values: ``(*b, L)`` Ritz values sorted by ``which`` (padding last).
        vectors: ``(*b, L, L)`` eigenvectors ``Z`` of ``H`` in the same order.
        is_pad: ``(*b, L)`` Ritz pairs living on padding (no information).
        estimate: ``(*b, L)`` Ritz residual estimates ``‖r‖ |z_{last,i}|``.
        converged: ``(*b, L)`` estimate ≤ tol · max(|θ|, ε^{2/3}‖H‖) and not padding.
        last_row: ``(*b, L)`` signed ``z_{last,i}``.
    """

    def __init__(
        self, theta: Tensor, coup: Tensor, yvalid: Tensor, res: LanczosResult, which: str, tol: float, eps: float
    ) -> None:
        cdt = theta.dtype
        l = theta.shape[-1]
        m = res.num_steps
        L = l + m
        T = res.tridiag()[..., 0, :, :].to(cdt)  # (*b, m, m)
        its = res.iterations[..., 0]  # (*b,)
        qvalid = torch.arange(m, device=its.device) < its.unsqueeze(-1)  # (*b, m)
        valid = torch.cat([yvalid, qvalid], -1)  # (*b, L)
        batch = T.shape[:-2]
        H = T.new_zeros(*batch, L, L)
        H[..., :l, :l] = torch.diag_embed(theta)
        H[..., l:, l:] = T
        has_q = (its > 0).to(cdt).unsqueeze(-1)
        H[..., :l, l] = coup * has_q
        H[..., l, :l] = coup * has_q
        H = H * (valid.unsqueeze(-1) & valid.unsqueeze(-2))  # decouple padding
        nb = H.abs().sum(-1).amax(-1, keepdim=True)  # (*b, 1) ≥ ‖H‖_2
        pad = {"LM": torch.zeros_like(nb), "LA": -2 * nb - 1, "SA": 2 * nb + 1}[which]
        H = H + torch.diag_embed(torch.where(valid, torch.zeros_like(H[..., 0]), pad.expand(*batch, L)))
        vals, Z = torch.linalg.eigh(H)
        is_pad = (Z.square() * (~valid).to(cdt).unsqueeze(-1)).sum(-2) > 0.5
        key = torch.where(is_pad, torch.full_like(vals, -float("inf")), sort_key(vals, which))
        order = key.argsort(dim=-1, descending=True, stable=True)
        self.values = vals.gather(-1, order)
        self.vectors = Z.gather(-1, order.unsqueeze(-2).expand_as(Z))
        self.is_pad = is_pad.gather(-1, order)
        last = (l + its - 1).clamp_min(0)  # (*b,)
        idx = last.view(*batch, 1, 1).expand(*batch, 1, L)
        self.last_row = self.vectors.gather(-2, idx).squeeze(-2) * has_q
        beta = res.residual_norm[..., 0].to(cdt).unsqueeze(-1)
        self.estimate = beta * self.last_row.abs()
        scale = torch.maximum(self.values.abs(), eps ** (2.0 / 3.0) * nb)
        self.converged = (self.estimate <= tol * scale) & ~self.is_pad


def _restart_vector(
    r: Tensor, beta: Tensor, fresh: Tensor, Y: Tensor, gen: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Next start ``(*b, n, 1)``: ``r/‖r‖``, or a random vector where ``fresh``; both ⊥ ``Y`` (twice)."""
    rnd = randn(tuple(r.shape), gen, r.dtype, r.device)
    q = torch.where(fresh.view(*fresh.shape, 1, 1), rnd, r)
    for _ in range(2):
        q = q - Y @ (Y.mT @ q)
    nrm = torch.linalg.vector_norm(q, dim=-2, keepdim=True)
    q = q / torch.where(nrm > 0, nrm, torch.ones_like(nrm))
    return q, fresh


def _thick_restart(
    op: PreparedOperator,
    *,
    k: int,
    which: str,
    tol: float,
    ncv: int,
    keep: int,
    max_iter: int,
    reorthogonalize: bool,
    check_every: int,
    gen: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``values (*b,k)`` float64, ``vectors (*b,n,k)``, ``converged (*b,k)``, ``iterations (*b)``, ``‖H‖``."""
    batch, n, dtype, device = tuple(op.batch_shape), op.n, op.dtype, op.device
    cdt = _compute_dtype(dtype, device)
    eps = torch.finfo(dtype).eps
    Y = torch.zeros(*batch, n, 0, dtype=dtype, device=device)  # kept Ritz vectors
    theta = torch.zeros(*batch, 0, dtype=cdt, device=device)
    coup = torch.zeros_like(theta)
    yvalid = torch.zeros(*batch, 0, dtype=torch.bool, device=device)
    v = randn((*batch, n, 1), gen, dtype, device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    iters = torch.zeros(batch, dtype=torch.long, device=device)
    out_vals = torch.zeros(*batch, k, dtype=cdt, device=device)
    out_vecs = torch.zeros(*batch, n, k, dtype=dtype, device=device)
    out_conv = torch.zeros(*batch, k, dtype=torch.bool, device=device)
    total = 0
    while True:
        l = Y.shape[-1]
        budget = min(ncv - l, max_iter - total)

        def stop_fn(partial: LanczosResult, theta: Tensor = theta, coup: Tensor = coup, yv: Tensor = yvalid) -> Tensor:
            proj = _Projected(theta, coup, yv, partial, which, tol, eps)
            return proj.converged[..., :k].all(-1, keepdim=True)

        v0 = v * (~done).to(dtype).view(*batch, 1, 1)
        res = lanczos_tridiag(
            op.matmul,
            v0,
            max_iter=budget,
            reorthogonalize=reorthogonalize,
            stop_fn=stop_fn,
            check_every=check_every,
            allow_zero=True,
            orthogonal_to=Y if l else None,
        )
        if not bool(torch.isfinite(res.alpha).all() & torch.isfinite(res.beta).all()):
            raise ValueError("The operator produced NaN or Inf in a matrix-vector product.")
        total += res.num_steps
        iters = iters + res.iterations[..., 0] * (~done)
        proj = _Projected(theta, coup, yvalid, res, which, tol, eps)
        L = proj.values.shape[-1]
        lnew = min(keep, L)
        ncols = min(max(lnew, k), L)
        Zk = proj.vectors[..., :ncols].to(dtype)  # (*b, L, ncols)
        Qb = res.basis[..., 0, :, :].mT  # (*b, n, m)
        Yall = Y @ Zk[..., :l, :] + Qb @ Zk[..., l:, :]  # (*b, n, ncols) Ritz vectors
        Ynew = Yall[..., :lnew]
        if L >= k:
            conv_k = proj.converged[..., :k]
            keep_old = done.unsqueeze(-1)
            out_vals = torch.where(keep_old, out_vals, proj.values[..., :k])
            out_vecs = torch.where(keep_old.unsqueeze(-2), out_vecs, Yall[..., :k])
            out_conv = torch.where(keep_old, out_conv, conv_k)
            done = done | conv_k.all(-1)
        if bool(done.all()) or total >= max_iter:
            anorm = torch.where(proj.is_pad, torch.zeros_like(proj.values), proj.values.abs()).amax(-1)
            return out_vals, out_vecs, out_conv, iters, anorm
        beta = res.residual_norm[..., 0]
        fresh = res.broke_down[..., 0] | (res.iterations[..., 0] == 0)
        rvec = res.residual_vector
        assert rvec is not None
        v, fresh = _restart_vector(rvec, beta, fresh, Ynew, gen)
        Y = Ynew
        theta = proj.values[..., :lnew]
        coup = torch.where(
            fresh.unsqueeze(-1), torch.zeros_like(theta), beta.to(cdt).unsqueeze(-1) * proj.last_row[..., :lnew]
        )
        yvalid = ~proj.is_pad[..., :lnew]


def lanczos(
    operator: object,
    *,
    k: int,
    max_iter: int | None = None,
    tol: float = 1e-4,
    reorthogonalize: bool | None = None,
    which: Which = "LM",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    ncv: int | None = None,
    check_every: int | None = None,
) -> EigenResult:
    r"""``k`` eigenpairs of a symmetric operator by thick-restart Lanczos (see the module docstring).

    Args:
        operator: symmetric LinearOperator, dense ``(*b, n, n)`` tensor, or ``(matvec, n)`` /
            ``(matvec, n, dtype, device)`` tuple. Batched operators give batched results.
        k: number of eigenpairs, ``1 ≤ k ≤ n``.
        max_iter: budget of Lanczos steps (operator applications) over all restarts.
            ``None``: ``max(1000, 50 · ncv)``. A budget ``≤ ncv`` is a single unrestarted run
            with a Krylov dimension of ``max_iter`` (the hessian-eigenthings meaning).
        tol: relative Ritz residual ``‖r‖|z_{last,i}| / |θ_i|`` at which a pair is converged.
        reorthogonalize: full reorthogonalization. ``None`` (auto) means ``True``: Ritz
            *vectors* need an orthonormal basis (without it, converged pairs reappear as ghost
            copies, Paige 1976), and with restarts the basis never exceeds ``ncv`` vectors, so the
            cost ``O(ncv · n)`` per step is below one dense matvec. ``False`` runs the plain
            three-term recurrence (still orthogonal to the kept Ritz vectors).
        which: ``"LM"`` largest magnitude, ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic.
        seed: seed of a local ``torch.Generator`` on the operator's device for the start vector.
        generator: an explicit ``torch.Generator`` (on the operator's device) instead of ``seed``.
        ncv: Krylov subspace size per cycle; ``None``: ``min(n, max(2k + 1, 20), max_iter)``
            (ARPACK's default).
        check_every: Lanczos steps between convergence checks inside a cycle (host syncs).

    Returns:
        :class:`EigenResult`; eigenvalues are differentiable w.r.t. the operator's tensors
        (``∂λ_i = y_i^T ∂A y_i``, one ``_bilinear_derivative`` call in backward).

    Raises:
        ValueError: ``k`` outside ``[1, n]``, non-square or non-symmetric dense input, bad
            ``which``, negative ``tol``, bad ``max_iter``/``ncv``, ``seed`` with ``generator``.
    """
    which = check_which(which)
    tol = check_tol(tol)
    op = prepare_operator(operator)
    n = op.n
    k = check_k(k, n)
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < k):
        raise ValueError(
            f"max_iter must be an int >= k={k} (the Krylov space must hold k Ritz vectors); got {max_iter!r}."
        )
    if ncv is None:
        ncv = min(n, max(2 * k + 1, 20))
        if max_iter is not None:
            ncv = max(min(ncv, max_iter), min(k + 1, n))
    elif isinstance(ncv, bool) or not isinstance(ncv, int) or not (min(k + 1, n) <= ncv <= n):
        raise ValueError(f"ncv must be an int with min(k + 1, n) <= ncv <= n = {n}; got {ncv!r}.")
    if max_iter is None:
        max_iter = max(1000, 50 * ncv)
    if check_every is None:
        check_every = max(5, (ncv - k) // 4)
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be a positive int; got {check_every!r}.")
    reorth = True if reorthogonalize is None else bool(reorthogonalize)
    gen = resolve_generator(seed, generator, op.device)
    keep = max(1, min(ncv - 1, k + max(1, (ncv - k) // 2)))  # kept Ritz vectors per restart
    vals, vecs, conv, iters, anorm = _thick_restart(
        op,
        k=k,
        which=which,
        tol=tol,
        ncv=ncv,
        keep=keep,
        max_iter=max_iter,
        reorthogonalize=reorth,
        check_every=check_every,
        gen=gen,
    )
    values = vals.to(op.dtype)  # (*b, k)
    AV = op.matmul(vecs)  # (*b, n, k): the one extra matmul for TRUE residuals
    residuals = torch.linalg.vector_norm(AV - vecs * values.unsqueeze(-2), dim=-2)
    # Ritz estimates ignore the rounding drift of thick restarts: confirm against the TRUE residual,
    # allowing 10x the requested tolerance plus a rounding floor of ~100 eps ||A||.
    eps = torch.finfo(op.dtype).eps
    anorm = anorm.to(op.dtype).unsqueeze(-1)
    scale = torch.maximum(values.abs(), eps ** (2.0 / 3.0) * anorm)
    conv = conv & (residuals <= 10 * tol * scale + 100 * eps * anorm)
    values = differentiable_eigenvalues(op.linear_op, vecs, values)
    return EigenResult(
        eigenvalues=values,
        eigenvectors=vecs.mT.contiguous(),
        residuals=residuals,
        iterations=iters,
        converged=conv,
    )
