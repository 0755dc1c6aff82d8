r"""Scalar functions applied to symmetric matrices, and their stable divided differences.

For a symmetric ``T = S diag(λ) S^T`` the Fréchet derivative of ``f`` at ``T`` is
(Daleckii–Krein; Higham, *Functions of Matrices*, Thm 3.11)

.. math::
    Df(T)[E] = S\,(F \circ (S^\top E S))\,S^\top,\qquad
    F_{ij} = \frac{f(λ_i) - f(λ_j)}{λ_i - λ_j}\ (i\neq j),\quad F_{ii} = f'(λ_i),

the first divided-difference (Loewner) matrix. The forward-only gradient of
arXiv:2605.12801 (eq. for ``Γ = F ∘ (b a^T)``) needs ``F`` at the Ritz values, which
cluster and repeat (ghosts, converged pairs) — so ``F`` must never be formed by dividing a
difference of nearly equal numbers by a tiny gap. Built-in functions use exact rewritings
(``sqrt``: ``1/(√λ_i+√λ_j)``; ``log``: ``log1p``; ``exp``: ``expm1``); user functions use
``f'`` at the midpoint when the gap is below ``eps^{1/3}`` of the scale (error
``O(gap^2 f''')``, balanced against the cancellation error ``O(eps·|f|/gap)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MatrixFunction", "get_matrix_function", "divided_differences", "BUILTIN_FUNCTIONS"]

ScalarFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class MatrixFunction:
    """A scalar function ``f`` lifted to symmetric matrices.

    Attributes:
        name: short name used in messages.
        f: elementwise ``f(λ)``.
        df: elementwise derivative ``f'(λ)``.
        dd: optional exact/stable divided difference ``(λ_i, λ_j) -> F_ij`` (broadcasting);
            when ``None`` the generic midpoint-guarded formula is used.
        requires_positive: ``f`` is only defined for positive definite operators
            (``log``, ``inv``, ``sqrt``, ``invsqrt``); nonpositive Ritz values raise ``NotPSDError``.
        curvature: optional ``λ -> |f''(λ) / f'(λ)|``, the relative sensitivity of ``f'`` that sets
            the round-off floor of the gradient (``κ_f = ‖A‖ · curvature``); ``None``: ``1/λ`` for
            positive-definite functions, ``1`` otherwise.
        gradient_constant: ``c`` in the gradient error estimate ``c · relative_residual`` (the
            spectrum-dependent constant of arXiv:2605.12801, Thm 2): 2 by default, 8 for ``sqrt``,
            whose gradient error was measured up to 6.5× its residual (``benchmarks/estimate_coverage.py``).
    """

    name: str
    f: ScalarFn
    df: ScalarFn
    dd: Callable[[Tensor, Tensor], Tensor] | None = None
    requires_positive: bool = False
    curvature: ScalarFn | None = None
    gradient_constant: float = 2.0

    def divided_differences(self, lam: Tensor) -> Tensor:
        """Loewner matrix ``F`` for Ritz values ``lam`` ``(*, m)`` -> ``(*, m, m)``."""
        return divided_differences(self, lam)


def _dd_log(li: Tensor, lj: Tensor) -> Tensor:
    # (log λi − log λj)/(λi − λj) = log1p(x)/x / λj with x = (λi − λj)/λj; exact when x == 0.
    x = (li - lj) / lj
    safe = torch.where(x == 0, torch.ones_like(x), x)
    ratio = torch.where(x == 0, torch.ones_like(x), torch.log1p(safe) / safe)
    return ratio / lj


def _dd_exp(li: Tensor, lj: Tensor) -> Tensor:
    # e^min · expm1(gap)/gap, gap = |λi − λj| ≥ 0: no overflow beyond e^max itself.
    lo = torch.minimum(li, lj)
    gap = (li - lj).abs()
    safe = torch.where(gap == 0, torch.ones_like(gap), gap)
    ratio = torch.where(gap == 0, torch.ones_like(gap), torch.expm1(safe) / safe)
    return torch.exp(lo) * ratio


def _dd_inv(li: Tensor, lj: Tensor) -> Tensor:
    return -1.0 / (li * lj)


def _dd_sqrt(li: Tensor, lj: Tensor) -> Tensor:
    return 1.0 / (li.sqrt() + lj.sqrt())


def _dd_invsqrt(li: Tensor, lj: Tensor) -> Tensor:
    si, sj = li.sqrt(), lj.sqrt()
    return -1.0 / (si * sj * (si + sj))


BUILTIN_FUNCTIONS: dict[str, MatrixFunction] = {
    "log": MatrixFunction(
        "log", torch.log, torch.reciprocal, _dd_log, requires_positive=True, curvature=lambda x: 1.0 / x
    ),
    "inv": MatrixFunction(
        "inv", torch.reciprocal, lambda x: -x.pow(-2), _dd_inv, requires_positive=True, curvature=lambda x: 2.0 / x
    ),
    "exp": MatrixFunction("exp", torch.exp, torch.exp, _dd_exp, curvature=torch.ones_like),
    "sqrt": MatrixFunction(
        "sqrt",
        torch.sqrt,
        lambda x: 0.5 * x.rsqrt(),
        _dd_sqrt,
        requires_positive=True,
        curvature=lambda x: 0.5 / x,
        gradient_constant=8.0,
    ),
    "invsqrt": MatrixFunction(
        "invsqrt",
        torch.rsqrt,
        lambda x: -0.5 * x.pow(-1.5),
        _dd_invsqrt,
        requires_positive=True,
        curvature=lambda x: 1.5 / x,
    ),
}


def _elementwise(g: ScalarFn, name: str, role: str) -> ScalarFn:
    """Wrap a user function so that a non-elementwise result (wrong shape or type) raises at once."""

    def checked(x: Tensor) -> Tensor:
        y = g(x)
        if not isinstance(y, Tensor) or y.shape != x.shape or not y.dtype.is_floating_point:
            got = f"shape {tuple(y.shape)}, dtype {y.dtype}" if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(
                f"the matrix function {role}={name!r} must be elementwise: map a tensor of shape {tuple(x.shape)} "
                f"to a floating tensor of the same shape; got {got}."
            )
        if x.numel() > 1:  # same shape but not elementwise (a cumsum, a sum broadcast back): the last entry differs
            last = g(x.reshape(-1)[-1:])
            if isinstance(last, Tensor) and last.shape == (1,):
                want = y.reshape(-1)[-1:]
                ok = torch.isclose(last, want, rtol=1e-5, atol=0) | ~torch.isfinite(want)
                if not bool(ok.all()):
                    raise ValueError(
                        f"the matrix function {role}={name!r} must be elementwise: f(x)[-1] = {float(want):.6g} "
                        f"but f(x[-1:]) = {float(last):.6g}."
                    )
        return y

    return checked


def autograd_derivative(f: ScalarFn) -> ScalarFn:
    """Elementwise derivative of an elementwise, torch-differentiable ``f``."""

    def df(x: Tensor) -> Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(f(xg).sum(), xg)
        return g

    return df


def get_matrix_function(f: str | MatrixFunction | ScalarFn | tuple[ScalarFn, ScalarFn]) -> MatrixFunction:
    """Resolve ``f`` to a :class:`MatrixFunction`.

    ``f`` is a built-in name (``"log"``, ``"inv"``, ``"exp"``, ``"sqrt"``, ``"invsqrt"``),
    a :class:`MatrixFunction`, a pair ``(f, f')`` of elementwise callables, or a single
    elementwise torch-differentiable callable (its derivative is taken by autograd).
    """
    if isinstance(f, MatrixFunction):
        return f
    if isinstance(f, str):
        try:
            return BUILTIN_FUNCTIONS[f]
        except KeyError:
            raise ValueError(
                f"Unknown matrix function f={f!r}; expected one of {sorted(BUILTIN_FUNCTIONS)}, "
                "a callable, or a (f, df) pair."
            ) from None
    if isinstance(f, tuple) and len(f) == 2 and all(callable(g) for g in f):
        name = getattr(f[0], "__name__", "custom")
        return MatrixFunction(name, _elementwise(f[0], name, "f"), _elementwise(f[1], name, "df"))
    if callable(f):
        name = getattr(f, "__name__", "custom")
        checked = _elementwise(f, name, "f")
        return MatrixFunction(name, checked, autograd_derivative(checked))
    raise ValueError(
        f"f must be a function name, a MatrixFunction, a callable or a (f, df) pair; got {type(f).__name__}."
    )


def divided_differences(fn: MatrixFunction, lam: Tensor) -> Tensor:
    """First divided-difference matrix ``F`` of ``fn`` at ``lam`` (``(*, m)`` -> ``(*, m, m)``).

    ``F_ij = (f(λ_i) − f(λ_j)) / (λ_i − λ_j)`` and ``F_ii = f'(λ_i)``, computed without
    cancellation (see the module docstring). The result is exactly symmetric.
    """
    li, lj = lam.unsqueeze(-1), lam.unsqueeze(-2)
    if fn.dd is not None:
        F = fn.dd(li, lj)
    else:
        eps = torch.finfo(lam.dtype).eps
        scale = torch.maximum(li.abs(), lj.abs()).clamp_min(torch.finfo(lam.dtype).tiny)
        gap = li - lj
        close = gap.abs() <= eps ** (1.0 / 3.0) * scale
        fl = fn.f(lam)
        num = fl.unsqueeze(-1) - fl.unsqueeze(-2)
        direct = num / torch.where(close, torch.ones_like(gap), gap)
        mid = fn.df(0.5 * (li + lj))
        F = torch.where(close, mid, direct)
    return 0.5 * (F + F.mT)
