"""Eigen-utilities on symmetric operators (LinearOperator, dense tensor, or ``(matvec, n)``).

* :func:`lanczos` — top-``k`` eigenpairs by thick-restart Lanczos, differentiable eigenvalues;
* :func:`deflated_power_iteration` — the power-iteration baseline;
* :func:`spectral_density` — SLQ spectral density;
* :func:`trace` — Hutchinson / Hutch++;
* :func:`extreme_eigenvalues`, :func:`condition_number` — extremes with residual bounds.
"""

from .density import spectral_density
from .extreme import condition_number, extreme_eigenvalues
from .power import deflated_power_iteration
from .result import ConditionNumber, EigenResult, ExtremeEigenvalues, SpectralDensity, TraceResult
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
    "TraceResult",
    "SpectralDensity",
    "ExtremeEigenvalues",
    "ConditionNumber",
]
