"""Frozen result types of the eigen-utilities (shapes carry the operator's batch dims ``*b``)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = [
    "EigenResult",
    "LanczosDiagnostics",
    "TraceResult",
    "SpectralDensity",
    "ExtremeEigenvalues",
    "ConditionNumber",
]


@dataclass(frozen=True)
class LanczosDiagnostics:
    """How :func:`~lanczos_grad_gp.eigen.lanczos` got its result.

    Attributes:
        block_size: ``b``, the columns of each Lanczos block.
        num_matvecs: every product with the operator ``A`` (vectors): iteration, deflated checks,
            repairs, the final residual product where one is spent (always for shift-invert, which
            also counts its inner solves; in plain mode only where the stored products ``A Q`` are
            not trusted, see ``EigenResult.residuals``).
        verified: ``(*b)`` all pairs converged and the deflated check (:mod:`~lanczos_grad_gp.eigen.verify`)
            found no eigenvalue beyond them in their orthogonal complement (False where no check ran).
        checks: deflated checks run; repairs: restarts from a check's findings.
        sigma: the shift of shift-invert (``None``: plain mode).
        solve_matvecs: products with ``A`` inside the shift-invert solves (0 in plain mode).
        solve_worst_residual: the largest relative residual of an inner solve (0 in plain mode).
    """

    block_size: int
    num_matvecs: int
    verified: Tensor
    checks: int
    repairs: int
    sigma: float | None = None
    solve_matvecs: int = 0
    solve_worst_residual: float = 0.0


@dataclass(frozen=True)
class EigenResult:
    """``k`` eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: ``(*b, k)`` ordered by ``which`` (``"LM"``: decreasing ``|λ|``, ``"LA"``:
            decreasing, ``"SA"``: increasing; with ``sigma``: increasing ``|λ − σ|``). Differentiable
            w.r.t. the operator's tensors (``∂λ_i = y_i^T ∂A y_i``).
        eigenvectors: ``(*b, k, n)`` orthonormal rows ``y_i`` (detached).
        residuals: ``(*b, k)`` TRUE residuals ``‖A y_i − λ_i y_i‖`` against the original operator (for
            :func:`~lanczos_grad_gp.eigen.lanczos` from the stored products ``A y_i = (A Q) z_i`` when
            their recombination rounding, ``√ncv ε ‖A‖`` per restart, stays below a tenth of the
            tolerance and the operator works at the working precision; else from a final product).
        iterations: ``(*b)`` int64, operator applications (vectors: Lanczos block columns including
            the deflated checks / power iterations) used; for shift-invert applications of
            ``(A − σI)^{-1}``. ``int(result.iterations)`` for an unbatched operator.
        converged: ``(*b, k)`` whether the algorithm's stopping test passed for each pair (for
            :func:`~lanczos_grad_gp.eigen.lanczos`: the TRUE residual is
            ``≤ 10·tol·max(|λ|, ε^{2/3}‖A‖) + 100 ε ‖A‖`` AND the deflated check supports the pair).
        diagnostics: :class:`LanczosDiagnostics` (``None`` for power iteration).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    iterations: Tensor
    converged: Tensor
    diagnostics: LanczosDiagnostics | None = None


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
    extreme eigenvalue (not an interior one), which holds once Lanczos has converged there. An end
    that did not converge (or whose Krylov space broke down with no restart left) has the outer
    bound ``±inf``: only the interlacing side is known.

    Attributes:
        lambda_max, lambda_min: ``(*b)`` Ritz estimates ``θ_max``, ``θ_min``.
        lambda_max_bounds, lambda_min_bounds: ``(*b, 2)`` ``[lower, upper]`` intervals.
        residual_max, residual_min: ``(*b)`` true residuals ``r_max``, ``r_min``.
        iterations: ``(*b)`` Lanczos steps (all restarts).
        converged_max, converged_min: ``(*b)`` the end met the tolerance with no unresolved breakdown.
        restarts: restarts after a breakdown (an invariant start subspace).
    """

    lambda_max: Tensor
    lambda_min: Tensor
    lambda_max_bounds: Tensor
    lambda_min_bounds: Tensor
    residual_max: Tensor
    residual_min: Tensor
    iterations: Tensor
    converged_max: Tensor | None = None
    converged_min: Tensor | None = None
    restarts: int = 0


@dataclass(frozen=True)
class ConditionNumber:
    """``κ = λ_max / λ_min`` of a positive definite operator with bounds.

    Attributes:
        estimate: ``(*b)`` ``θ_max / θ_min``.
        lower: ``(*b)`` ``θ_max / θ_min`` is also a rigorous lower bound by interlacing.
        upper: ``(*b)`` ``(θ_max + r_max) / (θ_min − r_min)`` (``inf`` when ``θ_min ≤ r_min`` or an end
            did not converge).
        extremes: the underlying :class:`ExtremeEigenvalues`.
        converged: ``(*b)`` both ends converged.
    """

    estimate: Tensor
    lower: Tensor
    upper: Tensor
    extremes: ExtremeEigenvalues
    converged: Tensor | None = None
