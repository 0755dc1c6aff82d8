"""``LanczosGradLinearOperator``: any LinearOperator, with forward-only Lanczos inv-quad / log-det.

Wrap an operator to make its ``inv_quad_logdet``, ``inv_quad`` and ``logdet`` use
:func:`lanczos_grad_gp.inv_quad_logdet` regardless of the ``use_lanczos_grad`` flag and of
``max_cholesky_size``; every other operation is the base operator's own::

    K = LanczosGradLinearOperator(AddedDiagLinearOperator(kernel_op, noise_op))
    inv_quad, logdet = K.inv_quad_logdet(y.unsqueeze(-1), logdet=True)
"""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator, to_linear_operator
from torch import Tensor

from .._compat import (
    bilinear_derivative,
    expand_batch,
    get_entries,
    operator_diagonal,
    operator_matmul,
    transpose_nonbatch,
)
from ..functions.inv_quad_logdet import inv_quad_logdet

__all__ = ["LanczosGradLinearOperator"]


class LanczosGradLinearOperator(LinearOperator):
    """Delegates to ``base`` except for ``inv_quad_logdet`` / ``inv_quad`` / ``logdet``.

    Args:
        base: a square ``(*batch, n, n)`` positive definite LinearOperator (or tensor).
    """

    #: the flag's router leaves this operator's own (Lanczos) method in place at every size
    _lanczos_grad_gp_operator = True

    def __init__(self, base: LinearOperator | Tensor) -> None:
        base = to_linear_operator(base)
        if base.shape[-1] != base.shape[-2]:
            raise ValueError(f"LanczosGradLinearOperator needs a square operator; got shape {tuple(base.shape)}.")
        super().__init__(base)
        self.base = base

    # --- delegated structure -------------------------------------------------------------
    def _matmul(self, rhs: Tensor) -> Tensor:
        return operator_matmul(self.base, rhs)

    def _size(self) -> torch.Size:
        return self.base.shape

    def _transpose_nonbatch(self) -> LinearOperator:
        # Mathematically symmetric, but the base's tensors need not be (their gradients differ by a transpose).
        return self.__class__(transpose_nonbatch(self.base))

    def _diagonal(self) -> Tensor:
        return operator_diagonal(self.base)

    def _get_indices(self, row_index, col_index, *batch_indices) -> Tensor:
        return get_entries(self.base, row_index, col_index, *batch_indices)

    def _expand_batch(self, batch_shape: torch.Size) -> LinearOperator:
        return self.__class__(expand_batch(self.base, batch_shape))

    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor) -> tuple[Tensor | None, ...]:
        return bilinear_derivative(self.base, left_vecs, right_vecs)

    def to_dense(self) -> Tensor:
        return self.base.to_dense()

    # --- the Lanczos routine ---------------------------------------------------------------
    def inv_quad_logdet(
        self,
        inv_quad_rhs: Tensor | None = None,
        logdet: bool | None = False,
        reduce_inv_quad: bool | None = True,
    ) -> tuple[Tensor, Tensor]:
        return inv_quad_logdet(self.base, inv_quad_rhs, bool(logdet), bool(reduce_inv_quad))

    def inv_quad(self, inv_quad_rhs: Tensor, reduce_inv_quad: bool = True) -> Tensor:
        return self.inv_quad_logdet(inv_quad_rhs, logdet=False, reduce_inv_quad=reduce_inv_quad)[0]

    def logdet(self) -> Tensor:
        return self.inv_quad_logdet(None, logdet=True)[1]
