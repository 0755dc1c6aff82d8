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


def rank_limited(precond: Preconditioner, max_rank: int, n: int) -> bool:
    """Whether the factor stopped at its rank cap short of ``n`` (so the log-determinant is a genuine estimate).

    A factor that stopped earlier met its trace tolerance (``B ≈ I``: exact up to ``O(ρ)`` at every ``θ``);
    a full-rank one is exact. Where a block's tighter tolerance is out of the cap's reach the factor is cut
    back to the one outside the block (``fallback_tol``), so this decides as outside it. Preconditioners
    without a pivoted-Cholesky factor count as rank-limited.
    """
    if getattr(precond, "factor", None) is None:
        return not (precond.rank == 0 and max_rank == 0)  # max_preconditioner_size 0: identity, nothing to fix
    return max_rank <= precond.rank < n
