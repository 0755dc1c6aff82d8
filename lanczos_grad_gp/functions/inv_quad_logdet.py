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

The forward is the shared engine (:func:`lanczos_grad_gp.core.engine.lanczos_forward`) with the two column
groups; diagnostics are published through :func:`lanczos_grad_gp.record_calls`.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, replace

import torch
from linear_operator import settings as lo_settings
from linear_operator.operators import LinearOperator
from linear_operator.utils.errors import NotPSDError
from linear_operator.utils.warnings import NumericalWarning
from torch import Tensor

from .. import settings
from .._compat import operator_matmul
from ..core.engine import ColumnGroup, EngineOptions, lanczos_forward
from ..core.matfuncs import BUILTIN_FUNCTIONS
from ..core.preconditioners import Preconditioner, select_preconditioner
from ..core.preconditioners.control_variate import control_variate_term
from ..core.probes import gp_probes, unit_probes
from ..diagnostics import record, record_calls, warn_not_converged
from .block_rules import FrozenParts, may_refresh, rank_limited, trace_tol_in_force
from .forward_only import GradientPayload, attach_forward_only_gradient, flatten_factors
from .validation import check_inv_quad_logdet_args

__all__ = ["inv_quad_logdet", "InvQuadLogdetInfo", "GPOptions", "record_calls"]

_INV = BUILTIN_FUNCTIONS["inv"]
_LOG = BUILTIN_FUNCTIONS["log"]


@dataclass(frozen=True)
class GPOptions:
    """Resolved numerical options of one :func:`inv_quad_logdet` call (from :mod:`.settings`)."""

    max_iter: int
    tol: float
    num_probes: int
    probe_seed: int | None
    max_preconditioner_size: int
    preconditioner_tol: float
    reorthogonalize: bool
    check_every: int
    control_variate: bool = True

    @staticmethod
    def from_settings(dtype: torch.dtype, estimates_logdet: bool = True) -> GPOptions:
        """The options in force; ``estimates_logdet``: the call estimates a log-determinant with probes
        (only then does a deterministic-objective block tighten the trace tolerance)."""
        tol = settings.lanczos_tol.value()
        if tol is None:
            tol = 1e-4 if dtype == torch.float64 else 1e-3
        return GPOptions(
            max_iter=settings.max_lanczos_iter.value(),
            tol=tol,
            num_probes=settings.num_probes.value(),
            probe_seed=settings.probe_seed.value(),
            max_preconditioner_size=settings.max_preconditioner_size.value(),
            preconditioner_tol=trace_tol_in_force(estimates_logdet),
            reorthogonalize=settings.reorthogonalize.on(),
            check_every=settings.check_every.value(),
            control_variate=settings.preconditioner_control_variate.on(),
        )


@dataclass(frozen=True)
class InvQuadLogdetInfo:
    """Diagnostics of one call (collected by :func:`record_calls`).

    Attributes:
        n: matrix size.
        batch_shape: the operator's batch shape.
        num_probes: probe vectors used (``n`` when the trace was exact).
        exact_trace: the probes were the unit vectors (``n ≤ num_probes``).
        preconditioner_rank: rank of the preconditioner's low-rank part (0: diagonal only / none).
        preconditioner_kind: ``"pivoted_cholesky"``, ``"nystrom"``, ``"identity"`` or an override's class name.
        iterations: ``(*batch, t + N)`` Lanczos steps per column (rhs first, then probes).
        inv_quad_relative_residual: ``(*batch, t)`` CG-type relative residual of ``B^{-1} w``.
        logdet_relative_residual: ``(*batch, N)`` relative residual of ``log(B) z``.
        logdet_standard_error: ``(*batch)`` standard error of the probe average (0 if exact).
        converged: every column met ``tol`` (or broke down) with a round-off floor the dtype can attain,
            the rule of :func:`lanczos_grad_gp.core.engine.lanczos_forward`; when False a
            ``NumericalWarning`` was raised.
        options: the options in force.
        attainable: the estimated round-off floor of every column is within the tolerance (part of
            ``converged``; False means the dtype, not the iteration count, limits the accuracy).
        route: which computation ran: ``"lanczos"`` (this routine).
        variance_reduced: the log-determinant gradient used the preconditioner as a control
            variate (:mod:`lanczos_grad_gp.core.preconditioners.control_variate`), or the trace was exact.
        fixed_preconditioner: the preconditioner and probes were those held fixed by a
            :class:`~lanczos_grad_gp.settings.deterministic_objective` block (built at this call or an
            earlier one of the block), and the control variate kept its value ``tr(G M(θ))``.
        jitter: the diagonal jitter added after Lanczos found ``A`` numerically not positive definite
            (0: none), following GPyTorch's ``psd_safe_cholesky`` (``cholesky_jitter``, ×10 per try,
            ``cholesky_max_tries``), with a ``NumericalWarning``.
        preconditioner_refreshed: in a block, the held factor (built at another ``θ``) left this call
            unconverged, so the call was repeated with the factor built at this ``θ``, which the block
            holds from then on (same probes); ``iterations`` and residuals are the repeated run's.
        discarded_iterations: steps of a run this call made and threw away (the held factor's capped run
            when ``preconditioner_refreshed``, or a repeat with a fresh factor that did not converge either;
            0 when the call ran once): the cost that ``iterations`` does not show.
    """

    n: int
    batch_shape: torch.Size
    num_probes: int
    exact_trace: bool
    preconditioner_rank: int
    iterations: Tensor
    inv_quad_relative_residual: Tensor
    logdet_relative_residual: Tensor
    logdet_standard_error: Tensor
    converged: bool
    options: GPOptions
    attainable: bool = True
    route: str = "lanczos"
    variance_reduced: bool = False
    jitter: float = 0.0
    fixed_preconditioner: bool = False
    preconditioner_kind: str = "pivoted_cholesky"
    preconditioner_refreshed: bool = False
    discarded_iterations: int = 0


def _preconditioned_matmul(A: LinearOperator, precond: Preconditioner, x: Tensor) -> Tensor:
    """``B x = C^{-1} K C^{-T} x``."""
    return precond.inv_root(operator_matmul(A, precond.inv_root_t(x)))


def _forward(
    A: LinearOperator, rhs: Tensor | None, want_logdet: bool, options: GPOptions
) -> tuple[Tensor, Tensor, InvQuadLogdetInfo]:
    """Values (with forward-only gradients attached) and diagnostics of one call."""
    n, batch, dtype, device = A.shape[-1], A.batch_shape, A.dtype, A.device
    t = 0 if rhs is None else rhs.shape[-1]
    exact_trace = want_logdet and n <= options.num_probes
    scope = settings.deterministic_objective.value() if want_logdet and not exact_trace else None
    key = (batch, n, dtype, device, options, settings.preconditioner_override.value())
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
    frozen: FrozenParts | None = None
    built = precond
    if scope is not None and rank_limited(precond, options.max_preconditioner_size, n):
        frozen = scope.frozen.get(key)
        if frozen is None:
            z = gp_probes(batch, n, options.num_probes, seed=options.probe_seed, dtype=dtype, device=device)
            frozen = scope.frozen[key] = FrozenParts(precond, z)
        precond = frozen.precond
    inv_quad, logdet, info = _compute(A, rhs, want_logdet, options, precond, frozen)
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
            repeat = _compute(A, rhs, want_logdet, options, built, parts)
            if repeat[2].converged:
                scope.frozen[key] = parts
                scope.refreshed += 1
                dropped = info
                inv_quad, logdet, info = repeat[0], repeat[1], replace(repeat[2], preconditioner_refreshed=True)
            else:  # the fresh factor does not help either: keep the block's objective (and warn, below)
                dropped = repeat[2]
            info = replace(info, discarded_iterations=int(dropped.iterations.max()))
            del repeat, dropped
    return inv_quad, logdet, info


def _compute(
    A: LinearOperator,
    rhs: Tensor | None,
    want_logdet: bool,
    options: GPOptions,
    precond: Preconditioner,
    frozen: FrozenParts | None,
) -> tuple[Tensor, Tensor, InvQuadLogdetInfo]:
    """One Lanczos run with ``precond`` (and the probes of ``frozen``: parts a block holds fixed, if any)."""
    n, batch, dtype, device = A.shape[-1], A.batch_shape, A.dtype, A.device
    matrix_args = A.representation()
    grad_on = torch.is_grad_enabled()
    want_matrix = grad_on and any(t.requires_grad for t in matrix_args)
    want_rhs = grad_on and rhs is not None and rhs.requires_grad
    t = 0 if rhs is None else rhs.shape[-1]
    exact_trace = want_logdet and n <= options.num_probes
    groups, starts = [], []
    if t:
        starts.append(precond.inv_root(rhs))  # w = C^{-1} r: autograd maps ∂/∂w back to r
        groups.append(ColumnGroup(_INV, t))
    num = 0
    if want_logdet:
        if exact_trace:
            z = unit_probes(batch, n, dtype=dtype, device=device)
        elif frozen is not None:
            z = frozen.probes
        else:
            z = gp_probes(batch, n, options.num_probes, seed=options.probe_seed, dtype=dtype, device=device)
        num = z.shape[-1]
        starts.append(z)
        groups.append(ColumnGroup(_LOG, num))
    start = torch.cat(starts, -1)  # (*batch, n, t + N)
    engine_options = EngineOptions(
        options.max_iter,
        options.tol,
        options.reorthogonalize,
        options.check_every,
        compress_tol=options.tol,
        gradient_residual=False,  # the log-det gradient error tracks log's residual; probe noise dominates
    )
    result = lanczos_forward(
        functools.partial(_preconditioned_matmul, A, precond),
        start.detach(),
        groups,
        engine_options,
        want_factors=want_matrix,
        want_applied=want_rhs,
        what="the (preconditioned) covariance",
    )
    values = result.values
    if want_matrix or want_rhs:
        payload = GradientPayload(None, None, None, result.applied)
        if want_matrix:
            with torch.no_grad():
                offsets = [sum(g.count for g in groups[:i]) for i in range(len(groups))]
                left, right, owner = flatten_factors(result.factors, offsets)
                payload = GradientPayload(precond.inv_root_t(left), precond.inv_root_t(right), owner, result.applied)
        values = attach_forward_only_gradient(values, payload, start, A.representation_tree(), matrix_args)
    inv_quad = values[..., :t]
    logdet = torch.zeros(batch, dtype=dtype, device=device)
    se = torch.zeros(batch, dtype=dtype, device=device)
    variance_reduced = False
    if want_logdet:
        per_probe = values[..., t:]  # (*batch, N)
        weight = 1.0 if exact_trace else 1.0 / num
        logdet = precond.logdet.to(dtype) + weight * per_probe.sum(-1)
        fixed = frozen is not None
        if (want_matrix or fixed) and not exact_trace and options.control_variate:
            # with P held fixed (deterministic-objective block) the term keeps its value H(θ) = tr(G M(θ)),
            # with or without gradients: zero where P was built, zero in expectation everywhere, so the
            # value is the function whose gradient is returned; with P built at this call it is a pure
            # gradient term (value zero)
            with torch.set_grad_enabled(want_matrix):
                cv = control_variate_term(A, precond, z, weight)
            if cv is not None:
                logdet = logdet + (cv if fixed else cv - cv.detach())
                variance_reduced = want_matrix or variance_reduced
        if not exact_trace and num > 1:
            se = per_probe.detach().std(-1) / num**0.5
        elif not exact_trace:  # one probe: the spread of a Rademacher estimate is unknown, not 0
            se = torch.full(batch, float("nan"), dtype=dtype, device=device)
    d = result.diagnostics
    converged = bool(d.converged.all())
    info = InvQuadLogdetInfo(
        n=n,
        batch_shape=batch,
        num_probes=num,
        exact_trace=exact_trace,
        preconditioner_rank=precond.rank,
        preconditioner_kind=getattr(precond, "kind", type(precond).__name__),
        iterations=d.iterations,
        inv_quad_relative_residual=d.relative_residual[..., :t],
        logdet_relative_residual=d.relative_residual[..., t:],
        logdet_standard_error=se,
        converged=converged,
        options=options,
        attainable=bool(d.floor_ok.all()),
        variance_reduced=want_logdet and (exact_trace or variance_reduced),
        fixed_preconditioner=frozen is not None,
    )
    return inv_quad, logdet, info


def _forward_with_jitter(
    A: LinearOperator, rhs: Tensor | None, want_logdet: bool, options: GPOptions
) -> tuple[Tensor, Tensor, InvQuadLogdetInfo]:
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
            inv_quad, logdet, info = _forward(A.add_jitter(amount), rhs, want_logdet, options)
        except NotPSDError:
            continue
        warnings.warn(
            f"lanczos_grad_gp.inv_quad_logdet: A (n={A.shape[-1]}, {A.dtype}) is not numerically positive "
            f"definite; added jitter of {amount:.1e} to the diagonal (as GPyTorch's Cholesky does). ({error})",
            NumericalWarning,
            stacklevel=3,
        )
        return inv_quad, logdet, replace(info, jitter=amount)
    raise error


def _warn_if_not_converged(info: InvQuadLogdetInfo) -> None:
    """Never return an unconverged result silently (GPyTorch warns the same way when CG stops early)."""
    if info.converged:
        return
    rels = torch.cat([info.inv_quad_relative_residual, info.logdet_relative_residual], -1)
    worst = float(rels.max()) if rels.numel() else 0.0
    floor = "" if info.attainable else " and a round-off floor above tol for this conditioning"
    warn_not_converged(
        "inv_quad_logdet",
        f"Lanczos stopped after {int(info.iterations.max())} steps (n={info.n}) with relative residual "
        f"{worst:.2e} (tol {info.options.tol:.1e}){floor}",
        "Increase lgg.settings.max_lanczos_iter or max_preconditioner_size, raise the noise, or use float64.",
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
