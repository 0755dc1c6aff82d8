r"""Dense Cholesky for a covariance that a deterministic-objective block cannot resolve in ``max_lanczos_iter`` steps.

In a :class:`~lanczos_grad_gp.settings.deterministic_objective` block (an L-BFGS fit under the flag) a call
that is still unconverged at ``max_lanczos_iter`` — with the block's held factor, and with the factor built
at its own ``θ`` where one was tried — needs many more Lanczos steps: its truncated value is biased, and a
line search follows the bias. Where the covariance is small enough to factor
(``n ≤`` :class:`~lanczos_grad_gp.settings.deterministic_dense_size`), that call and every later call of the
same covariance key in the block are computed exactly instead, without building a preconditioner first (on pol
at ``n = 5000`` the factor of 219 of 221 later calls was rank-limited, and building it to find that out took
1.5 s of a 15 s call; the 2 calls whose factor met its trace tolerance would have been exact up to ``O(ρ)`` on
Lanczos at a tenth of the cost),

.. math::
    K = L L^\top,\qquad r^\top K^{-1} r = \lVert L^{-1} r\rVert^2,\qquad \log\det K = 2 \sum_i \log L_{ii},

with autograd gradients through the dense kernel — GPyTorch's own Cholesky computation
(``psd_safe_cholesky``, the same jitter and ``NumericalWarning``). Whether that is cheaper than more steps
depends on ``n``: the factorization and its backward cost ``O(n³)``, a Lanczos step over ``t + N`` columns
``O((t + N) n²)`` plus its share of the gradient. Measured on one CPU thread (``ScaleKernel(RBF)``, ``d = 6``,
float64, value and gradient, ``benchmarks/README.md`` "Dense hand-over"): at ``n = 3000`` a dense call took
3.4 s against 4.5 s for a 100-step Lanczos call; at ``n = 5000`` 14.8 s against 10.4 s at 100 steps and 17.8 s
at 300, a break-even near 220 steps. A call that reached the cap needs more than 100 (Hartmann6 at
``n = 5000``: a mean of 259 with the raised cap, plus the 100 or 200 thrown away), and later calls of a fit
need about as many. The break-even grows about linearly with ``n`` (``n³`` against ``n²``: near 630 steps at
``n = 10000``), hence the default size 5000. Memory is that of GPyTorch's Cholesky path: the matrix, its factor
and the kernel's autograd graph, about 14 ``n × n`` matrices in value and gradient (measured at ``n = 2000``;
2.8 GB at 5000 in float64).

The block's objective changes once, from the fixed-probe estimate to the exact value: the same kind of change
as a replaced factor, and one after which the values are exact rather than estimated.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from linear_operator.operators import LinearOperator
from linear_operator.utils.cholesky import psd_safe_cholesky
from linear_operator.utils.errors import NotPSDError
from torch import Tensor

from .. import settings

__all__ = ["dense_fits", "dense_inv_quad_logdet"]


def dense_fits(A: LinearOperator) -> bool:
    """Whether ``A`` may be handed to dense Cholesky: ``n ≤ deterministic_dense_size``, the batch's dense
    matrices together hold at most ``deterministic_dense_size²`` entries, all its tensors are on its device
    (not a multi-device kernel) and it is not row-sharded over processes (``torch.distributed``: every rank
    would build the whole matrix)."""
    size = settings.deterministic_dense_size.value()
    n = A.shape[-1]
    if not (0 < n <= size and math.prod(A.batch_shape) * n * n <= size * size):
        return False
    from ..distributed.operator import RowShardedLinearOperator

    return all(t.device == A.device for t in A.representation()) and not any(
        isinstance(op, RowShardedLinearOperator) for op in _operators(A)
    )


def _operators(op: LinearOperator) -> Iterator[LinearOperator]:
    """``op`` and the linear operators among its arguments, recursively."""
    yield op
    for arg in getattr(op, "_args", ()):
        if isinstance(arg, LinearOperator):
            yield from _operators(arg)


def dense_inv_quad_logdet(A: LinearOperator, rhs: Tensor | None, want_logdet: bool) -> tuple[Tensor, Tensor] | None:
    """``(r^T K^{-1} r`` per column ``(*batch, t)``, ``log det K`` ``(*batch)``) by dense Cholesky, with autograd
    gradients; ``None`` where the Cholesky fails even with GPyTorch's jitter (``NotPSDError``) or the matrix
    does not fit in memory (the caller then keeps Lanczos)."""
    try:
        K = A.to_dense()  # (*batch, n, n), differentiable in the kernel's parameters
        L = psd_safe_cholesky(K)
    except (NotPSDError, torch.OutOfMemoryError):
        return None
    batch = A.batch_shape
    if rhs is None:
        inv_quad = K.new_zeros((*batch, 0))
    else:
        w = torch.linalg.solve_triangular(L, rhs, upper=False)  # (*batch, n, t)
        inv_quad = (w * w).sum(-2)  # (*batch, t)
    if want_logdet:
        logdet = 2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # (*batch)
    else:
        logdet = K.new_zeros(batch)
    return inv_quad, logdet
