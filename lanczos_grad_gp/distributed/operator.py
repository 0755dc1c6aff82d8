r"""``RowShardedLinearOperator``: the training covariance ``K(X, X; θ)`` with its rows sharded over the ranks.

The operator stands for the full ``n × n`` kernel on every rank, but rank ``r`` only ever computes
its rows ``\mathcal R_r`` (:class:`~lanczos_grad_gp.distributed.comm.RowPartition`):

.. math::
    K Q = \operatorname{allgather}_r\big(K[\mathcal R_r, :]\, Q\big),\qquad
    \frac{∂}{∂θ} \operatorname{tr}(L^\top K R) = \operatorname{allreduce}_r
        \Big(\frac{∂}{∂θ} \operatorname{tr}\big(L[\mathcal R_r]^\top K[\mathcal R_r, :]\, R\big)\Big),

with ``Q`` (``n × k``, the Lanczos block) and the gradient factors ``L, R`` (``n × R``) replicated on
every rank — they are, because every rank runs the same recurrence on the same all-gathered
products with the same seeded probes. Entries (``_diagonal``, ``_get_indices``: the pivoted
Cholesky's rows, the control variate's differentiable ``n × k`` columns) and ``to_dense`` are
computed locally from the replicated inputs: no communication, and cheaper than fetching them
from their owners (one row costs ``O(n d)``, a round trip at least as much).

Subclasses (:mod:`.generic`, :mod:`.stationary`) provide the local rows' product and gradient;
this class owns the collectives. The representation is ``(x1, x2, *parameters)``; ``x1`` and ``x2``
are the same training inputs (the operator is symmetric).
"""

from __future__ import annotations

from typing import Any

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from .comm import ShardSpec, all_gather_rows, all_reduce_sum

__all__ = ["RowShardedLinearOperator", "row_block_entries"]


def row_block_entries(device: torch.device, cpu: int, gpu: int) -> int:
    """Entries of one recomputed row block: ``cpu`` (cache-sized) on a CPU, ``gpu`` on an accelerator.

    At ``n = 10⁶`` a cache-sized block is one row; on a GPU that is one kernel launch per row, so
    accelerators get blocks large enough (tens of rows) to amortise the launches.
    """
    return cpu if device.type == "cpu" else max(cpu, gpu)


class RowShardedLinearOperator(LinearOperator):
    """Base class: ``(n × n)`` symmetric kernel whose products and gradients are computed by row blocks per rank.

    Args:
        x1, x2: ``(n, d)`` the training inputs (the same points).
        *params: the differentiable tensors the kernel is built from.
        shard: the process group and this rank (:class:`~lanczos_grad_gp.distributed.comm.ShardSpec`).
        dense: keep this rank's ``(n_r × n)`` block in memory for the products (else recompute row
            blocks at every product: ``O(block)`` memory).
        kwargs: further non-tensor arguments of the subclass (reconstructed by ``representation_tree``).
    """

    def __init__(self, x1: Tensor, x2: Tensor, *params: Tensor, shard: ShardSpec, dense: bool, **kwargs: Any) -> None:
        if x1.dim() != 2 or x2.shape != x1.shape:
            raise ValueError(
                f"{type(self).__name__} shards an unbatched training covariance: x1 and x2 must both be (n, d); "
                f"got {tuple(x1.shape)} and {tuple(x2.shape)}."
            )
        super().__init__(x1, x2, *params, shard=shard, dense=bool(dense), **kwargs)
        self.x1, self.x2, self.kernel_params = x1, x2, params
        self.shard = shard
        self.dense = bool(dense)
        self.local_rows = shard.rows(x1.shape[-2])  # this rank's rows [start, stop)
        # per instance (``detach()``/``representation_tree()`` copies rebuild lazily): the local dense block
        self._cache: dict[str, Any] = {}

    # ---- what a subclass provides -------------------------------------------------------------

    def _local_matmul(self, rhs: Tensor) -> Tensor:
        """``K[rows, :] @ rhs`` for this rank's rows: ``(n, k) -> (n_r, k)``, without an autograd graph."""
        raise NotImplementedError

    def _local_bilinear_derivative(self, left_rows: Tensor, right: Tensor) -> tuple[Tensor | None, ...]:
        """Partial gradients of ``tr(left_rows^T K[rows, :] right)`` w.r.t. the representation (full shapes)."""
        raise NotImplementedError

    # ---- LinearOperator contract --------------------------------------------------------------

    def _size(self) -> torch.Size:
        n = self.x1.shape[-2]
        return torch.Size([n, n])

    def _transpose_nonbatch(self) -> LinearOperator:
        return self  # K(X, X) is symmetric

    def _matmul(self, rhs: Tensor) -> Tensor:
        """``K @ rhs`` on every rank: local rows, then one all-gather (``(n, k)``; ``(n,)`` for a vector)."""
        vector = rhs.dim() == 1
        r = rhs.unsqueeze(-1) if vector else rhs
        if r.dim() != 2:
            raise ValueError(
                f"{type(self).__name__} multiplies (n,) or (n, k) right-hand sides; got {tuple(rhs.shape)}."
            )
        with torch.no_grad():
            local = self._local_matmul(r.to(self.dtype))  # (n_r, k)
            out = all_gather_rows(local, self.shard, self.x1.shape[-2])  # (n, k), identical on every rank
        return out.squeeze(-1) if vector else out

    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor) -> tuple[Tensor | None, ...]:
        """Gradients of ``Σ_i left_i^T K right_i``: local rows contracted, then ONE all-reduce of the partial sums."""
        if left_vecs.dim() == 1:
            left_vecs, right_vecs = left_vecs.unsqueeze(-1), right_vecs.unsqueeze(-1)
        if not any(t.requires_grad for t in self.representation()):
            return (None,) * len(self.representation())
        with torch.no_grad():
            partial = self._local_bilinear_derivative(left_vecs[self.local_rows], right_vecs)
        return all_reduce_sum(partial, self.shard)

    def _expand_batch(self, batch_shape: torch.Size) -> LinearOperator:
        raise NotImplementedError(f"{type(self).__name__} is unbatched; it cannot be expanded to {tuple(batch_shape)}.")
