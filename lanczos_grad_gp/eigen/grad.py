r"""Differentiable eigenvalues by first-order perturbation theory.

For a simple eigenvalue ``λ_i`` of a symmetric ``A(θ)`` with unit eigenvector ``y_i``,
``∂λ_i/∂θ = y_i^\top (∂A/∂θ) y_i`` (Hellmann–Feynman; Magnus 1985). With output gradients
``g`` the chain rule gives ``Σ_i g_i y_i^\top ∂A y_i = tr(Y diag(g) Y^\top ∂A)``, i.e. ONE call
``A._bilinear_derivative(Y diag(g), Y)`` — the same forward-only shape as
:class:`lanczos_grad_gp.forms._QuadForm`: all Krylov work in ``forward``, the eigenvectors
cached, no matvecs in ``backward``. For a cluster of (nearly) equal eigenvalues the individual
derivatives are ill-defined, but the sum over the cluster is still exact.
"""

from __future__ import annotations

from typing import Any

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from .._compat import bilinear_derivative
from ..functions.validation import first_order_only

__all__ = ["differentiable_eigenvalues"]


class _Eigenvalues(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, representation_tree: Any, vectors: Tensor, values: Tensor, *matrix_args: Tensor
    ) -> Tensor:
        ctx.representation_tree = representation_tree
        ctx.save_for_backward(vectors, *matrix_args)
        return values.clone()

    @staticmethod
    @first_order_only  # double backward raises a clear RuntimeError, never a silently wrong value
    def backward(ctx: Any, grad_values: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        vectors, *matrix_args = ctx.saved_tensors
        A = ctx.representation_tree(*matrix_args)
        left = vectors * grad_values.unsqueeze(-2)  # (*b, n, k): y_i g_i
        matrix_grads = bilinear_derivative(A, left, vectors)
        return (None, None, None, *matrix_grads)


def differentiable_eigenvalues(linear_op: LinearOperator | None, vectors: Tensor, values: Tensor) -> Tensor:
    """Attach ``∂λ_i = y_i^T ∂A y_i`` to ``values`` (``(*b, k)``) given ``vectors`` ``(*b, n, k)``.

    Returns ``values`` unchanged when there is nothing to differentiate (no LinearOperator,
    grad mode off, or no tensor of the operator requires grad).
    """
    if linear_op is None or not torch.is_grad_enabled():
        return values
    args = linear_op.representation()
    if not any(a.requires_grad for a in args):
        return values
    return _Eigenvalues.apply(linear_op.representation_tree(), vectors.detach(), values.detach(), *args)
