"""lanczos_grad_gp: forward-only Lanczos gradients for GPyTorch / linear_operator / BoTorch.

Bilinear forms ``u^T f(A) v`` of symmetric operators and their gradients by Lanczos with the
forward-only gradient of Singh, Barros & Li (arXiv:2605.12801), an exact-GP
``inv_quad_logdet`` built on it, and a GPyTorch-style flag that switches existing models over::

    import lanczos_grad_gp as lgg
    with lgg.settings.use_lanczos_grad():
        loss = -mll(model(train_x), train_y)
        loss.backward()

Layers (each imports only those above it):

* :mod:`.core` — torch-only numerics (Lanczos, matrix functions, quadrature, the forward-only
  gradient factors, the shared engine, probes, preconditioners); no GPyTorch import;
* :mod:`.functions` — the autograd Function and the public forms / GP routine;
* :mod:`.operators` — ``LanczosGradLinearOperator``;
* :mod:`.kernels` — closed-form stationary kernels, chunked and fused kernel operators;
* :mod:`.eigen` — eigen-utilities;
* :mod:`.gpytorch_hooks` (also ``lgg.patching``) — the flag-gated hooks, installed on import and
  inert while the flag is off;
* :mod:`.app` — the CLI, training loop and data sets (not part of the library API).
"""

from . import eigen, settings
from . import gpytorch_hooks as patching
from .core.lanczos import LanczosResult, lanczos_tridiag
from .core.matfuncs import MatrixFunction, get_matrix_function
from .diagnostics import record_calls
from .functions.forms import LanczosOptions, QuadFormInfo, bilinear_form, quad_form
from .functions.inv_quad_logdet import InvQuadLogdetInfo, inv_quad_logdet
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
