r"""``ShardedStationaryLinearOperator``: a fused RBF / Matérn kernel ``s · g(r²)``, row-sharded, closed-form gradient.

The same closed forms as the single-process fused operator
(:class:`~lanczos_grad_gp.kernels.stationary.StationaryKernelLinearOperator`), restricted to this
rank's rows ``\mathcal R_r``:

* products: the unit-outputscale rows ``g(r²)[\mathcal R_r, :]`` (``n_r × n``) are written in place
  by :class:`~lanczos_grad_gp.kernels.blocks.UnitBlocks` of the FULL inputs (so the self-distances
  ``r²_ii`` are exactly 0, as in the single-process matrix), kept dense or recomputed per product;
  ``K[\mathcal R_r, :] Q = s · g(r²)[\mathcal R_r, :] Q``;
* gradient: :func:`~lanczos_grad_gp.kernels.derivative.stationary_bilinear_derivative` on
  ``x1 = X[\mathcal R_r]`` against all of ``x2 = X`` with ``L[\mathcal R_r]`` and the full ``R``
  (it works on any row range), giving the partial ``∂s``, ``∂ℓ``, ``∂X`` of this rank's rows; the
  ranks' partial sums are all-reduced by the base class. ``O(n_r · n · (k + d))`` flops per rank;
* entries and diagonal: computed locally. A pivot row is one ``1 × n`` block of the same
  ``UnitBlocks`` (no graph); differentiable requests (the control variate's ``n × k`` columns) and
  ``to_dense`` go to a full-size, never-dense ``StationaryKernelLinearOperator`` on the replicated
  inputs, exactly as in a single process.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._compat import get_entries, operator_diagonal
from ..kernels.blocks import BUILD_BLOCK_ENTRIES, UnitBlocks, row_blocks
from ..kernels.derivative import stationary_bilinear_derivative
from ..kernels.stationary import StationaryKernelLinearOperator
from .comm import ShardSpec
from .operator import RowShardedLinearOperator, row_block_entries

__all__ = ["ShardedStationaryLinearOperator"]

#: graph-free entry requests over at most this many distinct rows are filled from ``UnitBlocks`` rows
_MAX_FILL_ROWS = 16
#: entries of a recomputed product block / of a gradient block on an accelerator (256 MiB / 64 MiB in float32)
_GPU_PRODUCT_ENTRIES, _GPU_GRADIENT_ENTRIES = 2**26, 2**24
#: entries of a gradient block on a CPU (the single-process closed form's default: stays in cache)
_CPU_GRADIENT_ENTRIES = 2**18


class ShardedStationaryLinearOperator(RowShardedLinearOperator):
    """Row-sharded ``s · g(r²(X, X; ℓ))`` for RBF (``nu=None``) or Matérn (``nu`` ∈ {0.5, 1.5, 2.5}).

    Args:
        x1, x2: ``(n, d)`` training inputs (the same points, after the kernel's ``active_dims``).
        lengthscale: ``(1, d)`` or ``(1, 1)``; outputscale: ``()``.
        shard: process group and rank; dense: keep this rank's ``(n_r × n)`` unit block in memory.
        nu: ``None`` for RBF, else the Matérn smoothness.
    """

    def __init__(
        self,
        x1: Tensor,
        x2: Tensor,
        lengthscale: Tensor,
        outputscale: Tensor,
        *,
        shard: ShardSpec,
        dense: bool,
        nu: float | None = None,
    ) -> None:
        super().__init__(x1, x2, lengthscale, outputscale, shard=shard, dense=dense, nu=nu)
        self.nu = None if nu is None else float(nu)
        self.lengthscale, self.outputscale = lengthscale, outputscale

    def _unit_blocks(self) -> UnitBlocks:
        """``UnitBlocks`` of the full inputs (scaled, centred once; no graph)."""
        if "blocks" not in self._cache:
            with torch.no_grad():
                self._cache["blocks"] = UnitBlocks(self.x1, self.x2, self.lengthscale, self.nu)
        return self._cache["blocks"]

    def _chunks(self, entries: int) -> list[slice]:
        """This rank's rows in blocks of ``≈ entries / n`` rows (global row indices)."""
        start, stop, n = self.local_rows.start, self.local_rows.stop, self.x2.shape[-2]
        return [slice(start + s.start, start + s.stop) for s in row_blocks(stop - start, n, entries)]

    def _local_unit(self) -> Tensor:
        """``g(r²)`` of this rank's rows, ``(n_r, n)``: one allocation, filled in place (dense mode)."""
        if "unit" not in self._cache:
            with torch.no_grad():
                blocks, start = self._unit_blocks(), self.local_rows.start
                out = blocks.right_t.new_empty(self.local_rows.stop - start, self.x2.shape[-2])
                for rows in self._chunks(BUILD_BLOCK_ENTRIES):
                    blocks.fill(rows, out[rows.start - start : rows.stop - start])
                self._cache["unit"] = out
        return self._cache["unit"]

    def _local_matmul(self, rhs: Tensor) -> Tensor:
        s = self.outputscale.detach()
        if self.dense:
            return s * (self._local_unit() @ rhs)
        entries = row_block_entries(rhs.device, BUILD_BLOCK_ENTRIES, _GPU_PRODUCT_ENTRIES)
        blocks, chunks = self._unit_blocks(), self._chunks(entries)
        if not chunks:  # no rows on this rank (n < p)
            return rhs.new_zeros(0, rhs.shape[-1])
        buf = blocks.right_t.new_empty(chunks[0].stop - chunks[0].start, self.x2.shape[-2])  # reused
        parts = [blocks.fill(rows, buf[: rows.stop - rows.start]) @ rhs for rows in chunks]
        return s * torch.cat(parts, 0)

    def _local_bilinear_derivative(self, left_rows: Tensor, right: Tensor) -> tuple[Tensor | None, ...]:
        x1, x2, ls, os_ = self.x1, self.x2, self.lengthscale, self.outputscale
        need = (x1.requires_grad, x2.requires_grad, ls.requires_grad, os_.requires_grad)
        rows = self.local_rows
        entries = row_block_entries(x1.device, _CPU_GRADIENT_ENTRIES, _GPU_GRADIENT_ENTRIES)
        g_rows, g_x2, g_ls, g_s = stationary_bilinear_derivative(
            x1[rows], x2, ls, os_, self.nu, left_rows, right, need=need, block_entries=entries
        )
        g_x1 = None
        if g_rows is not None:  # this rank's rows of ∂X; the other rows come from the other ranks
            g_x1 = x1.new_zeros(x1.shape)
            g_x1[rows] = g_rows
        return g_x1, g_x2, g_ls, g_s

    def _full(self) -> StationaryKernelLinearOperator:
        """The full-size single-process operator on the replicated inputs (never dense: O(n d) to build)."""
        return StationaryKernelLinearOperator(
            self.x1, self.x2, lengthscale=self.lengthscale, outputscale=self.outputscale, nu=self.nu, dense=False
        )

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        """Entries, locally: a few rows from ``UnitBlocks`` (exact zero self-distance), the rest as in one process."""
        graph_free = not (torch.is_grad_enabled() and self.requires_grad)
        if graph_free and not batch_indices:
            rows, cols = torch.broadcast_tensors(row_index, col_index)
            ru, ri = torch.unique(rows.reshape(-1), return_inverse=True)
            if ru.numel() <= _MAX_FILL_ROWS:
                blocks, n = self._unit_blocks(), self.x2.shape[-2]
                unit = blocks.right_t.new_empty(ru.numel(), n)
                for j, r in enumerate(ru.tolist()):  # a pivot row: one (1 × n) product
                    blocks.fill(slice(r, r + 1), unit[j : j + 1])
                return (self.outputscale.detach() * unit[ri, cols.reshape(-1)]).view(rows.shape)
        return get_entries(self._full(), row_index, col_index, *batch_indices)

    def _diagonal(self) -> Tensor:
        return operator_diagonal(self._full())

    def to_dense(self) -> Tensor:
        """The full ``(n, n)`` kernel, locally (for small ``n`` only)."""
        return self._full().to_dense()
