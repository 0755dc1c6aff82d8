"""Matrix functions and their divided differences, against float64 closed forms / midpoint series.

Reference (tests/conftest.py ``loewner_reference``): for gaps ``|h| ≤ 1e-4`` of the scale the series
``f'(c) + f'''(c) h²/24`` (truncation ``O((h/c)⁴) ≤ 1e-16`` relative), otherwise the plain quotient
(cancellation ``eps·|f|/|h|``, ≤ a few eps for the O(1) gaps used here). Gaps in the test lie in
``{0, 1e-15, 1e-10, 1e-5}`` (series) or ``≥ 0.3`` of the scale (quotient), never in between.

Tolerances: the built-ins use exact rewritings (log1p, expm1, rationalised sqrt), so their error is a
few ulps: we allow ``16·eps``. Custom functions use the generic formula: the quotient down to gaps of
``eps^{1/3}`` of the scale, ``f'`` at the midpoint below; its error is bounded by
``max(eps·|f|/|h|, |f'''| h²/24)`` at the switch point ``h = eps^{1/3}``, i.e. ``O(eps^{2/3})``; we
allow ``10·eps^{2/3}``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_FUNCTIONS, BUILTINS, SCALAR_FUNCTIONS, eps, library_f, loewner_reference

from lanczos_grad_gp.core.matfuncs import BUILTIN_FUNCTIONS, MatrixFunction, divided_differences, get_matrix_function

GAPS = (0.0, 1e-15, 1e-10, 1e-5)
CENTRES = {
    # relative-gap functions: centres across scales; gaps are relative (λ = c·(1 + g))
    "log": (1e-3, 0.7, 1e3),
    "inv": (1e-3, 0.7, 1e3),
    "sqrt": (1e-3, 0.7, 1e3),
    "invsqrt": (1e-3, 0.7, 1e3),
    # absolute-gap functions (λ = c + g)
    "exp": (-20.0, 0.7, 30.0),
    "custom": (0.0, 0.7, 5.0),
    "custom_pair": (-2.0, 0.7, 3.0),
}


def ritz_like(name: str, c: float, dtype) -> torch.Tensor:
    """Clusters of (nearly) coincident values at c and at a second centre, plus one far value."""
    relative = SCALAR_FUNCTIONS[name][3]
    g = torch.tensor(GAPS, dtype=torch.float64)
    if relative:
        lam = torch.cat([c * (1 + g), 2.5 * c * (1 + g[:2]), torch.tensor([0.3 * c], dtype=torch.float64)])
    else:
        lam = torch.cat([c + g, (c + 1.0) + g[:2], torch.tensor([c - 0.3], dtype=torch.float64)])
    return lam.to(dtype)


def tolerance(name: str, dtype) -> float:
    return 16 * eps(dtype) if name in BUILTINS else 10 * eps(dtype) ** (2 / 3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ALL_FUNCTIONS)
def test_divided_differences_near_coincident(name, dtype):
    fn = get_matrix_function(library_f(name))
    for c in CENTRES[name]:
        lam = ritz_like(name, c, dtype)  # rounded to dtype: the reference uses the rounded values
        F = divided_differences(fn, lam)
        assert F.dtype == dtype and F.shape == (lam.numel(), lam.numel())
        assert torch.isfinite(F).all(), (name, c)
        assert torch.equal(F, F.mT)  # exactly symmetric
        ref = loewner_reference(lam, name)
        err = ((F.to(torch.float64) - ref).abs() / ref.abs()).max()
        assert float(err) < tolerance(name, dtype), (name, c, float(err))
        # the diagonal is f'(λ)
        df = SCALAR_FUNCTIONS[name][1]
        d_err = ((F.diagonal().to(torch.float64) - df(lam.to(torch.float64))).abs() / ref.diagonal().abs()).max()
        assert float(d_err) < tolerance(name, dtype)


def test_divided_differences_batched_and_method():
    lam = torch.tensor([[1.0, 1.0, 2.0], [0.5, 0.5 + 1e-12, 4.0]], dtype=torch.float64)
    fn = get_matrix_function("log")
    F = fn.divided_differences(lam)
    assert F.shape == (2, 3, 3)
    for b in range(2):
        assert torch.allclose(F[b], loewner_reference(lam[b], "log"), rtol=16 * eps(torch.float64), atol=0)


def test_exp_divided_differences_do_not_overflow_early():
    # e^700 ≈ 1e304 is finite; the rewriting e^min·expm1(gap)/gap never forms e^(2·700) or e^a − e^b badly
    lam = torch.tensor([700.0, 700.0 + 1e-10, 700.5], dtype=torch.float64)
    F = divided_differences(BUILTIN_FUNCTIONS["exp"], lam)
    assert torch.isfinite(F).all()
    ref = loewner_reference(lam, "exp")
    assert float(((F - ref).abs() / ref).max()) < 16 * eps(torch.float64)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_values_and_derivatives(name):
    fn = get_matrix_function(name)
    f, df, _, _ = SCALAR_FUNCTIONS[name]
    x = torch.linspace(0.05, 4.0, 50, dtype=torch.float64)
    assert torch.allclose(fn.f(x), f(x), rtol=4 * eps(torch.float64), atol=0)
    assert torch.allclose(fn.df(x), df(x), rtol=4 * eps(torch.float64), atol=0)
    assert fn.requires_positive == (name != "exp")


def test_get_matrix_function_resolution():
    assert get_matrix_function("log") is BUILTIN_FUNCTIONS["log"]
    mf = MatrixFunction("cube", lambda x: x**3, lambda x: 3 * x**2)
    assert get_matrix_function(mf) is mf
    x = torch.linspace(-2.0, 2.0, 9, dtype=torch.float64)
    # a bare callable gets its derivative by autograd
    auto = get_matrix_function(lambda x: torch.sin(x) * x)
    assert torch.allclose(auto.df(x), torch.cos(x) * x + torch.sin(x), rtol=0, atol=4 * eps(torch.float64))
    pair = get_matrix_function((torch.sin, torch.cos))
    assert torch.equal(pair.df(x), torch.cos(x)) and pair.name == "sin" and not pair.requires_positive
    with pytest.raises(ValueError, match="Unknown matrix function f='logdet'"):
        get_matrix_function("logdet")
    with pytest.raises(ValueError, match="f must be a function name"):
        get_matrix_function(3.0)
