r"""Stationary kernels (RBF, Matérn) with a closed-form, row-blocked ``_bilinear_derivative``.

The exact-GP gradient needs ``∂/∂θ tr(L^T K(θ) R)`` for thin factors ``L, R`` (``(*batch, n, k)``,
DESIGN §4). linear_operator's default forms the ``n × n`` matrix ``L R^T`` and back-propagates it
through GPyTorch's kernel construction (``sq_dist``, ``exp``, ``mul``: several ``n × n``
temporaries and an autograd graph that holds them). For a stationary kernel
``K_ij = s · g(r²_ij)``, ``r²_ij = Σ_d (x_id − x'_jd)² / ℓ_d²``, the same gradient is a
row-block contraction. With ``G = L R^T``, ``W = G ∘ g'(r²)`` and the scaled inputs
``u = x / ℓ``, ``u' = x' / ℓ``:

.. math::
    \frac{∂}{∂s} = \sum_{ij} G_{ij}\, g(r^2_{ij}),\qquad
    \frac{∂}{∂ℓ_d} = -\frac{2s}{ℓ_d} \sum_{ij} W_{ij} (u_{id} - u'_{jd})^2,

    \frac{∂}{∂x_{id}} = \frac{2s}{ℓ_d}\Big(u_{id} \sum_j W_{ij} - (W u')_{id}\Big),\qquad
    \frac{∂}{∂x'_{jd}} = \frac{2s}{ℓ_d}\Big(u'_{jd} \sum_i W_{ij} - (W^\top u)_{jd}\Big),

and ``Σ_ij W_ij (u_id − u'_jd)² = Σ_i u_id² Σ_j W_ij + Σ_j u'_jd² Σ_i W_ij − 2 Σ_i u_id (W u')_id``
(inputs centred first, so the expansion does not cancel). Per row block ``b`` this is one
``(b × k)(k × n)`` product for ``G_b``, elementwise work and one ``(b × n)(n × D)`` product:
``O(n · (k + D))`` flops per row, ``O(b · n)`` memory, no autograd graph over ``n × n`` tensors.
The profiles ``g`` and ``g' = dg/d(r²)`` are

* RBF: ``g = e^{-r²/2}``, ``g' = −g / 2``;
* Matérn ν = ½: ``g = e^{-r}``, ``g' = −e^{-r} / (2r)`` (0 for ``r < sqrt(eps)``, see :func:`kernel_profile`);
* Matérn ν = 3/2: ``g = (1 + √3 r) e^{-√3 r}``, ``g' = −(3/2) e^{-√3 r}``;
* Matérn ν = 5/2: ``g = (1 + √5 r + 5r²/3) e^{-√5 r}``, ``g' = −(5/6)(1 + √5 r) e^{-√5 r}``

(GPyTorch's ``RBFKernel`` / ``MaternKernel`` conventions).

:class:`StationaryKernelLinearOperator` uses it, and for the forward products either keeps the
unit-outputscale matrix ``g(r²)`` dense (built once, in place, without an autograd graph, when
``n ≤`` :class:`~lanczos_grad_gp.settings.max_dense_kernel_size`) or recomputes row blocks at
every product (:class:`~lanczos_grad_gp.kernel_ops.ChunkedKernelLinearOperator`'s ``_matmul``).
:func:`fuse_stationary_kernel` turns GPyTorch's lazily evaluated ``ScaleKernel(RBFKernel)`` /
``MaternKernel`` covariance into this operator; the ``use_lanczos_grad`` hook calls it
(:class:`~lanczos_grad_gp.settings.fused_kernels`).
"""

from __future__ import annotations

import math
from typing import Any

import gpytorch
import torch
from linear_operator.operators import AddedDiagLinearOperator, LinearOperator
from torch import Tensor

from . import settings
from .kernel_ops import ChunkedKernelLinearOperator, _sum_to_shape, matern_covar, rbf_covar

__all__ = [
    "StationaryKernelLinearOperator",
    "fuse_stationary_kernel",
    "kernel_profile",
    "stationary_bilinear_derivative",
]

#: entries of one row block in the closed-form derivative (2 MiB in float64: stays in cache)
_DERIV_BLOCK_ENTRIES = 2**18
#: entries of one row block when filling the dense matrix
_BUILD_BLOCK_ENTRIES = 2**20


def kernel_profile(sq: Tensor, nu: float | None, *, derivative: bool = True) -> tuple[Tensor, Tensor | None]:
    """``g(r²)`` and ``g'(r²) = dg/d(r²)`` of the unit-outputscale kernel (``nu=None``: RBF).

    ``sq`` is the scaled squared distance ``r²`` (``≥ 0``). Matérn-½'s ``g' = −e^{-r}/(2r)`` is
    unbounded at ``r → 0``, where it only ever multiplies ``(u_id − u'_jd)² ≤ r²`` (a pair
    contributes ``O(r)``); pairs closer than ``r_min = sqrt(eps)`` are dropped (``g' = 0``, error
    ``≤ r_min/2`` per pair) because the expanded contraction would amplify their rounding by ``1/r``.
    """
    if nu is None:
        g = torch.exp(-0.5 * sq)
        return g, (-0.5 * g if derivative else None)
    r = sq.sqrt()
    if nu == 0.5:
        e = torch.exp(-r)
        if not derivative:
            return e, None
        r_min = torch.finfo(sq.dtype).eps ** 0.5
        return e, torch.where(r > r_min, -0.5 * e / r.clamp_min(r_min), torch.zeros_like(e))
    if nu == 1.5:
        e = torch.exp(-math.sqrt(3.0) * r)
        return (1 + math.sqrt(3.0) * r) * e, (-1.5 * e if derivative else None)
    if nu == 2.5:
        e = torch.exp(-math.sqrt(5.0) * r)
        lin = 1 + math.sqrt(5.0) * r
        return (lin + (5.0 / 3.0) * sq) * e, ((-5.0 / 6.0) * lin * e if derivative else None)
    raise ValueError(f"nu must be None (RBF), 0.5, 1.5 or 2.5; got {nu!r}.")


def _scaled_centred(x1: Tensor, x2: Tensor, lengthscale: Tensor) -> tuple[Tensor, Tensor]:
    """``u = x1/ℓ``, ``u' = x2/ℓ`` shifted by a common mean (distances unchanged, no cancellation)."""
    u1, u2 = x1 / lengthscale, x2 / lengthscale
    mu = u1.mean(-2, keepdim=True) if u1.shape[-2] >= u2.shape[-2] else u2.mean(-2, keepdim=True)
    return u1 - mu, u2 - mu


def _same_inputs(x1: Tensor, x2: Tensor) -> bool:
    """``x1`` and ``x2`` are the same points (the training covariance): its diagonal distances are 0."""
    return x1 is x2 or (x1.shape == x2.shape and bool(torch.equal(x1, x2)))


def _row_blocks(m: int, n: int, max_entries: int) -> list[slice]:
    b = max(1, min(m, max_entries // max(n, 1)))
    return [slice(i, min(i + b, m)) for i in range(0, m, b)]


def _matern_profile_(sq: Tensor, nu: float) -> Tensor:
    """Matérn ``g(r²)`` written over ``sq`` (in place; one temporary block). RBF: :meth:`_UnitBlocks.fill`."""
    t = sq.sqrt_()
    if nu == 0.5:
        return t.neg_().exp_()
    c = math.sqrt(3.0) if nu == 1.5 else math.sqrt(5.0)
    t.mul_(c)  # t = c r
    e = torch.exp(-t)
    if nu == 1.5:
        return t.add_(1).mul_(e)  # (1 + √3 r) e^{-√3 r}
    return t.addcmul_(t, t, value=1.0 / 3.0).add_(1).mul_(e)  # (1 + √5 r + 5r²/3) e^{-√5 r}


class _UnitBlocks:
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
        self.same = _same_inputs(x1, x2)
        self.nu = nu
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
        if self.nu is None:
            torch.matmul(self.half_left[..., rows, :], self.right_t, out=out)  # −r²/2
            self._zero_diagonal(rows, out)
            return out.clamp_max_(0).exp_()
        return _matern_profile_(self.fill_sq(rows, out), self.nu)


def _fill_matrix(blocks: _UnitBlocks, block_entries: int | None = None) -> Tensor:
    """Dense ``g(r²)`` ``(*batch, M, N)`` of ``blocks``: one allocation, filled in place block by block."""
    m, n = blocks.shape
    out = blocks.right_t.new_empty(*blocks.batch, m, n)
    for rows in _row_blocks(m, n, block_entries or _BUILD_BLOCK_ENTRIES):
        if len(blocks.batch):  # a batched row slice is not contiguous: fill a temporary, copy
            out[..., rows, :] = blocks.fill(rows, out.new_empty(*blocks.batch, rows.stop - rows.start, n))
        else:
            blocks.fill(rows, out[rows])
    return out


def _blocks_matmul(blocks: _UnitBlocks, rhs: Tensor, block_entries: int | None = None) -> Tensor:
    """``g(r²) @ rhs`` ``(*batch, M, k)`` of ``blocks``, row block by row block in one reused buffer."""
    m, n = blocks.shape
    slices = _row_blocks(m, n, block_entries or _BUILD_BLOCK_ENTRIES)
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
        return _fill_matrix(_UnitBlocks(x1, x2, lengthscale, nu), block_entries)


def unit_kernel_matmul(
    x1: Tensor, x2: Tensor, lengthscale: Tensor, nu: float | None, rhs: Tensor, *, block_entries: int | None = None
) -> Tensor:
    """``g(r²) @ rhs`` ``(*batch, M, k)`` by row blocks in one reused buffer: ``O(block)`` extra memory."""
    with torch.no_grad():
        return _blocks_matmul(_UnitBlocks(x1, x2, lengthscale, nu), rhs, block_entries)


def stationary_bilinear_derivative(
    x1: Tensor,
    x2: Tensor,
    lengthscale: Tensor,
    outputscale: Tensor,
    nu: float | None,
    left: Tensor,
    right: Tensor,
    *,
    need: tuple[bool, bool, bool, bool] = (True, True, True, True),
    block_entries: int = _DERIV_BLOCK_ENTRIES,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    r"""Gradients of ``tr(left^T K right)``, ``K = s · g(r²(x1, x2; ℓ))``, by row blocks (module docstring).

    Args:
        x1: ``(*batch, M, D)``; x2: ``(*batch, N, D)``.
        lengthscale: ``(*batch, 1, D)`` or ``(*batch, 1, 1)``; outputscale: ``(*batch)``.
        nu: ``None`` for RBF, else the Matérn smoothness (0.5, 1.5, 2.5).
        left: ``(*batch, M, k)``; right: ``(*batch, N, k)``.
        need: which of ``(x1, x2, lengthscale, outputscale)`` gradients to compute.

    Returns:
        ``(∂x1, ∂x2, ∂ℓ, ∂s)`` reduced to the shapes of the inputs (``None`` where not needed).
    """
    with torch.no_grad():
        blocks = _UnitBlocks(x1, x2, lengthscale, nu)
        u1, u2 = blocks.u1, blocks.u2  # (*batch, M, D), (*batch, N, D)
        batch = torch.broadcast_shapes(u1.shape[:-2], u2.shape[:-2], left.shape[:-2])
        m, n, d = u1.shape[-2], u2.shape[-2], u1.shape[-1]
        s = outputscale[..., None, None]
        grad_s = u1.new_zeros(batch) if need[3] else None
        col_w = u1.new_zeros(*batch, n)  # Σ_i W_ij
        sq_sum = u1.new_zeros(*batch, d)  # Σ_ij W_ij (u_id − u'_jd)², first two terms
        gx1 = u1.new_zeros(*batch, m, d) if need[0] else None
        wt_u1 = u1.new_zeros(*batch, n, d) if need[1] else None
        want_w = need[0] or need[1] or need[2]
        rt = right.mT  # (*batch, k, N)
        slices = _row_blocks(m, n, block_entries)
        buf = u1.new_empty(*blocks.batch, (slices[0].stop - slices[0].start) if slices else 0, n)  # reused
        for rows in slices:
            u1b = u1[..., rows, :]  # (*batch, b, D)
            blk = buf[..., : rows.stop - rows.start, :]
            gram = left[..., rows, :] @ rt  # (*batch, b, N): rows of G = L R^T
            if nu is None:  # RBF: g' = -g/2, so W = -(G ∘ g)/2; the -1/2 is applied once at the end
                w = gram.mul_(blocks.fill(rows, blk))
                if grad_s is not None:
                    grad_s += w.sum((-2, -1))
            else:
                g, dg = kernel_profile(blocks.fill_sq(rows, blk), nu, derivative=want_w)
                if grad_s is not None:
                    grad_s += (gram * g).sum((-2, -1))
                w = gram.mul_(dg) if dg is not None else gram  # W_b = G_b ∘ g'(r²_b)
            if not want_w:
                continue
            row_w = w.sum(-1)  # (*batch, b)
            col_w += w.sum(-2)
            wu2 = w @ u2  # (*batch, b, D)
            sq_sum += (u1b.square() * row_w.unsqueeze(-1) - 2 * u1b * wu2).sum(-2)
            if gx1 is not None:
                gx1[..., rows, :] = u1b * row_w.unsqueeze(-1) - wu2
            if wt_u1 is not None:
                wt_u1 += w.mT @ u1b
        w_scale = -0.5 if nu is None else 1.0
        factor = (2 * w_scale) * s / lengthscale  # (*batch, 1, D) or (*batch, 1, 1)
        g_x1 = None if gx1 is None else _sum_to_shape(factor * gx1, x1.shape)
        g_x2 = None
        if wt_u1 is not None:
            g_x2 = _sum_to_shape(factor * (u2 * col_w.unsqueeze(-1) - wt_u1), x2.shape)
        g_ls = None
        if need[2]:
            sq_sum = sq_sum + (u2.square() * col_w.unsqueeze(-1)).sum(-2)
            g_ls = _sum_to_shape(-factor * sq_sum.unsqueeze(-2), lengthscale.shape)
        g_s = None if grad_s is None else _sum_to_shape(grad_s, outputscale.shape)
    return g_x1, g_x2, g_ls, g_s


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
        if nu not in (None, 0.5, 1.5, 2.5):
            raise ValueError(f"nu must be None (RBF), 0.5, 1.5 or 2.5; got {nu!r}.")
        kwargs.pop("covar_func", None)
        kwargs.pop("num_nonbatch_dimensions", None)
        kwargs.pop("num_outputs_per_input", None)
        covar_func = rbf_covar if nu is None else matern_covar
        extra = {} if nu is None else {"nu": float(nu)}
        super().__init__(
            x1,
            x2,
            covar_func=covar_func,
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
        self._nondifferentiable_kwargs["dense"] = self.dense
        self._nondifferentiable_kwargs.pop("covar_func", None)
        self._nondifferentiable_kwargs.pop("num_nonbatch_dimensions", None)
        self._nondifferentiable_kwargs.pop("num_outputs_per_input", None)
        # shared with detach()ed copies (same inputs): the scaled inputs and the dense matrix, built at most once
        self._cache: dict[str, Any] = {}

    def _unit_blocks(self) -> _UnitBlocks:
        if "blocks" not in self._cache:
            with torch.no_grad():
                self._cache["blocks"] = _UnitBlocks(self.x1, self.x2, self.tensor_params["lengthscale"], self.nu)
        return self._cache["blocks"]

    def _unit_dense(self) -> Tensor:
        if "unit" not in self._cache:
            with torch.no_grad():
                self._cache["unit"] = _fill_matrix(self._unit_blocks())
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
            return s * (self._unit_dense() @ rhs)
        with torch.no_grad():
            return s * _blocks_matmul(self._unit_blocks(), rhs)

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        if self.dense and self._graph_free() and not batch_indices and not len(self.batch_shape):
            s = self.tensor_params["outputscale"]
            return s * self._unit_dense()[row_index, col_index]
        return super()._get_indices(row_index, col_index, *batch_indices)

    def _diagonal(self) -> Tensor:
        """``K_ii = s · g(|x1_i − x2_i|² / ℓ²)``; ``s`` (``g(0) = 1``) for the training covariance."""
        s = self.tensor_params["outputscale"].unsqueeze(-1)  # (*batch, 1)
        n = min(self.x1.shape[-2], self.x2.shape[-2])
        if _same_inputs(self.x1, self.x2):
            return s.expand(*self.batch_shape, n)
        ls = self.tensor_params["lengthscale"]
        sq = ((self.x1[..., :n, :] - self.x2[..., :n, :]) / ls).square().sum(-1)
        return s * kernel_profile(sq.clamp_min(1e-30), self.nu, derivative=False)[0]

    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor) -> tuple[Tensor | None, ...]:
        """Closed-form gradients w.r.t. ``(x1, x2, lengthscale, outputscale)`` (module docstring)."""
        if left_vecs.dim() == 1:
            left_vecs, right_vecs = left_vecs.unsqueeze(-1), right_vecs.unsqueeze(-1)
        names = list(self._differentiable_kwargs.keys())
        originals = [self.x1, self.x2, *(self._differentiable_kwargs[k] for k in names)]
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
                unit = _fill_matrix(self._unit_blocks())
        return self.tensor_params["outputscale"][..., None, None] * unit

    def _expand_batch(self, batch_shape: torch.Size) -> LinearOperator:
        op = super()._expand_batch(batch_shape)
        if isinstance(op, StationaryKernelLinearOperator):
            op.dense = self.dense
        return op


def _stationary_parts(kernel: gpytorch.kernels.Kernel) -> tuple[Any, Any, float | None] | None:
    """``(inner kernel, ScaleKernel or None, nu)`` when ``kernel`` is a supported stationary kernel."""
    scale = None
    inner = kernel
    if type(kernel) is gpytorch.kernels.ScaleKernel:
        scale, inner = kernel, kernel.base_kernel
        if inner.active_dims is not None:  # GPyTorch's ScaleKernel ignores it; leave such models alone
            return None
    if type(inner) is gpytorch.kernels.RBFKernel:
        nu = None
    elif type(inner) is gpytorch.kernels.MaternKernel and float(inner.nu) in (0.5, 1.5, 2.5):
        nu = float(inner.nu)
    else:
        return None
    if getattr(inner, "lengthscale", None) is None:
        return None
    return inner, scale, nu


def fuse_stationary_kernel(covar: Any) -> Any:
    """Replace a lazily evaluated RBF/Matérn (optionally scaled) kernel by :class:`StationaryKernelLinearOperator`.

    Accepts the covariance GPyTorch's exact GPs hand to ``log_prob``: a
    ``LazyEvaluatedKernelTensor`` or ``AddedDiagLinearOperator(LazyEvaluatedKernelTensor, noise)``.
    Anything else (other kernels, sums/products of kernels, ``active_dims`` on a wrapped kernel,
    kernel checkpointing, extra kernel kwargs) is returned unchanged, so GPyTorch's own evaluation
    runs. The value is the same kernel matrix as GPyTorch's up to rounding.
    """
    from gpytorch.lazy import LazyEvaluatedKernelTensor

    if isinstance(covar, AddedDiagLinearOperator):
        inner = fuse_stationary_kernel(covar._linear_op)
        if inner is covar._linear_op:
            return covar
        return AddedDiagLinearOperator(inner, covar._diag_tensor)
    if not isinstance(covar, LazyEvaluatedKernelTensor) or covar.last_dim_is_batch or covar.params:
        return covar
    if gpytorch.beta_features.checkpoint_kernel.value():
        return covar
    parts = _stationary_parts(covar.kernel)
    if parts is None:
        return covar
    inner, scale, nu = parts
    x1, x2 = covar.x1, covar.x2
    if x1.dim() < 2 or x2.dim() < 2:
        return covar
    ls = inner.lengthscale  # (*batch, 1, D or 1)
    if scale is not None:
        os_ = scale.outputscale  # (*batch)
    else:
        os_ = torch.ones(inner.batch_shape, dtype=ls.dtype, device=ls.device)
    try:
        op = StationaryKernelLinearOperator(x1, x2, lengthscale=ls, outputscale=os_, nu=nu)
    except RuntimeError:  # shapes GPyTorch broadcasts differently: keep its own path
        return covar
    if op.shape != covar.shape:
        return covar
    return op
