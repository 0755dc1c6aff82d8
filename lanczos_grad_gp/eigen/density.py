r"""Spectral density by stochastic Lanczos quadrature (SLQ).

The normalised spectral measure ``μ = (1/n) Σ_j δ_{λ_j}`` satisfies
``∫ f dμ = tr f(A)/n = E[z^\top f(A) z]`` for unit-norm probes with ``E[z z^T] = I/n``. For each
probe ``z_p``, ``m`` Lanczos steps give Gauss quadrature nodes ``θ_{p,i}`` (Ritz values) and
weights ``τ_{p,i}² = (e_1^\top s_i)²`` with ``z_p^\top f(A) z_p ≈ Σ_i τ_{p,i}² f(θ_{p,i})``
(Golub & Meurant 2009). Averaging over probes and smoothing with a Gaussian ``g_σ``:

.. math::
    φ_σ(t) = \frac{1}{P} \sum_{p=1}^{P} \sum_{i=1}^{m} τ_{p,i}^2\, g_σ(t − θ_{p,i}),
    \qquad g_σ(x) = \frac{e^{-x^2/(2σ^2)}}{σ\sqrt{2π}}.

References: Lin, Saad & Yang (2016), "Approximating spectral densities of large matrices",
SIAM Review 58(1); Ubaru, Chen & Saad (2017), "Fast estimation of tr(f(A)) via stochastic
Lanczos quadrature", SIAM J. Matrix Anal. Appl. 38(4).

All probes run side by side in ONE batched :func:`~lanczos_grad_gp.lanczos.lanczos_tridiag` call
(no reorthogonalization by default: Gauss quadrature of a smooth kernel is robust to the loss of
orthogonality, ghost copies split their weight).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.lanczos import lanczos_tridiag
from ..core.quadrature import ritz_decomposition
from .inputs import holds_operator_fixed, prepare_operator, rademacher, resolve_generator
from .result import SpectralDensity

__all__ = ["spectral_density"]


@holds_operator_fixed
def spectral_density(
    operator: object,
    *,
    num_probes: int,
    num_iters: int,
    grid: int | Tensor | None = None,
    sigma: float | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    reorthogonalize: bool = False,
) -> SpectralDensity:
    """Gaussian-smoothed spectral density by SLQ (module docstring).

    Args:
        operator: symmetric LinearOperator, dense ``(*b, n, n)`` tensor, or ``(matvec, n)`` tuple.
        num_probes: Rademacher probes ``P`` (normalised to unit norm).
        num_iters: Lanczos steps ``m`` per probe (clipped to ``n``).
        grid: number of evaluation points (``None``: 512) spanning
            ``[θ_min − 4σ, θ_max + 4σ]``, or a 1-D tensor of points.
        sigma: kernel width; ``None``: ``(θ_max − θ_min) / (2 m)``, about half the spacing of
            ``m`` Gauss nodes (Lin, Saad & Yang 2016 tie the resolution to the degree).
        seed, generator: randomness of the probes (one or the other).
        reorthogonalize: full reorthogonalization of each probe's Lanczos run.
    """
    for name, val in (("num_probes", num_probes), ("num_iters", num_iters)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int; got {val!r}.")
    if sigma is not None and not (isinstance(sigma, (int, float)) and 0 < sigma < float("inf")):
        raise ValueError(f"sigma must be a positive finite number or None; got {sigma!r}.")
    op = prepare_operator(operator)
    gen = resolve_generator(seed, generator, op.device)
    batch, n, dtype, device = tuple(op.batch_shape), op.n, op.dtype, op.device
    Z = rademacher((*batch, n, num_probes), gen, dtype, device) / math.sqrt(n)  # (*b, n, P) unit columns
    res = lanczos_tridiag(op.matmul, Z, max_iter=num_iters, reorthogonalize=reorthogonalize)
    if not bool(torch.isfinite(res.alpha).all() & torch.isfinite(res.beta).all()):
        raise ValueError("The operator produced NaN or Inf in a matrix-vector product.")
    ritz = ritz_decomposition(res)
    nodes = ritz.values  # (*b, P, m) compute dtype
    weights = ritz.weights.square()  # (*b, P, m); padded pairs have weight 0
    used = weights > 0
    lo = float(torch.where(used, nodes, torch.full_like(nodes, float("inf"))).min())
    hi = float(torch.where(used, nodes, torch.full_like(nodes, -float("inf"))).max())
    if sigma is None:
        width = hi - lo
        sigma = width / (2 * res.num_steps) if width > 0 else max(abs(hi), 1.0) * 1e-3
    if grid is None or isinstance(grid, int) and not isinstance(grid, bool):
        G = 512 if grid is None else grid
        if G < 2:
            raise ValueError(f"grid must have at least 2 points; got {G}.")
        t = torch.linspace(lo - 4 * sigma, hi + 4 * sigma, G, dtype=nodes.dtype, device=device)
    elif isinstance(grid, Tensor) and grid.dim() == 1 and grid.numel() >= 1:
        t = grid.to(device=device, dtype=nodes.dtype)
    else:
        raise ValueError("grid must be None, an int >= 2, or a 1-D tensor of points.")
    diff = t.view(*([1] * len(nodes.shape)), -1) - nodes.unsqueeze(-1)  # (*b, P, m, G)
    kern = torch.exp(-0.5 * (diff / sigma).square()) / (sigma * math.sqrt(2 * math.pi))
    density = (weights.unsqueeze(-1) * kern).sum(-2).mean(-2)  # (*b, G)
    out_dtype = dtype
    return SpectralDensity(
        grid=t.to(out_dtype),
        density=density.to(out_dtype),
        nodes=nodes.to(out_dtype),
        weights=weights.to(out_dtype),
        sigma=float(sigma),
    )
