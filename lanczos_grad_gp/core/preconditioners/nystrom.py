r"""Randomized (Gaussian-sketch) Nyström preconditioner for ``K = K_θ + D``.

The greedy pivoted Cholesky picks columns of ``K_θ``: on a kernel whose leading eigenvectors are
spread over many weakly correlated points it captures almost none of them. Measured (RBF-ARD,
lengthscale 1, n = 4000, noise 0.1): on elevators the largest eigenvalue of ``K_θ − L Lᵀ`` is still
85 (``λ_1(K_θ) = 88``) after 500 pivots, so the iterations do not fall (90 without a factor, 80
with rank 500); on protein ``λ_max(K_θ − L Lᵀ) = 128`` at rank 200 where the best rank-200
approximation leaves ``λ_201 = 1.4``.

A Gaussian sketch sees the leading eigenspace instead (Halko, Martinsson & Tropp 2011; as a
preconditioner: Frangella, Tropp & Udell, "Randomized Nyström preconditioning", SIAM J. Matrix
Anal. Appl. 2023). With ``S = D^{-1/2} K_θ D^{-1/2}`` and an orthonormal ``Ω`` (``n × r``, seeded):

.. math::
    Y = S Ω,\quad ν = \sqrt{n}\, ε\, \lVert Y\rVert_F,\quad Y_ν = Y + νΩ,\quad
    Ω^\top Y_ν = R^\top R,\quad Y_ν R^{-1} = U \operatorname{diag}(σ) V^\top,\quad
    Λ = \max(σ^2 - ν, 0),

and ``S ≈ U Λ Uᵀ`` (``0 ⪯ U Λ Uᵀ ⪯ S``), so ``P = D^{1/2}(I + U Λ U^\top)D^{1/2}`` is the
:class:`~.low_rank.LowRankPlusDiagPreconditioner` with ``s² = Λ``: ``log det P = Σ log d_i + Σ log(1 + Λ_j)``
and the preconditioned operator's eigenvalues are ``≥ 1``. The cost is ONE product of the kernel with
``r`` columns (a dense GEMM, far more efficient per flop than the ``r`` row fetches and rank-one
updates of the pivoted Cholesky) plus ``O(n r²)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from ..._compat import operator_matmul
from .low_rank import LowRankPlusDiagPreconditioner, identity_preconditioner, noise_split

#: ``(A, max_rank, trace_tol) -> preconditioner | None`` (as in :mod:`lanczos_grad_gp.core.preconditioners`)
PreconditionerFactory = Callable[[LinearOperator, int, float], "LowRankPlusDiagPreconditioner | None"]

__all__ = ["nystrom", "nystrom_preconditioner", "adaptive_nystrom_preconditioner", "STEPS_PER_ROOT_KAPPA", "START_RANK"]

#: ``a`` of the step model ``m ≈ a √κ`` (measured: 1.6–2.2 on protein, n = 4000, tol 1e-4, ranks 0–500)
STEPS_PER_ROOT_KAPPA = 1.7
#: first sketch size of :func:`adaptive_nystrom_preconditioner`
START_RANK = 64


def _gaussian(batch: torch.Size, n: int, r: int, seed: int, like: Tensor) -> Tensor:
    """``(*batch, n, r)`` standard normal columns from a CPU generator (the same on every device)."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(*batch, n, r, generator=g, dtype=torch.float64).to(device=like.device, dtype=like.dtype)


def _nystrom_eig(Y: Tensor, omega: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(U, Λ)`` with ``S ≈ U Λ Uᵀ`` from ``Y = S Ω`` (``Λ`` descending, ``(*batch, r)``); ``None`` if unstable."""
    n = Y.shape[-2]
    eps = torch.finfo(Y.dtype).eps
    nu = n**0.5 * eps * torch.linalg.matrix_norm(Y).clamp_min(torch.finfo(Y.dtype).tiny)  # (*batch)
    for _ in range(3):
        Y_nu = Y + nu[..., None, None] * omega
        G = omega.mT @ Y_nu
        R, info = torch.linalg.cholesky_ex(0.5 * (G + G.mT), upper=True)  # (*batch, r, r)
        if not bool((info != 0).any()):
            break
        nu = nu * 100.0
    else:
        return None
    B = torch.linalg.solve_triangular(R, Y_nu, upper=True, left=False)  # (*batch, n, r) Y_ν R^{-1}
    U, sigma, _ = torch.linalg.svd(B, full_matrices=False)
    return U, (sigma.square() - nu.unsqueeze(-1)).clamp_min(0)


def _assemble(base: LinearOperator, d: Tensor, U: Tensor, lam: Tensor) -> LowRankPlusDiagPreconditioner:
    inv_sqrt_d, logdet = d.rsqrt(), d.log().sum(-1)
    if not bool((lam > 0).any()):
        return LowRankPlusDiagPreconditioner(inv_sqrt_d, None, None, logdet, 0, kind="nystrom")
    scale = (1.0 + lam).rsqrt() - 1.0  # (*batch, r), 0 where λ = 0: no effect
    logdet = logdet + torch.log1p(lam).sum(-1)
    captured = ((U.square() * lam.unsqueeze(-2)).sum(-1) * d).sum(-1)  # tr(D^{1/2} U Λ Uᵀ D^{1/2})
    remainder_ratio = (base.diagonal().sum(-1) - captured).clamp_min(0) / d.sum(-1)
    U_t = U.mT.contiguous() if U.device.type == "cpu" else None
    return LowRankPlusDiagPreconditioner(
        inv_sqrt_d, U, scale, logdet, U.shape[-1], None, None, remainder_ratio, U_t, kind="nystrom"
    )


def _scaled_product(base: LinearOperator, inv_sqrt_d: Tensor, X: Tensor) -> Tensor:
    """``S X = D^{-1/2} K_θ D^{-1/2} X``."""
    s = inv_sqrt_d.unsqueeze(-1)
    return s * operator_matmul(base, s * X)


def nystrom_preconditioner(A: LinearOperator, rank: int, *, seed: int = 0) -> LowRankPlusDiagPreconditioner | None:
    """The rank-``≤ rank`` randomized Nyström split preconditioner of ``A = K_θ + D`` (module docstring).

    Returns the identity when ``A`` is not ``K + D`` with a positive diagonal ``D``, and ``None`` when the
    small Cholesky fails even after raising the shift (the caller then falls back to the pivoted Cholesky).
    ``seed`` fixes the sketch ``Ω`` (a preconditioner must not change between calls at the same ``θ``).
    """
    with torch.no_grad():
        split = noise_split(A)
        if split is None:
            return identity_preconditioner(A)
        base, d = split
        r = min(int(rank), A.shape[-1])
        if r == 0:
            return LowRankPlusDiagPreconditioner(d.rsqrt(), None, None, d.log().sum(-1), 0, kind="nystrom")
        omega, _ = torch.linalg.qr(_gaussian(A.batch_shape, A.shape[-1], r, seed, d))  # (*batch, n, r)
        eig = _nystrom_eig(_scaled_product(base, d.rsqrt(), omega), omega)
        return None if eig is None else _assemble(base, d, *eig)


def _seconds(fn: Callable[[], Tensor], like: Tensor) -> tuple[Tensor, float]:
    """``fn()`` and its wall time (synchronised before and after on CUDA)."""
    if like.is_cuda:
        torch.cuda.synchronize(like.device)
    t0 = time.perf_counter()
    out = fn()
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    return out, time.perf_counter() - t0


def _find_shard(op: LinearOperator) -> object | None:
    """The shard spec of a row-sharded operator inside ``op`` (wrapped by a scale or a sum), if any."""
    spec = getattr(op, "shard", None)
    if spec is not None:
        return spec
    for arg in getattr(op, "_args", ()):
        if isinstance(arg, LinearOperator):
            found = _find_shard(arg)
            if found is not None:
                return found
    return None


def _agreed(base: LinearOperator, seconds: list[float], like: Tensor) -> list[float]:
    """The ranks' mean of measured times for a row-sharded operator, so every rank takes the same decision."""
    spec = _find_shard(base)
    if spec is None or getattr(spec, "world_size", 1) == 1:
        return seconds
    from ...distributed.comm import all_reduce_sum

    (total,) = all_reduce_sum([torch.tensor(seconds, dtype=torch.float64, device=like.device)], spec)
    return [float(t) / spec.world_size for t in total]


#: ``(operator type, n, batch, block columns, sketch columns, dtype, device, threads) -> cost ratio``
_cost_cache: dict[tuple, float] = {}


def _column_cost(base: LinearOperator, inv_sqrt_d: Tensor, omega: Tensor, Y: Tensor, c: int) -> float:
    """Time of one sketch column over the time of one product with the ``c``-column Lanczos block.

    Measured once per shape, dtype, device and thread count and process (after one untimed product of each
    width, so that a layout tuning of :mod:`lanczos_grad_gp.core.dense_matmul` is not billed), and reused,
    so the rank is a deterministic function of ``θ`` after the first call.
    """
    key = (type(base).__name__, *Y.shape, c, Y.dtype, str(Y.device), torch.get_num_threads())
    if key not in _cost_cache:
        block = omega[..., :c]
        _scaled_product(base, inv_sqrt_d, block)  # warm-up (Y itself was the sketch's)
        _, t_sketch = _seconds(lambda: _scaled_product(base, inv_sqrt_d, omega), Y)
        _, t_step = _seconds(lambda: _scaled_product(base, inv_sqrt_d, block), Y)
        t_sketch, t_step = _agreed(base, [t_sketch, t_step], Y)
        _cost_cache[key] = t_sketch / omega.shape[-1] / max(t_step, 1e-9)
    return _cost_cache[key]


def adaptive_nystrom_preconditioner(
    A: LinearOperator, max_rank: int, *, num_columns: int, seed: int = 0, start_rank: int | None = None
) -> LowRankPlusDiagPreconditioner | None:
    r"""The Nyström preconditioner whose rank is chosen by cost: doubled while it pays.

    Model (a heuristic, calibrated on protein): Lanczos needs about
    ``m(r) = STEPS_PER_ROOT_KAPPA · √(1 + Λ_r)`` steps on the preconditioned operator, with ``Λ_r`` the
    smallest eigenvalue the rank-``r`` sketch found (``≈ λ_r(S)``, the part of the spectrum left above 1).
    Doubling to ``2r`` is predicted to leave ``Λ_r · (Λ_r / Λ_{r/2})`` (the sketch's own decay
    continued), taken for the batch entry with the largest ``Λ_r``. It is done when the predicted saving
    ``m(r) − m(2r)`` Lanczos steps exceeds its cost in steps: the ``r`` new sketch columns (at the
    measured cost ratio of :func:`_column_cost`) plus the larger factor's application over ``m(2r)``
    steps (``4 r / n`` of a step per added column block). For a row-sharded operator the measured times
    are averaged over the ranks, so that all take the same decision. ``start_rank``: ``START_RANK``.
    """
    with torch.no_grad():
        split = noise_split(A)
        if split is None:
            return identity_preconditioner(A)
        base, d = split
        n, batch = A.shape[-1], A.batch_shape
        inv_sqrt_d = d.rsqrt()
        r = min(START_RANK if start_rank is None else int(start_rank), int(max_rank), n)
        if r == 0:
            return LowRankPlusDiagPreconditioner(inv_sqrt_d, None, None, d.log().sum(-1), 0, kind="nystrom")
        omega, _ = torch.linalg.qr(_gaussian(batch, n, r, seed, d))
        Y = _scaled_product(base, inv_sqrt_d, omega)  # (*batch, n, r)
        eig = _nystrom_eig(Y, omega)
        if eig is None:
            return None
        per_column = None
        step = 1
        while r < min(int(max_rank), n):
            lam = eig[1].reshape(-1, eig[1].shape[-1])  # (B, r)
            lam = lam[lam[:, -1].argmax()]  # the batch entry with the most spectrum left
            r_new = min(2 * r, int(max_rank), n)
            lam_r, lam_half = float(lam[-1]), float(lam[max(r // 2 - 1, 0)])
            lam_next = lam_r * (lam_r / lam_half) if lam_half > 0 else 0.0
            m_now = STEPS_PER_ROOT_KAPPA * math.sqrt(1.0 + lam_r)
            m_next = STEPS_PER_ROOT_KAPPA * math.sqrt(1.0 + lam_next)
            if m_now - m_next <= m_next * 4.0 * (r_new - r) / n:  # not even the application pays
                break
            if per_column is None:
                per_column = _column_cost(base, inv_sqrt_d, omega, Y, max(1, min(int(num_columns), r)))
            if m_now - m_next <= per_column * (r_new - r) + m_next * 4.0 * (r_new - r) / n:
                break
            extra = _gaussian(batch, n, r_new - r, seed + step, d)
            for _ in range(2):  # twice is enough: orthogonal to Ω to working precision
                extra = extra - omega @ (omega.mT @ extra)
            extra, _ = torch.linalg.qr(extra)
            omega, Y = torch.cat([omega, extra], -1), torch.cat([Y, _scaled_product(base, inv_sqrt_d, extra)], -1)
            larger = _nystrom_eig(Y, omega)
            if larger is None:  # keep the smaller factor
                break
            eig, r, step = larger, r_new, step + 1
        return _assemble(base, d, *eig)


def nystrom(rank: int | None = None, *, seed: int = 0) -> PreconditionerFactory:
    """A :class:`~lanczos_grad_gp.settings.preconditioner_override` factory for the Nyström preconditioner.

    ``rank`` (``None``: ``max_preconditioner_size``) is the sketch size; when the small Cholesky fails
    the GP routine falls back to its default choice (:func:`~.select_preconditioner`)::

        with lgg.settings.preconditioner_override(lgg.core.preconditioners.nystrom(256)):
            loss = -mll(model(x), y)
    """
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 0):
        raise ValueError(f"rank must be a non-negative int or None; got {rank!r}.")

    def factory(A: LinearOperator, max_rank: int, trace_tol: float) -> LowRankPlusDiagPreconditioner | None:
        return nystrom_preconditioner(A, max_rank if rank is None else rank, seed=seed)

    return factory
