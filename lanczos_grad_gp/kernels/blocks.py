r"""Row blocks of a stationary kernel's unit-outputscale matrix ``g(r²)``, built in place without a graph.

The inputs are scaled and centred once and augmented so that ONE ``(b × (D+2))((D+2) × N)`` GEMM
gives a block of ``r²`` (or ``−r²/2`` for RBF, one ``exp_`` from ``g``); blocks are written into
caller-owned buffers, so a reused buffer never page-faults. Used by the fused operator's products
(:mod:`.stationary`) and the closed-form derivative (:mod:`.derivative`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .profiles import get_profile

__all__ = [
    "UnitBlocks",
    "fill_matrix",
    "blocks_matmul",
    "row_blocks",
    "same_inputs",
    "sum_to_shape",
    "unit_kernel_matrix",
    "unit_kernel_matmul",
    "BUILD_BLOCK_ENTRIES",
]

#: entries of one row block when filling the dense matrix
BUILD_BLOCK_ENTRIES = 2**20


def _scaled_centred(x1: Tensor, x2: Tensor, lengthscale: Tensor) -> tuple[Tensor, Tensor]:
    """``u = x1/ℓ``, ``u' = x2/ℓ`` shifted by a common mean (distances unchanged, no cancellation)."""
    u1, u2 = x1 / lengthscale, x2 / lengthscale
    mu = u1.mean(-2, keepdim=True) if u1.shape[-2] >= u2.shape[-2] else u2.mean(-2, keepdim=True)
    return u1 - mu, u2 - mu


def same_inputs(x1: Tensor, x2: Tensor) -> bool:
    """``x1`` and ``x2`` are the same points (the training covariance): its diagonal distances are 0."""
    return x1 is x2 or (x1.shape == x2.shape and bool(torch.equal(x1, x2)))


def row_blocks(m: int, n: int, max_entries: int) -> list[slice]:
    b = max(1, min(m, max_entries // max(n, 1)))
    return [slice(i, min(i + b, m)) for i in range(0, m, b)]


class UnitBlocks:
    """Row blocks of ``r²`` or ``g(r²)`` for fixed inputs, written in place into caller-owned buffers.

    The inputs are scaled and centred once and augmented so that ONE ``(b × (D+2))((D+2) × N)``
    product gives the block directly (no graph, no temporaries, a reused buffer never page-faults):

    * ``[-2u, |u|², 1] · [u', 1, |u'|²]ᵀ = |u|² − 2u·u' + |u'|² = r²``;
    * for RBF ``[u, -|u|²/2, -1/2] · [u', 1, |u'|²]ᵀ = −r²/2``, so ``g`` is one ``exp_`` away.
    """

    def __init__(self, x1: Tensor, x2: Tensor, lengthscale: Tensor, nu: float | None) -> None:
        u1, u2 = _scaled_centred(x1.detach(), x2.detach(), lengthscale.detach())
        self.batch = torch.broadcast_shapes(u1.shape[:-2], u2.shape[:-2])
        u1, u2 = u1.expand(*self.batch, *u1.shape[-2:]), u2.expand(*self.batch, *u2.shape[-2:])
        self.u1, self.u2 = u1, u2  # (*batch, M, D), (*batch, N, D): scaled, centred
        n1sq, n2sq = u1.square().sum(-1, keepdim=True), u2.square().sum(-1, keepdim=True)
        one1, one2 = torch.ones_like(n1sq), torch.ones_like(n2sq)
        self.sq_left = torch.cat([-2 * u1, n1sq, one1], -1)  # (*batch, M, D+2)
        self.half_left = torch.cat([u1, -0.5 * n1sq, -0.5 * one1], -1)  # (*batch, M, D+2)
        self.right_t = torch.cat([u2, one2, n2sq], -1).mT  # (*batch, D+2, N)
        self.same = same_inputs(x1, x2)
        self.nu = nu
        self.profile = get_profile(nu)
        self.shape = (u1.shape[-2], u2.shape[-2])

    def _zero_diagonal(self, rows: slice, out: Tensor) -> None:
        if self.same:  # exact 0 distance of a point to itself, not the expansion's rounding
            out.diagonal(offset=rows.start, dim1=-2, dim2=-1).fill_(0)

    def fill_sq(self, rows: slice, out: Tensor) -> Tensor:
        """Write ``r²`` (clamped at 0) of rows ``rows`` into ``out`` (``(*batch, len(rows), N)``)."""
        torch.matmul(self.sq_left[..., rows, :], self.right_t, out=out)
        self._zero_diagonal(rows, out)
        return out.clamp_min_(0)

    def fill(self, rows: slice, out: Tensor) -> Tensor:
        """Write ``g(r²)`` of rows ``rows`` into ``out`` (``(*batch, len(rows), N)``) and return it."""
        if self.profile.gaussian:
            torch.matmul(self.half_left[..., rows, :], self.right_t, out=out)  # −r²/2
            self._zero_diagonal(rows, out)
            return out.clamp_max_(0).exp_()
        return self.profile.fill_(self.fill_sq(rows, out))


def fill_matrix(blocks: UnitBlocks, block_entries: int | None = None) -> Tensor:
    """Dense ``g(r²)`` ``(*batch, M, N)`` of ``blocks``: one allocation, filled in place block by block."""
    m, n = blocks.shape
    out = blocks.right_t.new_empty(*blocks.batch, m, n)
    for rows in row_blocks(m, n, block_entries or BUILD_BLOCK_ENTRIES):
        if len(blocks.batch):  # a batched row slice is not contiguous: fill a temporary, copy
            out[..., rows, :] = blocks.fill(rows, out.new_empty(*blocks.batch, rows.stop - rows.start, n))
        else:
            blocks.fill(rows, out[rows])
    return out


def blocks_matmul(blocks: UnitBlocks, rhs: Tensor, block_entries: int | None = None) -> Tensor:
    """``g(r²) @ rhs`` ``(*batch, M, k)`` of ``blocks``, row block by row block in one reused buffer."""
    m, n = blocks.shape
    slices = row_blocks(m, n, block_entries or BUILD_BLOCK_ENTRIES)
    if not slices:  # no rows
        return rhs.new_zeros(*torch.broadcast_shapes(blocks.batch, rhs.shape[:-2]), 0, rhs.shape[-1])
    buf = blocks.right_t.new_empty(*blocks.batch, slices[0].stop - slices[0].start, n)
    parts = [blocks.fill(rows, buf[..., : rows.stop - rows.start, :]) @ rhs for rows in slices]
    return torch.cat(parts, dim=-2)


def unit_kernel_matrix(
    x1: Tensor, x2: Tensor, lengthscale: Tensor, nu: float | None, *, block_entries: int | None = None
) -> Tensor:
    """Dense ``g(r²)`` ``(*batch, M, N)``: one allocation, filled in place row block by row block (no graph)."""
    with torch.no_grad():
        return fill_matrix(UnitBlocks(x1, x2, lengthscale, nu), block_entries)


def unit_kernel_matmul(
    x1: Tensor, x2: Tensor, lengthscale: Tensor, nu: float | None, rhs: Tensor, *, block_entries: int | None = None
) -> Tensor:
    """``g(r²) @ rhs`` ``(*batch, M, k)`` by row blocks in one reused buffer: ``O(block)`` extra memory."""
    with torch.no_grad():
        return blocks_matmul(UnitBlocks(x1, x2, lengthscale, nu), rhs, block_entries)


def sum_to_shape(g: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a broadcast gradient back to ``shape``."""
    while g.dim() > len(shape):
        g = g.sum(0)
    for i, s in enumerate(shape):
        if s == 1 and g.shape[i] != 1:
            g = g.sum(i, keepdim=True)
    return g
