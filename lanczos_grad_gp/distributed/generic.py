r"""``ShardedKernelLinearOperator``: any GPyTorch kernel, row-sharded, differentiated by autograd per row block.

Rank ``r``'s rows ``K[\mathcal R_r, :] = k(X[\mathcal R_r], X; θ)`` are evaluated by the wrapped
kernel itself, a block of ``b`` rows at a time (``b · n ≈ 2^22`` entries), as a pure function of the
representation ``(x1, x2, θ_1, …, θ_m)`` (``torch.func.functional_call`` with the kernel's own
parameters ``θ_j`` swapped for the representation's tensors):

* products: ``K[\mathcal R_r, :] Q`` from a cached dense ``(n_r × n)`` block (``dense=True``) or from
  blocks recomputed at every product;
* gradient: per block, ``∂/∂θ sum(L_b ∘ (K_b(θ) R))`` by autograd, summed over the blocks and then
  over the ranks (:class:`~lanczos_grad_gp.distributed.operator.RowShardedLinearOperator`);
* entries, diagonal and ``to_dense``: the kernel on the requested rows/columns, locally and
  differentiably (the preconditioner control variate back-propagates through them).

A row block is ``k(X_b, X)`` with ``X_b ≠ X``, so GPyTorch does not zero the self-distances of a
block exactly: for kernels that take a square root of a distance (Matérn) a diagonal entry can be
off by ``O(sqrt(eps))`` relative. The fused
stationary path (:mod:`.stationary`) has no such error; prefer it for RBF / Matérn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import gpytorch
import torch
from linear_operator import to_dense
from torch import Tensor

from .comm import ShardSpec
from .operator import RowShardedLinearOperator, row_block_entries

__all__ = ["KernelRef", "ShardedKernelLinearOperator"]

#: entries of one row block of a generic kernel (GPyTorch makes a few temporaries of its size): 32 MiB in float64
_BLOCK_ENTRIES = 2**22
#: the same on an accelerator (amortises GPyTorch's per-call overhead at large n): 256 MiB in float32
_GPU_BLOCK_ENTRIES = 2**26
#: entries per piece when a scattered ``_get_indices`` request is evaluated piecewise
_PIECE = 1024


@dataclass(frozen=True, eq=False)
class KernelRef:
    """The wrapped kernel and its parameter names, carried as ONE non-tensor argument.

    (``LinearOperator.to``/``detach`` would otherwise move or copy a module argument.)
    """

    kernel: gpytorch.kernels.Kernel
    names: tuple[str, ...]

    def __deepcopy__(self, memo: dict) -> KernelRef:
        return self


class _Evaluate(torch.nn.Module):
    """``kernel(x1, x2)`` as a dense tensor (or its diagonal), evaluated eagerly."""

    def __init__(self, kernel: gpytorch.kernels.Kernel) -> None:
        super().__init__()
        self.kernel = kernel

    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False) -> Tensor:
        with gpytorch.settings.lazily_evaluate_kernels(False):
            out = self.kernel(x1, x2, diag=diag)
        return out if diag else to_dense(out)


class ShardedKernelLinearOperator(RowShardedLinearOperator):
    """Row-sharded ``k(X, X; θ)`` of any GPyTorch kernel (module docstring).

    Args:
        x1, x2: ``(n, d)`` training inputs (the same points; the kernel applies its own ``active_dims``).
        *params: the kernel's parameters, in the order of ``kernel_ref.names``.
        kernel_ref: the kernel and its parameter names (``named_parameters()`` order).
        shard: process group and rank; dense: cache this rank's ``(n_r × n)`` block.
    """

    def __init__(
        self, x1: Tensor, x2: Tensor, *params: Tensor, kernel_ref: KernelRef, shard: ShardSpec, dense: bool
    ) -> None:
        if len(params) != len(kernel_ref.names):
            raise ValueError(f"expected {len(kernel_ref.names)} kernel parameters, got {len(params)}.")
        super().__init__(x1, x2, *params, shard=shard, dense=dense, kernel_ref=kernel_ref)
        self.kernel_ref = kernel_ref

    def _evaluate(self, x1: Tensor, x2: Tensor, params: Sequence[Tensor], diag: bool = False) -> Tensor:
        """``k(x1, x2; params)`` (``(m, m')``, or ``(m,)`` with ``diag``), with a graph when ``params`` need one."""
        tensors = {f"kernel.{name}": t for name, t in zip(self.kernel_ref.names, params, strict=True)}
        return torch.func.functional_call(_Evaluate(self.kernel_ref.kernel), tensors, (x1, x2), {"diag": diag})

    def _chunks(self) -> list[slice]:
        """This rank's rows in blocks of ``≈ 2^22 / n`` rows (``2^26 / n`` on an accelerator)."""
        start, stop, n = self.local_rows.start, self.local_rows.stop, self.x2.shape[-2]
        b = max(1, row_block_entries(self.x1.device, _BLOCK_ENTRIES, _GPU_BLOCK_ENTRIES) // max(n, 1))
        return [slice(i, min(i + b, stop)) for i in range(start, stop, b)]

    def _local_block(self) -> Tensor:
        """This rank's rows ``(n_r, n)``, built once without a graph (dense mode)."""
        if "block" not in self._cache:
            with torch.no_grad():
                start = self.local_rows.start
                out = self.x1.new_empty(self.local_rows.stop - start, self.x2.shape[-2])
                for rows in self._chunks():
                    out[rows.start - start : rows.stop - start] = self._evaluate(
                        self.x1[rows], self.x2, self.kernel_params
                    )
                self._cache["block"] = out
        return self._cache["block"]

    def _local_matmul(self, rhs: Tensor) -> Tensor:
        if self.dense:
            return self._local_block() @ rhs
        parts = [self._evaluate(self.x1[rows], self.x2, self.kernel_params) @ rhs for rows in self._chunks()]
        return torch.cat(parts, 0) if parts else rhs.new_zeros(0, rhs.shape[-1])

    def _local_bilinear_derivative(self, left_rows: Tensor, right: Tensor) -> tuple[Tensor | None, ...]:
        originals = [self.x1, self.x2, *self.kernel_params]
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in originals]
        targets = [i for i, t in enumerate(leaves) if t.requires_grad]
        grads: list[Tensor | None] = [None] * len(leaves)
        start = self.local_rows.start
        with torch.enable_grad():
            for rows in self._chunks():
                block = self._evaluate(leaves[0][rows], leaves[1], leaves[2:])  # (b, n), with a graph
                value = (left_rows[rows.start - start : rows.stop - start] * (block @ right)).sum()
                parts = torch.autograd.grad(value, [leaves[i] for i in targets], allow_unused=True)
                for i, g in zip(targets, parts, strict=True):
                    if g is not None:
                        grads[i] = g if grads[i] is None else grads[i] + g
        # zeros, not None, for every wanted gradient: the all-reduce needs the same layout on every rank
        return tuple(
            (torch.zeros_like(t) if g is None else g) if t.requires_grad else None
            for g, t in zip(grads, originals, strict=True)
        )

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        """Entries ``K[row_index, col_index]`` (unbatched: no batch indices), locally and differentiably."""
        rows, cols = torch.broadcast_tensors(row_index, col_index)
        return self._entries(rows.reshape(-1), cols.reshape(-1)).view(rows.shape)

    def _entries(self, rows: Tensor, cols: Tensor) -> Tensor:
        """``K[rows_i, cols_i]`` from one kernel evaluation on the distinct rows × columns (piecewise if scattered)."""
        ru, ri = torch.unique(rows, return_inverse=True)
        cu, ci = torch.unique(cols, return_inverse=True)
        if ru.numel() * cu.numel() <= 4 * rows.numel() + 4096:  # a pivot row (1 × n), the n × k columns
            return self._evaluate(self.x1[ru], self.x2[cu], self.kernel_params)[ri, ci]
        return torch.cat([self._entries(r, c) for r, c in zip(rows.split(_PIECE), cols.split(_PIECE), strict=True)])

    def _diagonal(self) -> Tensor:
        return self._evaluate(self.x1, self.x2, self.kernel_params, diag=True)

    def to_dense(self) -> Tensor:
        """The full ``(n, n)`` kernel, locally (for small ``n`` only; differentiable)."""
        return self._evaluate(self.x1, self.x2, self.kernel_params)
