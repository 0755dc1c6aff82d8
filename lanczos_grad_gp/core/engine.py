r"""The one pure forward shared by every Lanczos form: starts, a function per column, options ->
values, forward-only gradient factors and diagnostics.

``quad_form``, ``bilinear_form`` and the GP routine ``inv_quad_logdet`` all call
:func:`lanczos_forward`; it owns the single policy of the package for

* the **stop rule**: a column stops when its relative function residual (:func:`.quadrature.function_residual`,
  docs/mathematics.md, "Which residual to trust") is ``≤ tol``, checked every ``check_every`` steps;
* the **positive-definiteness check**: a function that needs a positive definite operator (``log``,
  ``inv``, ``sqrt``, ``invsqrt``) raises ``NotPSDError`` when a Ritz value carrying quadrature
  weight is ``≤ 0`` (Ritz values lie in the hull of the spectrum, so this proves indefiniteness);
* the **compression rule** of the gradient factors (:mod:`.forward_grad`): drop at most a share
  ``compress_tol`` of ``Σ|D|``;
* the **error estimates** and the **convergence verdict** (docs/mathematics.md, "Error estimates
  and diagnostics"), per column, with ``ε`` the unit round-off of the basis dtype,
  ``‖A‖ ≈ max|θ|`` and ``κ_f = ‖A‖ max_θ |f''(θ)/f'(θ)|`` over the Ritz values (``2κ`` for ``1/x``,
  ``κ`` for ``log``, ``‖A‖`` for ``exp``; :attr:`.matfuncs.MatrixFunction.curvature`):

  .. math::
      \text{value error} &\approx \underbrace{\lVert v\rVert^2 \lVert f(T)e_1\rVert\,ρ_{rel}}_{\text{truncation}}
      + \underbrace{c_v\, ε\, (\lVert A\rVert \lVert Γ\rVert_* + \sqrt{m}\,|\text{value}|)}_{\text{round-off floor}},\\
      \text{relative gradient error} &\approx c_f \max(ρ_{rel}, ρ'_{rel}) + \text{dropped share}
      + c_g\, ε\, (\sqrt{n} + κ_f) ,

  with ``c_f`` the function's :attr:`~.matfuncs.MatrixFunction.gradient_constant` (2; 8 for ``sqrt``)
  and ``ρ'_{rel}`` the relative residual of ``f'``: the gradient's divided differences are ``f'`` on
  their diagonal, and ``f``'s own residual can be deflated by a large constant part of ``f``.

  The truncation terms follow arXiv:2605.12801 (Thm 2: both errors are proportional to the Lanczos
  residual). The floors are the first-order effect of a backward error ``ε‖A‖`` in the operator,
  which finite-precision Lanczos without reorthogonalization carries (Greenbaum 1989): for ``f = 1/x``
  they are the classical ``ε κ`` attainable accuracy of CG. After a breakdown the Krylov space sees
  only part of the spectrum, so ``κ_f`` (and with it the gradient floor) can be underestimated:
  rounding-level components of ``v`` outside the invariant subspace, amplified by ``1/λ_min``, are
  not visible to any Krylov method.

  A column is **converged** when its residual met ``tol`` (or it broke down: the Krylov space is
  invariant) AND a tenth of both round-off floors (the value's relative to
  ``‖v‖² max(‖f(T) e_1‖, ‖T f'(T) e_1‖)``) is ``≤ max(tol, 10ε)``: the floors are worst-case
  first-order bounds and measured round-off is 10-100x below them. A tolerance below the accuracy
  the dtype can attain for this operator is reported as not met. The stopping quantity is
  ``max(ρ, ρ')`` (``ρ'`` the residual of ``f'``, which the gradient converges with) unless
  :attr:`EngineOptions.gradient_residual` is off. The constants ``c_v, c_g`` were calibrated on
  a seeded random family (``benchmarks/estimate_coverage.py``); the estimates are estimates, not
  rigorous bounds, and their measured coverage is in ``benchmarks/README.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from linear_operator.utils.errors import NotPSDError
from torch import Tensor

from .forward_grad import GradientMatrix, gradient_factors, gradient_matrix
from .lanczos import LanczosResult, lanczos_tridiag
from .matfuncs import MatrixFunction, autograd_derivative
from .quadrature import (
    RitzDecomposition,
    apply_function,
    f_T_e1,
    function_residual,
    quadrature,
    ritz_decomposition,
    select_columns,
)

__all__ = [
    "ColumnGroup",
    "EngineOptions",
    "ColumnDiagnostics",
    "EngineResult",
    "lanczos_forward",
    "default_tol",
    "VALUE_FLOOR_CONSTANT",
    "GRADIENT_FLOOR_CONSTANT",
]

#: ``c_v`` of the value round-off floor (module docstring)
VALUE_FLOOR_CONSTANT = 4.0
#: ``c_g`` of the gradient round-off floor (module docstring)
GRADIENT_FLOOR_CONSTANT = 8.0

MatmulFn = Callable[[Tensor], Tensor]


def default_tol(dtype: torch.dtype) -> float:
    """Default relative residual tolerance of the forms: 1e-8 in float64, 1e-4 in float32."""
    return 1e-8 if dtype == torch.float64 else 1e-4


@dataclass(frozen=True)
class ColumnGroup:
    """``count`` consecutive start columns that share the matrix function ``fn``."""

    fn: MatrixFunction
    count: int


@dataclass(frozen=True)
class EngineOptions:
    """Resolved options of one forward (no ``None``s).

    Attributes:
        max_iter: cap on Lanczos steps per column (may exceed ``n``).
        tol: relative function-residual tolerance (0: run ``max_iter`` steps, no stopping test).
        reorthogonalize: full reorthogonalization.
        check_every: steps between convergence checks (host syncs).
        compress_tol: share of ``Σ|D|`` the gradient factors may drop.
        gradient_residual: the stopping quantity is ``max(ρ, ρ')`` (``ρ'`` the residual of ``f'``,
            which the gradient converges with) instead of ``ρ`` alone, so that one tolerance controls
            value AND gradient. The GP routine turns it off for its probes (its gradient is a probe
            estimate whose noise dominates; the log-det gradient error was measured to track ``ρ``).
    """

    max_iter: int
    tol: float
    reorthogonalize: bool
    check_every: int
    compress_tol: float
    gradient_residual: bool = True


@dataclass(frozen=True)
class ColumnDiagnostics:
    """Per-column diagnostics ``(*batch, k)`` (basis dtype), in start-column order.

    Attributes:
        iterations: Lanczos steps taken.
        residual: ``β_m |e_m^T f(T) e_1| ‖v‖``, the residual of ``f(A) v``'s approximation.
        relative_residual: the dimensionless stopping quantity: ``max(ρ, ρ')`` with ``ρ`` the relative
            residual of ``f`` (:func:`.quadrature.function_residual`) and ``ρ'`` that of ``f'``, or ``ρ``
            alone when :attr:`EngineOptions.gradient_residual` is off.
        value_error_estimate: estimated ``|v^T f(A) v − value|`` (truncation + round-off floor).
        gradient_error_estimate: estimated relative error of the θ-gradient (Frobenius norm of the
            gradient matrix ``Q M Q^T``), truncation + dropped share + round-off floor.
        converged: residual ≤ tol (or breakdown) and both estimates within the attainable tolerance.
        broke_down: the start vector's Krylov space was invariant.
        floor_ok: a tenth of both round-off floors is within the tolerance (``tol`` is attainable here).
        gradient_rank: ``(groups,)`` columns per start vector handed to ``_bilinear_derivative``
            (a tuple of ints, one per :class:`ColumnGroup`; 0 when no factors were formed).
    """

    iterations: Tensor
    residual: Tensor
    relative_residual: Tensor
    value_error_estimate: Tensor
    gradient_error_estimate: Tensor
    converged: Tensor
    broke_down: Tensor
    floor_ok: Tensor
    gradient_rank: tuple[int, ...]


@dataclass(frozen=True)
class EngineResult:
    """Output of :func:`lanczos_forward`.

    Attributes:
        values: ``(*batch, k)`` ``v^T f(A) v`` per start column (basis dtype, no autograd graph).
        diagnostics: :class:`ColumnDiagnostics`.
        factors: one ``(left, right)`` pair per group, each ``(*batch, k_g, n, r_g)``, with
            ``Q M Q^T = left @ right^T`` per column; empty when not requested.
        applied: ``(*batch, n, k)`` ``f(A) v ≈ ‖v‖ Q f(T) e_1`` (for ``∂/∂v = 2 f(A) v``) or ``None``.
        lanczos: the raw :class:`~.lanczos.LanczosResult`.
    """

    values: Tensor
    diagnostics: ColumnDiagnostics
    factors: tuple[tuple[Tensor, Tensor], ...]
    applied: Tensor | None
    lanczos: LanczosResult


def _group_slices(groups: Sequence[ColumnGroup]) -> list[tuple[MatrixFunction, int, int]]:
    out, start = [], 0
    for g in groups:
        out.append((g.fn, start, start + g.count))
        start += g.count
    return out


def stopping_residual(
    fn: MatrixFunction, ritz: RitzDecomposition, res: LanczosResult, gradient_residual: bool
) -> tuple[Tensor, Tensor]:
    """``(ρ, stopping quantity)``: ``ρ`` of ``f`` and ``max(ρ, ρ')`` (or ``ρ``), per column."""
    _, rel = function_residual(fn, ritz, res)
    if not gradient_residual:
        return rel, rel
    _, rel_df = function_residual(_derivative_function(fn), ritz, res)
    return rel, torch.maximum(rel, torch.where(torch.isfinite(rel_df), rel_df, rel))


def _stop_fn(groups: Sequence[ColumnGroup], options: EngineOptions) -> Callable[[LanczosResult], Tensor]:
    slices = _group_slices(groups)

    def stop(partial: LanczosResult) -> Tensor:
        ritz = ritz_decomposition(partial)
        rels = []
        for fn, a, b in slices:
            ritz_g, res_g = select_columns(ritz, a, b), select_columns(partial, a, b)
            rels.append(stopping_residual(fn, ritz_g, res_g, options.gradient_residual)[1])
        return torch.cat(rels, -1) <= options.tol  # NaN (a Ritz value <= 0 so far) compares False: keep going

    return stop


def _check_positive(fn: MatrixFunction, ritz: RitzDecomposition, what: str) -> None:
    """One PD rule: a Ritz value with nonzero quadrature weight ``≤ 0`` raises ``NotPSDError``."""
    if not fn.requires_positive or ritz.values.numel() == 0:
        return
    used = ritz.weights != 0
    lam_min = torch.where(used, ritz.values, torch.full_like(ritz.values, float("inf"))).min()
    if not bool(lam_min > 0):  # one host sync, after the loop
        raise NotPSDError(
            f"f={fn.name!r} needs a positive definite operator, but Lanczos found a Ritz value "
            f"{float(lam_min):.3e} <= 0 of {what}: it is indefinite or numerically singular. "
            "Add jitter/noise to the diagonal or use float64."
        )


def lanczos_forward(
    matmul: MatmulFn,
    starts: Tensor,
    groups: Sequence[ColumnGroup],
    options: EngineOptions,
    *,
    want_factors: bool = False,
    want_applied: bool = False,
    what: str = "A",
) -> EngineResult:
    """Run ONE batched Lanczos over ``starts`` (``(*batch, n, k)``) and evaluate every column.

    Args:
        matmul: ``X (*batch, n, k) -> A X`` (no autograd graph needed).
        starts: start vectors, one column per quadratic form; zero columns give 0.
        groups: consecutive column groups and their functions; counts must add up to ``k``.
        options: :class:`EngineOptions`.
        want_factors: also form the forward-only gradient factors.
        want_applied: also form ``f(A) v``.
        what: the operator's name in error messages.
    """
    k = starts.shape[-1]
    if sum(g.count for g in groups) != k:
        raise ValueError(f"column groups cover {sum(g.count for g in groups)} columns; starts has {k}.")
    with torch.no_grad():
        res = lanczos_tridiag(
            matmul,
            starts,
            max_iter=options.max_iter,
            reorthogonalize=options.reorthogonalize,
            stop_fn=_stop_fn(groups, options) if options.tol > 0 else None,
            check_every=options.check_every,
            allow_zero=True,
        )
        ritz = ritz_decomposition(res)
        dtype = starts.dtype
        eps = torch.finfo(dtype).eps
        parts: dict[str, list[Tensor]] = {key: [] for key in ("value", "abs", "rel", "verr", "gerr", "ok", "floor")}
        factors: list[tuple[Tensor, Tensor]] = []
        ranks: list[int] = []
        applied = []
        for fn, a, b in _group_slices(groups):
            ritz_g, res_g = select_columns(ritz, a, b), select_columns(res, a, b)
            _check_positive(fn, ritz_g, what)
            value = quadrature(fn, ritz_g)  # compute dtype
            absolute, rel_f = function_residual(fn, ritz_g, res_g)
            _, rel_fd = stopping_residual(fn, ritz_g, res_g, True)  # max(ρ, ρ'), computed once
            rel = rel_fd if options.gradient_residual else rel_f  # the stopping quantity
            grad = gradient_matrix(fn, ritz_g)
            dropped = torch.zeros_like(rel)
            if want_factors:
                left, right, dropped = gradient_factors(grad, res_g, compress_tol=options.compress_tol)
                factors.append((left, right))
                ranks.append(left.shape[-1])
            else:
                ranks.append(0)
            if want_applied:
                applied.append(apply_function(fn, ritz_g, res_g))
            verr, gerr, ok, floor_ok = _estimates(fn, ritz_g, res_g, grad, value, dropped, options, eps, rel_f, rel_fd)
            for key, t in zip(parts, (value, absolute, rel, verr, gerr, ok, floor_ok), strict=True):
                parts[key].append(t)
        values = torch.cat(parts["value"], -1)
        if not bool(torch.isfinite(values).all()):
            raise ValueError(
                f"A value v^T f({what}) v overflows or is undefined in the compute precision "
                "(e.g. exp of a large spectrum): scale the operator or the vectors down."
            )
        out = values.to(dtype)
        if not bool(torch.isfinite(out).all()):
            raise ValueError(
                f"A value v^T f({what}) v overflows {dtype} (|value| > {torch.finfo(dtype).max:.1e}): "
                "scale the operator or the vectors down, or use float64."
            )
        converged = torch.cat(parts["ok"], -1)
        diagnostics = ColumnDiagnostics(
            iterations=res.iterations,
            residual=torch.cat(parts["abs"], -1).to(dtype),
            relative_residual=torch.cat(parts["rel"], -1).to(dtype),
            value_error_estimate=torch.cat(parts["verr"], -1).to(dtype),
            gradient_error_estimate=torch.cat(parts["gerr"], -1).to(dtype),
            converged=converged,
            broke_down=res.broke_down,
            floor_ok=torch.cat(parts["floor"], -1),
            gradient_rank=tuple(ranks),
        )
    return EngineResult(
        values=out,
        diagnostics=diagnostics,
        factors=tuple(factors),
        applied=torch.cat(applied, -1) if want_applied else None,
        lanczos=res,
    )


def _derivative_function(fn: MatrixFunction) -> MatrixFunction:
    """``f'`` as a :class:`MatrixFunction` for the residual (its values, domain and ``|f''|``).

    ``|f''|`` (the scale of :func:`~lanczos_grad_gp.core.quadrature.lipschitz_scale`, used only when
    ``f`` is not restricted to positive definite operators) is ``curvature · |f'|`` when ``f`` states
    its curvature ``|f''/f'|``, otherwise autograd through ``f'`` (``|f'|`` if ``f'`` is not differentiable).
    """
    if fn.curvature is not None:
        curvature = fn.curvature

        def d2(x: Tensor) -> Tensor:
            return curvature(x) * fn.df(x).abs()

    else:
        by_autograd = autograd_derivative(fn.df)

        def d2(x: Tensor) -> Tensor:
            try:
                return by_autograd(x)
            except RuntimeError:  # f' not differentiable by torch: curvature 1, the documented default
                return fn.df(x).abs()

    return MatrixFunction(f"{fn.name}'", fn.df, d2, requires_positive=fn.requires_positive)


def _estimates(
    fn: MatrixFunction,
    ritz: RitzDecomposition,
    res: LanczosResult,
    grad: GradientMatrix,
    value: Tensor,
    dropped: Tensor,
    options: EngineOptions,
    eps: float,
    rel: Tensor,
    rel_g: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Value error estimate (absolute), gradient error estimate (relative), verdict and floor verdict.

    ``rel`` is ``ρ`` (of ``f``), ``rel_g`` is ``max(ρ, ρ')``; the stopping quantity is one of them.
    """
    tol = options.tol
    stop_rel = rel_g if options.gradient_residual else rel
    used = ritz.weights != 0
    theta = ritz.values
    zero = torch.zeros_like(theta)
    norm_a = torch.where(used, theta.abs(), zero).amax(-1)  # ≈ ‖A‖ (a lower bound)
    if fn.curvature is not None:
        curv = fn.curvature(torch.where(used, theta, torch.ones_like(theta))).abs()
    elif fn.requires_positive:
        curv = 1.0 / torch.where(used, theta, torch.ones_like(theta)).abs()
    else:
        curv = torch.ones_like(theta)
    curv = torch.where(used & torch.isfinite(curv), curv, zero).amax(-1)
    kappa_f = norm_a * curv
    m = res.iterations.to(value.dtype).clamp_min(1)
    start_norm = res.start_norm.to(value.dtype)
    fe1 = torch.linalg.vector_norm(f_T_e1(fn, ritz), dim=-1)
    truncation = rel * start_norm.square() * fe1
    floor = VALUE_FLOOR_CONSTANT * eps * (norm_a * grad.nuclear + m.sqrt() * value.abs())
    value_err = truncation + floor
    n = res.basis.shape[-1]
    grad_floor = GRADIENT_FLOOR_CONSTANT * eps * (n**0.5 + kappa_f)
    # the gradient converges with f' (the diagonal of the divided differences), not with f: for
    # log(c A) = log c + log A the shift inflates ‖f(T) e_1‖ and deflates f's relative residual, f''s is unchanged
    grad_err = fn.gradient_constant * rel_g + dropped.to(rel.dtype) + grad_floor
    # A tolerance the dtype cannot attain is reported as not met. The floors are worst-case first-order
    # bounds; measured round-off is 10-100x below them (benchmarks/estimate_coverage.py), so the
    # tolerance counts as unattainable when a tenth of the floor exceeds it.
    attainable = 10 * max(tol, 10 * eps)
    # judged on the scale the residual test uses, ‖v‖² ‖f(T) e_1‖ (a norm: no cancellation, unlike |value|),
    # or ‖v‖² ‖T f'(T) e_1‖ if larger: the first-order change under a relative perturbation of A. For log
    # that is ‖v‖² however close log(T) is to 0 (a fully preconditioned B ≈ I: log B ≈ 0, yet δ log = δλ/λ)
    lam_df = MatrixFunction("x f'", lambda x: x * fn.df(x), lambda x: x)
    ref = start_norm.square() * torch.maximum(fe1, torch.linalg.vector_norm(f_T_e1(lam_df, ritz), dim=-1))
    floor_rel = torch.where(ref > 0, floor / torch.where(ref > 0, ref, torch.ones_like(ref)), zero[..., 0])
    broke = res.broke_down
    # tol = 0 (a fixed number of steps, no stopping test): converged only at round-off level
    residual_met = (stop_rel <= max(tol, 10 * eps)) | broke
    started = res.start_norm > 0
    floor_ok = ((floor_rel <= attainable) & (grad_floor <= attainable)) | ~started
    ok = (residual_met & floor_ok) | ~started
    return value_err, grad_err, ok, floor_ok
