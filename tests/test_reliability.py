"""Reliability under bad input and hard numerics: nothing silent, nothing lost.

Every test states what the user gets. The rule the package follows:

* bad input (types, shapes, dtypes, devices, NaN/Inf in data or hyperparameters, non-symmetric
  dense matrices, nonsensical options) -> ``ValueError`` / ``TypeError`` naming the argument,
  raised before the first matrix-vector product;
* hard numerics -> a finite result accurate to the tolerance stated in the test, or
  ``NotPSDError`` saying what happened and what to do; never NaN in values or gradients;
* an iterative result that did not reach its tolerance -> ``NumericalWarning`` (GP routine);
* degenerate sizes: a batch dimension or column count of size 0 gives an empty result (as
  linear_operator does); an operator of size ``n = 0`` raises ``ValueError``;
* user tensors are never modified in place; double backward raises a clear ``RuntimeError``.
"""

from __future__ import annotations

import math
import warnings

import gpytorch
import pytest
import torch
from conftest import dense_quad, rbf_kernel, rbf_points, rel_err, spd_matrix
from linear_operator.operators import AddedDiagLinearOperator, DenseLinearOperator, DiagLinearOperator
from linear_operator.utils.errors import NotPSDError
from linear_operator.utils.warnings import NumericalWarning

import lanczos_grad_gp as lgg
from lanczos_grad_gp.app.training import ExactGPModel

F64 = torch.float64


class CountingOp(DenseLinearOperator):
    """A dense operator that counts its matrix-vector products (class-wide)."""

    calls = 0

    def _matmul(self, rhs):
        CountingOp.calls += 1
        return super()._matmul(rhs)


def _spd(n=6, seed=0):
    return spd_matrix(n, 10.0, seed)


# ---------------------------------------------------------------------------------------------
# 2. Bad input: a clear error naming the argument, before any heavy work

_A = _spd()
_v = torch.linspace(-1, 1, 6, dtype=F64)
_NONSYM = _A + 0.1 * torch.triu(torch.ones(6, 6, dtype=F64), 1)
_NAN = _A.clone()
_NAN[1, 2] = _NAN[2, 1] = float("nan")

BAD_CALLS = {
    "quad_form non-square": (lambda A: lgg.quad_form(A[:, :5], _v), ValueError, "square"),
    "quad_form non-symmetric": (lambda A: lgg.quad_form(_NONSYM, _v), ValueError, "symmetric"),
    "quad_form NaN in A": (lambda A: lgg.quad_form(_NAN, _v), ValueError, "NaN"),
    "quad_form Inf in v": (lambda A: lgg.quad_form(A, _v / 0), ValueError, "v contains NaN or Inf"),
    "quad_form int A": (lambda A: lgg.quad_form(torch.eye(3, dtype=torch.long), _v[:3]), ValueError, "floating"),
    "quad_form dtype mismatch": (lambda A: lgg.quad_form(A, _v.float()), ValueError, "dtype"),
    "quad_form device mismatch": (lambda A: lgg.quad_form(A, _v.to("meta")), ValueError, "meta"),
    "quad_form wrong n": (lambda A: lgg.quad_form(A, _v[:4]), ValueError, "n = 6"),
    "quad_form batch mismatch": (
        lambda A: lgg.quad_form(A.expand(2, 6, 6), torch.ones(3, 6, 1, dtype=F64)),
        ValueError,
        "broadcast",
    ),
    "quad_form A is a list": (lambda A: lgg.quad_form(A.tolist(), _v), TypeError, "A must be"),
    "quad_form v is a list": (lambda A: lgg.quad_form(A, _v.tolist()), TypeError, "v must be"),
    "quad_form unknown f": (lambda A: lgg.quad_form(A, _v, "logm"), ValueError, "Unknown matrix function"),
    "quad_form f is int": (lambda A: lgg.quad_form(A, _v, 3), ValueError, "f must be"),
    "quad_form tol < 0": (lambda A: lgg.quad_form(A, _v, tol=-1e-3), ValueError, "tol"),
    "quad_form tol str": (lambda A: lgg.quad_form(A, _v, tol="1e-3"), ValueError, "tol"),
    "quad_form tol NaN": (lambda A: lgg.quad_form(A, _v, tol=float("nan")), ValueError, "tol"),
    "quad_form max_iter 0": (lambda A: lgg.quad_form(A, _v, max_iter=0), ValueError, "max_iter"),
    "quad_form max_iter float": (lambda A: lgg.quad_form(A, _v, max_iter=3.0), ValueError, "max_iter"),
    "quad_form max_iter bool": (lambda A: lgg.quad_form(A, _v, max_iter=True), ValueError, "max_iter"),
    "quad_form check_every 0": (lambda A: lgg.quad_form(A, _v, check_every=0), ValueError, "check_every"),
    "quad_form compress_tol 1": (lambda A: lgg.quad_form(A, _v, compress_tol=1.0), ValueError, "compress_tol"),
    "quad_form reorth str": (lambda A: lgg.quad_form(A, _v, reorthogonalize="yes"), ValueError, "reorthogonalize"),
    "quad_form n = 0": (
        lambda A: lgg.quad_form(torch.zeros(0, 0, dtype=F64), torch.zeros(0, dtype=F64)),
        ValueError,
        "n = 0",
    ),
    "bilinear shape mismatch": (lambda A: lgg.bilinear_form(A, _v, _v[:5]), ValueError, "same shape"),
    "bilinear dtype mismatch": (lambda A: lgg.bilinear_form(A, _v, _v.float()), ValueError, "same dtype"),
    "bilinear u not tensor": (lambda A: lgg.bilinear_form(A, 1.0, _v), TypeError, "torch.Tensor"),
    "bilinear non-symmetric": (lambda A: lgg.bilinear_form(_NONSYM, _v, _v), ValueError, "symmetric"),
    "iqld non-symmetric": (lambda A: lgg.inv_quad_logdet(_NONSYM, _v, True), ValueError, "symmetric"),
    "iqld non-square": (lambda A: lgg.inv_quad_logdet(A[:5], None, True), ValueError, "square"),
    "iqld NaN in A": (lambda A: lgg.inv_quad_logdet(_NAN, _v, True), ValueError, "NaN"),
    "iqld NaN rhs": (lambda A: lgg.inv_quad_logdet(A, _v * math.nan, True), ValueError, "inv_quad_rhs"),
    "iqld rhs dtype": (lambda A: lgg.inv_quad_logdet(A, _v.float(), True), ValueError, "dtype"),
    "iqld rhs wrong n": (lambda A: lgg.inv_quad_logdet(A, _v[:5], True), ValueError, "inv_quad_rhs"),
    "iqld rhs list": (lambda A: lgg.inv_quad_logdet(A, _v.tolist(), True), TypeError, "inv_quad_rhs"),
    "iqld nothing asked": (lambda A: lgg.inv_quad_logdet(A, None, False), ValueError, "logdet"),
    "iqld logdet str": (lambda A: lgg.inv_quad_logdet(A, _v, "yes"), ValueError, "logdet"),
    "iqld A str": (lambda A: lgg.inv_quad_logdet("A", _v, True), TypeError, "A must be"),
    "LanczosGradLinearOperator non-square": (
        lambda A: lgg.LanczosGradLinearOperator(A[:5]),
        ValueError,
        "square",
    ),
    "LanczosGradLinearOperator str": (lambda A: lgg.LanczosGradLinearOperator("A"), TypeError, "LinearOperator"),
    "LanczosGradLinearOperator NaN": (
        lambda A: lgg.LanczosGradLinearOperator(DenseLinearOperator(_NAN)).inv_quad_logdet(_v, True),
        ValueError,
        "NaN",
    ),
    "LanczosGradLinearOperator non-symmetric": (
        lambda A: lgg.LanczosGradLinearOperator(_NONSYM).logdet(),
        ValueError,
        "symmetric",
    ),
    "lanczos_tridiag max_iter 0": (
        lambda A: lgg.lanczos_tridiag(A.matmul, _v[:, None], max_iter=0),
        ValueError,
        "max_iter",
    ),
    "lanczos_tridiag max_iter float": (
        lambda A: lgg.lanczos_tridiag(A.matmul, _v[:, None], max_iter=2.5),
        ValueError,
        "max_iter",
    ),
    "lanczos_tridiag check_every 0": (
        lambda A: lgg.lanczos_tridiag(A.matmul, _v[:, None], max_iter=3, check_every=0),
        ValueError,
        "check_every",
    ),
    "lanczos_tridiag breakdown_tol < 0": (
        lambda A: lgg.lanczos_tridiag(A.matmul, _v[:, None], max_iter=3, breakdown_tol=-1.0),
        ValueError,
        "breakdown_tol",
    ),
    "lanczos_tridiag matmul not callable": (
        lambda A: lgg.lanczos_tridiag(A, _v[:, None], max_iter=3),
        TypeError,
        "matmul",
    ),
    "lanczos_tridiag v0 1-D": (lambda A: lgg.lanczos_tridiag(A.matmul, _v, max_iter=3), ValueError, "v0"),
    "lanczos_tridiag v0 int": (
        lambda A: lgg.lanczos_tridiag(A.matmul, torch.ones(6, 1, dtype=torch.long), max_iter=3),
        ValueError,
        "floating",
    ),
    "lanczos_tridiag v0 zero": (
        lambda A: lgg.lanczos_tridiag(A.matmul, torch.zeros(6, 1, dtype=F64), max_iter=3),
        ValueError,
        "all-zero",
    ),
    "lanczos_tridiag v0 NaN": (
        lambda A: lgg.lanczos_tridiag(A.matmul, _v[:, None] * math.nan, max_iter=3),
        ValueError,
        "NaN",
    ),
    "lanczos_tridiag matmul wrong shape": (
        lambda A: lgg.lanczos_tridiag(lambda x: x[:-1], _v[:, None], max_iter=3),
        ValueError,
        "same shape",
    ),
    "lanczos_tridiag matmul NaN": (
        lambda A: lgg.lanczos_tridiag(lambda x: x * math.nan, _v[:, None], max_iter=3),
        ValueError,
        "NaN or Inf",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_clear_error_before_any_matvec(case):
    call, exc, match = BAD_CALLS[case]
    CountingOp.calls = 0
    A = _A.clone()
    with pytest.raises(exc, match=match):
        call(A)
    assert CountingOp.calls == 0
    assert torch.equal(A, _A)


@pytest.mark.parametrize(
    "call",
    [
        lambda A: lgg.quad_form(A, _v, tol=-1.0),
        lambda A: lgg.quad_form(A, _v.float()),
        lambda A: lgg.quad_form(A, _v, "nope"),
        lambda A: lgg.inv_quad_logdet(A, _v[:5], True),
        lambda A: lgg.LanczosGradLinearOperator(A).inv_quad_logdet(_v.float(), True),
    ],
)
def test_validation_happens_before_the_first_matvec(call):
    CountingOp.calls = 0
    with pytest.raises((ValueError, TypeError)):
        call(CountingOp(_A.clone()))
    assert CountingOp.calls == 0


def test_round_off_asymmetry_is_accepted():
    """A kernel matrix symmetric up to round-off (1e-13 relative) is not rejected."""
    A = _A + 1e-13 * torch.triu(torch.ones(6, 6, dtype=F64), 1)
    exact, _ = dense_quad(0.5 * (A + A.T), _v, "log")
    assert abs(float(lgg.quad_form(A, _v, "log")) - float(exact)) < 1e-10


def test_exp_overflow_in_float32_raises_instead_of_inf():
    A = (spd_matrix(10, 1e2, 0) * 120).float()  # exp(120) > float32 max
    with pytest.raises(ValueError, match="overflows"):
        lgg.quad_form(A, torch.ones(10), "exp")


# ---------------------------------------------------------------------------------------------
# GPyTorch models under the flag


def _gp(n, dtype=F64, noise=1e-2, dup=0.0, seed=0, y=None):
    """RBF GP on [0,1]²; with ``dup > 0`` the second half of the inputs repeats the first half within ``dup``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g, dtype=F64)
    if dup:
        h = n - n // 2
        x[n // 2 :] = x[:h] + dup * torch.randn(h, 2, generator=g, dtype=F64)
    if y is None:
        y = torch.sin(6 * x[:, 0]) + 0.1 * torch.randn(n, generator=g, dtype=F64)
    x, y = x.to(dtype), y.to(dtype)
    lik = gpytorch.likelihoods.GaussianLikelihood(noise_constraint=gpytorch.constraints.GreaterThan(1e-8)).to(dtype)
    model = ExactGPModel(x, y, lik).to(dtype)
    model.initialize(**{"likelihood.noise": noise, "covar_module.base_kernel.lengthscale": 0.3})
    return model, lik, x, y


def _mll(model, lik, x, y, flag=True, probes=None, create_graph=False):
    model.zero_grad()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    # the tolerances of these tests are stated for a pinned Lanczos tolerance, not the (tunable) default
    with (
        lgg.settings.use_lanczos_grad(flag),
        lgg.settings.num_probes(probes or lgg.settings.num_probes.value()),
        lgg.settings.lanczos_tol(1e-8 if x.dtype == F64 else 1e-4),
        gpytorch.settings.max_cholesky_size(10**6),
    ):
        loss = mll(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=create_graph)
    return loss.detach().double(), torch.cat([g.reshape(-1) for g in grads]).detach().double()


@pytest.mark.parametrize("what", ["lengthscale", "outputscale", "noise", "mean"])
def test_gp_nan_hyperparameter_raises_clear_error(what):
    model, lik, x, y = _gp(30)
    raw = {
        "lengthscale": model.covar_module.base_kernel.raw_lengthscale,
        "outputscale": model.covar_module.raw_outputscale,
        "noise": lik.noise_covar.raw_noise,
        "mean": model.mean_module.constant,
    }[what]
    with torch.no_grad():
        raw.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        _mll(model, lik, x, y)


def test_gp_nan_targets_raise_clear_error():
    model, lik, x, y = _gp(30)
    y = y.clone()
    y[4] = float("nan")
    model.set_train_data(targets=y, strict=False)
    with pytest.raises(ValueError, match="targets"):
        _mll(model, lik, x, y)


# ---------------------------------------------------------------------------------------------
# 1. Hard numerics

# (dtype, noise) -> (abs tolerance on the per-point MLL, relative tolerance on the gradient) vs a
# float64 Cholesky oracle, or NotPSDError. n = 60 near-duplicate inputs (pairs 1e-7 apart: exact
# duplicates in float32), num_probes >= n so the log-determinant trace is exact and the only
# error left is Lanczos' (and float32 round-off, amplified by cond(K) ~ n/noise).
HARD_CASES = {
    (F64, 1e-2): (1e-10, 1e-7),
    (F64, 1e-4): (1e-8, 1e-6),
    (F64, 1e-6): (1e-6, 1e-5),
    (torch.float32, 1e-2): (1e-4, 1e-3),
    (torch.float32, 1e-4): (3e-2, 3e-2),
    (torch.float32, 1e-6): "jitter",
}


@pytest.mark.parametrize(("dtype", "noise"), list(HARD_CASES), ids=lambda x: str(x))
@pytest.mark.usefixtures("lanczos_at_every_size")
def test_gp_near_duplicate_inputs_accurate_or_not_psd(dtype, noise):
    expected = HARD_CASES[(dtype, noise)]
    n = 60
    model, lik, x, y = _gp(n, dtype, noise, dup=1e-7)
    if expected == "jitter":
        # exact duplicates in float32 with noise 1e-6: numerically singular. Stock GPyTorch's Cholesky adds
        # jitter (cholesky_jitter, x10 per try) with a warning; so does the flag, and it says so.
        with warnings.catch_warnings(record=True) as caught, lgg.record_calls() as calls:
            warnings.simplefilter("always")
            val, grad = _mll(model, lik, x, y, probes=n)
        assert any("added jitter" in str(w.message) for w in caught)
        assert calls[-1].jitter > 0 and torch.isfinite(val) and torch.isfinite(grad).all()
        return
    val, grad = _mll(model, lik, x, y, probes=n)
    assert torch.isfinite(val) and torch.isfinite(grad).all()
    ref_model = _gp(n, F64, noise, dup=1e-7)
    ref_val, ref_grad = _mll(*ref_model, flag=False)
    val_tol, grad_tol = expected
    assert abs(float(val - ref_val)) <= val_tol
    assert rel_err(grad, ref_grad) <= grad_tol


def test_float32_gradient_stable_beyond_loss_of_orthogonality():
    """Paper's stability claim: float32, no reorthogonalization, m = n = 300 steps on an RBF kernel with a
    clustered spectrum (22 eigenvalues > 0.1, 278 clustered near the noise 1e-2; cond ~ 1e4). The Lanczos basis
    has lost orthogonality completely (‖QᵀQ − I‖ = O(1)), yet value and lengthscale gradient of
    ``v^T log(K) v`` and ``v^T K^{-1} v`` match a float64 dense oracle to 1e-3 (measured ≤ 5e-5)."""
    n = 300
    x = rbf_points(n, 2, 0)
    v = torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(1))
    K32 = rbf_kernel(x.float(), torch.tensor(0.3), 1e-2)
    res = lgg.lanczos_tridiag(K32.matmul, v.float()[:, None], max_iter=n)
    Q = res.basis[0].double()
    assert float(torch.linalg.matrix_norm(Q @ Q.T - torch.eye(n, dtype=F64), 2)) > 0.5
    for name in ("log", "inv"):
        ls64 = torch.tensor(0.3, dtype=F64, requires_grad=True)
        K64 = rbf_kernel(x, ls64, 1e-2)
        ref, G = dense_quad(K64, v, name)
        (gref,) = torch.autograd.grad(K64, ls64, G)
        ls = torch.tensor(0.3, requires_grad=True)
        val = lgg.quad_form(rbf_kernel(x.float(), ls, 1e-2), v.float(), name, max_iter=n, tol=0.0)
        (g,) = torch.autograd.grad(val, ls)
        assert torch.isfinite(val) and torch.isfinite(g)
        assert abs(float(val.detach()) - float(ref)) <= 1e-3 * abs(float(ref))
        assert abs(float(g) - float(gref)) <= 1e-3 * abs(float(gref))


def test_indefinite_operator_raises_not_psd_with_advice():
    A = _spd() - 0.5 * torch.eye(6, dtype=F64)  # spectrum [0.1, 1] shifted: indefinite
    with pytest.raises(NotPSDError, match="jitter|noise"):
        lgg.quad_form(A, _v, "log")
    with pytest.raises(NotPSDError, match="noise"):
        lgg.inv_quad_logdet(A, _v, True)
    # exp is defined everywhere: no error, correct value
    exact, _ = dense_quad(A, _v, "exp")
    assert abs(float(lgg.quad_form(A, _v, "exp")) - float(exact)) < 1e-10


def test_unconverged_gp_routine_warns():
    A = spd_matrix(200, 1e4, 0)
    with lgg.settings.max_lanczos_iter(5), pytest.warns(NumericalWarning, match="max_lanczos_iter"):
        inv_quad, logdet = lgg.inv_quad_logdet(A, torch.ones(200, dtype=F64), True)
    assert torch.isfinite(inv_quad) and torch.isfinite(logdet)


def test_breakdown_is_exact():
    """Three distinct eigenvalues: Lanczos breaks down after 3 steps; value and gradient are exact."""
    n = 20
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(0)))
    lam = torch.tensor([0.5, 2.0, 7.0], dtype=F64).repeat_interleave(torch.tensor([7, 7, 6]))
    A = ((Q * lam) @ Q.T).requires_grad_(True)
    v = torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(1))
    for name in ("log", "inv", "sqrt"):
        val, info = lgg.quad_form(A, v, name, tol=0.0, return_info=True)
        (g,) = torch.autograd.grad(val, A)
        ref, G = dense_quad(A, v, name)
        assert bool(info.broke_down) and int(info.iterations) == 3
        assert abs(float(val.detach() - ref)) < 1e-12 * abs(float(ref))
        assert rel_err(g, G) < 1e-10


def test_zero_targets_give_exact_zero_and_finite_gradients():
    A = _spd().requires_grad_(True)
    r = torch.zeros(6, dtype=F64, requires_grad=True)
    inv_quad, logdet = lgg.inv_quad_logdet(A, r, True)
    assert float(inv_quad) == 0.0
    (inv_quad + logdet).backward()
    assert torch.isfinite(A.grad).all() and torch.equal(r.grad, torch.zeros(6, dtype=F64))
    val = lgg.quad_form(A, r, "log")
    assert float(val) == 0.0


def test_gp_constant_targets_equal_to_mean():
    """y == mean exactly (r = 0): the MLL is finite and matches Cholesky; all gradients finite."""
    n = 40
    model, lik, x, y = _gp(n, y=torch.zeros(n, dtype=F64))
    val, grad = _mll(model, lik, x, y, probes=n)
    ref_val, ref_grad = _mll(model, lik, x, y, flag=False)
    assert torch.isfinite(grad).all()
    assert abs(float(val - ref_val)) < 1e-10 and rel_err(grad, ref_grad) < 1e-7


def test_n_equals_one_exact():
    A = torch.tensor([[2.5]], dtype=F64, requires_grad=True)
    v = torch.tensor([3.0], dtype=F64, requires_grad=True)
    val = lgg.quad_form(A, v, "log")
    val.backward()
    assert math.isclose(float(val), 9 * math.log(2.5), rel_tol=1e-14)
    assert math.isclose(float(A.grad), 9 / 2.5, rel_tol=1e-14)
    assert math.isclose(float(v.grad), 6 * math.log(2.5), rel_tol=1e-14)
    inv_quad, logdet = lgg.inv_quad_logdet(torch.tensor([[2.5]], dtype=F64), torch.tensor([3.0], dtype=F64), True)
    assert math.isclose(float(inv_quad), 9 / 2.5, rel_tol=1e-14)
    assert math.isclose(float(logdet), math.log(2.5), rel_tol=1e-14)


def test_more_columns_than_n_and_iteration_cap_above_n():
    A = _spd(5)
    V = torch.randn(5, 9, dtype=F64, generator=torch.Generator().manual_seed(2))
    val = lgg.quad_form(A, V, "invsqrt", max_iter=1000)
    for j in range(9):
        ref, _ = dense_quad(A, V[:, j], "invsqrt")
        assert abs(float(val[j] - ref)) < 1e-12 * abs(float(ref))
    with lgg.settings.max_lanczos_iter(1000):
        inv_quad, _ = lgg.inv_quad_logdet(A, V, False, reduce_inv_quad=False)
    assert torch.allclose(inv_quad, (V * torch.linalg.solve(A, V)).sum(0), rtol=1e-12)


def test_empty_batches_give_empty_results_consistently():
    A = _spd(4).expand(0, 4, 4).clone().requires_grad_(True)
    V = torch.zeros(0, 4, 2, dtype=F64, requires_grad=True)
    q = lgg.quad_form(A, V, "log")
    b = lgg.bilinear_form(A, V, V, "log")
    iq, ld = lgg.inv_quad_logdet(A, V, True, reduce_inv_quad=False)
    assert q.shape == b.shape == iq.shape == (0, 2) and ld.shape == (0,)
    (q.sum() + iq.sum() + ld.sum()).backward()
    assert A.grad.shape == A.shape and V.grad.shape == V.shape
    res = lgg.lanczos_tridiag(lambda x: x, torch.zeros(0, 4, 2, dtype=F64), max_iter=3)
    assert res.alpha.shape[:2] == (0, 2)
    # k = 0 columns: empty values; the log-determinant still comes back
    A2 = _spd(4)
    assert lgg.quad_form(A2, torch.zeros(4, 0, dtype=F64)).shape == (0,)
    iq2, ld2 = lgg.inv_quad_logdet(A2, torch.zeros(4, 0, dtype=F64), True, reduce_inv_quad=False)
    assert iq2.shape == (0,) and math.isclose(float(ld2), float(torch.logdet(A2)), rel_tol=1e-12)


# ---------------------------------------------------------------------------------------------
# 3. State: no in-place modification, double backward


def test_user_tensors_never_modified_in_place():
    A = _spd(8).requires_grad_(True)
    u = torch.randn(8, 3, dtype=F64, requires_grad=True)
    v = torch.randn(8, 3, dtype=F64, requires_grad=True)
    copies = [t.detach().clone() for t in (A, u, v)]
    versions = [t._version for t in (A, u, v)]
    out = lgg.quad_form(A, v, "log").sum() + lgg.bilinear_form(A, u, v, "sqrt").sum()
    iq, ld = lgg.inv_quad_logdet(A, v, True)
    (out + iq + ld).backward()
    assert [t._version for t in (A, u, v)] == versions
    for t, c in zip((A, u, v), copies, strict=True):
        assert torch.equal(t.detach(), c)
    # the same for a GP under the flag: data and parameters untouched by the forward/backward
    model, lik, x, y = _gp(30)
    before = [t.detach().clone() for t in (x, y, *model.parameters())]
    vers = [t._version for t in (x, y, *model.parameters())]
    _mll(model, lik, x, y)
    assert [t._version for t in (x, y, *model.parameters())] == vers
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, (x, y, *model.parameters()), strict=True))


DOUBLE_BACKWARD = {
    "quad_form wrt v": lambda A, v: torch.autograd.grad(lgg.quad_form(A, v, "log"), v, create_graph=True)[0],
    "quad_form wrt A": lambda A, v: torch.autograd.grad(lgg.quad_form(A, v, "inv"), A, create_graph=True)[0],
    "bilinear_form": lambda A, v: torch.autograd.grad(lgg.bilinear_form(A, v, v.flip(0)), A, create_graph=True)[0],
    "inv_quad_logdet": lambda A, v: torch.autograd.grad(sum(lgg.inv_quad_logdet(A, v, True)), A, create_graph=True)[0],
}


@pytest.mark.parametrize("case", list(DOUBLE_BACKWARD))
def test_double_backward_raises_clear_error(case):
    A = _spd().requires_grad_(True)
    v = _v.clone().requires_grad_(True)
    g = DOUBLE_BACKWARD[case](A, v)
    assert torch.isfinite(g).all()  # the first-order gradient is still delivered
    with pytest.raises(RuntimeError, match="first-order only"):
        g.sum().backward()


@pytest.mark.usefixtures("lanczos_at_every_size")
def test_double_backward_through_gp_flag_path_raises():
    model, lik, x, y = _gp(20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.zero_grad()
        with lgg.settings.use_lanczos_grad():
            loss = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)(model(x), y)
        (g,) = torch.autograd.grad(loss, model.covar_module.base_kernel.raw_lengthscale, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order only"):
        g.sum().backward()


def test_added_diag_operator_with_nan_noise_raises():
    K = DenseLinearOperator(rbf_kernel(rbf_points(20, 2, 0), torch.tensor(0.3, dtype=F64), 0.0))
    noise = torch.full((20,), 1e-2, dtype=F64)
    noise[3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        lgg.inv_quad_logdet(AddedDiagLinearOperator(K, DiagLinearOperator(noise)), torch.ones(20, dtype=F64), True)
