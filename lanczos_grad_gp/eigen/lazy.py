r"""GPyTorch lazy kernels as row-block operators: the eigen-utilities never evaluate ``k(X)`` densely.

``kernel(x)`` in GPyTorch is a ``LazyEvaluatedKernelTensor``; its ``evaluate_kernel()`` builds the
``n × n`` matrix with the kernel's full autograd temporaries (RBF: about three ``n × n`` buffers), so
``lanczos(k(X), k=3)`` at ``n = 20000`` peaked at 9 GB in float64 and ran out of memory at 30000.
Here the lazy tensor (alone or as ``AddedDiagLinearOperator(lazy, noise)``) becomes

* for RBF / Matérn kernels (optionally in a ``ScaleKernel``): the library's fused
  :class:`~lanczos_grad_gp.kernels.StationaryKernelLinearOperator` (closed-form gradient). It keeps
  ``g(r²)`` dense, filled in place without a graph (``8 n²`` bytes in float64), while
  ``n ≤`` :class:`lanczos_grad_gp.settings.max_dense_kernel_size` and recomputes row blocks at every
  product above (``O(chunk · n)`` memory);
* for any other kernel (periodic, linear, sums and products of kernels, …): a
  :class:`~lanczos_grad_gp.kernels.ChunkedKernelLinearOperator` that calls the kernel module on
  ``chunk × n`` row blocks, ``K V = [k(x[b], x) V]_b``, with the kernel's parameters as differentiable
  tensors (``torch.func.functional_call``), so eigenvalue gradients reach the hyperparameters. Up to
  the same size its matrix is assembled once from the blocks (one ``n × n`` buffer, no temporaries);
  above it every product recomputes the blocks.

Anything else (kernel checkpointing, ``last_dim_is_batch``, a kernel whose parameters do not follow
GPyTorch's batch convention) keeps the old path, ``evaluate_kernel()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gpytorch
import torch
from linear_operator.operators import AddedDiagLinearOperator, LinearOperator
from torch import Tensor

from .. import settings
from .._compat import added_diag_parts, lazy_kernel_parts, operator_matmul
from ..kernels import ChunkedKernelLinearOperator, fuse_stationary_kernel

__all__ = ["RowBlocked", "row_block_kernel", "module_covar"]


@dataclass(frozen=True)
class RowBlocked:
    """A lazy kernel converted for the eigen-utilities.

    Attributes:
        operator: the LinearOperator standing for the kernel (shape, dtype and the gradient's
            ``_bilinear_derivative``); it never holds an ``n × n`` autograd graph.
        matmul: ``X (*b, n, c) -> K X`` without a graph (row blocks, or a dense matrix built from them).
    """

    operator: LinearOperator
    matmul: Callable[[Tensor], Tensor]


def module_covar(
    x1: Tensor, x2: Tensor, *, kernel: Any, names: tuple[str, ...], kernel_kwargs: tuple, **tensors: Tensor
) -> Tensor:
    """Dense block ``k(x1, x2)`` ``(*b, M, N)`` of a GPyTorch kernel module, parameters substituted.

    ``tensors["p{i}"]`` replaces the parameter ``names[i]`` (``torch.func.functional_call``), so autograd
    through a block reaches the tensors the operator holds (and from them the model's parameters).
    """
    params = {name: tensors[f"p{i}"] for i, name in enumerate(names)}
    with gpytorch.settings.lazily_evaluate_kernels(False):
        out = torch.func.functional_call(kernel, params, (x1, x2), dict(kernel_kwargs))
    return out.to_dense() if isinstance(out, LinearOperator) else out


def _generic(lazy: dict[str, Any], shape: torch.Size) -> LinearOperator | None:
    kernel = lazy["kernel"]
    names, tensors, nonbatch = [], {}, {}
    nb = len(kernel.batch_shape)
    for i, (name, p) in enumerate(kernel.named_parameters()):
        if p.dim() < nb:
            return None
        names.append(name)
        tensors[f"p{i}"] = p
        nonbatch[f"p{i}"] = p.dim() - nb
    try:
        op = ChunkedKernelLinearOperator(
            lazy["x1"],
            lazy["x2"],
            covar_func=module_covar,
            num_nonbatch_dimensions=nonbatch,
            kernel=kernel,
            names=tuple(names),
            kernel_kwargs=tuple(sorted(lazy["params"].items())),
            **tensors,
        )
    except (RuntimeError, ValueError, TypeError):  # parameters outside GPyTorch's batch convention
        return None
    return op if op.shape == shape else None


def _dense_from_blocks(op: LinearOperator) -> Callable[[Tensor], Tensor]:
    cache: dict[str, Tensor] = {}

    def matmul(X: Tensor) -> Tensor:
        if "K" not in cache:
            with torch.no_grad():  # ChunkedKernelLinearOperator.to_dense: concatenated row blocks, no graph
                cache["K"] = op.to_dense()
        return cache["K"] @ X

    return matmul


def row_block_kernel(operator: LinearOperator) -> RowBlocked | None:
    """``operator`` as a :class:`RowBlocked` when it is a GPyTorch lazy kernel (optionally ``+ D``), else ``None``."""
    parts = added_diag_parts(operator)
    if parts is not None:
        base, diag = parts
        inner = row_block_kernel(base)
        if inner is None:
            return None
        inner_mm = inner.matmul

        def added(X: Tensor) -> Tensor:
            return inner_mm(X) + operator_matmul(diag, X)

        return RowBlocked(AddedDiagLinearOperator(inner.operator, diag), added)
    lazy = lazy_kernel_parts(operator)
    if lazy is None or lazy["last_dim_is_batch"] or gpytorch.beta_features.checkpoint_kernel.value():
        return None
    fused = fuse_stationary_kernel(operator)
    if fused is not operator:
        return RowBlocked(fused, lambda X: operator_matmul(fused, X))
    op = _generic(lazy, operator.shape)
    if op is None:
        return None
    if max(op.shape[-2:]) <= settings.max_dense_kernel_size.value():
        return RowBlocked(op, _dense_from_blocks(op))
    return RowBlocked(op, lambda X: operator_matmul(op, X))
