r"""Closed-form, row-blocked gradient of ``tr(L^T K R)`` for a stationary kernel ``K = s · g(r²)``.

The exact-GP gradient needs ``∂/∂θ tr(L^T K(θ) R)`` for thin factors ``L, R`` (``(*batch, n, k)``;
docs/mathematics.md, "Integration with GPyTorch, linear_operator and BoTorch"). linear_operator's
default forms the ``n × n`` matrix ``L R^T`` and back-propagates it through GPyTorch's kernel
construction. For a stationary kernel the same gradient is a row-block contraction. With
``G = L R^T``, ``W = G ∘ g'(r²)`` and the scaled inputs ``u = x / ℓ``, ``u' = x' / ℓ``:

.. math::
    \frac{∂}{∂s} = \sum_{ij} G_{ij}\, g(r^2_{ij}),\qquad
    \frac{∂}{∂ℓ_d} = -\frac{2s}{ℓ_d} \sum_{ij} W_{ij} (u_{id} - u'_{jd})^2,

    \frac{∂}{∂x_{id}} = \frac{2s}{ℓ_d}\Big(u_{id} \sum_j W_{ij} - (W u')_{id}\Big),\qquad
    \frac{∂}{∂x'_{jd}} = \frac{2s}{ℓ_d}\Big(u'_{jd} \sum_i W_{ij} - (W^\top u)_{jd}\Big),

and ``Σ_ij W_ij (u_id − u'_jd)² = Σ_i u_id² Σ_j W_ij + Σ_j u'_jd² Σ_i W_ij − 2 Σ_i u_id (W u')_id``
(inputs centred first, so the expansion does not cancel). Per row block ``b`` this is one
``(b × k)(k × n)`` product for ``G_b``, elementwise work and one ``(b × n)(n × D)`` product:
``O(n · (k + D))`` flops per row, ``O(b · n)`` memory, no autograd graph over ``n × n`` tensors.
The profiles ``g, g'`` come from the registry in :mod:`.profiles`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .blocks import UnitBlocks, row_blocks, sum_to_shape

__all__ = ["stationary_bilinear_derivative"]

#: entries of one row block in the closed-form derivative (2 MiB in float64: stays in cache)
_DERIV_BLOCK_ENTRIES = 2**18


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
        blocks = UnitBlocks(x1, x2, lengthscale, nu)
        gaussian = blocks.profile.gaussian
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
        slices = row_blocks(m, n, block_entries)
        buf = u1.new_empty(*blocks.batch, (slices[0].stop - slices[0].start) if slices else 0, n)  # reused
        for rows in slices:
            u1b = u1[..., rows, :]  # (*batch, b, D)
            blk = buf[..., : rows.stop - rows.start, :]
            gram = left[..., rows, :] @ rt  # (*batch, b, N): rows of G = L R^T
            if gaussian:  # RBF: g' = -g/2, so W = -(G ∘ g)/2; the -1/2 is applied once at the end
                w = gram.mul_(blocks.fill(rows, blk))
                if grad_s is not None:
                    grad_s += w.sum((-2, -1))
            else:
                g, dg = blocks.profile.profile(blocks.fill_sq(rows, blk), want_w)
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
        w_scale = -0.5 if gaussian else 1.0
        factor = (2 * w_scale) * s / lengthscale  # (*batch, 1, D) or (*batch, 1, 1)
        g_x1 = None if gx1 is None else sum_to_shape(factor * gx1, x1.shape)
        g_x2 = None
        if wt_u1 is not None:
            g_x2 = sum_to_shape(factor * (u2 * col_w.unsqueeze(-1) - wt_u1), x2.shape)
        g_ls = None
        if need[2]:
            sq_sum = sq_sum + (u2.square() * col_w.unsqueeze(-1)).sum(-2)
            g_ls = sum_to_shape(-factor * sq_sum.unsqueeze(-2), lengthscale.shape)
        g_s = None if grad_s is None else sum_to_shape(grad_s, outputscale.shape)
    return g_x1, g_x2, g_ls, g_s
