r"""The one autograd Function of the package: attach forward-only gradients to precomputed values.

Every Lanczos form computes its values, gradient factors and diagnostics in ONE pure forward
(:func:`lanczos_grad_gp.core.engine.lanczos_forward`) under ``no_grad``; this Function only makes
the values differentiable. Its backward is the contract of linear_operator's ``InvQuadLogdet``:
one call

.. math::
    \nabla_θ \sum_c g_c\, v_c^\top f_c(A) v_c \approx
    \texttt{A.\_bilinear\_derivative}\big([\,g_{c(j)}\,\text{left}_j\,]_j,\ [\,\text{right}_j\,]_j\big)

over the factors of all columns (each factor column ``j`` scaled by the output gradient of its
column ``c(j)``), plus ``∂/∂v_c = 2 g_c f_c(A) v_c`` for the start vectors (arXiv:2605.12801;
docs/mathematics.md, "The forward-only gradient"). No Krylov work happens in the backward.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from linear_operator.utils.warnings import NumericalWarning
from torch import Tensor

from .._compat import bilinear_derivative
from .validation import first_order_only

__all__ = ["GradientPayload", "attach_forward_only_gradient"]


@dataclass(frozen=True)
class GradientPayload:
    """What the backward needs, all detached.

    Attributes:
        left: ``(*batch, n, R)`` left factors of all columns, concatenated, or ``None``.
        right: ``(*batch, n, R)`` right factors.
        owner: ``(R,)`` long: the output column each factor column belongs to.
        applied: ``(*batch, n, k)`` ``f(A) v`` of every column, or ``None``.
    """

    left: Tensor | None
    right: Tensor | None
    owner: Tensor | None
    applied: Tensor | None


class _ForwardOnlyGradient(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        payload: GradientPayload,
        representation_tree: Any,
        values: Tensor,
        starts: Tensor,
        *matrix_args: Tensor,
    ) -> Tensor:
        ctx.payload = payload
        ctx.representation_tree = representation_tree
        ctx.save_for_backward(starts, *matrix_args)  # starts too: the double-backward guard anchors on them
        return values.clone()

    @staticmethod
    @first_order_only  # double backward raises a clear RuntimeError, never a silently wrong value
    def backward(ctx: Any, grad_values: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        payload: GradientPayload = ctx.payload
        matrix_args = ctx.saved_tensors[1:]
        start_grad = None
        if payload.applied is not None and ctx.needs_input_grad[3]:
            start_grad = 2.0 * payload.applied * grad_values.unsqueeze(-2)  # (*batch, n, k)
        matrix_grads: tuple = (None,) * len(matrix_args)
        if payload.left is not None and any(ctx.needs_input_grad[4:]):
            weights = grad_values.index_select(-1, payload.owner)  # (*batch, R)
            A = ctx.representation_tree(*matrix_args)
            matrix_grads = tuple(bilinear_derivative(A, payload.left * weights.unsqueeze(-2), payload.right))
        _warn_if_nonfinite(start_grad, *matrix_grads)
        return (None, None, None, start_grad, *matrix_grads)


def _warn_if_nonfinite(*grads: Tensor | None) -> None:
    """A gradient that overflowed (a tiny operator in float32: ``1/λ²`` beyond the dtype) is never silent."""
    parts = [g for g in grads if isinstance(g, Tensor) and g.is_floating_point() and g.numel()]
    if parts and not bool(torch.stack([torch.isfinite(g).all() for g in parts]).all()):  # one sync per backward
        warnings.warn(
            "lanczos_grad_gp: the forward-only gradient contains NaN or Inf (it overflowed the dtype, e.g. "
            "1/λ² of a tiny operator in float32). Rescale the operator or use float64.",
            NumericalWarning,
            stacklevel=3,
        )


def attach_forward_only_gradient(
    values: Tensor,
    payload: GradientPayload,
    starts: Tensor,
    representation_tree: Any,
    matrix_args: tuple[Tensor, ...],
) -> Tensor:
    """``values`` (``(*batch, k)``, detached) made differentiable w.r.t. ``starts`` and ``matrix_args``."""
    return _ForwardOnlyGradient.apply(payload, representation_tree, values, starts, *matrix_args)


def flatten_factors(
    factors: tuple[tuple[Tensor, Tensor], ...], column_offsets: list[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate per-group factors ``(*batch, k_g, n, r_g)`` into ``(*batch, n, R)`` and their owners ``(R,)``."""
    lefts, rights, owners = [], [], []
    for (left, right), offset in zip(factors, column_offsets, strict=True):
        k_g, r_g = left.shape[-3], left.shape[-1]
        lefts.append(left.movedim(-3, -2).flatten(-2))  # (*batch, n, k_g * r_g)
        rights.append(right.movedim(-3, -2).flatten(-2))
        owners.append(torch.arange(offset, offset + k_g, device=left.device).repeat_interleave(r_g))
    return torch.cat(lefts, -1), torch.cat(rights, -1), torch.cat(owners)
