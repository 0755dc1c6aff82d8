"""Frozen result types of the eigen-utilities (shapes carry the operator's batch dims ``*b``)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["EigenResult", "TraceResult", "SpectralDensity", "ExtremeEigenvalues", "ConditionNumber"]


@dataclass(frozen=True)
class EigenResult:
    """``k`` eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: ``(*b, k)`` ordered by ``which`` (``"LM"``: decreasing ``|λ|``, ``"LA"``:
            decreasing, ``"SA"``: increasing). Differentiable w.r.t. the operator's tensors
            (``∂λ_i = y_i^T ∂A y_i``) for :func:`~lanczos_grad_gp.eigen.lanczos`.
        eigenvectors: ``(*b, k, n)`` orthonormal rows ``y_i`` (detached).
        residuals: ``(*b, k)`` TRUE residuals ``‖A y_i − λ_i y_i‖`` against the original operator.
        iterations: ``(*b)`` int64, operator applications (Lanczos steps / power iterations)
            used; ``int(result.iterations)`` for an unbatched operator.
        converged: ``(*b, k)`` whether the algorithm's stopping test passed for each pair (for
            :func:`~lanczos_grad_gp.eigen.lanczos` also confirmed by the TRUE residual,
            ``≤ 10·tol·max(|λ|, ε^{2/3}‖A‖) + 100 ε ‖A‖``).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    iterations: Tensor
    converged: Tensor


@dataclass(frozen=True)
class TraceResult:
    """Stochastic trace estimate.

    Attributes:
        estimate: ``(*b)`` estimate of ``tr(A)``.
        standard_error: ``(*b)`` standard error of the estimate (sample std of the probe
            values ``/ sqrt(#probes)``; only the stochastic part for Hutch++; ``inf`` with one
            probe).
        num_matvecs: operator applications used (columns of all matmuls).
    """

    estimate: Tensor
    standard_error: Tensor
    num_matvecs: int


@dataclass(frozen=True)
class SpectralDensity:
    """Gaussian-smoothed spectral density ``φ_σ(t) ≈ (1/n) Σ_j g_σ(t − λ_j)`` by SLQ.

    Attributes:
        grid: ``(G,)`` evaluation points ``t``.
        density: ``(*b, G)`` the smoothed density; integrates to ~1 over the real line.
        nodes: ``(*b, P, m)`` Ritz values ``θ_{p,i}`` of each probe's Lanczos run.
        weights: ``(*b, P, m)`` Gauss weights ``τ_{p,i}²`` (each probe's weights sum to 1).
        sigma: width of the Gaussian kernel ``g_σ``.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float


@dataclass(frozen=True)
class ExtremeEigenvalues:
    """Extreme eigenvalue estimates with residual bounds.

    ``θ`` are Ritz values and ``r = ‖A y − θ y‖`` the true residuals of their Ritz vectors;
    some eigenvalue lies in ``[θ − r, θ + r]`` (Kahan–Parlett), and by interlacing
    ``θ_max ≤ λ_max`` and ``λ_min ≤ θ_min``. Hence ``λ_max ∈ [θ_max, θ_max + r_max]`` and
    ``λ_min ∈ [θ_min − r_min, θ_min]``; the outer ends assume the Ritz value approximates the
    extreme eigenvalue (not an interior one), which holds once Lanczos has converged there.

    Attributes:
        lambda_max, lambda_min: ``(*b)`` Ritz estimates ``θ_max``, ``θ_min``.
        lambda_max_bounds, lambda_min_bounds: ``(*b, 2)`` ``[lower, upper]`` intervals.
        residual_max, residual_min: ``(*b)`` true residuals ``r_max``, ``r_min``.
        iterations: ``(*b)`` Lanczos steps.
    """

    lambda_max: Tensor
    lambda_min: Tensor
    lambda_max_bounds: Tensor
    lambda_min_bounds: Tensor
    residual_max: Tensor
    residual_min: Tensor
    iterations: Tensor


@dataclass(frozen=True)
class ConditionNumber:
    """``κ = λ_max / λ_min`` of a positive definite operator with bounds.

    Attributes:
        estimate: ``(*b)`` ``θ_max / θ_min``.
        lower: ``(*b)`` ``θ_max / θ_min`` is also a rigorous lower bound by interlacing.
        upper: ``(*b)`` ``(θ_max + r_max) / (θ_min − r_min)`` (``inf`` when ``θ_min ≤ r_min``).
        extremes: the underlying :class:`ExtremeEigenvalues`.
    """

    estimate: Tensor
    lower: Tensor
    upper: Tensor
    extremes: ExtremeEigenvalues
