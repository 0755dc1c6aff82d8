r"""Baselines that differentiate *through* Lanczos, for comparison with the forward-only gradient.

Both compute the same stochastic-Lanczos-quadrature estimate of the exact-GP terms as
:func:`lanczos_grad_gp.functions.inv_quad_logdet` — same Rademacher probes, same split pivoted-Cholesky
preconditioner ``P = C C^T``, a fixed number ``m`` of Lanczos steps on ``B = C^{-1} K C^{-T}`` —

.. math::
    r^\top K^{-1} r \approx \lVert w\rVert^2 e_1^\top T_w^{-1} e_1,\qquad
    \log\det K \approx \log\det P + \tfrac1N \sum_p \lVert z_p\rVert^2 e_1^\top \log(T_p) e_1,

and differ only in how the gradient with respect to the kernel hyperparameters is obtained:

* :func:`backprop_lanczos_terms` — reverse-mode autograd straight through the three-term
  recurrence (:func:`lanczos_grad_gp.lanczos_tridiag` run under ``torch.enable_grad`` on the
  dense, differentiable kernel matrix), optionally with full reorthogonalization;
* :func:`adjoint_lanczos_terms` — the adjoint (reverse-mode) recurrence of Krämer, Moreno-Muñoz,
  Roy & Hauberg, "Gradients of functions of large matrices", NeurIPS 2024, ported from the
  JAX library matfree (``matfree.decomp``: ``_tridiag_adjoint`` / ``_tridiag_adjoint_step``,
  the version without reorthogonalization) as a :class:`torch.autograd.Function`. Its backward
  runs ``m`` more matvecs and hands all ``Σ_k x_k^T ∂B λ_k`` terms to ONE
  ``_bilinear_derivative`` call.

The small ``m x m`` part ``‖v‖² e_1^T f(T) e_1`` is differentiated by :class:`TridiagQuadForm`
(Daleckii–Krein with the library's stable divided differences) for both, so differences between
the methods come from the Krylov part only and not from autograd through ``eigh`` (which divides
by Ritz-value gaps and fails on ghost copies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from lanczos_grad_gp import lanczos_tridiag
from lanczos_grad_gp.core.matfuncs import BUILTIN_FUNCTIONS, MatrixFunction
from lanczos_grad_gp.core.preconditioners import SplitPreconditioner, pivoted_cholesky_preconditioner
from lanczos_grad_gp.core.probes import gp_probes

__all__ = [
    "SLQSetup",
    "TridiagQuadForm",
    "AdjointLanczos",
    "adjoint_lanczos_terms",
    "backprop_lanczos_terms",
    "lanczos_fixed",
    "make_setup",
    "mll_from_terms",
    "tridiag_quad",
]

_INV = BUILTIN_FUNCTIONS["inv"]
_LOG = BUILTIN_FUNCTIONS["log"]


# --------------------------------------------------------------------------------------------
# the small tridiagonal part
# --------------------------------------------------------------------------------------------
def _tridiag(alpha: Tensor, beta: Tensor) -> Tensor:
    T = torch.diag_embed(alpha)
    if alpha.shape[-1] > 1:
        T = T + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    return T


class TridiagQuadForm(torch.autograd.Function):
    r"""``‖v‖² e_1^T f(T) e_1`` per column from the tridiagonal ``(alpha, beta)`` (``(k, m)``, ``(k, m-1)``).

    Backward by Daleckii–Krein: ``∂/∂T = ‖v‖² S (F ∘ s s^T) S^T`` with ``s = S^T e_1`` and ``F`` the
    stable divided differences of ``f``; ``∂/∂α = diag``, ``∂/∂β = 2·offdiag`` (``T`` symmetric).
    """

    @staticmethod
    def forward(ctx: Any, fn: MatrixFunction, alpha: Tensor, beta: Tensor, start_norm: Tensor) -> Tensor:  # type: ignore[override]
        T = _tridiag(alpha, beta).to(torch.float64)
        lam, S = torch.linalg.eigh(T)
        s = S[..., 0, :]
        fl = fn.f(lam)
        nrm2 = start_norm.to(torch.float64).square()
        core = (s.square() * fl).sum(-1)
        ctx.fn = fn
        ctx.save_for_backward(lam, S, start_norm.to(torch.float64), core)
        ctx.dtype = alpha.dtype
        return (nrm2 * core).to(alpha.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        lam, S, nrm, core = ctx.saved_tensors
        F = ctx.fn.divided_differences(lam)
        s = S[..., 0, :]
        scale = (g.to(torch.float64) * nrm.square())[..., None, None]
        G = scale * (S @ (F * (s.unsqueeze(-1) * s.unsqueeze(-2))) @ S.mT)
        d_alpha = G.diagonal(dim1=-2, dim2=-1).to(ctx.dtype)
        d_beta = (2 * G.diagonal(offset=1, dim1=-2, dim2=-1)).to(ctx.dtype)
        d_norm = (g.to(torch.float64) * 2 * nrm * core).to(ctx.dtype)
        return None, d_alpha, d_beta, d_norm


def tridiag_quad(fn: MatrixFunction, alpha: Tensor, beta: Tensor, start_norm: Tensor) -> Tensor:
    """Functional form of :class:`TridiagQuadForm`."""
    return TridiagQuadForm.apply(fn, alpha, beta, start_norm)


# --------------------------------------------------------------------------------------------
# shared set-up: probes, preconditioner, start vectors
# --------------------------------------------------------------------------------------------
@dataclass
class SLQSetup:
    """Everything the Lanczos baselines share with ``lgg.inv_quad_logdet`` for one covariance ``A``.

    Attributes:
        precond: the split preconditioner (built as in ``lgg.inv_quad_logdet``).
        start: ``(n, 1 + N)`` start vectors ``[C^{-1} r, z_1, …, z_N]`` (detached).
        t: number of right-hand-side columns (1).
        num_probes: ``N``.
    """

    precond: SplitPreconditioner
    start: Tensor
    t: int
    num_probes: int


def make_setup(
    A: LinearOperator, rhs: Tensor, *, num_probes: int, probe_seed: int, max_rank: int, precond_tol: float
) -> SLQSetup:
    """Probes and preconditioner exactly as :func:`lanczos_grad_gp.functions.inv_quad_logdet` draws/builds them."""
    with torch.no_grad():
        precond = pivoted_cholesky_preconditioner(A, max_rank, precond_tol)
        r = rhs.detach().reshape(-1, 1)
        z = gp_probes(torch.Size(), A.shape[-1], num_probes, seed=probe_seed, dtype=A.dtype, device=A.device)
        start = torch.cat([precond.inv_root(r), z], -1)
    return SLQSetup(precond, start, 1, num_probes)


def mll_from_terms(
    alpha: Tensor, beta: Tensor, start_norm: Tensor, setup: SLQSetup, n: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(mll / n, inv_quad, logdet)`` from the tridiagonals of all columns (GPyTorch's MLL scaling)."""
    t = setup.t
    inv_quad = tridiag_quad(_INV, alpha[:t], beta[:t], start_norm[:t]).sum()
    per_probe = tridiag_quad(_LOG, alpha[t:], beta[t:], start_norm[t:])
    logdet = setup.precond.logdet.to(alpha.dtype) + per_probe.mean()
    mll = -0.5 * (inv_quad + logdet + n * math.log(2 * math.pi)) / n
    return mll, inv_quad, logdet


# --------------------------------------------------------------------------------------------
# (c) autograd through the recurrence
# --------------------------------------------------------------------------------------------
def lanczos_fixed(matmul: Any, v0: Tensor, m: int, *, reorthogonalize: bool = False) -> tuple[Tensor, Tensor]:
    """Plain fixed-``m`` batched Lanczos without in-place writes (safe for autograd).

    Returns ``alpha (k, m)`` and ``beta (k, m - 1)``. Used for the reorthogonalized autograd
    baseline, because :func:`lanczos_grad_gp.lanczos_tridiag` writes its basis in place.
    """
    norm = torch.linalg.vector_norm(v0, dim=0)
    q = v0 / norm
    q_prev = torch.zeros_like(q)
    b_prev = torch.zeros_like(norm)
    basis, alphas, betas = [], [], []
    for j in range(m):
        basis.append(q)
        w = matmul(q)
        a = (q * w).sum(0)
        w = w - a * q - b_prev * q_prev
        if reorthogonalize:
            Qs = torch.stack(basis, 0)  # (j+1, n, k)
            for _ in range(2):
                w = w - (Qs * (Qs * w).sum(1, keepdim=True)).sum(0)
        b = torch.linalg.vector_norm(w, dim=0)
        alphas.append(a)
        if j + 1 < m:
            betas.append(b)
        q_prev, q, b_prev = q, w / b, b
    alpha = torch.stack(alphas, 0).mT
    beta = torch.stack(betas, 0).mT if betas else alpha.new_zeros(alpha.shape[0], 0)
    return alpha, beta


def backprop_lanczos_terms(
    A: LinearOperator, setup: SLQSetup, m: int, *, reorthogonalize: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """``(mll / n, inv_quad, logdet)`` with reverse-mode autograd through ``m`` Lanczos steps.

    The kernel matrix is formed densely (``A.to_dense()``, differentiable) and every step's
    ``K @ Q_j`` is recorded; the backward therefore accumulates an ``n x n`` gradient of ``K``
    (``O(n²)`` memory, ``m`` rank-``k`` updates). Without reorthogonalization the recurrence is
    :func:`lanczos_grad_gp.lanczos_tridiag` itself; with it, :func:`lanczos_fixed` (the library
    loop writes its basis in place, which autograd rejects once the basis is read back).
    """
    pc = setup.precond
    with torch.enable_grad():
        K = A.to_dense()

        def matmul(x: Tensor) -> Tensor:
            return pc.inv_root(K @ pc.inv_root_t(x))

        if reorthogonalize:
            alpha, beta = lanczos_fixed(matmul, setup.start, m, reorthogonalize=True)
        else:
            res = lanczos_tridiag(matmul, setup.start, max_iter=m, reorthogonalize=False)
            alpha, beta = res.alpha, res.beta
        norm = torch.linalg.vector_norm(setup.start, dim=0)
        return mll_from_terms(alpha, beta, norm, setup, A.shape[-1])


# --------------------------------------------------------------------------------------------
# (d) adjoint Lanczos (Krämer et al. 2024, as in matfree)
# --------------------------------------------------------------------------------------------
class AdjointLanczos(torch.autograd.Function):
    r"""``m`` Lanczos steps on ``B = C^{-1} A(θ) C^{-T}`` with the adjoint recurrence as backward.

    Forward (matfree's ``_tridiag_forward``, batched over the ``k`` columns of ``v0``):
    ``x_0 = v/‖v‖``, ``a_j = x_j^T B x_j``, ``r = B x_j - a_j x_j - b_{j-1} x_{j-1}``,
    ``b_j = ‖r‖``, ``x_{j+1} = r / b_j``. Outputs ``alpha (k, m)`` and ``beta (k, m-1)``.

    Backward (matfree's ``_tridiag_adjoint_step``, ``j = m-1, …, 0``, with ``∂x_j = 0``):

    .. math::
        ξ \leftarrow ξ / b_j,\quad μ = \bar b_j - λ_{j+1}^\top x_j + x_{j+1}^\top ξ,\quad
        ν = \bar a_j + x_j^\top ξ,\quad λ_j = -ξ + μ x_{j+1} + ν x_j,

        ξ \leftarrow -B λ_j + a_j λ_j + b_j λ_{j+1} - b_j ν x_{j+1},

    and ``∂θ = Σ_j x_j^T (∂B/∂θ) λ_j`` — one ``A._bilinear_derivative(C^{-T}X, C^{-T}Λ)``.
    The start vectors are treated as constants (no gradient).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, representation_tree: Any, precond: SplitPreconditioner, v0: Tensor, m: int, *matrix_args: Tensor
    ) -> tuple[Tensor, Tensor]:
        A = representation_tree(*matrix_args)

        def matmul(x: Tensor) -> Tensor:
            return precond.inv_root(A._matmul(precond.inv_root_t(x)))

        with torch.no_grad():
            n, k = v0.shape
            xs = v0.new_zeros(m + 1, n, k)
            alphas = v0.new_zeros(m, k)
            betas = v0.new_zeros(m, k)
            x = v0 / torch.linalg.vector_norm(v0, dim=0)
            x_prev = torch.zeros_like(x)
            b = v0.new_zeros(k)
            for j in range(m):
                xs[j] = x
                w = matmul(x)
                a = (x * w).sum(0)
                r = w - a * x - b * x_prev
                b = torch.linalg.vector_norm(r, dim=0)
                alphas[j], betas[j] = a, b
                x_prev, x = x, r / b
            xs[m] = x
        ctx.representation_tree, ctx.precond, ctx.m = representation_tree, precond, m
        ctx.save_for_backward(xs, alphas, betas, *matrix_args)
        return alphas.mT.contiguous(), betas[:-1].mT.contiguous()

    @staticmethod
    def backward(ctx: Any, d_alpha: Tensor, d_beta: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        xs, alphas, betas, *matrix_args = ctx.saved_tensors
        pc, m = ctx.precond, ctx.m
        A = ctx.representation_tree(*matrix_args)
        da = d_alpha.mT  # (m, k)
        db = torch.cat([d_beta.mT, d_beta.new_zeros(1, d_beta.shape[0])], 0)  # (m, k), no grad on b_{m-1}
        with torch.no_grad():
            lam_plus = torch.zeros_like(xs[0])
            xi = torch.zeros_like(xs[0])  # -∂x_m = 0
            lams = torch.empty_like(xs[:m])
            for j in range(m - 1, -1, -1):
                x, x_plus, a, b = xs[j], xs[j + 1], alphas[j], betas[j]
                xi = xi / b
                mu = db[j] - (lam_plus * x).sum(0) + (x_plus * xi).sum(0)
                nu = da[j] + (x * xi).sum(0)
                lam = -xi + mu * x_plus + nu * x
                lams[j] = lam
                B_lam = pc.inv_root(A._matmul(pc.inv_root_t(lam)))
                xi = -B_lam + a * lam + b * lam_plus - b * nu * x_plus
                lam_plus = lam
            left = pc.inv_root_t(xs[:m].permute(1, 0, 2).reshape(xs.shape[1], -1))
            right = pc.inv_root_t(lams.permute(1, 0, 2).reshape(xs.shape[1], -1))
        grads = A._bilinear_derivative(left, right)
        return (None, None, None, None, *grads)


def adjoint_lanczos_terms(A: LinearOperator, setup: SLQSetup, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(mll / n, inv_quad, logdet)`` with the adjoint-Lanczos gradient (:class:`AdjointLanczos`)."""
    alpha, beta = AdjointLanczos.apply(A.representation_tree(), setup.precond, setup.start, m, *A.representation())
    norm = torch.linalg.vector_norm(setup.start, dim=0)
    return mll_from_terms(alpha, beta, norm, setup, A.shape[-1])
