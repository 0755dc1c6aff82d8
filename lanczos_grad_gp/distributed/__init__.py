"""Row-sharded exact-GP kernels over ``torch.distributed`` (SPMD: one process per device, full data on each).

* :mod:`.kernel` — :class:`DistributedKernel` (wrap any GPyTorch kernel) and :func:`shard_kernel_matrix`;
* :mod:`.operator` — :class:`RowShardedLinearOperator`: all-gathered products, all-reduced gradients;
* :mod:`.stationary` — the fused RBF / Matérn closed form on this rank's rows;
* :mod:`.generic` — any kernel, autograd per row block;
* :mod:`.comm` — the row partition, the three collectives and the replicated-data check;
* :mod:`.launch` — :func:`spawn_local`, ``p`` local processes in one group (tests, benchmarks);
* :mod:`.multi_device` — entries of GPyTorch's single-process ``MultiDeviceKernel`` matrices.

docs/distributed.md has the layout, the costs and a worked estimate for ``n = 10⁶`` on 8 GPUs.
"""

from .comm import RowPartition, ShardSpec
from .generic import ShardedKernelLinearOperator
from .kernel import DistributedKernel, shard_kernel_matrix
from .launch import spawn_local
from .multi_device import cat_get_entries
from .operator import RowShardedLinearOperator
from .stationary import ShardedStationaryLinearOperator

__all__ = [
    "DistributedKernel",
    "RowPartition",
    "RowShardedLinearOperator",
    "ShardSpec",
    "ShardedKernelLinearOperator",
    "ShardedStationaryLinearOperator",
    "cat_get_entries",
    "shard_kernel_matrix",
    "spawn_local",
]
