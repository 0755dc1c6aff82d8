r"""Scale-safe vector norms.

``torch.linalg.vector_norm`` sums squares: entries below ``sqrt(tiny)`` (``1e-19`` in float32)
underflow to a zero norm and entries above ``sqrt(max)`` (``1e154`` in float64) overflow to
``inf``. Dividing by the largest magnitude first (LAPACK's ``dnrm2`` strategy, in two passes)
keeps every norm finite and accurate for any finite input:

.. math::
    \lVert x \rVert = s \,\lVert x / s \rVert,\qquad s = \max_i |x_i|.

Example:
    >>> import torch
    >>> x = torch.full((4,), 1e-25, dtype=torch.float32)
    >>> float(torch.linalg.vector_norm(x))  # underflows
    0.0
    >>> f"{float(safe_norm(x, dim=0)):.1e}"
    '2.0e-25'
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["safe_norm", "safe_matrix_norm"]


def safe_norm(x: Tensor, dim: int | tuple[int, ...] = -1, keepdim: bool = False) -> Tensor:
    """Euclidean norm of ``x`` along ``dim`` without underflow or overflow (two passes over ``x``)."""
    scale = x.abs().amax(dim=dim, keepdim=True)  # (*, 1)
    ok = (scale > 0) & torch.isfinite(scale)
    unit = torch.where(ok, scale, torch.ones_like(scale))
    norm = torch.linalg.vector_norm(x / unit, dim=dim, keepdim=True) * unit
    norm = torch.where(ok, norm, scale)  # 0 for zero columns, inf/nan propagate
    return norm if keepdim else norm.squeeze(dim) if isinstance(dim, int) else _squeeze_dims(norm, dim)


def _squeeze_dims(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    for d in sorted((d % x.dim() for d in dims), reverse=True):
        x = x.squeeze(d)
    return x


def safe_matrix_norm(M: Tensor) -> Tensor:
    """Frobenius norm of the trailing two dimensions of ``M`` without underflow or overflow."""
    return safe_norm(M, dim=(-2, -1))
