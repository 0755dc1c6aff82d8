"""Eigen-utilities on symmetric operators (LinearOperator, dense tensor, curvature operator, or ``(matvec, n)``).

* :func:`lanczos` — top-``k`` eigenpairs by thick-restart block Lanczos (``block_size``), verified by
  a deflated check, shift-invert with ``sigma``; differentiable eigenvalues;
* :func:`deflated_power_iteration` — the power-iteration baseline;
* :func:`spectral_density` — SLQ spectral density;
* :func:`trace` — Hutchinson / Hutch++;
* :func:`extreme_eigenvalues`, :func:`condition_number` — extremes with residual bounds, restarted
  after a breakdown;
* :class:`HessianOperator`, :class:`GGNOperator` (:mod:`.curvature`) — the curvature of a PyTorch
  model's loss as operators for all of the above.

GPyTorch lazy kernels are applied by row blocks (:mod:`.lazy`); half precision runs in float32.
The mathematics is in ``docs/eigen.md``.
"""

from .curvature import CurvatureOperator, GGNOperator, HessianOperator
from .density import spectral_density
from .extreme import condition_number, extreme_eigenvalues
from .power import deflated_power_iteration
from .result import (
    ConditionNumber,
    EigenResult,
    ExtremeEigenvalues,
    LanczosDiagnostics,
    SpectralDensity,
    TraceResult,
)
from .topk import Which, lanczos
from .trace import trace

__all__ = [
    "lanczos",
    "deflated_power_iteration",
    "spectral_density",
    "trace",
    "extreme_eigenvalues",
    "condition_number",
    "Which",
    "EigenResult",
    "LanczosDiagnostics",
    "TraceResult",
    "SpectralDensity",
    "ExtremeEigenvalues",
    "ConditionNumber",
    "CurvatureOperator",
    "HessianOperator",
    "GGNOperator",
]
