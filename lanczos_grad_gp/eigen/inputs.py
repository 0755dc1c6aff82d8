"""Input normalisation shared by the eigen-utilities: operators, generators, start vectors.

An operator is a :class:`~linear_operator.operators.LinearOperator`, a dense ``(*b, n, n)``
tensor, or a tuple ``(matvec, n)`` / ``(matvec, n, dtype, device)`` with ``matvec`` mapping an
``(n,)`` vector to ``A v`` (a Hessian-vector product, say). Everything stays on the operator's
device and dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from linear_operator.operators import DenseLinearOperator, LinearOperator, to_linear_operator
from torch import Tensor

from .._compat import operator_matmul
from ..core.probes import rademacher, randn, resolve_generator

__all__ = ["PreparedOperator", "prepare_operator", "resolve_generator", "randn", "rademacher", "check_k"]

MatmulFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class PreparedOperator:
    """A validated operator.

    Attributes:
        matmul: ``(*b, n, c) -> A X`` without autograd tracking.
        n, dtype, device, batch_shape: as the operator.
        linear_op: the LinearOperator (dense tensors wrapped) whose ``representation()`` carries
            gradients; ``None`` for matvec callables.
    """

    matmul: MatmulFn
    n: int
    dtype: torch.dtype
    device: torch.device
    batch_shape: torch.Size
    linear_op: LinearOperator | None


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


def _matvec_closure(fn: Callable[[Tensor], Tensor], n: int) -> MatmulFn:
    def matmul(X: Tensor) -> Tensor:  # (n, c) -> (n, c), one matvec per column
        if X.dim() != 2:
            raise ValueError(f"a (matvec, n) operator has no batch dimensions; got input shape {tuple(X.shape)}.")
        with torch.no_grad():
            cols = [fn(X[:, j]) for j in range(X.shape[-1])]
        for c in cols:
            if not isinstance(c, Tensor) or c.shape != (n,):
                shape = tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__
                raise ValueError(f"matvec must map an ({n},) vector to an ({n},) tensor; it returned {shape}.")
        return torch.stack(cols, dim=-1).to(X.dtype)

    return matmul


def prepare_operator(operator: object, name: str = "operator") -> PreparedOperator:
    """Validate ``operator`` (square, floating, symmetric when dense) and build its matmul closure."""
    checked = isinstance(operator, Tensor)
    if isinstance(operator, Tensor):
        _check_dense(operator, name)
        operator = to_linear_operator(operator)
    if isinstance(operator, LinearOperator):
        # GPyTorch's lazily evaluated kernels (e.g. kernel(x).add_diagonal(...)) must be evaluated first
        operator = operator.evaluate_kernel()
        if len(operator.shape) < 2 or operator.shape[-1] != operator.shape[-2]:
            raise ValueError(f"{name} must be square with shape (*batch, n, n); got shape {tuple(operator.shape)}.")
        if not operator.dtype.is_floating_point:
            raise ValueError(f"{name} must be floating point; got dtype {operator.dtype}.")
        if isinstance(operator, DenseLinearOperator) and not checked:
            _check_dense(operator.tensor, name)
        op = operator

        def matmul(X: Tensor) -> Tensor:
            with torch.no_grad():
                return operator_matmul(op, X)

        return PreparedOperator(matmul, op.shape[-1], op.dtype, op.device, op.batch_shape, op)
    if isinstance(operator, tuple) and len(operator) in (2, 4) and callable(operator[0]):
        fn, n = operator[0], operator[1]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"the size n of a (matvec, n) operator must be a positive int; got {n!r}.")
        dtype = operator[2] if len(operator) == 4 else torch.float64
        device = torch.device(operator[3]) if len(operator) == 4 else torch.device("cpu")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype of a (matvec, n, dtype, device) operator must be floating; got {dtype!r}.")
        return PreparedOperator(_matvec_closure(fn, n), n, dtype, device, torch.Size(), None)
    raise TypeError(
        f"{name} must be a LinearOperator, a dense (*batch, n, n) tensor, or a tuple (matvec, n[, dtype, device]); "
        f"got {type(operator).__name__}."
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
