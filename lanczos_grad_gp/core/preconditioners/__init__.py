r"""Preconditioners of the GP routine: a small protocol, three implementations and one chooser.

The default is the greedy pivoted Cholesky (:mod:`.low_rank`); :func:`nystrom` gives the randomized
Nyström preconditioner of :mod:`.nystrom`, which sees the leading eigenspace where pivot columns do not.

A preconditioner ``P = C C^T ≈ K`` is used symmetrically: Lanczos runs on ``B = C^{-1} K C^{-T}``,
``log det K = log det P + log det B`` and the Ritz vectors map back by ``C^{-T}``
(docs/mathematics.md, "The GP marginal likelihood"). Anything that implements
:class:`Preconditioner` plugs in — return it from a function passed to
:class:`lanczos_grad_gp.settings.preconditioner_override` (the counterpart of linear_operator's
``preconditioner_override``)::

    def my_preconditioner(A, max_rank, trace_tol):
        return None          # None: fall back to the default choice
    with lgg.settings.preconditioner_override(my_preconditioner):
        ...

Example:
    >>> import torch
    >>> from linear_operator.operators import DenseLinearOperator
    >>> A = DenseLinearOperator(torch.eye(3, dtype=torch.float64))
    >>> P = select_preconditioner(A, max_rank=10, trace_tol=0.01)
    >>> isinstance(P, Preconditioner), P.rank
    (True, 0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from linear_operator.operators import LinearOperator
from torch import Tensor

from .low_rank import (
    LowRankPlusDiagPreconditioner,
    SplitPreconditioner,
    identity_preconditioner,
    pivoted_cholesky_preconditioner,
)
from .nystrom import adaptive_nystrom_preconditioner, nystrom, nystrom_preconditioner
from .pivoted_cholesky import pivoted_cholesky

__all__ = [
    "Preconditioner",
    "PreconditionerFactory",
    "LowRankPlusDiagPreconditioner",
    "SplitPreconditioner",
    "identity_preconditioner",
    "adaptive_nystrom_preconditioner",
    "nystrom",
    "nystrom_preconditioner",
    "pivoted_cholesky",
    "pivoted_cholesky_preconditioner",
    "select_preconditioner",
]


@runtime_checkable
class Preconditioner(Protocol):
    """``P = C C^T``: what the GP routine needs of a preconditioner.

    ``inv_root(x) = C^{-1} x`` and ``inv_root_t(x) = C^{-T} x`` map ``(*batch, n, c)`` to the same
    shape; ``logdet`` is ``log det P`` (``(*batch)``, a constant of the gradient); ``rank`` is
    reported by ``record_calls()`` (0 for no low-rank part).
    """

    logdet: Tensor
    rank: int

    def inv_root(self, x: Tensor) -> Tensor: ...

    def inv_root_t(self, x: Tensor) -> Tensor: ...


#: the smallest ``max_rank`` at which the default may trade the greedy factor for the Nyström sketch
AUTO_MIN_RANK = 64

#: ``(A, max_rank, trace_tol) -> Preconditioner | None``
PreconditionerFactory = Callable[[LinearOperator, int, float], "Preconditioner | None"]


def select_preconditioner(
    A: LinearOperator,
    *,
    max_rank: int,
    trace_tol: float,
    override: PreconditionerFactory | None = None,
    num_columns: int = 11,
    fallback_tol: float | None = None,
) -> Preconditioner:
    """The preconditioner for ``A``: the override's, when it returns one, else the default.

    Default, for ``K + D`` (diagonal ``D > 0``; the identity for anything else): the greedy
    pivoted-Cholesky split preconditioner, unless ``n > 2 max_rank``, ``max_rank ≥ 64`` and the
    factor is projected to stop at ``max_rank`` with a remainder above ``tr(D)``: then it is abandoned
    (at the earliest after 40 columns) for the randomized Nyström preconditioner whose rank is chosen by cost
    (:func:`.nystrom.adaptive_nystrom_preconditioner`; ``num_columns``: the Lanczos columns it is
    applied to per step). Where the greedy factor meets its trace tolerance, or the variance-reduced
    gradient's regime ``ρ ≤ 1``, it is kept: value and gradient are then (nearly) exact.
    ``fallback_tol``: where ``trace_tol`` is not reached within ``max_rank``, the greedy factor is cut
    to where ``fallback_tol`` would have stopped it (:func:`.low_rank.pivoted_cholesky_preconditioner`).
    """
    if override is not None:
        chosen = override(A, max_rank, trace_tol)
        if chosen is not None:
            if not isinstance(chosen, Preconditioner):
                raise TypeError(
                    "preconditioner_override must return None or an object with inv_root, inv_root_t, logdet "
                    f"and rank; got {type(chosen).__name__}."
                )
            return chosen
    n = A.shape[-1]
    if max_rank >= AUTO_MIN_RANK and n > 2 * max_rank:
        greedy = pivoted_cholesky_preconditioner(A, max_rank, trace_tol, abandon_short=True, fallback_tol=fallback_tol)
        if greedy is not None:
            return greedy
        sketched = adaptive_nystrom_preconditioner(A, max_rank, num_columns=num_columns)
        if sketched is not None:
            return sketched
    return pivoted_cholesky_preconditioner(A, max_rank, trace_tol, fallback_tol=fallback_tol)
