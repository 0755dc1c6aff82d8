"""Which preconditioner factors a :class:`~lanczos_grad_gp.settings.deterministic_objective` block fixes,
and the trace tolerance its factors are built to (docs/mathematics.md, "Deterministic objectives")."""

from __future__ import annotations

from .. import settings
from ..core.preconditioners import Preconditioner


def trace_tol_in_force(estimates_logdet: bool) -> float:
    """The pivoted Cholesky's trace tolerance: tightened inside a deterministic-objective block for calls
    that estimate a log-determinant (a factor that meets its tolerance is rebuilt at every ``θ``, and a
    change of its pivots moves the estimate by the probes' error, which the tolerance bounds)."""
    tol = settings.preconditioner_tol.value()
    if not estimates_logdet or settings.deterministic_objective.value() is None:
        return tol
    return min(tol, settings.deterministic_preconditioner_tol.value())


def rank_limited(precond: Preconditioner, max_rank: int, n: int, regime_tol: float) -> bool:
    """Whether the factor stopped at its rank cap short of ``n`` without meeting ``regime_tol`` (so the
    log-determinant is a genuine estimate).

    A factor that stopped earlier met its trace tolerance (``B ≈ I``: exact up to ``O(ρ)`` at every ``θ``);
    a full-rank one is exact. A factor at its cap whose remainder meets ``regime_tol`` (``preconditioner_tol``,
    while it was built to a block's tighter one) is of the first kind too: the block decides which factors
    it fixes by ``preconditioner_tol``, as outside a block, and the tighter tolerance only makes the
    factors it rebuilds more accurate. Preconditioners without a pivoted-Cholesky factor count as
    rank-limited.
    """
    if getattr(precond, "factor", None) is None:
        return not (precond.rank == 0 and max_rank == 0)  # max_preconditioner_size 0: identity, nothing to fix
    if not max_rank <= precond.rank < n:
        return False
    if precond.remainder_ratio is None or precond.inv_sqrt_diag is None:
        return True
    d = precond.inv_sqrt_diag.square().reciprocal()  # (*batch, n) the noise diagonal D
    met = precond.remainder_ratio * d.sum(-1) <= regime_tol * n * d.amin(-1)  # (*batch) tr(K − LLᵀ) ≤ tol n σ²_min
    return not bool(met.all())  # one host sync per call, outside the Lanczos loop
