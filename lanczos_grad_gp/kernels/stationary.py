r"""``StationaryKernelLinearOperator``: an RBF / Matérn kernel matrix with a closed-form gradient.

For the forward products it either keeps the unit-outputscale matrix ``g(r²)`` dense (built once, in
place, without an autograd graph, when ``n ≤`` :class:`~lanczos_grad_gp.settings.max_dense_kernel_size`)
or recomputes row blocks at every product (:mod:`.blocks`). Its ``_bilinear_derivative`` is the closed
form of :mod:`.derivative`; the profile comes from the registry of :mod:`.profiles`.
:func:`lanczos_grad_gp.kernels.matcher.fuse_stationary_kernel` turns GPyTorch's lazily evaluated
kernels into this operator under the ``use_lanczos_grad`` flag.
"""

from __future__ import annotations

from typing import Any

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from .. import settings
from .._compat import kernel_operator_kwargs
from ..core.dense_matmul import symmetric_matmul
from .blocks import UnitBlocks, blocks_matmul, fill_matrix, same_inputs
from .chunked import ChunkedKernelLinearOperator
from .derivative import stationary_bilinear_derivative
from .profiles import get_profile, kernel_profile

__all__ = ["StationaryKernelLinearOperator"]


class StationaryKernelLinearOperator(ChunkedKernelLinearOperator):
    """``s · g(r²(x1, x2; ℓ))`` for RBF / Matérn with a closed-form ``_bilinear_derivative``.

    Args:
        x1: ``(*batch, M, D)``; x2: ``(*batch, N, D)``.
        lengthscale: ``(*batch, 1, D)`` or ``(*batch, 1, 1)``; outputscale: ``(*batch)``.
        nu: ``None`` for RBF, else the Matérn smoothness (0.5, 1.5, 2.5).
        dense: keep ``g(r²)`` as one dense matrix for the products (``None``: when
            ``max(M, N) ≤ max_dense_kernel_size``); otherwise row blocks are recomputed per product.
        chunk_size: rows per block of the recomputed products (see :class:`ChunkedKernelLinearOperator`).

    The dense matrix is built without an autograd graph; gradients always come from
    :func:`stationary_bilinear_derivative`, which never forms an ``n × n`` tensor.
    """

    def __init__(
        self,
        x1: Tensor,
        x2: Tensor,
        *,
        lengthscale: Tensor,
        outputscale: Tensor,
        nu: float | None = None,
        dense: bool | None = None,
        chunk_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        profile = get_profile(nu)
        kwargs.pop("covar_func", None)
        kwargs.pop("num_nonbatch_dimensions", None)
        kwargs.pop("num_outputs_per_input", None)
        extra = {} if nu is None else {"nu": float(nu)}
        super().__init__(
            x1,
            x2,
            covar_func=profile.covar if nu is None else _matern_covar_kw,
            num_nonbatch_dimensions={"lengthscale": 2, "outputscale": 0},
            chunk_size=chunk_size,
            lengthscale=lengthscale,
            outputscale=outputscale,
            **extra,
        )
        if dense is None:
            dense = max(x1.shape[-2], x2.shape[-2]) <= settings.max_dense_kernel_size.value()
        self.dense = bool(dense)
        self.nu = None if nu is None else float(nu)
        # reconstructed by representation_tree(); ``nu`` already travels as a covar_func kwarg
        _, nondiff = kernel_operator_kwargs(self)
        nondiff["dense"] = self.dense
        for key in ("covar_func", "num_nonbatch_dimensions", "num_outputs_per_input"):
            nondiff.pop(key, None)
        # shared with detach()ed copies (same inputs): the scaled inputs and the dense matrix, built at most once
        self._cache: dict[str, Any] = {}

    def _unit_blocks(self) -> UnitBlocks:
        if "blocks" not in self._cache:
            with torch.no_grad():
                self._cache["blocks"] = UnitBlocks(self.x1, self.x2, self.tensor_params["lengthscale"], self.nu)
        return self._cache["blocks"]

    def _unit_dense(self) -> Tensor:
        if "unit" not in self._cache:
            with torch.no_grad():
                self._cache["unit"] = fill_matrix(self._unit_blocks())
        return self._cache["unit"]

    def detach(self) -> StationaryKernelLinearOperator:
        """A detached copy that shares the dense matrix (built without a graph anyway)."""
        op = super().detach()
        op._cache = self._cache
        return op

    def _graph_free(self) -> bool:
        return not (torch.is_grad_enabled() and self.requires_grad)

    def _matmul(self, rhs: Tensor) -> Tensor:
        """``K @ rhs``: one product with the dense ``g(r²)`` in dense mode, else row blocks in one buffer."""
        if not self._graph_free():
            return super()._matmul(rhs)
        s = self.tensor_params["outputscale"][..., None, None]
        if self.dense:
            unit = self._unit_dense()
            if unit.device.type == "cpu" and self._symmetric():  # any layout computes a symmetric product
                return s * symmetric_matmul(unit, rhs)
            return s * (unit @ rhs)
        with torch.no_grad():
            return s * blocks_matmul(self._unit_blocks(), rhs)

    def _symmetric(self) -> bool:
        """``x1`` and ``x2`` are the same points (the training covariance), checked once."""
        if "symmetric" not in self._cache:
            self._cache["symmetric"] = same_inputs(self.x1, self.x2)
        return self._cache["symmetric"]

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        if self.dense and self._graph_free() and not batch_indices and not len(self.batch_shape):
            s = self.tensor_params["outputscale"]
            return s * self._unit_dense()[row_index, col_index]
        return super()._get_indices(row_index, col_index, *batch_indices)

    def _diagonal(self) -> Tensor:
        """``K_ii = s · g(|x1_i − x2_i|² / ℓ²)``; ``s`` (``g(0) = 1``) for the training covariance."""
        s = self.tensor_params["outputscale"].unsqueeze(-1)  # (*batch, 1)
        n = min(self.x1.shape[-2], self.x2.shape[-2])
        if same_inputs(self.x1, self.x2):
            return s.expand(*self.batch_shape, n)
        ls = self.tensor_params["lengthscale"]
        sq = ((self.x1[..., :n, :] - self.x2[..., :n, :]) / ls).square().sum(-1)
        return s * kernel_profile(sq.clamp_min(1e-30), self.nu, derivative=False)[0]

    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor) -> tuple[Tensor | None, ...]:
        """Closed-form gradients w.r.t. ``(x1, x2, lengthscale, outputscale)`` (module docstring)."""
        if left_vecs.dim() == 1:
            left_vecs, right_vecs = left_vecs.unsqueeze(-1), right_vecs.unsqueeze(-1)
        diff, _ = kernel_operator_kwargs(self)
        names = list(diff.keys())
        originals = [self.x1, self.x2, *(diff[k] for k in names)]
        by_name = dict(zip(names, originals[2:], strict=True))
        ls, os_ = by_name["lengthscale"], by_name["outputscale"]
        need = (self.x1.requires_grad, self.x2.requires_grad, ls.requires_grad, os_.requires_grad)
        if not any(need):
            return (None,) * len(originals)
        g_x1, g_x2, g_ls, g_s = stationary_bilinear_derivative(
            self.x1, self.x2, ls, os_, self.nu, left_vecs, right_vecs, need=need
        )
        named = {"lengthscale": g_ls, "outputscale": g_s}
        return (g_x1, g_x2, *(named[k] for k in names))

    def to_dense(self) -> Tensor:
        """The dense kernel (with an autograd graph when one is needed)."""
        if not self._graph_free():
            return super().to_dense()
        if self.dense:
            unit = self._unit_dense()
        else:
            with torch.no_grad():
                unit = fill_matrix(self._unit_blocks())
        return self.tensor_params["outputscale"][..., None, None] * unit

    def _expand_batch(self, batch_shape: torch.Size) -> LinearOperator:
        op = super()._expand_batch(batch_shape)
        if isinstance(op, StationaryKernelLinearOperator):
            op.dense = self.dense
        return op


def _matern_covar_kw(x1: Tensor, x2: Tensor, *, lengthscale: Tensor, outputscale: Tensor, nu: float) -> Tensor:
    """The Matérn profile's dense block (``nu`` travels as a non-tensor kwarg of the operator)."""
    return get_profile(nu).covar(x1, x2, lengthscale=lengthscale, outputscale=outputscale)
