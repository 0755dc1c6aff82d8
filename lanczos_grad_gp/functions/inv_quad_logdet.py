r"""The GP routine: ``r^T K^{-1} r`` and ``log det K`` with forward-only Lanczos gradients.

Same inputs, outputs and shapes as :meth:`linear_operator.LinearOperator.inv_quad_logdet`.
The exact-GP marginal log likelihood (docs/mathematics.md, "The GP marginal likelihood")

.. math::
    \log p(y) = -\tfrac12 r^\top K^{-1} r - \tfrac12 \log\det K - \tfrac n2 \log 2\pi,\quad r = y - μ,

needs both terms and their gradients. Forward: ONE batched Lanczos run on the preconditioned
operator ``B = C^{-1} K C^{-T}`` (:mod:`lanczos_grad_gp.core.preconditioners`) over the columns
``[C^{-1} r, z_1, …, z_N]`` — ``f = 1/x`` for the right-hand sides, ``f = log`` for the Rademacher
probes of stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Dong et al. 2017):

.. math::
    \log\det K \approx \log\det P + \frac1N \sum_p z_p^\top \log(B) z_p.

Backward: the forward-only gradient (Singh, Barros & Li, arXiv:2605.12801) of every column,
mapped back by ``C^{-T}`` and handed to ONE ``K._bilinear_derivative`` call — the same
contract as linear_operator's ``InvQuadLogdet``; plus ``∂/∂r = 2 K^{-1} r`` so mean-function
parameters train. For ``n ≤ num_probes`` the probes are the unit vectors and the trace is exact.

The run itself, its options and its diagnostics are in :mod:`.gp_run` (the shared engine,
:func:`lanczos_grad_gp.core.engine.lanczos_forward`, with the two column groups). This module chooses the
preconditioner and probes of each call, applies the rules of a deterministic-objective block
(:mod:`.block_rules`: hold a rank-limited factor and the probes, replace a held factor that leaves a call
unconverged, hand a covariance still at the step cap to dense Cholesky (:mod:`.dense_block`) or run the call
again with the block's cap), retries with jitter where ``A``
is numerically not positive definite, warns, and publishes the diagnostics through
:func:`lanczos_grad_gp.record_calls`.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any

import torch
from linear_operator import settings as lo_settings
from linear_operator.operators import LinearOperator
from linear_operator.utils.errors import NotPSDError
from linear_operator.utils.warnings import NumericalWarning
from torch import Tensor

from .. import settings
from ..core.preconditioners import select_preconditioner
from ..core.probes import gp_probes
from ..diagnostics import record, record_calls, warn_not_converged
from ..routing import RouteInfo
from .block_rules import FrozenParts, may_hand_to_dense, may_raise_step_cap, may_refresh, rank_limited
from .dense_block import dense_fits, dense_inv_quad_logdet
from .gp_run import GPOptions, InvQuadLogdetInfo, lanczos_run
from .validation import check_inv_quad_logdet_args

__all__ = ["inv_quad_logdet", "InvQuadLogdetInfo", "GPOptions", "record_calls"]

_HANDED = "a deterministic_objective block handed this covariance to dense Cholesky"


def _dense_call(
    A: LinearOperator, rhs: Tensor | None, want_logdet: bool, scope: Any, reason: str, discarded: int = 0
) -> tuple[Tensor, Tensor, RouteInfo] | None:
    """One call of a block by dense Cholesky (:mod:`.dense_block`), or ``None`` where the factorization fails."""
    dense = dense_inv_quad_logdet(A, rhs, want_logdet)
    if dense is None:
        return None
    scope.dense_calls += 1
    n, name = A.shape[-1], type(A).__name__
    info = RouteInfo("cholesky", n, A.batch_shape, name, reason, block_dense=True, discarded_iterations=discarded)
    return dense[0], dense[1], info


def _forward(
    A: LinearOperator, rhs: Tensor | None, want_logdet: bool, options: GPOptions, retry: bool = False
) -> tuple[Tensor, Tensor, InvQuadLogdetInfo | RouteInfo]:
    """Values (with forward-only gradients attached) and diagnostics of one call (``retry``: with jitter)."""
    n, batch, dtype, device = A.shape[-1], A.batch_shape, A.dtype, A.device
    t = 0 if rhs is None else rhs.shape[-1]
    exact_trace = want_logdet and n <= options.num_probes
    scope = settings.deterministic_objective.value() if want_logdet and not exact_trace else None
    key = (batch, n, dtype, device, options, settings.preconditioner_override.value())
    if scope is not None and not retry:
        scope.estimating_calls += 1
    tried_dense = False
    if scope is not None and (key in scope.dense or scope.dense_all_keys) and dense_fits(A):
        # Handed over earlier in the block: exact by Cholesky, without building a factor first (on pol at
        # n = 5000, 219 of 221 later calls had a rank-limited factor, which cost 1.5 s of a 15 s call to find)
        handed = _dense_call(A, rhs, want_logdet, scope, f"{_HANDED} at an earlier call (n = {n})")
        if handed is not None:
            return handed
        # the factorization failed at this θ: back to the block's Lanczos estimator (its objective changes again)
        scope.dense.discard(key)
        scope.dense_all_keys = False
        scope.dense_switches += 1
        tried_dense = True
    with torch.no_grad():
        precond = select_preconditioner(
            A,
            max_rank=options.max_preconditioner_size,
            trace_tol=options.preconditioner_tol,
            override=settings.preconditioner_override.value(),
            num_columns=t + (options.num_probes if want_logdet and not exact_trace else 0),
            fallback_tol=settings.preconditioner_tol.value(),  # a block's tighter tolerance only where reachable
        )
    # In a deterministic-objective scope a rank-limited factor is replaced by the key's fixed one (the
    # first rank-limited factor of the scope, stored with the probes, or the factor that replaced it); a
    # factor that meets its trace tolerance is used as built: exact up to O(ρ), hence consistent.
    limited = rank_limited(precond, options.max_preconditioner_size, n)
    frozen: FrozenParts | None = None
    built = precond
    if scope is not None and limited:
        frozen = scope.frozen.get(key)
        if frozen is None:
            z = gp_probes(batch, n, options.num_probes, seed=options.probe_seed, dtype=dtype, device=device)
            frozen = scope.frozen[key] = FrozenParts(precond, z)
        precond = frozen.precond
    inv_quad, logdet, info = lanczos_run(A, rhs, want_logdet, options, precond, frozen)
    discarded = 0
    if frozen is not None:
        scope.calls += 1
        if may_refresh(info.converged, info.attainable, frozen, built, scope):
            # The held factor was built at another θ and no longer preconditions this covariance: the run
            # stopped at the step cap and its truncated estimate is biased (a line search would follow it).
            # The call is repeated with the factor built here; if that run converges, the factor replaces
            # the held one, with the same probes, for the rest of the block.
            # (the capped run's result stays alive until the repeat is judged: about twice one call's memory)
            scope.refresh_attempts += 1
            parts = FrozenParts(built, frozen.probes)
            repeat = lanczos_run(A, rhs, want_logdet, options, built, parts)
            if repeat[2].converged:
                scope.frozen[key] = parts
                scope.refreshed += 1
                dropped = info
                inv_quad, logdet, info = repeat[0], repeat[1], replace(repeat[2], preconditioner_refreshed=True)
            else:  # the fresh factor does not help either: keep the block's objective
                dropped = repeat[2]
            discarded = int(dropped.iterations.max())
            del repeat, dropped
    if scope is not None and not tried_dense and may_hand_to_dense(info.converged, info.attainable, dense_fits(A)):
        # Still at the step cap where the covariance is small enough to factor: this call and the block's later
        # calls of the key are exact (the factorization costs less than the steps it would need).
        steps = discarded + int(info.iterations.max())
        reason = f"{_HANDED}: Lanczos stopped at {options.max_iter} steps unconverged ({steps} steps discarded)"
        handed = _dense_call(A, rhs, want_logdet, scope, reason, discarded=steps)
        if handed is not None:  # (not a handed key: it returned above, or its factorization failed there)
            scope.dense_handovers += 1
            scope.dense_switches += scope.estimating_calls > 1  # L-BFGS saw estimates: the objective changed
            scope.dense.add(key)
            return handed
    if scope is not None and may_raise_step_cap(info.converged, info.attainable, options.max_iter):
        # Still at the step cap: a truncated value is biased and a line search follows it. The block's own
        # estimator (its held factor and probes, or this call's factor) is run again with the block's cap.
        # (a refresh that was kept converged, so the held parts are still `frozen`'s)
        longer = replace(options, max_iter=settings.deterministic_max_lanczos_iter.value())
        try:
            raised = lanczos_run(A, rhs, want_logdet, longer, precond, frozen)
        except NotPSDError:  # the longer run met round-off the capped one did not: keep the capped, warned result
            raised = None
        if raised is not None:
            scope.raised_step_caps += 1
            discarded += int(info.iterations.max())
            inv_quad, logdet, info = raised[0], raised[1], replace(raised[2], step_cap_raised=True)
            del raised
    if discarded:
        info = replace(info, discarded_iterations=discarded)
    return inv_quad, logdet, info


def _forward_with_jitter(
    A: LinearOperator, rhs: Tensor | None, want_logdet: bool, options: GPOptions
) -> tuple[Tensor, Tensor, InvQuadLogdetInfo | RouteInfo]:
    """:func:`_forward`, retried with diagonal jitter when ``A`` is numerically not positive definite.

    As forgiving as GPyTorch's Cholesky (``psd_safe_cholesky``): float32 round-off in a covariance
    whose smallest eigenvalues are near its noise (posterior covariances, tiny fixed noise) makes
    Lanczos see a nonpositive Ritz value; stock GPyTorch then adds ``cholesky_jitter`` (1e-6 float32,
    1e-8 float64), ten times more per try, up to ``cholesky_max_tries`` (3), and warns. So do we. A
    clearly indefinite matrix still raises the first ``NotPSDError``.
    """
    try:
        return _forward(A, rhs, want_logdet, options)
    except NotPSDError as first:
        error = first
    jitter = lo_settings.cholesky_jitter.value(A.dtype)
    for attempt in range(lo_settings.cholesky_max_tries.value()):
        amount = jitter * 10**attempt
        try:
            inv_quad, logdet, info = _forward(A.add_jitter(amount), rhs, want_logdet, options, retry=True)
        except NotPSDError:
            continue
        warnings.warn(
            f"lanczos_grad_gp.inv_quad_logdet: A (n={A.shape[-1]}, {A.dtype}) is not numerically positive "
            f"definite; added jitter of {amount:.1e} to the diagonal (as GPyTorch's Cholesky does). ({error})",
            NumericalWarning,
            stacklevel=3,
        )
        if isinstance(info, RouteInfo):  # a block's dense call of the jittered matrix
            return inv_quad, logdet, replace(info, reason=f"{info.reason}; jitter {amount:.1e} added to A")
        return inv_quad, logdet, replace(info, jitter=amount)
    raise error


def _warn_if_not_converged(info: InvQuadLogdetInfo | RouteInfo) -> None:
    """Never return an unconverged result silently (GPyTorch warns the same way when CG stops early)."""
    if info.converged:
        return
    rels = torch.cat([info.inv_quad_relative_residual, info.logdet_relative_residual], -1)
    worst = float(rels.max()) if rels.numel() else 0.0
    floor = "" if info.attainable else " and a round-off floor above tol for this conditioning"
    cap = "deterministic_max_lanczos_iter (the cap in this block)" if info.step_cap_raised else "max_lanczos_iter"
    warn_not_converged(
        "inv_quad_logdet",
        f"Lanczos stopped after {int(info.iterations.max())} steps (n={info.n}) with relative residual "
        f"{worst:.2e} (tol {info.options.tol:.1e}){floor}",
        f"Increase lgg.settings.{cap} or max_preconditioner_size, raise the noise, or use float64.",
        stacklevel=3,
    )


def inv_quad_logdet(
    A: LinearOperator | Tensor,
    inv_quad_rhs: Tensor | None = None,
    logdet: bool = False,
    reduce_inv_quad: bool = True,
) -> tuple[Tensor, Tensor]:
    r"""``(inv_quad, logdet)`` of a positive definite ``A`` with forward-only Lanczos gradients.

    Drop-in for :meth:`linear_operator.LinearOperator.inv_quad_logdet`.

    Args:
        A: ``(*batch, n, n)`` positive definite LinearOperator (or tensor).
        inv_quad_rhs: ``None``, ``(n,)`` for a 2-D ``A``, or ``(*batch, n, k)``.
        logdet: whether to compute ``log det A``.
        reduce_inv_quad: return ``tr(R^T A^{-1} R)`` (``(*batch)``) instead of
            ``diag(R^T A^{-1} R)`` (``(*batch, k)``).

    Returns:
        ``(inv_quad, logdet)``; an absent term is returned as zeros of the batch shape.

    Numerical options come from :mod:`lanczos_grad_gp.settings` (iteration cap, tolerance,
    probes and their seed, preconditioner size). Raises ``NotPSDError`` when Lanczos proves
    ``A`` is not positive definite and ``ValueError`` for bad shapes/dtypes/NaN.
    """
    A, rhs, is_vector = check_inv_quad_logdet_args(A, inv_quad_rhs, logdet)
    if rhs is not None and rhs.shape[-1] == 0 and not logdet:  # no columns: nothing to compute (as stock)
        empty = rhs.new_zeros(rhs.shape[:-2] if reduce_inv_quad else (*rhs.shape[:-2], 0))
        return empty, torch.zeros(A.batch_shape, dtype=A.dtype, device=A.device)
    options = GPOptions.from_settings(A.dtype, estimates_logdet=logdet and A.shape[-1] > settings.num_probes.value())
    inv_quad, ld, info = _forward_with_jitter(A, rhs, logdet, options)
    record(info)
    _warn_if_not_converged(info)
    if rhs is None:
        inv_quad = torch.zeros(A.batch_shape, dtype=A.dtype, device=A.device)
    elif reduce_inv_quad:
        inv_quad = inv_quad.sum(-1)
    elif is_vector:
        inv_quad = inv_quad.squeeze(-1)
    return inv_quad, ld
