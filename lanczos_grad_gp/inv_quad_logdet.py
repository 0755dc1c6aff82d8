r"""The GP routine: ``r^T K^{-1} r`` and ``log det K`` with forward-only Lanczos gradients.

Same inputs, outputs and shapes as :meth:`linear_operator.LinearOperator.inv_quad_logdet`.
The exact-GP marginal log likelihood (DESIGN §3)

.. math::
    \log p(y) = -\tfrac12 r^\top K^{-1} r - \tfrac12 \log\det K - \tfrac n2 \log 2\pi,\quad r = y - μ,

needs both terms and their gradients. Forward: ONE batched Lanczos run on the preconditioned
operator ``B = C^{-1} K C^{-T}`` (:mod:`.preconditioner`) over the columns
``[C^{-1} r, z_1, …, z_N]`` — ``f = 1/x`` for the right-hand sides, ``f = log`` for the
Rademacher probes of stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017;
Dong et al. 2017):

.. math::
    \log\det K \approx \log\det P + \frac1N \sum_p z_p^\top \log(B) z_p.

Backward: the forward-only gradient (Singh, Barros & Li, arXiv:2605.12801) of every column,
mapped back by ``C^{-T}`` and handed to ONE ``K._bilinear_derivative`` call — the same
contract as linear_operator's ``InvQuadLogdet``; plus ``∂/∂r = 2 K^{-1} r`` so mean-function
parameters train. For ``n ≤ num_probes`` the probes are the unit vectors and the trace is exact.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from linear_operator.operators import LinearOperator
from linear_operator.utils.errors import NotPSDError
from linear_operator.utils.warnings import NumericalWarning
from torch import Tensor

from . import settings
from ._checks import broadcast_rhs, check_operator, first_order_only
from .lanczos import LanczosResult, lanczos_tridiag
from .matfuncs import BUILTIN_FUNCTIONS
from .preconditioner import pivoted_cholesky_preconditioner
from .quadrature import (
    RitzDecomposition,
    apply_function,
    function_residual,
    gradient_factors,
    quadrature,
    ritz_decomposition,
)

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

    @staticmethod
    def from_settings(dtype: torch.dtype) -> GPOptions:
        tol = settings.lanczos_tol.value()
        if tol is None:
            tol = 1e-4 if dtype == torch.float64 else 1e-3
        return GPOptions(
            max_iter=settings.max_lanczos_iter.value(),
            tol=tol,
            num_probes=settings.num_probes.value(),
            probe_seed=settings.probe_seed.value(),
            max_preconditioner_size=settings.max_preconditioner_size.value(),
            preconditioner_tol=settings.preconditioner_tol.value(),
            reorthogonalize=settings.reorthogonalize.on(),
            check_every=settings.check_every.value(),
        )


@dataclass(frozen=True)
class InvQuadLogdetInfo:
    """Diagnostics of one call (collected by :func:`record_calls`).

    Attributes:
        n: matrix size.
        batch_shape: the operator's batch shape.
        num_probes: probe vectors used (``n`` when the trace was exact).
        exact_trace: the probes were the unit vectors (``n ≤ num_probes``).
        preconditioner_rank: rank of the pivoted-Cholesky factor (0: diagonal only / none).
        iterations: ``(*batch, t + N)`` Lanczos steps per column (rhs first, then probes).
        inv_quad_relative_residual: ``(*batch, t)`` CG-type relative residual of ``B^{-1} w``.
        logdet_relative_residual: ``(*batch, N)`` relative residual of ``log(B) z``.
        logdet_standard_error: ``(*batch)`` standard error of the probe average (0 if exact).
        converged: every column reached ``tol`` (or broke down).
        options: the options in force.
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


_recorders = threading.local()


@contextmanager
def record_calls() -> Iterator[list[InvQuadLogdetInfo]]:
    """Collect an :class:`InvQuadLogdetInfo` for every :func:`inv_quad_logdet` call in this thread.

    >>> import lanczos_grad_gp as lgg
    >>> with lgg.record_calls() as calls:
    ...     pass
    >>> calls
    []
    """
    stack = getattr(_recorders, "stack", None)
    if stack is None:
        stack = _recorders.stack = []
    calls: list[InvQuadLogdetInfo] = []
    stack.append(calls)
    try:
        yield calls
    finally:
        stack.remove(calls)


def _record(info: InvQuadLogdetInfo) -> None:
    for calls in getattr(_recorders, "stack", ()):
        calls.append(info)


def _columns(obj: Any, sl: slice) -> Any:
    """Select Lanczos columns ``sl`` of a :class:`LanczosResult` or :class:`RitzDecomposition`."""
    if isinstance(obj, LanczosResult):
        dims = {"basis": -3, "alpha": -2, "beta": -2}
    else:
        dims = {"values": -2, "vectors": -3, "weights": -2}
    out = {}
    for field in dataclasses.fields(obj):
        t = getattr(obj, field.name)
        dim = dims.get(field.name, -1)
        out[field.name] = None if t is None else t.narrow(dim, sl.start, sl.stop - sl.start)
    return type(obj)(**out)


def _probes(batch: torch.Size, n: int, num: int, seed: int | None, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Rademacher probes ``(*batch, n, num)``; drawn on the CPU from ``seed`` so runs agree across devices."""
    if seed is None:
        bits = torch.randint(0, 2, (*batch, n, num), device=device)
    else:
        gen = torch.Generator().manual_seed(seed)
        bits = torch.randint(0, 2, (*batch, n, num), generator=gen).to(device)
    return (2 * bits - 1).to(dtype)


def _flat(x: Tensor) -> Tensor:
    # (*batch, k, n, r) -> (*batch, n, k*r)
    return x.movedim(-3, -2).flatten(-2)


class _InvQuadLogdet(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        options: GPOptions,
        want_logdet: bool,
        info_sink: list,
        representation_tree: Any,
        rhs: Tensor | None,
        *matrix_args: Tensor,
    ) -> tuple[Tensor, Tensor]:
        A = representation_tree(*matrix_args)
        n, batch, dtype, device = A.shape[-1], A.batch_shape, A.dtype, A.device
        need_matrix_grad = any(ctx.needs_input_grad[5:])
        with torch.no_grad():
            precond = pivoted_cholesky_preconditioner(A, options.max_preconditioner_size, options.preconditioner_tol)
            t = 0 if rhs is None else rhs.shape[-1]
            starts = [] if rhs is None else [precond.inv_root(rhs)]
            exact_trace = want_logdet and n <= options.num_probes
            num = 0
            if want_logdet:
                if exact_trace:
                    z = torch.eye(n, dtype=dtype, device=device).expand(*batch, n, n)
                else:
                    z = _probes(batch, n, options.num_probes, options.probe_seed, dtype, device)
                num = z.shape[-1]
                starts.append(z)
            start = torch.cat(starts, -1)

            def matmul(x: Tensor) -> Tensor:
                return precond.inv_root(A._matmul(precond.inv_root_t(x)))

            res = lanczos_tridiag(
                matmul,
                start,
                max_iter=options.max_iter,
                reorthogonalize=options.reorthogonalize,
                stop_fn=_stop_fn(t, options.tol),
                check_every=options.check_every,
                allow_zero=True,
            )
            ritz = ritz_decomposition(res)
            _check_pd(ritz, res, n)
            inv_quad = torch.zeros(*batch, t, dtype=dtype, device=device)
            logdet = torch.zeros(batch, dtype=dtype, device=device)
            lefts, rights = [], []
            fv = None
            inv_rel = log_rel = torch.zeros(*batch, 0, dtype=dtype, device=device)
            if t:
                res_t, ritz_t = _columns(res, slice(0, t)), _columns(ritz, slice(0, t))
                inv_quad = quadrature(_INV, ritz_t).to(dtype)
                _, inv_rel = function_residual(_INV, ritz_t, res_t)
                if need_matrix_grad:
                    left, right, _ = gradient_factors(_INV, ritz_t, res_t, compress_tol=options.tol)
                    ctx.inv_rank = left.shape[-1]
                    lefts.append(precond.inv_root_t(_flat(left)))
                    rights.append(precond.inv_root_t(_flat(right)))
                if ctx.needs_input_grad[4]:
                    fv = precond.inv_root_t(apply_function(_INV, ritz_t, res_t))  # K^{-1} r, (*batch, n, t)
            se = torch.zeros(batch, dtype=dtype, device=device)
            if want_logdet:
                sl = slice(t, t + num)
                res_p, ritz_p = _columns(res, sl), _columns(ritz, sl)
                per_probe = quadrature(_LOG, ritz_p).to(dtype)  # (*batch, N)
                weight = 1.0 if exact_trace else 1.0 / num
                logdet = precond.logdet.to(dtype) + weight * per_probe.sum(-1)
                if not exact_trace and num > 1:
                    se = per_probe.std(-1) / num**0.5
                _, log_rel = function_residual(_LOG, ritz_p, res_p)
                if need_matrix_grad:
                    left, right, _ = gradient_factors(_LOG, ritz_p, res_p, compress_tol=options.tol)
                    ctx.log_rank = left.shape[-1]
                    lefts.append(precond.inv_root_t(_flat(left)) * weight)
                    rights.append(precond.inv_root_t(_flat(right)))
        info_sink.append(
            InvQuadLogdetInfo(
                n=n,
                batch_shape=batch,
                num_probes=num,
                exact_trace=exact_trace,
                preconditioner_rank=precond.rank,
                iterations=res.iterations,
                inv_quad_relative_residual=inv_rel.to(dtype),
                logdet_relative_residual=log_rel.to(dtype),
                logdet_standard_error=se,
                converged=bool(((torch.cat([inv_rel, log_rel], -1) <= options.tol) | res.broke_down).all()),
                options=options,
            )
        )
        ctx.representation_tree = representation_tree
        ctx.has_inv = bool(t) and need_matrix_grad
        ctx.has_log = want_logdet and need_matrix_grad
        ctx.has_fv = fv is not None
        ctx.save_for_backward(*lefts, *rights, *([fv] if fv is not None else []), *matrix_args)
        ctx.num_factors = len(lefts)
        return inv_quad, logdet

    @staticmethod
    @first_order_only  # double backward raises a clear RuntimeError, never a silently wrong value
    def backward(ctx: Any, g_inv: Tensor, g_logdet: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        k = ctx.num_factors
        lefts, rights = saved[:k], saved[k : 2 * k]
        rest = saved[2 * k :]
        fv = rest.pop(0) if ctx.has_fv else None
        matrix_args = rest
        scaled = []
        i = 0
        if ctx.has_inv:
            scaled.append(lefts[i] * g_inv.repeat_interleave(ctx.inv_rank, dim=-1).unsqueeze(-2))
            i += 1
        if ctx.has_log:
            scaled.append(lefts[i] * g_logdet.unsqueeze(-1).unsqueeze(-1))
        matrix_grads: tuple = (None,) * len(matrix_args)
        if scaled:
            A = ctx.representation_tree(*matrix_args)
            matrix_grads = tuple(A._bilinear_derivative(torch.cat(scaled, -1), torch.cat(rights, -1)))
        rhs_grad = None if fv is None else 2.0 * fv * g_inv.unsqueeze(-2)
        return (None, None, None, None, rhs_grad, *matrix_grads)


def _stop_fn(t: int, tol: float):
    """Stop rule: relative residual of ``B^{-1} w`` (rhs columns) or ``log(B) z`` (probes) ``≤ tol``."""

    def stop(partial: LanczosResult) -> Tensor:
        ritz = ritz_decomposition(partial)
        _, rel_inv = function_residual(_INV, ritz, partial)
        _, rel_log = function_residual(_LOG, ritz, partial)
        col = torch.arange(rel_inv.shape[-1], device=rel_inv.device)
        rel = torch.where(col < t, rel_inv, rel_log)
        return rel <= tol  # NaN while a Ritz value is <= 0: keep going

    return stop


def _check_pd(ritz: RitzDecomposition, res: LanczosResult, n: int) -> None:
    used = ritz.weights != 0
    lam = torch.where(used, ritz.values, torch.ones_like(ritz.values))
    if lam.numel() == 0:  # empty batch: nothing to check
        return
    lam_min = lam.min()
    if not bool(lam_min > 0):
        raise NotPSDError(
            f"The covariance (n={n}) is not positive definite: Lanczos found a Ritz value {float(lam_min):.3e} <= 0 "
            "of the (preconditioned) covariance. Increase the noise/jitter (e.g. a GreaterThan(1e-4) noise "
            "constraint) or use float64."
        )


def _warn_if_not_converged(info: InvQuadLogdetInfo) -> None:
    """Never return a far-from-converged result silently (GPyTorch warns the same way when CG stops early).

    Warns when the iteration cap stopped a column with a relative residual above ``10 · tol``
    (``info.converged`` reports the strict test; the gradient error is about twice the residual,
    so a residual within 10x of a 1e-4 tolerance is still far more accurate than the probe noise).
    ``lanczos_tol(0)`` asks for a fixed number of steps (no stopping test): nothing to warn about.
    """
    if info.converged or info.options.tol == 0:
        return
    worst = float(torch.cat([info.inv_quad_relative_residual, info.logdet_relative_residual], -1).max())
    if worst <= 10 * info.options.tol:
        return
    warnings.warn(
        f"lanczos_grad_gp.inv_quad_logdet: Lanczos stopped after {int(info.iterations.max())} steps (n={info.n}) "
        f"with relative residual {worst:.2e} > tol {info.options.tol:.1e}; the value and gradient may be "
        "inaccurate. Increase lgg.settings.max_lanczos_iter or max_preconditioner_size, raise the noise, or use "
        "float64.",
        NumericalWarning,
        stacklevel=3,
    )


def _validate(A: Any, rhs: Tensor | None, logdet: bool) -> tuple[LinearOperator, Tensor | None, bool]:
    if logdet is not None and not isinstance(logdet, bool):
        raise ValueError(f"logdet must be a bool; got {logdet!r}.")
    # type, square, n >= 1, float dtype, finite data/hyperparameters, symmetric if dense (before any work)
    A = check_operator(A, "A", " (the covariance operator)")
    if rhs is None:
        if not logdet:
            raise ValueError("Either inv_quad_rhs or logdet=True must be given.")
        return A, None, False
    if not isinstance(rhs, Tensor):
        raise TypeError(f"inv_quad_rhs must be a torch.Tensor; got {type(rhs).__name__}.")
    if rhs.dtype != A.dtype or rhs.device != A.device:
        raise ValueError(
            f"inv_quad_rhs ({rhs.dtype}, {rhs.device}) must match A's dtype and device ({A.dtype}, {A.device})."
        )
    n = A.shape[-1]
    is_vector = A.dim() == 2 and rhs.dim() == 1
    r = rhs.unsqueeze(-1) if is_vector else rhs
    if r.dim() != A.dim() or r.shape[-2] != n:
        raise ValueError(
            f"inv_quad_rhs must have shape (*batch, n) for a 2-D A or (*batch, n, k) with n = {n}; "
            f"got {tuple(rhs.shape)} for A of shape {tuple(A.shape)}."
        )
    A, r = broadcast_rhs(A, r, "inv_quad_rhs", " (check the training targets and the mean function)")
    return A, r, is_vector


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
    A, rhs, is_vector = _validate(A, inv_quad_rhs, logdet)
    options = GPOptions.from_settings(A.dtype)
    sink: list[InvQuadLogdetInfo] = []
    inv_quad, ld = _InvQuadLogdet.apply(options, logdet, sink, A.representation_tree(), rhs, *A.representation())
    _record(sink[0])
    _warn_if_not_converged(sink[0])
    if rhs is None:
        inv_quad = torch.zeros(A.batch_shape, dtype=A.dtype, device=A.device)
    elif reduce_inv_quad:
        inv_quad = inv_quad.sum(-1)
    elif is_vector:
        inv_quad = inv_quad.squeeze(-1)
    return inv_quad, ld
