"""Differentiable functions on operators (linear_operator's naming): the forms and the GP routine.

* :mod:`.forms` — ``quad_form`` / ``bilinear_form``;
* :mod:`.inv_quad_logdet` — the GP routine;
* :mod:`.gp_run` — one Lanczos run of it, its options and diagnostics;
* :mod:`.block_rules` — what a deterministic-objective block holds fixed, replaces and runs longer;
* :mod:`.forward_only` — the one autograd Function that attaches forward-only gradients;
* :mod:`.validation` — early, named argument checks.
"""

from .forms import LanczosOptions, QuadFormInfo, bilinear_form, quad_form
from .inv_quad_logdet import GPOptions, InvQuadLogdetInfo, inv_quad_logdet

__all__ = [
    "GPOptions",
    "InvQuadLogdetInfo",
    "LanczosOptions",
    "QuadFormInfo",
    "bilinear_form",
    "inv_quad_logdet",
    "quad_form",
]
