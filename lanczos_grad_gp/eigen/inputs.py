"""Input normalisation shared by the eigen-utilities: operators, generators, start vectors.

An operator is a :class:`~linear_operator.operators.LinearOperator`, a dense ``(*b, n, n)``
tensor, a :class:`~lanczos_grad_gp.eigen.curvature.CurvatureOperator` (Hessian / GGN of a model's
loss), an object with hessian-eigenthings' operator interface, or a tuple ``(matvec, n)`` /
``(matvec, n, dtype, device)`` with ``matvec`` mapping an ``(n,)`` vector to ``A v``. Everything
stays on the operator's device and dtype, except half precision, which runs in float32.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from linear_operator.operators import DenseLinearOperator, LinearOperator, to_linear_operator
from linear_operator.utils.warnings import NumericalWarning
from torch import Tensor

from .._compat import operator_matmul
from ..core.probes import rademacher, randn, resolve_generator
from .curvature.base import CurvatureOperator
from .lazy import row_block_kernel

__all__ = [
    "PreparedOperator",
    "prepare_operator",
    "holds_operator_fixed",
    "resolve_generator",
    "randn",
    "rademacher",
    "check_k",
]

MatmulFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class PreparedOperator:
    """A validated operator.

    Attributes:
        matmul: ``(*b, n, c) -> A X`` without autograd tracking.
        n, dtype, device, batch_shape: as the operator.
        linear_op: the LinearOperator (dense tensors wrapped) whose ``representation()`` carries
            gradients; ``None`` for matvec callables.
        promoted: the operator computes in half precision and its products are promoted to ``dtype``
            (each product rounds its input vectors).
    """

    matmul: MatmulFn
    n: int
    dtype: torch.dtype
    device: torch.device
    batch_shape: torch.Size
    linear_op: LinearOperator | None
    promoted: bool = False


def symmetry_rtol(dtype: torch.dtype) -> float:
    """Relative asymmetry ``‖A − A^T‖_F / ‖A‖_F`` tolerated: ``max(1e-6, 10·eps(dtype))``."""
    return max(1e-6, 10.0 * torch.finfo(dtype).eps)


_EXACT_CHECK_MAX_N = 2048


def _check_dense(A: Tensor, name: str) -> None:
    """Square, floating, finite and symmetric to ``‖A − A^T‖_F ≤ rtol ‖A‖_F`` (:func:`symmetry_rtol`).

    For ``n ≤ 2048`` the Frobenius norms are exact. Above, two matmuls with 4 fixed Gaussian probes
    ``Z`` estimate them without an ``n × n`` temporary: ``E‖(A − A^T) Z‖_F² = 4 ‖A − A^T‖_F²`` and
    ``E‖A Z‖_F² = 4 ‖A‖_F²`` (unbiased; the ratio is accurate to a small factor, ample for a
    threshold that separates rounding-level ``1e-16`` from genuine asymmetry). NaN/Inf entries
    propagate into the same products, so one finiteness test covers them.
    """
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{name} must be square with shape (*batch, n, n); got shape {tuple(A.shape)}.")
    if not A.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor; got dtype {A.dtype}.")
    A = A.detach()
    n = A.shape[-1]
    if n <= _EXACT_CHECK_MAX_N:
        asym = torch.linalg.matrix_norm(A - A.mT)
        scale = torch.linalg.matrix_norm(A)
    else:
        gen = torch.Generator(device=A.device).manual_seed(0)
        Z = torch.randn(n, 4, generator=gen, dtype=A.dtype, device=A.device)
        AZ = A @ Z
        asym = torch.linalg.matrix_norm(AZ - A.mT @ Z)
        scale = torch.linalg.matrix_norm(AZ)
    if not bool(torch.isfinite(asym).all() & torch.isfinite(scale).all()):
        raise ValueError(f"{name} contains NaN or Inf.")
    rtol = symmetry_rtol(A.dtype)
    if not bool((asym <= rtol * scale).all()):
        worst = float((asym / scale.clamp_min(torch.finfo(A.dtype).tiny)).max())
        raise ValueError(
            f"{name} must be symmetric: relative asymmetry ||A - A^T||_F / ||A||_F = {worst:.2e} exceeds "
            f"{rtol:.1e}. Symmetrize it, e.g. (A + A.mT) / 2."
        )


HALF_DTYPES = (torch.float16, torch.bfloat16)


def _promoted(dtype: torch.dtype, name: str) -> torch.dtype:
    """float32 for half-precision dtypes (with a ``NumericalWarning``), else ``dtype`` unchanged.

    Lanczos in float16 / bfloat16 (unit round-off 5e-4 / 4e-3) loses orthogonality and all accuracy
    within a few steps and its residual tests cannot tell, so half-precision operators run in float32:
    a dense or LinearOperator input is converted (differentiably), a matvec callable receives its
    vectors in its own dtype and its results are promoted. The operator's own rounding then shows in
    the TRUE residuals (``converged=False`` when it exceeds the tolerance), never as a garbage pair
    marked converged.
    """
    if dtype not in HALF_DTYPES:
        return dtype
    warnings.warn(
        f"lanczos_grad_gp.eigen: {name} has dtype {dtype}; the eigen-utilities run in float32 (half precision "
        "loses all accuracy within a few Lanczos steps) and return float32 results.",
        NumericalWarning,
        stacklevel=4,
    )
    return torch.float32


def _matvec_closure(fn: Callable[[Tensor], Tensor], n: int, in_dtype: torch.dtype) -> MatmulFn:
    """``(n, c) -> (n, c)``, one ``fn`` call per column, in the caller's grad mode (a Hessian-vector product
    needs autograd); the results are detached."""

    def matmul(X: Tensor) -> Tensor:
        if X.dim() != 2:
            raise ValueError(f"a (matvec, n) operator has no batch dimensions; got input shape {tuple(X.shape)}.")
        cols = [fn(X[:, j].to(in_dtype)) for j in range(X.shape[-1])]
        for c in cols:
            if not isinstance(c, Tensor) or c.shape != (n,):
                shape = tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__
                raise ValueError(f"matvec must map an ({n},) vector to an ({n},) tensor; it returned {shape}.")
        return torch.stack(cols, dim=-1).detach().to(X.dtype)

    return matmul


def _block_closure(fn: Callable[[Tensor], Tensor], n: int, in_dtype: torch.dtype) -> MatmulFn:
    """``(n, c) -> (n, c)`` through an operator's own batched ``matmul`` (a :class:`CurvatureOperator`)."""

    def matmul(X: Tensor) -> Tensor:
        if X.dim() != 2:
            raise ValueError(f"a curvature operator has no batch dimensions; got input shape {tuple(X.shape)}.")
        out = fn(X.to(in_dtype))
        if not isinstance(out, Tensor) or out.shape != X.shape:
            raise ValueError(f"the operator's matmul must map ({n}, c) to ({n}, c); got {tuple(out.shape)}.")
        return out.detach().to(X.dtype)

    return matmul


def _prepare_linear_operator(operator: LinearOperator, name: str, checked: bool) -> PreparedOperator:
    dtype = _promoted(operator.dtype, name) if operator.dtype.is_floating_point else operator.dtype
    if dtype != operator.dtype:
        operator = operator.to(dtype)
    # GPyTorch's lazily evaluated kernels: row-block operators instead of the dense n x n evaluation
    blocked = row_block_kernel(operator)
    operator = blocked.operator if blocked is not None else operator.evaluate_kernel()
    if len(operator.shape) < 2 or operator.shape[-1] != operator.shape[-2]:
        raise ValueError(f"{name} must be square with shape (*batch, n, n); got shape {tuple(operator.shape)}.")
    if not operator.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point; got dtype {operator.dtype}.")
    if isinstance(operator, DenseLinearOperator) and not checked:
        _check_dense(operator.tensor, name)
    op = operator
    products = blocked.matmul if blocked is not None else None

    def matmul(X: Tensor) -> Tensor:
        with torch.no_grad():
            return products(X) if products is not None else operator_matmul(op, X)

    return PreparedOperator(matmul, op.shape[-1], op.dtype, op.device, op.batch_shape, op)


F = TypeVar("F", bound=Callable[..., Any])


def holds_operator_fixed(fn: F) -> F:
    """Decorator: a :class:`CurvatureOperator` ``operator`` is held in its ``cached_graph()`` for the call.

    An eigen function's products all see one fixed operator, so a Hessian operator reuses one
    gradient graph instead of rebuilding it per product.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        operator = args[0] if args else kwargs.get("operator")
        if isinstance(operator, CurvatureOperator):
            with operator.cached_graph():
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def prepare_operator(operator: object, name: str = "operator") -> PreparedOperator:
    """Validate ``operator`` (square, floating, symmetric when dense) and build its matmul closure.

    Accepted: a dense ``(*b, n, n)`` tensor, a LinearOperator (GPyTorch lazy kernels by row blocks,
    :mod:`.lazy`), a :class:`~lanczos_grad_gp.eigen.curvature.CurvatureOperator`, any object with
    hessian-eigenthings' operator interface (``size``, ``matvec``, ``dtype``, ``device``), or a tuple
    ``(matvec, n)`` / ``(matvec, n, dtype, device)``. Half precision is promoted to float32 (warned).
    """
    checked = isinstance(operator, Tensor)
    if isinstance(operator, Tensor):
        if operator.dtype in HALF_DTYPES:
            operator = operator.to(_promoted(operator.dtype, name))
        _check_dense(operator, name)
        operator = to_linear_operator(operator)
    if isinstance(operator, LinearOperator):
        return _prepare_linear_operator(operator, name, checked)
    if isinstance(operator, CurvatureOperator):
        n, in_dtype = operator.n, operator.dtype
        dtype = _promoted(in_dtype, name)
        return PreparedOperator(
            _block_closure(operator.matmul, n, in_dtype),
            n,
            dtype,
            operator.device,
            torch.Size(),
            None,
            dtype != in_dtype,
        )
    if _is_eigenthings_operator(operator):
        n, in_dtype = int(operator.size), operator.dtype  # type: ignore[attr-defined]
        dtype = _promoted(in_dtype, name)
        fn, device = operator.matvec, torch.device(operator.device)  # type: ignore[attr-defined]
        return PreparedOperator(
            _matvec_closure(fn, n, in_dtype), n, dtype, device, torch.Size(), None, dtype != in_dtype
        )
    if isinstance(operator, tuple) and len(operator) in (2, 4) and callable(operator[0]):
        fn, n = operator[0], operator[1]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"the size n of a (matvec, n) operator must be a positive int; got {n!r}.")
        in_dtype = operator[2] if len(operator) == 4 else torch.float64
        device = torch.device(operator[3]) if len(operator) == 4 else torch.device("cpu")
        if not isinstance(in_dtype, torch.dtype) or not in_dtype.is_floating_point:
            raise ValueError(f"dtype of a (matvec, n, dtype, device) operator must be floating; got {in_dtype!r}.")
        dtype = _promoted(in_dtype, name)
        return PreparedOperator(
            _matvec_closure(fn, n, in_dtype), n, dtype, device, torch.Size(), None, dtype != in_dtype
        )
    raise TypeError(
        f"{name} must be a LinearOperator, a dense (*batch, n, n) tensor, a CurvatureOperator, an object with "
        f"size/matvec/dtype/device, or a tuple (matvec, n[, dtype, device]); got {type(operator).__name__}."
    )


def _is_eigenthings_operator(obj: object) -> bool:
    """hessian-eigenthings' ``CurvatureOperator`` interface: ``size`` (int), ``matvec``, ``dtype``, ``device``."""
    size = getattr(obj, "size", None)
    return (
        callable(getattr(obj, "matvec", None))
        and isinstance(size, int)
        and not isinstance(size, bool)
        and size >= 1
        and isinstance(getattr(obj, "dtype", None), torch.dtype)
        and getattr(obj, "device", None) is not None
    )


def check_k(k: object, n: int, name: str = "k") -> int:
    """``1 ≤ k ≤ n`` as a plain int, else ``ValueError``."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"{name} must be an int; got {k!r}.")
    if k < 1:
        raise ValueError(f"{name} must be >= 1; got {name}={k}.")
    if k > n:
        raise ValueError(f"{name}={k} exceeds the operator size n={n}: at most n eigenpairs exist.")
    return k


def check_tol(tol: object) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (tol >= 0) or tol == float("inf"):
        raise ValueError(f"tol must be a finite number >= 0; got tol={tol!r}.")
    return float(tol)
