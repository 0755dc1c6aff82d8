r"""``DistributedKernel``: shard any GPyTorch kernel's training covariance over ``torch.distributed`` ranks.

SPMD: every rank runs the same script with the full training data and an identically initialised
model, inside one process group (``torchrun``, or ``torch.distributed.init_process_group``)::

    model.covar_module = DistributedKernel(ScaleKernel(RBFKernel(ard_num_dims=d)))
    with lgg.settings.use_lanczos_grad():
        loss = -mll(model(train_x), train_y)   # rank r computes only its n/p kernel rows
    loss.backward()                            # identical gradients on every rank
    optimizer.step()                           # identical parameters on every rank

Under the flag, in training mode, for the training covariance ``K(X, X)`` with
``n > max_cholesky_size``, the kernel returns a row-sharded operator
(:func:`shard_kernel_matrix`): the fused closed form (:mod:`.stationary`) for RBF / Matérn,
optionally inside a ``ScaleKernel`` (what :func:`~lanczos_grad_gp.kernels.matcher.match_stationary_kernel`
accepts, while ``fused_kernels`` is on), and :mod:`.generic` for any other kernel. Everywhere else
(flag off, ``eval()`` / predictions, cross-covariances, diagonals, the Cholesky route) it is the
wrapped kernel, unchanged, and needs no process group.
"""

from __future__ import annotations

from typing import Any

import gpytorch
import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from .. import settings
from ..kernels.blocks import same_inputs
from ..kernels.matcher import match_stationary_kernel
from .comm import ShardSpec, check_replicated, resolve_group
from .generic import KernelRef, ShardedKernelLinearOperator
from .operator import RowShardedLinearOperator
from .stationary import ShardedStationaryLinearOperator

__all__ = ["DistributedKernel", "shard_kernel_matrix"]


def _dense_block(spec: ShardSpec, n: int) -> bool:
    """Keep this rank's ``(n_r × n)`` block when it holds at most ``max_dense_kernel_size²`` entries.

    The single-process fused kernel's limit, in entries: ``p`` ranks keep their blocks up to ``n ≈ sqrt(p)`` times it.
    """
    rows, limit = spec.rows(n), settings.max_dense_kernel_size.value()
    return (rows.stop - rows.start) * n <= limit * limit


def shard_kernel_matrix(
    kernel: gpytorch.kernels.Kernel, x: Tensor, group: Any = None, *, check: bool = True
) -> RowShardedLinearOperator:
    """The row-sharded training covariance ``kernel(x, x)`` (``(n, n)``) of this rank's process group.

    Args:
        kernel: any unbatched GPyTorch kernel (its ``active_dims`` are honoured).
        x: ``(n, d)`` the full training inputs, identical on every rank.
        group: the ``torch.distributed`` process group (``None``: the default group).
        check: first verify that every rank holds the same ``n``, ``d``, inputs and parameters
            (one all-gather of seven numbers; ``ValueError`` naming the mismatch).

    Raises:
        RuntimeError: no process group is initialized. ValueError: batched inputs or kernel, unseeded
        probes, or ranks that disagree.
    """
    spec = resolve_group(group)
    if x.dim() != 2 or len(kernel.batch_shape):
        raise ValueError(
            f"DistributedKernel shards unbatched kernels on (n, d) inputs; got inputs {tuple(x.shape)} and kernel "
            f"batch shape {tuple(kernel.batch_shape)}."
        )
    if settings.probe_seed.value() is None:
        raise ValueError(
            "DistributedKernel needs seeded probes (lgg.settings.probe_seed is None): every rank must run the "
            "Lanczos recurrence on the same probe vectors. Set lgg.settings.probe_seed to an int (default 0)."
        )
    params = [p for _, p in kernel.named_parameters()]
    if check:
        check_replicated(x, params, spec)
    match = match_stationary_kernel(kernel) if settings.fused_kernels.on() else None
    if match is not None and not gpytorch.beta_features.checkpoint_kernel.value():
        return _stationary(kernel, match, x, spec)
    return _generic(kernel, x, spec)


def _stationary(kernel: gpytorch.kernels.Kernel, match: tuple, x: Tensor, spec: ShardSpec) -> RowShardedLinearOperator:
    inner, scale, profile = match
    if kernel.active_dims is not None:  # ``Kernel.__call__`` would have applied them before ``forward``
        x = x.index_select(-1, kernel.active_dims)
    ls = inner.lengthscale  # (1, d) or (1, 1)
    os_ = scale.outputscale if scale is not None else torch.ones((), dtype=ls.dtype, device=ls.device)
    dtype = torch.promote_types(torch.promote_types(x.dtype, ls.dtype), os_.dtype)  # as GPyTorch promotes x / ℓ
    x, ls, os_ = x.to(dtype), ls.to(dtype), os_.to(dtype)
    dense = _dense_block(spec, x.shape[-2])
    return ShardedStationaryLinearOperator(x, x, ls, os_, shard=spec, dense=dense, nu=profile.nu)


def _generic(kernel: gpytorch.kernels.Kernel, x: Tensor, spec: ShardSpec) -> RowShardedLinearOperator:
    named = list(kernel.named_parameters())
    ref = KernelRef(kernel, tuple(name for name, _ in named))
    params = [p for _, p in named]
    dtype = x.dtype
    for p in params:
        dtype = torch.promote_types(dtype, p.dtype)
    x = x.to(dtype)
    dense = _dense_block(spec, x.shape[-2])
    return ShardedKernelLinearOperator(x, x, *params, kernel_ref=ref, shard=spec, dense=dense)


class DistributedKernel(gpytorch.kernels.Kernel):
    """A GPyTorch kernel that shards its training covariance's rows over a ``torch.distributed`` group.

    Args:
        base_kernel: the kernel to wrap (it keeps the parameters, priors and constraints; the model's
            ``state_dict`` gains the prefix ``base_kernel.``).
        group: the process group (``None``: the default group, looked up when first needed).

    Sharded (module docstring) only under ``lgg.settings.use_lanczos_grad``, in training mode, for
    ``K(X, X)`` with ``n > lgg.settings.max_cholesky_size``; otherwise exactly ``base_kernel``.
    """

    def __init__(self, base_kernel: gpytorch.kernels.Kernel, group: Any = None) -> None:
        super().__init__()
        self.base_kernel = base_kernel
        self._group = _GroupRef(group)

    @property
    def group(self) -> Any:
        return self._group.group

    @property
    def is_stationary(self) -> bool:
        return self.base_kernel.is_stationary

    def num_outputs_per_input(self, x1: Tensor, x2: Tensor) -> int:
        return self.base_kernel.num_outputs_per_input(x1, x2)

    def shards(self, x1: Tensor, x2: Tensor) -> bool:
        """Whether ``forward(x1, x2)`` returns the sharded operator (the policy of the class docstring)."""
        return (
            settings.use_lanczos_grad.on()
            and self.training
            and x1.shape[-2] > settings.max_cholesky_size.resolved()
            and same_inputs(x1, x2)
        )

    def forward(
        self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params: Any
    ) -> Tensor | LinearOperator:
        if diag or last_dim_is_batch or params or not self.shards(x1, x2):
            return self.base_kernel(x1, x2, diag=diag, last_dim_is_batch=last_dim_is_batch, **params)
        return shard_kernel_matrix(self.base_kernel, x1, self.group)


class _GroupRef:
    """Holds the process group outside the module's state (never deep-copied or pickled with the model)."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def __deepcopy__(self, memo: dict) -> _GroupRef:
        return self

    def __getstate__(self) -> dict:
        return {"group": None}  # a process group cannot be pickled; an unpickled model uses the default group
