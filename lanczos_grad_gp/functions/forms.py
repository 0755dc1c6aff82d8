r"""Differentiable quadratic and bilinear forms ``v^T f(A) v`` and ``u^T f(A) v``.

Forward: one batched Lanczos run over all columns of ``v`` (:mod:`.lanczos`), Gauss
quadrature for the value (:mod:`.quadrature`). Backward: the forward-only gradient of
Singh, Barros & Li, "Fast and Stable Gradient Approximation for Bilinear Forms of Hermitian
Matrix Functions", arXiv:2605.12801 — ONE call of the operator's ``_bilinear_derivative``
with factors formed in the forward pass; no extra matvecs, no adjoint recurrence, no
reorthogonalization. The gradient error is proportional to the Lanczos residual, the same
quantity that controls the value error, so one tolerance controls both.

``u^T f(A) v`` is computed by polarization,
``¼[(u+v)^T f(A)(u+v) − (u−v)^T f(A)(u−v)]``, two columns of one Lanczos run: projecting
``u`` onto a basis that lost orthogonality is unstable, quadratic forms are not (docs/mathematics.md,
"Polarization for u ≠ v"). ``u`` and ``v`` are normalised first,
``u^T f(A) v = ‖u‖‖v‖ û^T f(A) v̂``, so the two forms have comparable size and do not cancel when
``‖u‖ ≫ ‖v‖``.

Both functions run on the shared engine (:func:`lanczos_grad_gp.core.engine.lanczos_forward`): one
stop rule, one positive-definiteness check, one error-estimate policy. A result that misses its
tolerance raises a ``NumericalWarning`` and reports ``converged=False``.

Example:
    >>> import torch, lanczos_grad_gp as lgg
    >>> X = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> A = X @ X.T + torch.eye(50, dtype=torch.float64)
    >>> v = torch.ones(50, dtype=torch.float64)
    >>> value = lgg.quad_form(A, v, "log")
    >>> bool(torch.allclose(value, v @ torch.linalg.matrix_log(A) @ v))  # doctest: +SKIP
    True
    >>> exact = v @ torch.linalg.solve(A, v)
    >>> bool(torch.isclose(lgg.quad_form(A, v, "inv"), exact, rtol=1e-8))
    True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from .._compat import operator_matmul
from ..core.engine import ColumnGroup, default_tol, lanczos_forward
from ..core.forward_grad import factor_frobenius_norm
from ..core.matfuncs import MatrixFunction, get_matrix_function
from ..core.norms import safe_norm
from ..diagnostics import warn_not_converged
from .forward_only import GradientPayload, attach_forward_only_gradient, flatten_factors
from .options import LanczosOptions
from .validation import broadcast_rhs, check_operator

__all__ = ["quad_form", "bilinear_form", "QuadFormInfo", "LanczosOptions", "default_tol"]


@dataclass(frozen=True)
class QuadFormInfo:
    """Diagnostics of a Lanczos quadratic (or bilinear) form, per column ``(*batch, k)``.

    Attributes:
        iterations: Lanczos steps taken (the larger of the two forms for a bilinear form).
        residual: ``β_m |e_m^T f(T) e_1| ‖v‖``, the residual of ``f(A) v``'s approximation.
        relative_residual: the stopping quantity ``max(ρ, ρ')``: ``ρ = β_m |e_m^T f(T) e_1| / (‖f(T) e_1‖ θ)``
            (dimensionless; ``θ`` the smallest Ritz value for log/inv/sqrt/invsqrt, ``max|f| / max|f'|``
            over the Ritz values otherwise; :func:`lanczos_grad_gp.core.quadrature.function_residual`) and
            ``ρ'`` the same for ``f'``, which the gradient converges with.
        value_error_estimate: an ESTIMATE (not a rigorous bound) of ``|u^T f(A) v − value|``: the
            truncation term ``‖v‖² ‖f(T) e_1‖ · relative_residual`` plus a round-off floor
            ``c ε (‖A‖ ‖Γ‖_* + √m |value|)`` (:mod:`lanczos_grad_gp.core.engine`). Its measured
            coverage of the true error is in ``benchmarks/README.md``.
        gradient_error_estimate: an ESTIMATE of the relative Frobenius error of the gradient with
            respect to ``A``: ``c_f · relative_residual`` (arXiv:2605.12801, Thm 2: the error is
            proportional to the residual; ``c_f = 2``, 8 for ``sqrt``) plus the share dropped by
            factor compression plus a round-off floor ``8 ε (√n + κ_f)``. For a bilinear form the
            two forms' absolute errors are added and divided by the norm of the combined gradient.
            ``NaN`` when no gradient factors were formed (no gradient needed, ``return_info`` not asked).
        converged: the stopping quantity met ``tol`` (or the column broke down: exact) and a tenth of
            the round-off floors is within ``max(tol, 10 ε)`` (docs/mathematics.md, "Error estimates
            and diagnostics"). When False a ``NumericalWarning`` was raised.
        broke_down: the start vector's Krylov space was invariant (the result is exact up to round-off).
        gradient_rank: columns per vector handed to ``_bilinear_derivative``.
    """

    iterations: Tensor
    residual: Tensor
    relative_residual: Tensor
    value_error_estimate: Tensor
    gradient_error_estimate: Tensor
    converged: Tensor
    broke_down: Tensor
    gradient_rank: int


def _is_vector(v: Tensor, a_dim: int, n: int) -> bool:
    """``(*batch, n)`` vector(s) or ``(*batch, n, k)`` columns? By dimension; when ``v`` has one dim less
    than ``A`` but only the columns reading matches ``n`` (``v.shape[-2] == n != v.shape[-1]``), columns."""
    if v.dim() == 1:
        return True
    return v.dim() == a_dim - 1 and (v.shape[-1] == n or v.shape[-2] != n)


def _prepare(A: LinearOperator | Tensor, v: Tensor, name: str = "v") -> tuple[LinearOperator, Tensor, bool]:
    """Validate shapes, broadcast batches, return ``(operator, v as (*batch, n, k), was_vector)``."""
    A = check_operator(A, "A")  # type, square, n >= 1, float32/64, finite data, symmetric if dense
    return _prepare_vector(A, v, name)


def _prepare_vector(A: LinearOperator, v: Tensor, name: str) -> tuple[LinearOperator, Tensor, bool]:
    """``v`` checked against the validated operator ``A`` and broadcast with it."""
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(v).__name__}.")
    if v.dtype != A.dtype:
        raise ValueError(f"{name} has dtype {v.dtype} but A has dtype {A.dtype}; convert one of them.")
    if v.device != A.device:
        raise ValueError(f"{name} is on {v.device} but A is on {A.device}; move one of them.")
    n = A.shape[-1]
    if v.dim() == 0:
        raise ValueError(f"{name} must have shape (*batch, n) or (*batch, n, k) with n = {n}; got a 0-d tensor.")
    was_vector = _is_vector(v, A.dim(), n)
    vv = v.unsqueeze(-1) if was_vector else v
    if vv.shape[-2] != n:
        raise ValueError(
            f"{name} must have shape (*batch, n) or (*batch, n, k) with n = {n} matching A; got {tuple(v.shape)}."
        )
    A, vv = broadcast_rhs(A, vv, name)
    return A, vv, was_vector


@dataclass(frozen=True)
class _Forms:
    """Internal result of :func:`_quad_forms`: values with a graph, diagnostics, factors."""

    value: Tensor
    info: QuadFormInfo
    left: Tensor | None  # (*batch, k, n, r)
    right: Tensor | None


def _quad_forms(
    op: LinearOperator, vv: Tensor, fn: MatrixFunction, options: LanczosOptions, *, factors_for_info: bool
) -> _Forms:
    """``v^T f(A) v`` per column of ``vv`` (``(*batch, n, k)``) on the shared engine, differentiable."""
    matrix_args = op.representation()
    grad_on = torch.is_grad_enabled()
    want_matrix = grad_on and any(t.requires_grad for t in matrix_args)
    want_vector = grad_on and vv.requires_grad
    result = lanczos_forward(
        functools.partial(operator_matmul, op),
        vv.detach(),
        [ColumnGroup(fn, vv.shape[-1])],
        options.engine_options(op.shape[-1], op.dtype),
        want_factors=want_matrix or factors_for_info,
        want_applied=want_vector,
    )
    value = result.values
    left = right = None
    if result.factors:
        left, right = result.factors[0]
    if want_matrix or want_vector:
        payload = GradientPayload(None, None, None, result.applied)
        if want_matrix:
            flat_left, flat_right, owner = flatten_factors(result.factors, [0])
            payload = GradientPayload(flat_left, flat_right, owner, result.applied)
        value = attach_forward_only_gradient(value, payload, vv, op.representation_tree(), matrix_args)
    d = result.diagnostics
    gerr = d.gradient_error_estimate if result.factors else torch.full_like(d.gradient_error_estimate, float("nan"))
    info = QuadFormInfo(
        iterations=d.iterations,
        residual=d.residual,
        relative_residual=d.relative_residual,
        value_error_estimate=d.value_error_estimate,
        gradient_error_estimate=gerr,
        converged=d.converged,
        broke_down=d.broke_down,
        gradient_rank=d.gradient_rank[0],
    )
    return _Forms(value, info, left, right)


def _warn(where: str, info: QuadFormInfo, tol: float) -> None:
    if info.converged.numel() == 0 or bool(info.converged.all()):
        return
    bad = ~info.converged
    worst = float(info.relative_residual[bad].max())
    steps = int(info.iterations[bad].max())
    warn_not_converged(
        where,
        f"{int(bad.sum())} of {bad.numel()} columns did not meet tol={tol:.1e} (worst relative residual "
        f"{worst:.2e} after {steps} steps, or a round-off floor above tol for this conditioning)",
        "Raise max_iter, loosen tol, use float64 or precondition the operator.",
        stacklevel=4,
    )


def _squeeze_info(info: QuadFormInfo) -> QuadFormInfo:
    return QuadFormInfo(
        **{
            k: (getattr(info, k).squeeze(-1) if isinstance(getattr(info, k), Tensor) else getattr(info, k))
            for k in info.__dataclass_fields__
        }
    )


def quad_form(
    A: LinearOperator | Tensor,
    v: Tensor,
    f: str | MatrixFunction | Any = "log",
    *,
    max_iter: int | None = None,
    tol: float | None = None,
    reorthogonalize: bool = False,
    check_every: int = 10,
    compress_tol: float | None = None,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, QuadFormInfo]:
    r"""``v^T f(A) v`` for each column (or batch entry) of ``v``, differentiable by forward-only gradient.

    Args:
        A: symmetric ``(*batch, n, n)`` LinearOperator or tensor (float32 or float64). Gradients
            flow to every tensor it is built from through one ``_bilinear_derivative`` call per backward.
        v: ``(*batch, n)`` (one vector) or ``(*batch, n, k)`` (k columns). Gradient
            ``2 f(A) v`` flows to ``v``.
        f: ``"log"``, ``"inv"``, ``"exp"``, ``"sqrt"``, ``"invsqrt"``, an elementwise callable,
            a ``(f, df)`` pair, or a :class:`~lanczos_grad_gp.core.matfuncs.MatrixFunction`.
        max_iter, tol, reorthogonalize, check_every, compress_tol: see :class:`LanczosOptions`.
        return_info: also return a :class:`QuadFormInfo` with iterations, residuals and error
            estimates.

    Returns:
        ``(*batch)`` for a vector ``v``, ``(*batch, k)`` for columns; plus the info if asked.

    Warns:
        NumericalWarning: a column did not meet ``tol`` (its ``info.converged`` is False).

    Raises:
        ValueError: bad shapes, dtypes, devices, NaN/Inf, bad options.
        NotPSDError: ``f`` needs a positive definite ``A`` (log, inv, sqrt, invsqrt) and
            Lanczos found a nonpositive Ritz value.
    """
    fn = get_matrix_function(f)
    options = LanczosOptions(max_iter, tol, reorthogonalize, check_every, compress_tol)
    op, vv, was_vector = _prepare(A, v)
    forms = _quad_forms(op, vv, fn, options, factors_for_info=return_info)
    _warn("quad_form", forms.info, options.resolved(op.shape[-1], op.dtype)[1])
    value, info = forms.value, forms.info
    if was_vector:
        value, info = value.squeeze(-1), _squeeze_info(info)
    return (value, info) if return_info else value


def bilinear_form(
    A: LinearOperator | Tensor,
    u: Tensor,
    v: Tensor,
    f: str | MatrixFunction | Any = "log",
    *,
    max_iter: int | None = None,
    tol: float | None = None,
    reorthogonalize: bool = False,
    check_every: int = 10,
    compress_tol: float | None = None,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, QuadFormInfo]:
    r"""``u^T f(A) v`` per column, by normalised polarization into two quadratic forms of ONE Lanczos run.

    ``u^T f(A) v = ¼ ‖u‖‖v‖ [(û+v̂)^T f(A)(û+v̂) − (û−v̂)^T f(A)(û−v̂)]`` for symmetric ``A``,
    ``û = u/‖u‖``, ``v̂ = v/‖v‖`` (0 when ``u`` or ``v`` is 0). Shapes and options as
    :func:`quad_form`; ``u`` and ``v`` must have the same shape. Gradients flow to ``A``, ``u``
    and ``v``. With ``return_info=True`` the info combines the two forms: the larger iteration
    count and relative residual, the value error estimates added (times ``¼‖u‖‖v‖``), the gradient
    error estimate relative to the combined gradient, converged only if both are.
    """
    if not isinstance(u, Tensor) or not isinstance(v, Tensor):
        raise TypeError("u and v must be torch.Tensors.")
    if u.shape != v.shape:
        raise ValueError(f"u and v must have the same shape; got {tuple(u.shape)} and {tuple(v.shape)}.")
    if u.dtype != v.dtype or u.device != v.device:
        raise ValueError(
            f"u ({u.dtype}, {u.device}) and v ({v.dtype}, {v.device}) must have the same dtype and device."
        )
    if u.dim() == 0:
        raise ValueError("u and v must have shape (*batch, n) or (*batch, n, k); got 0-d tensors.")
    fn = get_matrix_function(f)
    options = LanczosOptions(max_iter, tol, reorthogonalize, check_every, compress_tol)
    op, uu, was_vector = _prepare(A, u, "u")
    _, vv, _ = _prepare_vector(op, v, "v")
    k = uu.shape[-1]
    # Polarization holds for ANY positive scales s_u, s_v; the norms, detached (constants of the
    # gradient, 1 for a zero vector), keep ∂/∂u = f(A) v exact, also at u = 0.
    with torch.no_grad():
        nu, nv = safe_norm(uu, dim=-2, keepdim=True), safe_norm(vv, dim=-2, keepdim=True)  # (*batch, 1, k)
        nu, nv = torch.where(nu > 0, nu, torch.ones_like(nu)), torch.where(nv > 0, nv, torch.ones_like(nv))
    uh, vh = uu / nu, vv / nv
    pair = torch.cat([uh + vh, uh - vh], dim=-1)  # (*batch, n, 2k)
    forms = _quad_forms(op, pair, fn, options, factors_for_info=return_info)
    scale = 0.25 * (nu * nv).squeeze(-2)  # (*batch, k)
    out = scale * (forms.value[..., :k] - forms.value[..., k:])
    tol_used = options.resolved(op.shape[-1], op.dtype)[1]
    info = _combine(forms, scale, k, fn, tol_used)
    _warn("bilinear_form", info, options.resolved(op.shape[-1], op.dtype)[1])
    if was_vector:
        out, info = out.squeeze(-1), _squeeze_info(info)
    return (out, info) if return_info else out


def _gradient_within(gerr: Tensor, left: Tensor | None, fn: MatrixFunction, tol: float) -> Tensor:
    """``gerr ≤ 10 c_f max(tol, 10 ε)`` where the combined gradient estimate is known (factors formed)."""
    if left is None:
        return torch.ones_like(gerr, dtype=torch.bool)
    eps = torch.finfo(left.dtype).eps
    return ~(gerr > 10 * fn.gradient_constant * max(tol, 10 * eps))  # NaN counts as within (unknown)


def _combine(forms: _Forms, scale: Tensor, k: int, fn: MatrixFunction, tol: float) -> QuadFormInfo:
    """Diagnostics of ``scale · (q₊ − q₋)`` from those of the two quadratic forms ``q₊, q₋``.

    Converged only if both forms are AND the combined gradient estimate, amplified by the
    cancellation of ``G₊ − G₋``, stays within ``10 c_f max(tol, 10 ε)`` (the forms' own verdict slack).
    """
    info = forms.info

    def split(t: Tensor) -> tuple[Tensor, Tensor]:
        return t[..., :k], t[..., k:]

    (ip, im), (rp, rm), (vp, vm) = (
        split(info.iterations),
        split(info.relative_residual),
        split(info.value_error_estimate),
    )
    (ap, am), (gp, gm) = split(info.residual), split(info.gradient_error_estimate)
    if forms.left is not None:
        lp, lm = forms.left[..., :k, :, :], forms.left[..., k:, :, :]
        qp, qm = forms.right[..., :k, :, :], forms.right[..., k:, :, :]
        norm_p, norm_m = factor_frobenius_norm(lp, qp), factor_frobenius_norm(lm, qm)
        combined = factor_frobenius_norm(torch.cat([lp, -lm], -1), torch.cat([qp, qm], -1))
        err = gp * norm_p + gm * norm_m
        safe = torch.where(combined > 0, combined, torch.ones_like(combined))
        gerr = torch.where(combined > 0, err / safe, torch.where(err > 0, torch.full_like(err, float("inf")), err))
    else:
        gerr = torch.maximum(gp, gm)
    return QuadFormInfo(
        iterations=torch.maximum(ip, im),
        residual=scale * (ap + am),
        relative_residual=torch.maximum(rp, rm),
        value_error_estimate=scale * (vp + vm),
        gradient_error_estimate=gerr.to(info.gradient_error_estimate.dtype),
        converged=info.converged[..., :k] & info.converged[..., k:] & _gradient_within(gerr, forms.left, fn, tol),
        broke_down=info.broke_down[..., :k] & info.broke_down[..., k:],
        gradient_rank=info.gradient_rank,
    )
