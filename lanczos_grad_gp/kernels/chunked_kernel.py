"""``ChunkedKernel``: a GPyTorch kernel whose matrices are evaluated in row blocks (never dense)."""

from __future__ import annotations

from typing import Any

import gpytorch
import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from .matcher import match_stationary_kernel
from .stationary import StationaryKernelLinearOperator

__all__ = ["ChunkedKernel"]


class ChunkedKernel(gpytorch.kernels.Kernel):
    """GPyTorch kernel whose kernel matrices are evaluated in row blocks (never dense).

    The matrices are :class:`~lanczos_grad_gp.kernels.stationary.StationaryKernelLinearOperator`
    with ``dense=False`` (a :class:`ChunkedKernelLinearOperator` with a closed-form gradient).

    Wraps ``RBFKernel`` or ``MaternKernel`` (``nu`` 0.5/1.5/2.5), optionally inside a
    ``ScaleKernel``; the wrapped module keeps the parameters, priors and constraints, so a model's
    ``state_dict`` is unchanged apart from the ``base_kernel.`` prefix. ``diag=True`` calls are
    forwarded to the wrapped kernel.

    Args:
        base_kernel: the kernel to evaluate in row chunks.
        chunk_size: rows per block (default :func:`~lanczos_grad_gp.kernels.chunked.default_chunk_size`).
    """

    def __init__(self, base_kernel: gpytorch.kernels.Kernel, *, chunk_size: int | None = None) -> None:
        super().__init__(batch_shape=base_kernel.batch_shape)
        inner = base_kernel.base_kernel if isinstance(base_kernel, gpytorch.kernels.ScaleKernel) else base_kernel
        if getattr(inner, "active_dims", None) is not None:
            raise ValueError("ChunkedKernel does not support active_dims on the wrapped kernel.")
        match = match_stationary_kernel(base_kernel)
        if match is None:
            raise TypeError(
                "ChunkedKernel supports RBFKernel or MaternKernel (nu 0.5/1.5/2.5), optionally in a ScaleKernel; "
                f"got {type(inner).__name__}."
            )
        self._profile = match[2]
        self.base_kernel = base_kernel
        self.chunk_size = chunk_size

    @property
    def _inner(self) -> gpytorch.kernels.Kernel:
        k = self.base_kernel
        return k.base_kernel if isinstance(k, gpytorch.kernels.ScaleKernel) else k

    def forward(
        self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params: Any
    ) -> Tensor | LinearOperator:
        """A :class:`ChunkedKernelLinearOperator` (or the wrapped kernel's output for ``diag``)."""
        if diag or last_dim_is_batch:
            return self.base_kernel.forward(x1, x2, diag=diag, last_dim_is_batch=last_dim_is_batch, **params)
        inner = self._inner
        if isinstance(self.base_kernel, gpytorch.kernels.ScaleKernel):
            outputscale = self.base_kernel.outputscale
        else:
            outputscale = torch.ones(self.batch_shape, dtype=x1.dtype, device=x1.device)
        nu = self._profile.nu
        return StationaryKernelLinearOperator(
            x1,
            x2,
            lengthscale=inner.lengthscale,
            outputscale=outputscale,
            nu=nu,
            dense=False,
            chunk_size=self.chunk_size,
        )

    def num_outputs_per_input(self, x1: Tensor, x2: Tensor) -> int:
        """One output per input."""
        return 1
