r"""Dense Cholesky for a covariance that a deterministic-objective block cannot resolve in ``max_lanczos_iter`` steps.

In a :class:`~lanczos_grad_gp.settings.deterministic_objective` block (an L-BFGS fit under the flag) a call
that is still unconverged at ``max_lanczos_iter`` — with the block's held factor, and with the factor built
at its own ``θ`` where one was tried — needs many more Lanczos steps: its truncated value is biased, and a
line search follows the bias. Where the covariance is small enough to factor
(``n ≤`` :class:`~lanczos_grad_gp.settings.deterministic_dense_size`), that call and every later call of the
same covariance key in the block are computed exactly instead,

.. math::
    K = L L^\top,\qquad r^\top K^{-1} r = \lVert L^{-1} r\rVert^2,\qquad \log\det K = 2 \sum_i \log L_{ii},

with autograd gradients through the dense kernel — GPyTorch's own Cholesky computation
(``psd_safe_cholesky``, the same jitter and ``NumericalWarning``). At these sizes that is also the cheaper
computation: the factorization costs ``n³/3`` flops, ``m`` Lanczos steps over ``t + N`` columns about
``2 m (t + N) n²``, so beyond ``m ≈ n / (6 (t + N))`` steps — 76 at ``n = 5000`` with 11 columns, 152 at
``n = 10000`` — the factorization is cheaper than the steps alone (and the raised step cap,
:class:`~lanczos_grad_gp.settings.deterministic_max_lanczos_iter`, lets a call take up to 1000).

The block's objective changes once, from the fixed-probe estimate to the exact value: the same kind of change
as a replaced factor, and one after which the values are exact rather than estimated.
"""

from __future__ import annotations

import math

import torch
from linear_operator.operators import LinearOperator
from linear_operator.utils.cholesky import psd_safe_cholesky
from linear_operator.utils.errors import NotPSDError
from torch import Tensor

from .. import settings

__all__ = ["dense_fits", "dense_inv_quad_logdet"]


def dense_fits(A: LinearOperator) -> bool:
    """Whether ``A`` is small enough for the block's dense hand-over: ``n ≤ deterministic_dense_size`` and the
    batch's dense matrices together hold at most ``deterministic_dense_size²`` entries."""
    size = settings.deterministic_dense_size.value()
    n = A.shape[-1]
    return 0 < n <= size and math.prod(A.batch_shape) * n * n <= size * size


def dense_inv_quad_logdet(A: LinearOperator, rhs: Tensor | None, want_logdet: bool) -> tuple[Tensor, Tensor] | None:
    """``(r^T K^{-1} r`` per column ``(*batch, t)``, ``log det K`` ``(*batch)``) by dense Cholesky, with autograd
    gradients; ``None`` where the Cholesky fails even with GPyTorch's jitter (``NotPSDError``)."""
    K = A.to_dense()  # (*batch, n, n), differentiable in the kernel's parameters
    try:
        L = psd_safe_cholesky(K)
    except NotPSDError:
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
