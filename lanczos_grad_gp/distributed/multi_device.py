"""Entries of GPyTorch's ``MultiDeviceKernel`` matrices (row blocks on several devices) for the GP routine.

``gpytorch.kernels.MultiDeviceKernel`` (one process, ``DataParallel`` over the GPUs) evaluates the
kernel as a ``CatLinearOperator`` of row blocks, block ``i`` on device ``i``. Under the flag its
products (``CatLinearOperator._matmul`` moves the right-hand side to every device) and its gradient
(autograd through those products) work as they are, but linear_operator 0.6.1's
``CatLinearOperator._get_indices`` hands index tensors that live on the output device to blocks on
other devices, which torch's indexing rejects. The pivoted-Cholesky rows and the control
variate's kernel columns go through :func:`lanczos_grad_gp._compat.get_entries`;
:func:`cat_get_entries` is the device-correct replacement it dispatches to for such operators:
each block gets its own rows' indices on its own device, and the entries come back to the
output device (differentiably: ``Tensor.to`` and ``index_put`` have gradients).
"""

from __future__ import annotations

import torch
from linear_operator.operators import CatLinearOperator, LinearOperator
from torch import Tensor

from .._compat import get_entries

__all__ = ["cat_get_entries", "is_multi_device_rows"]


def is_multi_device_rows(op: LinearOperator, batch_indices: tuple = ()) -> bool:
    """Whether ``op`` is an unbatched row-concatenated ``CatLinearOperator`` with blocks on more than one device."""
    return (
        isinstance(op, CatLinearOperator)
        and op.cat_dim == -2
        and not batch_indices
        and op.dim() == 2
        and len({b.device for b in op.linear_ops}) > 1
    )


def cat_get_entries(op: CatLinearOperator, row_index: Tensor, col_index: Tensor) -> Tensor:
    """``op[row_index, col_index]`` for an unbatched row-concatenated ``CatLinearOperator`` on several devices.

    Args:
        op: ``CatLinearOperator(B_0, …, B_{p-1}, dim=-2)``, ``B_i`` (``n_i × n``) on any device.
        row_index, col_index: broadcastable long tensors (on any device).

    Returns:
        the entries, of the broadcast shape, on ``op``'s output device.
    """
    rows, cols = torch.broadcast_tensors(row_index, col_index)
    shape = rows.shape
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    device = op.device if op.device is not None else rows.device
    out = None
    start = 0
    for block in op.linear_ops:
        stop = start + block.shape[-2]
        pos = ((rows >= start) & (rows < stop)).nonzero().squeeze(-1)  # positions whose row lives in this block
        start_i = start
        start = stop
        if not pos.numel():
            continue
        vals = get_entries(block, (rows[pos] - start_i).to(block.device), cols[pos].to(block.device)).to(device)
        if out is None:
            out = vals.new_zeros(rows.numel())
        out = out.index_put((pos.to(device),), vals)  # out of place: differentiable in vals
    if out is None:  # no entries requested
        out = torch.zeros(rows.numel(), dtype=op.dtype, device=device)
    return out.view(shape)
