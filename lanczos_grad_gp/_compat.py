"""Every touch of a private torch / linear_operator / GPyTorch API, in one place.

linear_operator's subclass contract (``_matmul``, ``_bilinear_derivative``, ``_diagonal``,
``_get_indices``, ``_size``, ``_transpose_nonbatch``, ``_expand_batch``) is the documented way to
write an operator, so our operators *override* those methods where they are defined. Everything
else that reaches into an object's underscored attributes, or into ``torch._C``, goes through the
functions below, so an upstream rename breaks one module (tested versions: torch 2.13,
linear_operator 0.6.1, gpytorch 1.15.2).
"""

from __future__ import annotations

from typing import Any

from linear_operator.operators import AddedDiagLinearOperator, CatLinearOperator, LinearOperator
from torch import Tensor

__all__ = [
    "added_diag_parts",
    "bilinear_derivative",
    "delayed_error",
    "expand_batch",
    "get_entries",
    "kernel_operator_kwargs",
    "lazy_kernel_parts",
    "operator_diagonal",
    "operator_matmul",
    "transpose_nonbatch",
    "validate_mvn_sample",
]


def operator_matmul(op: LinearOperator, rhs: Tensor) -> Tensor:
    """``op @ rhs`` through the operator's own ``_matmul`` (no argument checks, no autograd Function)."""
    return op._matmul(rhs)


def bilinear_derivative(op: LinearOperator, left: Tensor, right: Tensor) -> tuple[Tensor | None, ...]:
    """Gradients of ``Σ_i left_i^T op right_i`` w.r.t. ``op.representation()``."""
    return op._bilinear_derivative(left, right)


def get_entries(op: LinearOperator, row: Tensor, col: Tensor, *batch: Tensor) -> Tensor:
    """Entries ``op[..., row, col]`` without evaluating the operator (``_get_indices``)."""
    if isinstance(op, CatLinearOperator) and not batch:  # MultiDeviceKernel: row blocks on several devices
        from .distributed.multi_device import cat_get_entries, is_multi_device_rows

        if is_multi_device_rows(op):
            return cat_get_entries(op, row, col)
    return op._get_indices(row, col, *batch)


def operator_diagonal(op: LinearOperator) -> Tensor:
    """``op``'s diagonal through its ``_diagonal`` (no batch-shape bookkeeping)."""
    return op._diagonal()


def expand_batch(op: LinearOperator, batch_shape: Any) -> LinearOperator:
    """``op`` lazily expanded to ``batch_shape`` (``_expand_batch``)."""
    return op._expand_batch(batch_shape)


def transpose_nonbatch(op: LinearOperator) -> LinearOperator:
    """``op`` with its last two dimensions transposed (``_transpose_nonbatch``)."""
    return op._transpose_nonbatch()


def added_diag_parts(op: Any) -> tuple[LinearOperator, LinearOperator] | None:
    """``(K, D)`` of ``K + D`` when ``op`` is an ``AddedDiagLinearOperator``, else ``None``."""
    if isinstance(op, AddedDiagLinearOperator):
        return op._linear_op, op._diag_tensor
    return None


def delayed_error(message: bytes, num_outputs: int) -> Any:
    """torch's ``DelayedError`` node: an autograd Function that raises ``message`` when differentiated."""
    from torch._C import _functions

    return _functions.DelayedError(message, num_outputs)


def validate_mvn_sample(mvn: Any, value: Tensor) -> None:
    """``MultivariateNormal._validate_sample`` (torch.distributions' argument check)."""
    if mvn._validate_args:
        mvn._validate_sample(value)


def lazy_kernel_parts(covar: Any) -> dict[str, Any] | None:
    """``x1, x2, kernel, params, last_dim_is_batch`` of a GPyTorch ``LazyEvaluatedKernelTensor`` (else ``None``)."""
    from gpytorch.lazy import LazyEvaluatedKernelTensor

    if not isinstance(covar, LazyEvaluatedKernelTensor):
        return None
    return {
        "x1": covar.x1,
        "x2": covar.x2,
        "kernel": covar.kernel,
        "params": covar.params,
        "last_dim_is_batch": covar.last_dim_is_batch,
    }


def kernel_operator_kwargs(op: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The differentiable and non-differentiable keyword dicts of a ``KernelLinearOperator`` (mutable)."""
    return op._differentiable_kwargs, op._nondifferentiable_kwargs
