r"""Process-group plumbing of the row-sharded kernels: who owns which rows, and the three collectives.

Every rank runs the same script on the same data (SPMD). Rank ``r`` of ``p`` owns the contiguous rows

.. math::
    \mathcal R_r = [\lfloor r n / p \rfloor,\ \lfloor (r+1) n / p \rfloor)\qquad (\text{sizes differ by at most one}),

and only three collectives are ever issued, all through ``torch.distributed`` (``gloo`` for CPU
tensors, ``nccl`` for CUDA tensors, one device per rank):

* :func:`all_gather_rows` — per Lanczos product, ``(n_r × k)`` local rows to the ``(n × k)`` result
  on every rank (``p · ⌈n/p⌉ · k`` numbers received per rank);
* :func:`all_reduce_sum` — per backward, the partial hyperparameter gradients (a few numbers, plus
  ``n · d`` when the inputs themselves require grad);
* :func:`check_replicated` — per kernel evaluation, seven numbers per rank that prove the ranks agree
  on ``n``, ``d`` and (to ``1e-6``) the training inputs and hyperparameters.

Both backends return the same reduced bits on every rank, so all replicated work downstream (the
recurrence, the tiny tridiagonal problems, the optimizer) stays bit-identical across ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["RowPartition", "ShardSpec", "all_gather_rows", "all_reduce_sum", "check_replicated", "resolve_group"]

#: relative tolerance of the replicated-data checksums (exact data agrees to the last bit)
CHECKSUM_RTOL = 1e-6


@dataclass(frozen=True)
class RowPartition:
    """Balanced contiguous row blocks of an ``n``-row matrix over ``world_size`` ranks."""

    n: int
    world_size: int

    def bounds(self, rank: int) -> tuple[int, int]:
        """``(start, stop)`` of rank ``rank``'s rows: ``[⌊r n/p⌋, ⌊(r+1) n/p⌋)``."""
        return rank * self.n // self.world_size, (rank + 1) * self.n // self.world_size

    def rows(self, rank: int) -> slice:
        start, stop = self.bounds(rank)
        return slice(start, stop)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Rows per rank (``n_r``)."""
        return tuple(stop - start for start, stop in (self.bounds(r) for r in range(self.world_size)))

    @property
    def max_rows(self) -> int:
        """``⌈n / p⌉``: the padded block size of the all-gather."""
        return -(-self.n // self.world_size)


@dataclass(frozen=True)
class ShardSpec:
    """A process group and this process's place in it (hashable, never copied deeply).

    Attributes:
        group: the ``torch.distributed`` process group (``None``: the default group).
        rank: this process's rank in ``group``.
        world_size: number of ranks ``p`` in ``group``.
    """

    group: Any
    rank: int
    world_size: int

    def partition(self, n: int) -> RowPartition:
        return RowPartition(n, self.world_size)

    def rows(self, n: int) -> slice:
        """This rank's rows of an ``n``-row matrix."""
        return self.partition(n).rows(self.rank)

    def __deepcopy__(self, memo: dict) -> ShardSpec:  # a process group cannot be copied (model deepcopies)
        return self


def resolve_group(group: Any = None, what: str = "DistributedKernel") -> ShardSpec:
    """The :class:`ShardSpec` of ``group`` (default: the default group); ``RuntimeError`` when there is none."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError(
            f"{what}: this torch build has no torch.distributed support (torch.distributed.is_available())."
        )
    if not dist.is_initialized():
        raise RuntimeError(
            f"{what}: no torch.distributed process group is initialized. Call "
            "torch.distributed.init_process_group(backend='gloo' (CPU) or 'nccl' (GPU), ...) on every rank before "
            "evaluating the model under lgg.settings.use_lanczos_grad() (torchrun sets the environment for the "
            "default init_method='env://')."
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError(f"{what}: this process is not a member of the process group it was given.")
    return ShardSpec(group, rank, dist.get_world_size(group))


def all_gather_rows(local: Tensor, spec: ShardSpec, n: int) -> Tensor:
    """Assemble ``(*batch, n, k)`` on every rank from each rank's ``(*batch, n_r, k)`` rows (one all-gather).

    Blocks are padded to ``⌈n/p⌉`` rows (``all_gather`` needs equal shapes on every backend).
    """
    if spec.world_size == 1:
        return local
    import torch.distributed as dist

    part = spec.partition(n)
    send = local.movedim(-2, 0)  # (n_r, *batch, k): rows first, so a row block is contiguous
    pad = part.max_rows - send.shape[0]
    if pad:
        send = torch.cat([send, send.new_zeros(pad, *send.shape[1:])], 0)
    send = send.contiguous()
    recv = [torch.empty_like(send) for _ in range(spec.world_size)]
    dist.all_gather(recv, send, group=spec.group)
    full = torch.cat([block[:size] for block, size in zip(recv, part.sizes, strict=True)], 0)  # (n, *batch, k)
    return full.movedim(0, -2)


def all_reduce_sum(parts: Sequence[Tensor | None], spec: ShardSpec) -> tuple[Tensor | None, ...]:
    """Sum each tensor over the ranks (``None`` stays ``None``) in ONE all-reduce of the flattened values."""
    present = [t for t in parts if t is not None]
    if spec.world_size == 1 or not present:
        return tuple(parts)
    import torch.distributed as dist

    dtype = present[0].dtype
    for t in present[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    flat = torch.cat([t.reshape(-1).to(dtype) for t in present])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=spec.group)
    out: list[Tensor | None] = []
    offset = 0
    for t in parts:
        if t is None:
            out.append(None)
            continue
        out.append(flat[offset : offset + t.numel()].view(t.shape).to(t.dtype))
        offset += t.numel()
    return tuple(out)


def _weighted_abs_sum(t: Tensor) -> Tensor:
    """``Σ_i w_i |t_i|`` with position weights ``w_i = 1 + (i mod 97)`` (catches permuted rows)."""
    flat = t.detach().reshape(-1).to(torch.float64)
    w = 1.0 + (torch.arange(flat.numel(), device=flat.device) % 97).to(torch.float64)
    return (w * flat.abs()).sum()


def check_replicated(x: Tensor, params: Sequence[Tensor], spec: ShardSpec, what: str = "DistributedKernel") -> None:
    """``ValueError`` unless every rank holds the same ``n``, ``d`` and (to ``1e-6``) the same inputs and parameters.

    One all-gather of seven float64 numbers per rank: ``(n, d, batch size, Σ w|x|, Σ x², Σ_j j·Σ|θ_j|, Σ θ²)``.
    The sizes must agree exactly; the checksums (position-weighted, so a row permutation shows) to
    :data:`CHECKSUM_RTOL`. Must be the first collective of an evaluation: a mismatch in ``n`` would
    otherwise pad the row blocks differently on different ranks.
    """
    if spec.world_size == 1:
        return
    import torch.distributed as dist

    dev = x.device
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    p_abs = sum((float(j + 1) * p.detach().abs().sum().to(dev, torch.float64) for j, p in enumerate(params)), zero)
    p_sq = sum((p.detach().to(dev, torch.float64).square().sum() for p in params), zero)
    x64 = x.detach().to(torch.float64)
    sizes = torch.tensor([x.shape[-2], x.shape[-1], x.shape[:-2].numel()], dtype=torch.float64, device=dev)
    local = torch.cat([sizes, torch.stack([_weighted_abs_sum(x64), x64.square().sum(), p_abs, p_sq])])
    recv = [torch.empty_like(local) for _ in range(spec.world_size)]
    dist.all_gather(recv, local, group=spec.group)
    table = torch.stack(recv).cpu()  # (p, 7): one host sync
    ranks = range(spec.world_size)

    def listing(col: int) -> str:
        return ", ".join(f"rank {r}: {int(table[r, col])}" for r in ranks)

    if not bool((table[:, 0] == table[0, 0]).all()):
        raise ValueError(
            f"{what}: ranks disagree on the number of training points n ({listing(0)}). Every rank must run the "
            "same script on the full, identical training data (SPMD): do not split the data yourself, the "
            "kernel rows are sharded for you."
        )
    for col, name in ((1, "the input dimension d"), (2, "the batch size")):
        if not bool((table[:, col] == table[0, col]).all()):
            raise ValueError(f"{what}: ranks disagree on {name} ({listing(col)}); every rank needs the same data.")
    for cols, name, advice in (
        ((3, 4), "training inputs", "load the same data in the same order on every rank (same seed for any split)"),
        (
            (5, 6),
            "kernel hyperparameters",
            "initialise the model identically on every rank (same seed, or broadcast rank 0's state_dict)",
        ),
    ):
        ref = table[0, list(cols)]
        diff = (table[:, list(cols)] - ref).abs()
        if not bool((diff <= CHECKSUM_RTOL * ref.abs().clamp_min(1e-300)).all()):
            sums = ", ".join(f"rank {r}: {float(table[r, cols[0]]):.10g}" for r in ranks)
            raise ValueError(f"{what}: ranks hold different {name} (checksums {sums}); {advice}.")
