r"""Stationary kernel profiles: ONE registry of the closed-form kernels (RBF, Matérn ½, 3/2, 5/2).

A stationary kernel is ``K_ij = s · g(r²_ij)`` with ``r²_ij = Σ_d (x_id − x'_jd)² / ℓ_d²``. The
fused operator (:mod:`.stationary`) and its closed-form gradient (:mod:`.derivative`) need only
the profile ``g`` and ``g' = dg/d(r²)``; a new closed-form kernel is ONE :class:`StationaryProfile`
entry in :data:`PROFILES` (with the GPyTorch class it stands for, which :mod:`.matcher` uses):

* RBF: ``g = e^{-r²/2}``, ``g' = −g / 2``;
* Matérn ν = ½: ``g = e^{-r}``, ``g' = −e^{-r} / (2r)`` (0 for ``r < sqrt(eps)``, see :func:`kernel_profile`);
* Matérn ν = 3/2: ``g = (1 + √3 r) e^{-√3 r}``, ``g' = −(3/2) e^{-√3 r}``;
* Matérn ν = 5/2: ``g = (1 + √5 r + 5r²/3) e^{-√5 r}``, ``g' = −(5/6)(1 + √5 r) e^{-√5 r}``

(GPyTorch's ``RBFKernel`` / ``MaternKernel`` conventions).

Example:
    >>> import torch
    >>> g, dg = kernel_profile(torch.tensor([0.0, 1.0], dtype=torch.float64), None)
    >>> [round(float(x), 4) for x in g], [round(float(x), 4) for x in dg]
    ([1.0, 0.6065], [-0.5, -0.3033])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PROFILES", "StationaryProfile", "get_profile", "kernel_profile", "matern_covar", "rbf_covar"]


def _scaled_sq_dist(x1: Tensor, x2: Tensor, lengthscale: Tensor) -> Tensor:
    """``|x1_i - x2_j|² / ℓ²`` (ARD), clamped at 0; broadcasts over batch dimensions."""
    a, b = x1 / lengthscale, x2 / lengthscale
    # centre for accuracy of the expanded form |a|² - 2 a·b + |b|²
    mu = a.mean(-2, keepdim=True) if a.shape[-2] >= b.shape[-2] else b.mean(-2, keepdim=True)
    a, b = a - mu, b - mu
    sq = a.square().sum(-1, keepdim=True) - 2 * (a @ b.mT) + b.square().sum(-1, keepdim=True).mT
    return sq.clamp_min(0)


def rbf_covar(x1: Tensor, x2: Tensor, *, lengthscale: Tensor, outputscale: Tensor) -> Tensor:
    r"""Dense RBF-ARD block ``s · exp(-|x1_i - x2_j|² / 2ℓ²)``.

    Args:
        x1: ``(*batch, M, D)``; x2: ``(*batch, N, D)``.
        lengthscale: ``(*batch, 1, D)`` (or ``(*batch, 1, 1)``).
        outputscale: ``(*batch)`` (a 0-d tensor for an unbatched kernel).
    """
    return outputscale[..., None, None] * torch.exp(-0.5 * _scaled_sq_dist(x1, x2, lengthscale))


def matern_covar(x1: Tensor, x2: Tensor, *, lengthscale: Tensor, outputscale: Tensor, nu: float = 2.5) -> Tensor:
    """Dense Matérn block (``nu`` in 0.5, 1.5, 2.5), same parameter shapes as :func:`rbf_covar`."""
    d = (_scaled_sq_dist(x1, x2, lengthscale) + 1e-30).sqrt()  # +tiny keeps the sqrt differentiable at 0
    e = torch.exp(-math.sqrt(2 * nu) * d)
    if nu == 0.5:
        poly = torch.ones_like(d)
    elif nu == 1.5:
        poly = 1 + math.sqrt(3) * d
    elif nu == 2.5:
        poly = 1 + math.sqrt(5) * d + 5.0 / 3.0 * d.square()
    else:
        raise ValueError(f"nu must be 0.5, 1.5 or 2.5; got {nu}.")
    return outputscale[..., None, None] * poly * e


def _rbf(sq: Tensor, derivative: bool) -> tuple[Tensor, Tensor | None]:
    g = torch.exp(-0.5 * sq)
    return g, (-0.5 * g if derivative else None)


def _matern12(sq: Tensor, derivative: bool) -> tuple[Tensor, Tensor | None]:
    r = sq.sqrt()
    e = torch.exp(-r)
    if not derivative:
        return e, None
    r_min = torch.finfo(sq.dtype).eps ** 0.5  # see kernel_profile
    return e, torch.where(r > r_min, -0.5 * e / r.clamp_min(r_min), torch.zeros_like(e))


def _matern32(sq: Tensor, derivative: bool) -> tuple[Tensor, Tensor | None]:
    r = sq.sqrt()
    e = torch.exp(-math.sqrt(3.0) * r)
    return (1 + math.sqrt(3.0) * r) * e, (-1.5 * e if derivative else None)


def _matern52(sq: Tensor, derivative: bool) -> tuple[Tensor, Tensor | None]:
    r = sq.sqrt()
    e = torch.exp(-math.sqrt(5.0) * r)
    lin = 1 + math.sqrt(5.0) * r
    return (lin + (5.0 / 3.0) * sq) * e, ((-5.0 / 6.0) * lin * e if derivative else None)


def _rbf_(sq: Tensor) -> Tensor:
    return sq.mul_(-0.5).exp_()


def _matern12_(sq: Tensor) -> Tensor:
    return sq.sqrt_().neg_().exp_()


def _matern32_(sq: Tensor) -> Tensor:
    t = sq.sqrt_().mul_(math.sqrt(3.0))  # t = √3 r
    e = torch.exp(-t)
    return t.add_(1).mul_(e)  # (1 + √3 r) e^{-√3 r}


def _matern52_(sq: Tensor) -> Tensor:
    t = sq.sqrt_().mul_(math.sqrt(5.0))  # t = √5 r
    e = torch.exp(-t)
    return t.addcmul_(t, t, value=1.0 / 3.0).add_(1).mul_(e)  # (1 + √5 r + 5r²/3) e^{-√5 r}


@dataclass(frozen=True)
class StationaryProfile:
    """One closed-form stationary kernel: everything the fused operator and its gradient need.

    Attributes:
        name: short name.
        kernel_class: the GPyTorch kernel class name it stands for (``"RBFKernel"``, ``"MaternKernel"``).
        nu: Matérn smoothness (``None`` for RBF); also the registry key.
        profile: ``(r², derivative) -> (g(r²), g'(r²) or None)``, elementwise.
        fill_: ``r² -> g(r²)`` written in place over its argument (the products' hot path).
        covar: dense, autograd-capable ``covar(x1, x2, *, lengthscale, outputscale) -> (*b, M, N)``.
        gaussian: ``g = e^{-r²/2}`` (RBF): blocks of ``−r²/2`` come from one GEMM, one ``exp_`` from
            ``g``, and ``g' = −g/2`` lets the derivative reuse ``g``.
    """

    name: str
    kernel_class: str
    nu: float | None
    profile: Callable[[Tensor, bool], tuple[Tensor, Tensor | None]]
    fill_: Callable[[Tensor], Tensor]
    covar: Callable[..., Tensor]
    gaussian: bool = False


def _matern(nu: float) -> Callable[..., Tensor]:
    def covar(x1: Tensor, x2: Tensor, *, lengthscale: Tensor, outputscale: Tensor) -> Tensor:
        return matern_covar(x1, x2, lengthscale=lengthscale, outputscale=outputscale, nu=nu)

    return covar


#: the registry: key ``nu`` (``None`` for RBF) -> profile. A new closed-form kernel is one entry here.
PROFILES: dict[float | None, StationaryProfile] = {
    None: StationaryProfile("rbf", "RBFKernel", None, _rbf, _rbf_, rbf_covar, gaussian=True),
    0.5: StationaryProfile("matern12", "MaternKernel", 0.5, _matern12, _matern12_, _matern(0.5)),
    1.5: StationaryProfile("matern32", "MaternKernel", 1.5, _matern32, _matern32_, _matern(1.5)),
    2.5: StationaryProfile("matern52", "MaternKernel", 2.5, _matern52, _matern52_, _matern(2.5)),
}


def get_profile(nu: float | None) -> StationaryProfile:
    """The registered profile for ``nu`` (``None``: RBF); ``ValueError`` otherwise."""
    key = None if nu is None else float(nu)
    if key not in PROFILES:
        raise ValueError(f"nu must be None (RBF), 0.5, 1.5 or 2.5; got {nu!r}.")
    return PROFILES[key]


def kernel_profile(sq: Tensor, nu: float | None, *, derivative: bool = True) -> tuple[Tensor, Tensor | None]:
    """``g(r²)`` and ``g'(r²) = dg/d(r²)`` of the unit-outputscale kernel (``nu=None``: RBF).

    ``sq`` is the scaled squared distance ``r²`` (``≥ 0``). Matérn-½'s ``g' = −e^{-r}/(2r)`` is
    unbounded at ``r → 0``, where it only ever multiplies ``(u_id − u'_jd)² ≤ r²`` (a pair
    contributes ``O(r)``); pairs closer than ``r_min = sqrt(eps)`` are dropped (``g' = 0``, error
    ``≤ r_min/2`` per pair) because the expanded contraction would amplify their rounding by ``1/r``.
    """
    return get_profile(nu).profile(sq, derivative)
