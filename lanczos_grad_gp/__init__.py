"""lanczos_grad_gp: forward-only Lanczos gradients for GPyTorch / linear_operator / BoTorch.

Bilinear forms ``u^T f(A) v`` of symmetric operators and their gradients by Lanczos with the
forward-only gradient of Singh, Barros & Li (arXiv:2605.12801), an exact-GP
``inv_quad_logdet`` built on it, and a GPyTorch-style flag that switches existing models over::

    import lanczos_grad_gp as lgg
    with lgg.settings.use_lanczos_grad():
        loss = -mll(model(train_x), train_y)
        loss.backward()

Importing the package installs flag-gated hooks (see :mod:`lanczos_grad_gp.patching`); they
do nothing while the flag is off.
"""

from . import eigen, patching, settings
from .forms import LanczosOptions, QuadFormInfo, bilinear_form, quad_form
from .inv_quad_logdet import InvQuadLogdetInfo, inv_quad_logdet, record_calls
from .lanczos import LanczosResult, lanczos_tridiag
from .matfuncs import MatrixFunction, get_matrix_function
from .operators import LanczosGradLinearOperator

__version__ = "0.1.0.dev0"

patching.install()

__all__ = [
    "InvQuadLogdetInfo",
    "LanczosGradLinearOperator",
    "LanczosOptions",
    "LanczosResult",
    "MatrixFunction",
    "QuadFormInfo",
    "bilinear_form",
    "eigen",
    "get_matrix_function",
    "inv_quad_logdet",
    "lanczos_tridiag",
    "patching",
    "quad_form",
    "record_calls",
    "settings",
]
