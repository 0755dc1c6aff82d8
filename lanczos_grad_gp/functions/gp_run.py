r"""One Lanczos run of the GP routine, its options and its diagnostics.

:func:`lanczos_run` evaluates ``r^T K^{-1} r`` and the stochastic ``log det K`` of
:func:`lanczos_grad_gp.inv_quad_logdet` with ONE batched Lanczos over ``[C^{-1} r, z_1, …, z_N]`` on the
preconditioned operator ``B = C^{-1} K C^{-T}``, for a given preconditioner (and, in a deterministic-objective
block, the block's probes), and attaches the forward-only gradients (Singh, Barros & Li, arXiv:2605.12801).
Which preconditioner and probes a call uses, and whether a call is repeated, is decided by the caller
(:mod:`.inv_quad_logdet`, with the rules of :mod:`.block_rules`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from .. import settings
from .._compat import operator_matmul
from ..core.engine import ColumnGroup, EngineOptions, lanczos_forward
from ..core.matfuncs import BUILTIN_FUNCTIONS
from ..core.preconditioners import Preconditioner
from ..core.preconditioners.control_variate import control_variate_term
from ..core.probes import gp_probes, unit_probes
from .block_rules import FrozenParts, trace_tol_in_force
from .forward_only import GradientPayload, attach_forward_only_gradient, flatten_factors

__all__ = ["GPOptions", "InvQuadLogdetInfo", "lanczos_run"]

_INV = BUILTIN_FUNCTIONS["inv"]
_LOG = BUILTIN_FUNCTIONS["log"]


@dataclass(frozen=True)
class GPOptions:
    """Resolved numerical options of one :func:`lanczos_grad_gp.inv_quad_logdet` call (from the settings)."""

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
    """Diagnostics of one call (collected by :func:`lanczos_grad_gp.record_calls`).

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
        route: which computation ran: ``"lanczos"`` (:func:`lanczos_grad_gp.inv_quad_logdet`; the router
            records other routes).
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
            plus the capped run of a call whose step cap was raised; 0 when the call ran once): the cost that
            ``iterations`` does not show.
        step_cap_raised: in a block, the call still stopped at ``max_lanczos_iter`` (with the block's factor), so
            it was run again with :class:`~lanczos_grad_gp.settings.deterministic_max_lanczos_iter` steps
            (``options.max_iter`` is that cap; ``converged`` says whether that run met the tolerance).
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
    step_cap_raised: bool = False


def _preconditioned_matmul(A: LinearOperator, precond: Preconditioner, x: Tensor) -> Tensor:
    """``B x = C^{-1} K C^{-T} x``."""
    return precond.inv_root(operator_matmul(A, precond.inv_root_t(x)))


def lanczos_run(
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
