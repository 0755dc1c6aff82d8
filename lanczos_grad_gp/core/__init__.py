"""Torch-only numerics: no GPyTorch import (linear_operator only for its operator types and errors).

* :mod:`.lanczos` — the one batched Lanczos loop;
* :mod:`.matfuncs` — matrix functions and their stable divided differences;
* :mod:`.quadrature` — Ritz decomposition, Gauss quadrature, function residuals;
* :mod:`.forward_grad` — the forward-only gradient factors (arXiv:2605.12801);
* :mod:`.engine` — the one pure forward every form shares;
* :mod:`.probes` — random start vectors, one seeding policy;
* :mod:`.norms` — scale-safe norms;
* :mod:`.preconditioners` — the preconditioner protocol, pivoted Cholesky.
"""

from .engine import ColumnDiagnostics, ColumnGroup, EngineOptions, EngineResult, default_tol, lanczos_forward
from .lanczos import LanczosResult, lanczos_tridiag
from .matfuncs import BUILTIN_FUNCTIONS, MatrixFunction, divided_differences, get_matrix_function

__all__ = [
    "BUILTIN_FUNCTIONS",
    "ColumnDiagnostics",
    "ColumnGroup",
    "EngineOptions",
    "EngineResult",
    "LanczosResult",
    "MatrixFunction",
    "default_tol",
    "divided_differences",
    "get_matrix_function",
    "lanczos_forward",
    "lanczos_tridiag",
]
