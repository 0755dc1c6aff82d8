"""lanczos_grad_gp: forward-only Lanczos gradients for GPyTorch / linear_operator / BoTorch."""

from .forms import LanczosOptions, QuadFormInfo, bilinear_form, quad_form
from .lanczos import LanczosResult, lanczos_tridiag
from .matfuncs import MatrixFunction, get_matrix_function

__version__ = "0.1.0.dev0"

__all__ = [
    "LanczosOptions",
    "LanczosResult",
    "MatrixFunction",
    "QuadFormInfo",
    "bilinear_form",
    "get_matrix_function",
    "lanczos_tridiag",
    "quad_form",
]
