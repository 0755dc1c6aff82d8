r"""The deflated check: is an eigenvalue beyond the returned ones hiding in their orthogonal complement?

A Krylov method converges to the eigenvalues its start block "sees". A single vector sees one vector
per eigenspace, so with ``k = 4`` wanted pairs of a spectrum ``10, 10, 10, 10, 5, …`` it may return
``10, 10, 10, 5`` — every pair with a tiny residual, i.e. "converged", and one of them wrong. Residuals
cannot reveal a missing eigenvalue; a search in the complement can.

After convergence, with the returned pairs ``(θ_i, y_i)`` (``Y`` orthonormal), a short block Krylov
run from a fresh random block in ``span(Y)^⊥`` (:func:`.block.block_krylov` with ``orthogonal_to=Y``)
gives Ritz values ``μ_j`` of ``P A P`` (``P = I − Y Y^T``). If ``Y`` spanned exact eigenvectors, the
spectrum of ``A`` would be ``{θ_i} ∪ spec(P A P|_{Y^⊥})``, and by interlacing every ``μ_j`` lies in
the latter, so

.. math::
    \mathrm{key}(μ_j) > \mathrm{key}(θ_k) + δ \quad\Longrightarrow\quad
    θ_k \text{ is not the k-th most wanted eigenvalue},

``δ = tol · max(|θ_k|, ε^{2/3}‖A‖) + 100 ε‖A‖ + ‖r_k‖`` absorbing the residuals of ``Y``. A positive
check is a proof (up to ``δ``); a negative one is evidence, not proof: ``steps`` Krylov vectors from a
random start find an eigenvalue beyond ``θ_k`` unless it is nearly orthogonal to the start or very
close to the rest of the complement's spectrum. The pairs more wanted than the largest such ``μ``
are still supported; those less wanted are marked unconverged, and
:func:`~lanczos_grad_gp.eigen.lanczos` restarts from ``[Y, U]`` (``U`` the Ritz vectors of the
check) to find the missing copies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .block import KrylovOptions, KrylovOutcome, block_krylov
from .ritz import sort_key

__all__ = ["DeflatedCheck", "VerifiedOutcome", "deflated_check", "verify_and_repair"]


@dataclass(frozen=True)
class DeflatedCheck:
    """Outcome of :func:`deflated_check` (``*b`` the batch shape).

    Attributes:
        missed: ``(*b,)`` a Ritz value of the complement lies beyond the least wanted returned one.
        supported: ``(*b, k)`` the returned pair is more wanted than every such Ritz value.
        values: ``(*b, u)`` the complement's most wanted Ritz values ``μ`` (compute dtype).
        vectors, products: ``(*b, n, u)`` their Ritz vectors ``U`` and ``A U`` (no extra matvec).
        matvecs: operator applications of the check.
    """

    missed: Tensor
    supported: Tensor
    values: Tensor
    vectors: Tensor
    products: Tensor
    matvecs: int


def deflated_check(
    matmul: Callable[[Tensor], Tensor],
    shape: tuple[torch.Size, int, torch.dtype, torch.device],
    found: tuple[Tensor, Tensor, Tensor],
    *,
    which: str,
    tol: float,
    steps: int,
    block_size: int,
    anorm: Tensor,
    gen: torch.Generator | None,
) -> DeflatedCheck | None:
    """Run the check of the module docstring; ``None`` when the complement is empty (``k = n``).

    Args:
        matmul, shape: the operator as for :func:`.block.block_krylov`.
        found: ``(values (*b, k), vectors (*b, n, k) orthonormal, residuals (*b, k))`` most wanted first.
        which, tol: as the main iteration.
        steps: operator applications of the check (its Krylov dimension).
        block_size: width of the random start block.
        anorm: ``(*b,)`` estimate of ``‖A‖``.
        gen: generator of the start block.
    """
    batch, n, dtype, _ = shape
    values, Y, residuals = found
    k = Y.shape[-1]
    room = n - k
    if room <= 0:
        return None
    steps = max(1, min(steps, room))
    b = max(1, min(block_size, steps))
    opts = KrylovOptions(
        k=1, block_size=b, which=which, tol=0.0, ncv=steps, keep=max(1, steps - 1), max_matvecs=steps, check_every=10**9
    )
    Yq, _ = torch.linalg.qr(Y)
    out = block_krylov(matmul, shape, opts, gen, orthogonal_to=Yq)
    mu = out.ritz.values[..., : out.ritz_vectors.shape[-1]]
    valid = out.ritz.valid[..., : mu.shape[-1]]
    eps = torch.finfo(dtype).eps
    theta_k = values[..., -1]
    a = anorm.to(values.dtype)
    slack = tol * torch.maximum(theta_k.abs(), eps ** (2.0 / 3.0) * a) + 100 * eps * a + residuals[..., -1].to(a.dtype)
    key_mu = torch.where(valid, sort_key(mu, which), torch.full_like(mu, -float("inf")))
    beyond = key_mu > (sort_key(theta_k, which) + slack).unsqueeze(-1)  # (*b, u)
    best = key_mu[..., 0]  # the most wanted Ritz value of the complement
    supported = sort_key(values, which) >= (best - slack).unsqueeze(-1)
    count = max(1, int(beyond.sum(-1).max())) if beyond.numel() else 1
    u = min(count, mu.shape[-1])
    return DeflatedCheck(
        missed=beyond.any(-1),
        supported=supported | ~beyond.any(-1, keepdim=True),
        values=mu[..., :u],
        vectors=out.ritz_vectors[..., :u],
        products=out.ritz_products[..., :u],
        matvecs=out.matvecs,
    )


@dataclass(frozen=True)
class VerifiedOutcome:
    """:func:`verify_and_repair`'s result: the (possibly repaired) outcome and the checks' verdicts.

    Attributes:
        outcome: the :class:`~.block.KrylovOutcome` after repairs.
        supported: ``(*b, k)`` the last check supports the pair (True where no check ran).
        verified: ``(*b,)`` all pairs converged and the last check found nothing beyond them.
        checks: deflated checks run; repairs: restarts from a check's findings.
        matvecs: operator applications of the checks and repairs.
    """

    outcome: KrylovOutcome
    supported: Tensor
    verified: Tensor
    checks: int
    repairs: int
    matvecs: int


def _merge(old: KrylovOutcome, new: KrylovOutcome, where: Tensor, extra: int) -> KrylovOutcome:
    """``new`` for the batch entries ``where`` (``(*b,)``), ``old`` elsewhere; ``extra`` matvecs added to ``where``."""
    w1, w2 = where.unsqueeze(-1), where.unsqueeze(-1).unsqueeze(-1)
    return replace(
        old,
        values=torch.where(w1, new.values, old.values),
        vectors=torch.where(w2, new.vectors, old.vectors),
        products=torch.where(w2, new.products, old.products),
        residuals=torch.where(w1, new.residuals, old.residuals),
        converged=torch.where(w1, new.converged, old.converged),
        iterations=old.iterations + where * (extra + new.iterations),
        matvecs=old.matvecs + new.matvecs,
        anorm=torch.maximum(old.anorm, new.anorm),
    )


def verify_and_repair(
    matmul: Callable[[Tensor], Tensor],
    shape: tuple[torch.Size, int, torch.dtype, torch.device],
    opts: KrylovOptions,
    outcome: KrylovOutcome,
    *,
    steps: int,
    budget: int,
    gen: torch.Generator | None,
) -> VerifiedOutcome:
    """Check the converged entries (:func:`deflated_check`); where it finds more, restart from ``[Y, U]``.

    Repeats until a check finds nothing or the ``budget`` of repair matvecs is spent; pairs a check
    does not support are then reported unconverged.
    """
    batch = tuple(shape[0])
    k = opts.k
    supported = torch.ones(*batch, k, dtype=torch.bool, device=shape[3])
    verified = torch.zeros(batch, dtype=torch.bool, device=shape[3])
    checks = repairs = used = 0
    while True:
        ready = outcome.converged.all(-1)
        if not bool(ready.any()):
            break
        found = (outcome.values, outcome.vectors, outcome.residuals)
        chk = deflated_check(
            matmul,
            shape,
            found,
            which=opts.which,
            tol=opts.tol,
            steps=steps,
            block_size=opts.block_size,
            anorm=outcome.anorm,
            gen=gen,
        )
        if chk is None:  # k = n: nothing outside the returned pairs
            verified = ready
            break
        checks += 1
        used += chk.matvecs
        outcome = replace(outcome, iterations=outcome.iterations + chk.matvecs * ready)
        missed = chk.missed & ready
        verified = ready & ~chk.missed
        supported = chk.supported | ~ready.unsqueeze(-1)
        left = budget - used
        if not bool(missed.any()) or left <= 0:
            break
        B0 = torch.cat([outcome.vectors, chk.vectors], -1)
        AB0 = torch.cat([outcome.products, chk.products], -1)
        Bq, Rq = torch.linalg.qr(B0)
        ABq = torch.linalg.solve_triangular(Rq, AB0, upper=True, left=False)
        new = block_krylov(matmul, shape, replace(opts, max_matvecs=left), gen, start=(Bq, ABq))
        used += new.matvecs
        repairs += 1
        outcome = _merge(outcome, new, missed, 0)
    return VerifiedOutcome(outcome, supported, verified, checks, repairs, used)
