"""Regression tests for the silent wrong answers found in review: each now meets its tolerance, or
warns (``NumericalWarning``) and reports ``converged=False``, or raises a clear early error."""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch
from linear_operator.utils.warnings import NumericalWarning

import lanczos_grad_gp as lgg
from lanczos_grad_gp.app.training import ExactGPModel
from lanczos_grad_gp.core.lanczos import lanczos_tridiag


def _spd(n: int, lam: torch.Tensor, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = (Q * lam.to(torch.float64)) @ Q.T
    return (0.5 * (A + A.T)).to(dtype)


def _dense_f(A: torch.Tensor, f: str) -> torch.Tensor:
    lam, S = torch.linalg.eigh(A.double())
    fl = {"log": torch.log, "inv": torch.reciprocal, "exp": torch.exp, "sqrt": torch.sqrt}[f](lam)
    return (S * fl) @ S.T


# 1. ill-conditioned forms without reorthogonalization -------------------------------------------
@pytest.mark.parametrize("n", [40, 120, 400])
def test_ill_conditioned_forms_are_accurate_or_warned(n):
    A = _spd(n, torch.logspace(-7, 0, n, dtype=torch.float64), seed=n)
    v = torch.ones(n, dtype=torch.float64)
    exact = float(v @ _dense_f(A, "inv") @ v)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value, info = lgg.quad_form(A, v, "inv", return_info=True)
    warned = any(issubclass(w.category, NumericalWarning) for w in caught)
    err = abs(float(value) - exact) / exact
    if bool(info.converged):
        assert err <= 2 * float(info.value_error_estimate) / exact + 1e-12
    else:
        assert warned  # never a wrong answer without a word
    assert warned == (not bool(info.converged))


# 3. polarization of wildly different norms --------------------------------------------------------
@pytest.mark.parametrize("ratio", [1e4, 1e-4, 1e6])
def test_bilinear_form_normalises_before_polarizing(ratio):
    n = 60
    A64 = _spd(n, torch.linspace(-2.0, 1.0, n, dtype=torch.float64), seed=3)
    g = torch.Generator().manual_seed(4)
    u64 = torch.randn(n, generator=g, dtype=torch.float64) * ratio
    v64 = torch.randn(n, generator=g, dtype=torch.float64)
    exact = float(u64 @ _dense_f(A64, "exp") @ v64)
    scale = float(u64.norm() * v64.norm() * _dense_f(A64, "exp").norm(2))
    value, info = lgg.bilinear_form(A64.float(), u64.float(), v64.float(), "exp", return_info=True)
    assert bool(info.converged)
    # float32 input rounding alone is ~1e-7 of ‖u‖‖f(A)‖‖v‖; before the fix: 80% of |u^T f v|
    assert abs(float(value) - exact) <= 1e-5 * scale
    assert abs(float(value) - exact) <= float(info.value_error_estimate) + 1e-6 * scale


# 4. scale-safe norms ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype, scale", [(torch.float32, 1e-25), (torch.float32, 1e25), (torch.float64, 1e200), (torch.float64, 1e-200)]
)
def test_tiny_and_huge_operators(dtype, scale):
    n = 30
    base = _spd(n, torch.linspace(1.0, 4.0, n, dtype=torch.float64), seed=5)
    A = (base * scale).to(dtype)
    v = torch.ones(n, dtype=dtype)
    value, info = lgg.quad_form(A, v, "inv", return_info=True)
    exact = float(torch.ones(n, dtype=torch.float64) @ torch.linalg.solve(base, torch.ones(n, dtype=torch.float64)))
    assert not bool(info.broke_down)  # no false "breakdown, exact"
    assert bool(info.converged)
    assert abs(float(value) * scale - exact) / exact < (1e-4 if dtype == torch.float32 else 1e-8)
    res = lanczos_tridiag(lambda x: A @ x, v.unsqueeze(-1), max_iter=5)
    assert not bool(res.broke_down.any()) and int(res.iterations) == 5


# 6. smaller items -----------------------------------------------------------------------------------
def test_one_probe_has_unknown_standard_error():
    A = _spd(20, torch.linspace(1.0, 3.0, 20, dtype=torch.float64))
    with lgg.settings.num_probes(1), lgg.record_calls() as calls:
        lgg.inv_quad_logdet(A, logdet=True)
    assert torch.isnan(calls[0].logdet_standard_error).all()  # not 0: one sample has no spread


def test_float32_data_with_float64_model_promotes_like_stock():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=g), torch.randn(40, generator=g)  # float32 data
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = ExactGPModel(x.double(), y.double(), likelihood).double()  # float64 model
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    model.train()
    with gpytorch.settings.max_cholesky_size(10**6):
        ref = mll(model(x), y)
    for fused in (True, False):
        with lgg.settings.use_lanczos_grad(), lgg.settings.fused_kernels(fused), lgg.settings.lanczos_tol(1e-10):
            ours = mll(model(x), y)
        assert ours.dtype == torch.float64
        assert abs(float(ours) - float(ref)) < 5e-2 * abs(float(ref))  # 10 probes: a stochastic log det


def test_custom_function_must_be_elementwise():
    A = _spd(10, torch.linspace(1.0, 2.0, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="elementwise"):
        lgg.quad_form(A, torch.ones(10, dtype=torch.float64), lambda x: x.sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_rejected(dtype):
    A = torch.eye(8, dtype=dtype)
    v = torch.ones(8, dtype=dtype)
    with pytest.raises(ValueError, match="float32 or float64"):
        lgg.quad_form(A, v, "log")
    with pytest.raises(ValueError, match="float32 or float64"):
        lgg.inv_quad_logdet(A, v, logdet=True)
    with pytest.raises(ValueError, match="float32 or float64"):
        lanczos_tridiag(lambda x: x, v.unsqueeze(-1), max_iter=3)


def test_matmul_shape_is_checked_at_every_step():
    calls = []

    def bad(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x if len(calls) < 3 else x[:-1]

    with pytest.raises(ValueError, match="step 3"):
        lanczos_tridiag(bad, torch.randn(6, 1, dtype=torch.float64), max_iter=5)


@pytest.mark.parametrize("result", [torch.ones(3, dtype=torch.bool), torch.ones(1, 2), True])
def test_stop_fn_result_is_validated(result):
    with pytest.raises(ValueError, match="stop_fn must return a bool tensor"):
        lanczos_tridiag(
            lambda x: 2 * x, torch.randn(6, 2, dtype=torch.float64), max_iter=4, stop_fn=lambda r: result, check_every=1
        )


def test_second_derivative_raises_even_with_allow_unused():
    A0 = _spd(6, torch.linspace(1.0, 2.0, 6, dtype=torch.float64))
    theta = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    v = torch.ones(6, dtype=torch.float64)
    for value in (lgg.quad_form(A0 * theta, v, "log"), lgg.eigen.lanczos(A0 * theta, k=2).eigenvalues.sum()):
        (g,) = torch.autograd.grad(value, theta, create_graph=True)
        with pytest.raises(RuntimeError, match="first-order only"):
            torch.autograd.grad(g, theta, allow_unused=True)


# found in review ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tol", [1e-2, 1e-4, None])
def test_one_tolerance_controls_the_gradient_too(tol):
    """v close to the top eigenvector: the value converges long before the gradient (whose divided
    differences weight the small eigenvalues by f'); the stop rule includes f''s residual."""
    n = 40
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, 6, n, dtype=torch.float64)
    A0 = (Q * lam) @ Q.T
    A0 = 0.5 * (A0 + A0.T)
    v = Q[:, -1] + 1e-3 * torch.randn(n, generator=g, dtype=torch.float64)
    a = Q.T @ v
    li, lj = lam[:, None], lam[None, :]
    F = torch.where((li - lj).abs() > 1e-12 * li, (lam.log()[:, None] - lam.log()[None, :]) / (li - lj), 1 / li)
    G = Q @ (F * (a[:, None] * a[None, :])) @ Q.T
    A = A0.clone().requires_grad_(True)
    value, info = lgg.quad_form(A, v, "log", tol=tol, return_info=True)
    (grad,) = torch.autograd.grad(value, A)
    err = float((0.5 * (grad + grad.T) - G).norm() / G.norm())
    assert bool(info.converged)
    assert err <= float(info.gradient_error_estimate)  # before: 0.97 at tol 1e-2, converged, no warning
    assert err <= 2 * (tol or 1e-8)


def test_bilinear_gradient_at_zero_vector():
    A = _spd(6, torch.linspace(1.0, 3.0, 6, dtype=torch.float64), seed=8)
    w = torch.randn(6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    u = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    (g_u,) = torch.autograd.grad(lgg.bilinear_form(A, u, w, "log"), u)
    expected = _dense_f(A, "log") @ w  # ∂/∂u u^T f(A) w = f(A) w, also at u = 0
    assert float((g_u - expected).norm() / expected.norm()) < 1e-10


def test_double_backward_through_the_vectors_raises():
    A = _spd(5, torch.linspace(1.0, 2.0, 5, dtype=torch.float64), seed=10)
    g = torch.Generator().manual_seed(11)
    u = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(5, generator=g, dtype=torch.float64)
    for form, targets in (
        (lambda: lgg.quad_form(A, u, "log"), (u,)),
        (lambda: lgg.bilinear_form(A, u, w, "log"), (u, w)),
    ):
        for target in targets:
            (g_u,) = torch.autograd.grad(form(), u, create_graph=True)
            with pytest.raises(RuntimeError, match="first-order only"):
                torch.autograd.grad((c * g_u).sum(), target, allow_unused=True)


@pytest.mark.parametrize("f", [lambda x: x.cumsum(-1), lambda x: x.sum() * torch.ones_like(x)])
def test_shape_preserving_but_not_elementwise_function_is_rejected(f):
    A = _spd(8, torch.linspace(1.0, 2.0, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="elementwise"):
        lgg.quad_form(A, torch.ones(8, dtype=torch.float64), f)


def test_fixed_steps_that_miss_warn():
    A = _spd(50, torch.logspace(0, 4, 50, dtype=torch.float64), seed=12)
    with pytest.warns(NumericalWarning):
        _, info = lgg.quad_form(A, torch.ones(50, dtype=torch.float64), "inv", tol=0.0, max_iter=3, return_info=True)
    assert not bool(info.converged)


def test_gp_routine_warns_whenever_it_reports_not_converged():
    A = _spd(200, torch.logspace(-4, 0, 200, dtype=torch.float64), seed=13)
    rhs = torch.ones(200, 1, dtype=torch.float64)
    with lgg.settings.max_lanczos_iter(5), lgg.record_calls() as calls, pytest.warns(NumericalWarning):
        lgg.inv_quad_logdet(A, rhs, logdet=True)
    assert not calls[0].converged


def test_empty_rhs_returns_empty_like_stock():
    A = 2 * torch.eye(4, dtype=torch.float64)
    iq, ld = lgg.inv_quad_logdet(A, torch.zeros(4, 0, dtype=torch.float64), logdet=False, reduce_inv_quad=False)
    assert iq.shape == (0,)


def test_overflowing_gradient_warns():
    """float32, ‖A‖ ≈ 1e-20: the value 1/λ ≈ 1e20 fits, its gradient 1/λ² ≈ 1e40 does not."""
    A = (_spd(10, torch.linspace(1.0, 2.0, 10, dtype=torch.float64)) * 1e-20).float().requires_grad_(True)
    value = lgg.quad_form(A, torch.ones(10), "inv")
    assert torch.isfinite(value)
    with pytest.warns(NumericalWarning, match="NaN or Inf"):
        (g,) = torch.autograd.grad(value, A)
    assert not bool(torch.isfinite(g).all())
