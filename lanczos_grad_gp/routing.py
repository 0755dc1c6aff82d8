"""Which computation the flag gives a covariance: the routing policy of ``use_lanczos_grad``.

While :class:`~lanczos_grad_gp.settings.use_lanczos_grad` is on, every ``log_prob`` /
``inv_quad_logdet`` call that reaches the hooks (:mod:`lanczos_grad_gp.gpytorch_hooks`) takes one
of three routes, decided from the operator's size and class only (never from tensor values):

``"cholesky"``
    ``n ≤`` :class:`~lanczos_grad_gp.settings.max_cholesky_size` (by default GPyTorch's own
    ``max_cholesky_size``, 800): GPyTorch's stock computation runs with the flag off for that call
    — a dense Cholesky, exact and deterministic, which is what L-BFGS needs and what costs least
    at these sizes. Results are bit-identical to the flag being off.
``"operator"``
    the covariance's class overrides ``inv_quad_logdet`` with its own formula (diagonal,
    Kronecker, low-rank-root-plus-diagonal / SGPR, block-diagonal, triangular or Cholesky
    factors, ...): that method runs, as in stock GPyTorch. If it falls back to the generic
    method, that inner call is routed again and recorded separately.
``"lanczos"``
    everything else: :func:`lanczos_grad_gp.inv_quad_logdet`, forward-only Lanczos gradients. Inside a
    :class:`~lanczos_grad_gp.settings.deterministic_objective` block (BoTorch's L-BFGS fits) a covariance
    whose call stays unconverged at ``max_lanczos_iter`` is handed to dense Cholesky for the rest of the
    block (``n ≤ deterministic_dense_size``); those calls are recorded as ``"cholesky"`` with
    ``block_dense=True``.

:func:`lanczos_grad_gp.record_calls` receives one entry per routed call: an
:class:`~lanczos_grad_gp.InvQuadLogdetInfo` for ``"lanczos"``, a :class:`RouteInfo` for the
other two; both have ``route``, ``n``, ``batch_shape`` and ``converged``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from linear_operator.operators import LinearOperator

from . import settings

__all__ = ["RouteInfo", "choose_route", "own_inv_quad_logdet"]


@dataclass(frozen=True)
class RouteInfo:
    """A call the flag did not give to Lanczos (collected by :func:`~lanczos_grad_gp.record_calls`).

    Attributes:
        route: ``"cholesky"`` (GPyTorch's exact path) or ``"operator"`` (the operator's own method).
        n: matrix size.
        batch_shape: the operator's batch shape.
        operator: the covariance's class name.
        reason: why this route was taken, in words.
        converged: always True (both routes are exact computations).
        block_dense: a :class:`~lanczos_grad_gp.settings.deterministic_objective` block computed this call by
            dense Cholesky after Lanczos stopped unconverged at ``max_lanczos_iter`` (at this call, or an
            earlier one of the block: ``deterministic_dense_size``), not the router by size.
        discarded_iterations: steps of the Lanczos runs this call threw away before its hand-over (0 for the
            block's later dense calls and for the router's routes).
    """

    route: str
    n: int
    batch_shape: torch.Size
    operator: str
    reason: str
    converged: bool = True
    block_dense: bool = False
    discarded_iterations: int = 0


def own_inv_quad_logdet(op: object) -> type | None:
    """The class in ``type(op)``'s MRO that defines ``inv_quad_logdet`` below ``LinearOperator``, if any."""
    for klass in type(op).__mro__:
        if klass is LinearOperator:
            return None
        if "inv_quad_logdet" in vars(klass):
            return klass
    return None


def choose_route(op: LinearOperator, *, check_operator: bool = True) -> RouteInfo | None:
    """The route of ``op`` under the flag: a :class:`RouteInfo`, or ``None`` for Lanczos.

    Args:
        op: the covariance operator (``(*batch, n, n)``).
        check_operator: also route operators with their own ``inv_quad_logdet`` to it (the
            ``log_prob`` hook; the ``inv_quad_logdet`` hook only sees operators without one).
    """
    n = int(op.shape[-1])
    threshold = settings.max_cholesky_size.resolved()
    name = type(op).__name__
    if n <= threshold:
        return RouteInfo("cholesky", n, op.batch_shape, name, f"n = {n} <= max_cholesky_size = {threshold}")
    if check_operator:
        owner = own_inv_quad_logdet(op)
        if owner is not None and not getattr(owner, "_lanczos_grad_gp_operator", False):
            return RouteInfo("operator", n, op.batch_shape, name, f"{owner.__name__}.inv_quad_logdet (exact structure)")
    return None
