r"""Row-chunked kernel operators: exact-GP linear algebra without ever forming the ``n x n`` kernel.

:class:`ChunkedKernelLinearOperator` is a :class:`linear_operator.operators.KernelLinearOperator`
(the operator GPyTorch's KeOps kernels return: ``x1``, ``x2``, a ``covar_func`` and the
hyperparameters as tensors) whose heavy operations work on row blocks of ``chunk_size`` rows:

* ``_matmul(R)``: ``K R = [K(x1[b], x2) R]_b`` — ``O(chunk · n)`` memory per block;
* ``_bilinear_derivative(L, R)``: ``∂/∂θ Σ_i L_i^T K(θ) R_i = Σ_b ∂/∂θ sum(L[b] ∘ (K_b(θ) R))`` with
  autograd per block — ``O(n · k + chunk · n)`` memory instead of the dense default's ``O(n²)``;
* ``_diagonal`` and ``_get_indices`` (pivoted Cholesky fetches single rows) from the parent class,
  which evaluate ``covar_func`` on the requested entries only.

This is exactly the interface :func:`lanczos_grad_gp.inv_quad_logdet` uses (``_matmul``, diagonal,
pivoted Cholesky, ``_bilinear_derivative``; docs/mathematics.md, "Integration with GPyTorch,
linear_operator and BoTorch"), so a full UCI protein GP (n ≈ 41k) runs in a few GB.
:class:`~lanczos_grad_gp.kernels.chunked_kernel.ChunkedKernel` wraps a GPyTorch ``RBFKernel`` /
``MaternKernel`` (optionally inside a ``ScaleKernel``) so an existing model uses the operator
unchanged::

    model.covar_module = ChunkedKernel(ScaleKernel(RBFKernel(ard_num_dims=d)))
    with lgg.settings.use_lanczos_grad():
        loss = -mll(model(train_x), train_y)   # never forms the n x n kernel
        loss.backward()

Example:
    >>> import torch
    >>> from lanczos_grad_gp.kernels.profiles import rbf_covar
    >>> x = torch.randn(50, 3, dtype=torch.float64)
    >>> ls, os_ = torch.ones(1, 3, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    >>> K = ChunkedKernelLinearOperator(x, x, covar_func=rbf_covar, lengthscale=ls, outputscale=os_, chunk_size=7)
    >>> dense = rbf_covar(x, x, lengthscale=ls, outputscale=os_)
    >>> bool(torch.allclose(K @ torch.ones(50, 1, dtype=torch.float64), dense.sum(-1, keepdim=True)))
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from linear_operator.operators import KernelLinearOperator, LinearOperator
from torch import Tensor

from .._compat import kernel_operator_kwargs
from .blocks import sum_to_shape

__all__ = ["ChunkedKernelLinearOperator", "default_chunk_size"]

#: entries of one ``chunk x n`` kernel block when ``chunk_size`` is not given (128 MiB in float64)
_BLOCK_ENTRIES = 2**24


def default_chunk_size(n: int) -> int:
    """Rows per block so one ``chunk x n`` block holds about ``2**24`` entries (at least 1 row)."""
    return max(1, min(n, _BLOCK_ENTRIES // max(n, 1)))


class ChunkedKernelLinearOperator(KernelLinearOperator):
    """A kernel matrix ``K(x1, x2; θ)`` evaluated ``chunk_size`` rows at a time.

    Args:
        x1: ``(*batch, M, D)`` row inputs.
        x2: ``(*batch, N, D)`` column inputs.
        covar_func: ``covar_func(x1, x2, **params) -> (*batch, M', N')`` dense block; must
            broadcast over leading batch dimensions (the :class:`KernelLinearOperator` contract,
            used by ``_diagonal`` and ``_get_indices``).
        num_nonbatch_dimensions: trailing non-batch dimensions of each tensor parameter (as in
            :class:`KernelLinearOperator`; default 0, e.g. ``{"lengthscale": 2}``).
        chunk_size: rows per block (default :func:`default_chunk_size` of ``N``).
        params: the hyperparameters (tensors are differentiable inputs) and other keyword
            arguments of ``covar_func``.
    """

    def __init__(
        self,
        x1: Tensor,
        x2: Tensor,
        covar_func: Callable[..., Tensor],
        num_outputs_per_input: tuple[int, int] = (1, 1),
        num_nonbatch_dimensions: dict[str, int] | None = None,
        chunk_size: int | None = None,
        **params: Tensor | Any,
    ) -> None:
        if tuple(num_outputs_per_input) != (1, 1):
            raise ValueError("ChunkedKernelLinearOperator supports one output per input only.")
        if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
            raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size!r}.")
        super().__init__(
            x1,
            x2,
            covar_func=covar_func,
            num_outputs_per_input=(1, 1),
            num_nonbatch_dimensions=num_nonbatch_dimensions,
            **params,
        )
        self.chunk_size = int(chunk_size) if chunk_size is not None else default_chunk_size(self.x2.shape[-2])
        # stored for representation_tree()/detach(); not forwarded to covar_func
        kernel_operator_kwargs(self)[1]["chunk_size"] = chunk_size

    def _block(self, rows: slice, x1: Tensor | None = None, params: dict[str, Tensor] | None = None) -> Tensor:
        x1 = self.x1 if x1 is None else x1
        params = self.tensor_params if params is None else params
        return self.covar_func(x1[..., rows, :], self.x2, **params, **self.nontensor_params)

    def _row_slices(self) -> list[slice]:
        m, c = self.x1.shape[-2], self.chunk_size
        return [slice(i, min(i + c, m)) for i in range(0, m, c)]

    def _matmul(self, rhs: Tensor) -> Tensor:
        """``K @ rhs`` block by block (``O(chunk · N)`` extra memory)."""
        blocks = [self._block(rows) @ rhs for rows in self._row_slices()]
        return torch.cat(blocks, dim=-2)

    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor) -> tuple[Tensor | None, ...]:
        r"""Gradients of ``Σ_i left_i^T K(θ) right_i`` w.r.t. the representation, block by block.

        Each block ``K_b = K(x1[b], x2; θ)`` is rebuilt with autograd, contracted to a scalar
        ``sum(left[b] ∘ (K_b right))`` and back-propagated at once, so the peak memory is one block
        plus ``left``/``right``. Returns one entry per tensor of :meth:`representation` (``x1``,
        ``x2``, then the tensor parameters in sorted name order); ``None`` for those not requiring grad.
        """
        if left_vecs.dim() == 1:
            left_vecs, right_vecs = left_vecs.unsqueeze(-1), right_vecs.unsqueeze(-1)
        diff, _ = kernel_operator_kwargs(self)
        names = list(diff.keys())
        originals = [self.x1, self.x2, *(diff[k] for k in names)]
        wants = [t.requires_grad for t in originals]
        if not any(wants):
            return (None,) * len(originals)
        leaves = [t.detach().requires_grad_(w) for t, w in zip(originals, wants, strict=False)]
        x1, x2 = leaves[0], leaves[1]
        params = dict(zip(names, leaves[2:], strict=False))
        grads: list[Tensor | None] = [None] * len(leaves)
        targets = [(i, t) for i, t in enumerate(leaves) if t.requires_grad]
        with torch.enable_grad():
            for rows in self._row_slices():
                block = self.covar_func(x1[..., rows, :], x2, **params, **self.nontensor_params)
                value = (left_vecs[..., rows, :] * (block @ right_vecs)).sum()
                parts = torch.autograd.grad(value, [t for _, t in targets], allow_unused=True)
                for (i, _), g in zip(targets, parts, strict=False):
                    if g is not None:
                        grads[i] = g if grads[i] is None else grads[i] + g
        out: list[Tensor | None] = []
        for g, t in zip(grads, originals, strict=False):
            out.append(None if g is None else sum_to_shape(g, t.shape))
        return tuple(out)

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        """Entries ``K[row_index, col_index]``; one small dense block over the distinct rows/columns.

        Pivoted Cholesky asks for one full row per step (one distinct row, all columns): that is a
        ``1 x N`` block here, instead of the parent's ``N`` batched ``1 x 1`` kernel evaluations.
        Falls back to the parent for batched operators or when the block would be much larger
        than the request.
        """
        if batch_indices or len(self.batch_shape) or not torch.is_tensor(row_index) or not torch.is_tensor(col_index):
            return super()._get_indices(row_index, col_index, *batch_indices)
        rows, cols = torch.broadcast_tensors(row_index, col_index)
        ru, ri = torch.unique(rows, return_inverse=True)
        cu, ci = torch.unique(cols, return_inverse=True)
        if ru.numel() * cu.numel() > 4 * rows.numel() + 4096:
            return super()._get_indices(row_index, col_index, *batch_indices)
        block = self.covar_func(self.x1[ru], self.x2[cu], **self.tensor_params, **self.nontensor_params)
        return block[ri, ci]

    def to_dense(self) -> Tensor:
        """The dense kernel (for tests and small ``n`` only: ``O(M · N)`` memory)."""
        return torch.cat([self._block(rows) for rows in self._row_slices()], dim=-2)

    def _expand_batch(self, batch_shape: torch.Size) -> LinearOperator:
        op = super()._expand_batch(batch_shape)
        if isinstance(op, ChunkedKernelLinearOperator):
            op.chunk_size = self.chunk_size
        return op
