"""Which preconditioner factors a :class:`~lanczos_grad_gp.settings.deterministic_objective` block fixes,
and the trace tolerance its factors are built to (docs/mathematics.md, "Deterministic objectives")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .. import settings
from ..core.preconditioners import Preconditioner

#: repeats with a fresh factor per block at most (bounds the cost where nothing converges, or where two
#: same-shape covariances share a key and would replace each other's factor)
MAX_REFRESH_ATTEMPTS = 16


@dataclass(frozen=True)
class FrozenParts:
    """What a :class:`~lanczos_grad_gp.settings.deterministic_objective` scope fixes for one covariance shape."""

    precond: Preconditioner
    probes: Tensor  # (*batch, n, N)


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


def may_refresh(converged: bool, attainable: bool, frozen: FrozenParts, built: Preconditioner, scope: Any) -> bool:
    """Whether a call that used a block's held factor is repeated with the factor built at its own ``θ``: it
    stopped at the step cap (unconverged, but not at a round-off floor: ``attainable``), the fresh factor is a
    different, genuine one (not the held object, not the identity), and the block has attempts left."""
    return (
        not converged
        and attainable
        and built is not frozen.precond
        and built.rank > 0
        and scope.refresh_attempts < MAX_REFRESH_ATTEMPTS
    )


def may_raise_step_cap(converged: bool, attainable: bool, max_iter: int) -> bool:
    """Whether a call of a block that ended unconverged at the step cap (not at a round-off floor:
    ``attainable``) is run again with :class:`~lanczos_grad_gp.settings.deterministic_max_lanczos_iter` steps:
    a truncated estimate is biased, and a line search takes its errors for progress."""
    return not converged and attainable and settings.deterministic_max_lanczos_iter.value() > max_iter


def may_hand_to_dense(converged: bool, attainable: bool, fits: bool) -> bool:
    """Whether a call of a block that ended unconverged at the step cap (not at a round-off floor) hands its
    covariance to dense Cholesky for the rest of the block: it ``fits``
    (:func:`~lanczos_grad_gp.functions.dense_block.dense_fits`, ``n ≤ deterministic_dense_size``). Tried before
    the raised step cap, which stays the rule above that size."""
    return not converged and attainable and fits
