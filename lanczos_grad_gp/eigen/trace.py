r"""Stochastic trace estimators.

* Hutchinson (1989): ``tr(A) ≈ (1/N) Σ_j z_j^\top A z_j`` with Rademacher ``z_j``
  (``E[z z^T] = I``); variance ``2(‖A‖_F² − Σ_i A_ii²)/N``.
* Hutch++ (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: Optimal Stochastic Trace
  Estimation"): with ``N`` matvecs, ``s = ⌊N/3⌋`` sketch columns ``S``, ``Q = qr(A S)``, and
  ``g = N − 2s`` Rademacher ``G``:
  ``tr(A) ≈ tr(Q^\top A Q) + (1/g) tr(G^\top (I − QQ^\top) A (I − QQ^\top) G)``;
  error ``O(1/N)`` instead of ``O(1/\sqrt{N})`` for PSD ``A`` with decaying spectrum.

The standard error is the sample standard deviation of the per-probe values over
``sqrt(#probes)`` (the deflated part only for Hutch++; ``tr(Q^T A Q)`` is exact given ``Q``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .inputs import holds_operator_fixed, prepare_operator, rademacher, resolve_generator
from .result import TraceResult

__all__ = ["trace"]


def _mean_se(vals: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard error over the last dim (``inf`` error with one sample)."""
    mean = vals.mean(-1)
    if vals.shape[-1] < 2:
        return mean, torch.full_like(mean, float("inf"))
    return mean, vals.std(-1, correction=1) / vals.shape[-1] ** 0.5


@holds_operator_fixed
def trace(
    operator: object,
    *,
    num_matvecs: int,
    method: Literal["hutchinson", "hutch++"] = "hutchinson",
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> TraceResult:
    """Estimate ``tr(A)`` with ``num_matvecs`` operator applications.

    Args:
        operator: LinearOperator, dense ``(*b, n, n)`` tensor, or ``(matvec, n)`` tuple.
        num_matvecs: operator applications (``≥ 1``; ``≥ 3`` for ``"hutch++"``).
        method: ``"hutchinson"`` or ``"hutch++"``.
        seed, generator: randomness of the probes (one or the other).

    Example:
        >>> import torch
        >>> from lanczos_grad_gp.eigen import trace
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> float(trace(A, num_matvecs=4, seed=0).estimate)  # Rademacher probes are exact on diagonals
        5050.0
    """
    if method not in ("hutchinson", "hutch++"):
        raise ValueError(f"method must be 'hutchinson' or 'hutch++'; got {method!r}.")
    need = 3 if method == "hutch++" else 1
    if isinstance(num_matvecs, bool) or not isinstance(num_matvecs, int) or num_matvecs < need:
        raise ValueError(f"num_matvecs must be an int >= {need} for method={method!r}; got {num_matvecs!r}.")
    op = prepare_operator(operator)
    gen = resolve_generator(seed, generator, op.device)
    batch, n, dtype, device = tuple(op.batch_shape), op.n, op.dtype, op.device
    if method == "hutchinson":
        Z = rademacher((*batch, n, num_matvecs), gen, dtype, device)
        vals = (Z * op.matmul(Z)).sum(-2)  # (*b, N)
        est, se = _mean_se(vals)
        return TraceResult(est, se, num_matvecs)
    s = num_matvecs // 3
    g = num_matvecs - 2 * s
    S = rademacher((*batch, n, s), gen, dtype, device)
    Q, _ = torch.linalg.qr(op.matmul(S))  # (*b, n, s)
    exact = (Q * op.matmul(Q)).sum((-2, -1))  # tr(Q^T A Q)
    G = rademacher((*batch, n, g), gen, dtype, device)
    G = G - Q @ (Q.mT @ G)
    vals = (G * op.matmul(G)).sum(-2)  # (*b, g); (I-QQ^T) A (I-QQ^T) symmetric: one projection suffices
    est, se = _mean_se(vals)
    return TraceResult(exact + est, se, num_matvecs)
