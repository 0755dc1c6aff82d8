"""Fused stationary kernels: closed-form row-blocked gradients against autograd and Cholesky oracles."""

from __future__ import annotations

import unittest

import gpytorch
import pytest
import torch
from conftest import LinearOperatorDefaults
from linear_operator.test.linear_operator_test_case import LinearOperatorTestCase

import lanczos_grad_gp as lgg
from lanczos_grad_gp.kernels import (
    StationaryKernelLinearOperator,
    fuse_stationary_kernel,
    stationary_bilinear_derivative,
)
from lanczos_grad_gp.kernels.blocks import unit_kernel_matrix

NUS = [None, 0.5, 1.5, 2.5]


def _dense_oracle(x1, x2, ls, s, nu):
    """Independent dense kernel from pairwise differences (no expansion), autograd-differentiable."""
    sq = ((x1.unsqueeze(-2) - x2.unsqueeze(-3)) / ls.unsqueeze(-2)).square().sum(-1)
    if nu is None:
        g = torch.exp(-0.5 * sq)
    else:
        r = (sq + 1e-30).sqrt()  # differentiable at coincident points (derivative 0 there)
        c = (2 * nu) ** 0.5
        poly = {0.5: torch.ones_like(r), 1.5: 1 + c * r, 2.5: 1 + c * r + (5.0 / 3.0) * sq}[nu]
        g = poly * torch.exp(-c * r)
    return s[..., None, None] * g


def _inputs(batch=(), m=23, n=17, d=3, ard=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(*batch, m, d, generator=g, dtype=dtype).requires_grad_()
    x2 = torch.randn(*batch, n, d, generator=g, dtype=dtype).requires_grad_()
    ls = (torch.rand(*batch, 1, d if ard else 1, generator=g, dtype=dtype) + 0.5).requires_grad_()
    s = (torch.rand(batch, generator=g, dtype=dtype) + 0.5).requires_grad_()
    left = torch.randn(*batch, m, 4, generator=g, dtype=dtype)
    right = torch.randn(*batch, n, 4, generator=g, dtype=dtype)
    return x1, x2, ls, s, left, right


@pytest.mark.parametrize("nu", NUS)
@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("ard", [True, False])
@pytest.mark.parametrize("block_entries", [1, 50, 10**6])
def test_bilinear_derivative_matches_autograd(nu, batch, ard, block_entries):
    x1, x2, ls, s, left, right = _inputs(batch, ard=ard)
    value = (left * (_dense_oracle(x1, x2, ls, s, nu) @ right)).sum()
    ref = torch.autograd.grad(value, [x1, x2, ls, s])
    got = stationary_bilinear_derivative(x1, x2, ls, s, nu, left, right, block_entries=block_entries)
    for name, a, b in zip(["x1", "x2", "lengthscale", "outputscale"], got, ref, strict=True):
        assert a.shape == b.shape, name
        # a handful of float64 roundings per entry: 1e-12 relative is ~ 5000 eps
        assert float((a - b).norm() / b.norm()) < 1e-12, name


@pytest.mark.parametrize("nu", NUS)
def test_bilinear_derivative_float32(nu):
    x1, x2, ls, s, left, right = _inputs(dtype=torch.float32)
    ref = torch.autograd.grad(
        (left.double() * (_dense_oracle(x1.double(), x2.double(), ls.double(), s.double(), nu) @ right.double())).sum(),
        [x1, x2, ls, s],
    )
    got = stationary_bilinear_derivative(x1, x2, ls, s, nu, left, right)
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == torch.float32
        assert float((a.double() - b).norm() / b.norm()) < 1e-4  # ~ sqrt(n·k) float32 roundings


def test_bilinear_derivative_only_requested():
    x1, x2, ls, s, left, right = _inputs()
    got = stationary_bilinear_derivative(x1, x2, ls, s, None, left, right, need=(False, False, False, True))
    assert got[:3] == (None, None, None) and got[3] is not None


@pytest.mark.parametrize("nu", NUS)
@pytest.mark.parametrize("same", [True, False])
def test_unit_matrix_matches_gpytorch(nu, same):
    torch.manual_seed(0)
    x1 = 3 * torch.randn(40, 4, dtype=torch.float64)
    x2 = x1 if same else 3 * torch.randn(31, 4, dtype=torch.float64)
    if nu is None:
        k = gpytorch.kernels.RBFKernel(ard_num_dims=4).double()
    else:
        k = gpytorch.kernels.MaternKernel(nu=nu, ard_num_dims=4).double()
    k.lengthscale = torch.tensor([[0.5, 1.0, 2.0, 3.0]], dtype=torch.float64)
    with torch.no_grad():
        ref = k(x1, x2).to_dense()
        got = unit_kernel_matrix(x1, x2, k.lengthscale, nu, block_entries=100)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-13)
    if same:  # the diagonal is exactly 1, also for Matern-1/2 (no sqrt of a rounding error)
        assert bool((got.diagonal() == 1).all())


def _operator(nu=None, n=30, dense=None, batch=(), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, 3, generator=g, dtype=torch.float64)
    ls = (torch.rand(*batch, 1, 3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    s = (torch.rand(batch, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    op = StationaryKernelLinearOperator(x, x, lengthscale=ls, outputscale=s, nu=nu, dense=dense, chunk_size=7)
    return op, x, ls, s


@pytest.mark.parametrize("nu", NUS)
@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("block_entries", [64, 10**6])
def test_unit_matmul_and_matrix_batched(nu, dense, block_entries, monkeypatch):
    """Batched operators, row blocks that do not divide n (a partial last block in the reused buffer)."""
    import lanczos_grad_gp.kernels.blocks as blocks

    monkeypatch.setattr(blocks, "BUILD_BLOCK_ENTRIES", block_entries)  # read at call time
    op, x, ls, s = _operator(nu, n=30, dense=dense, batch=(2,))
    ref = _dense_oracle(x, x, ls, s, nu).detach()
    R = torch.randn(2, 30, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(op._matmul(R), ref @ R, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(op.to_dense(), ref, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(op._diagonal(), ref.diagonal(dim1=-2, dim2=-1), rtol=1e-14, atol=0)


@pytest.mark.parametrize("nu", NUS)
@pytest.mark.parametrize("dense", [True, False])
def test_operator_products_entries_diagonal(nu, dense):
    op, x, ls, s = _operator(nu, dense=dense)
    ref = _dense_oracle(x, x, ls, s, nu).detach()
    R = torch.randn(30, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(op._matmul(R), ref @ R, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(op.to_dense(), ref, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(op._diagonal(), ref.diagonal(), rtol=1e-14, atol=0)
        rows, cols = torch.tensor([[3], [7]]), torch.arange(30).unsqueeze(0)
        torch.testing.assert_close(op._get_indices(rows, cols), ref[rows, cols], rtol=1e-12, atol=1e-13)
    assert op.dense is dense


def test_operator_dense_matrix_built_once_and_shared_by_detach():
    op, *_ = _operator()
    with torch.no_grad():
        op._matmul(torch.ones(30, 1, dtype=torch.float64))
        twin = op.detach()
        assert twin._cache is op._cache and "unit" in op._cache
        rebuilt = op.representation_tree()(*op.representation())
    assert isinstance(rebuilt, StationaryKernelLinearOperator) and rebuilt.dense == op.dense and rebuilt.nu == op.nu


def test_operator_dense_default_follows_setting():
    with lgg.settings.max_dense_kernel_size(29):
        assert not _operator(n=30)[0].dense
    with lgg.settings.max_dense_kernel_size(30):
        assert _operator(n=30)[0].dense


def test_operator_rejects_bad_nu():
    x = torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="nu"):
        StationaryKernelLinearOperator(x, x, lengthscale=torch.ones(1, 2), outputscale=torch.ones(()), nu=3.5)


class TestStationaryKernelLinearOperator(LinearOperatorDefaults, LinearOperatorTestCase, unittest.TestCase):
    """linear_operator's own operator suite (float32, as it assumes); its derivative checks run our closed form."""

    seed = 0
    should_test_sample = False

    def create_linear_op(self):
        # a jittered, centred 4 x 3 grid: well conditioned (cond ≈ 4) and |x / ℓ| ≤ 4, so float32
        # rounding of the expanded contraction (~ eps · |x / ℓ|) stays below the suite's tolerances
        g = torch.Generator().manual_seed(3)
        gx, gy = torch.meshgrid(torch.arange(4.0) - 1.5, torch.arange(3.0) - 1.0, indexing="ij")
        x = torch.stack([gx.flatten(), gy.flatten()], -1) + 0.1 * torch.randn(12, 2, generator=g)
        ls = torch.tensor([[0.5, 0.7]], requires_grad=True)
        s = torch.tensor(1.7, requires_grad=True)
        return StationaryKernelLinearOperator(x, x, lengthscale=ls, outputscale=s, nu=2.5, chunk_size=5)

    def evaluate_linear_op(self, linear_op):
        ls, s = linear_op.tensor_params["lengthscale"], linear_op.tensor_params["outputscale"]
        return _dense_oracle(linear_op.x1, linear_op.x2, ls, s, 2.5)


# ----------------------------------------------------------------------------- GPyTorch models


class _GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, covar, batch_shape=None):
        batch_shape = torch.Size() if batch_shape is None else batch_shape
        lik = gpytorch.likelihoods.GaussianLikelihood(batch_shape=batch_shape)
        super().__init__(x, y, lik)
        self.mean_module = gpytorch.means.ConstantMean(batch_shape=batch_shape)
        self.covar_module = covar

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _data(n=70, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=torch.float64)
    y = torch.sin(6 * x).sum(-1) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    return x, (y - y.mean()) / y.std()


def _mll_grad(model, x, y, mode):
    model.train()
    model.zero_grad()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    if mode == "cholesky":
        with gpytorch.settings.max_cholesky_size(10**9):
            value = mll(model(x), y).sum()
    else:
        n = x.shape[-2]
        with (
            lgg.settings.use_lanczos_grad(),
            lgg.settings.fused_kernels(mode == "fused"),
            lgg.settings.num_probes(n),  # exact trace: the result is exact up to the Lanczos tolerance
            lgg.settings.lanczos_tol(1e-10),
        ):
            value = mll(model(x), y).sum()
    value.backward()
    return value.detach(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _scaled(inner, batch_shape=None):
    return gpytorch.kernels.ScaleKernel(inner, batch_shape=torch.Size() if batch_shape is None else batch_shape)


KERNELS = {
    "scale-rbf-ard": lambda: _scaled(gpytorch.kernels.RBFKernel(ard_num_dims=3)),
    "rbf-iso": lambda: gpytorch.kernels.RBFKernel(),
    "scale-matern05": lambda: _scaled(gpytorch.kernels.MaternKernel(nu=0.5, ard_num_dims=3)),
    "matern15": lambda: gpytorch.kernels.MaternKernel(nu=1.5, ard_num_dims=3),
    "scale-matern25": lambda: _scaled(gpytorch.kernels.MaternKernel(nu=2.5)),
}


@pytest.mark.parametrize("name", list(KERNELS))
def test_fused_model_matches_cholesky(name):
    x, y = _data()
    results = {}
    for mode in ("cholesky", "fused", "generic"):
        torch.manual_seed(0)
        model = _GP(x, y, KERNELS[name]()).double()
        model.covar_module.initialize(**({"outputscale": 1.4} if "scale" in name else {}))
        results[mode] = _mll_grad(model, x, y, mode)
    (v_ref, g_ref), (v, g), (_, g_gen) = results["cholesky"], results["fused"], results["generic"]
    torch.testing.assert_close(v, v_ref, rtol=1e-8, atol=1e-8)
    assert float((g - g_ref).norm() / g_ref.norm()) < 1e-6  # Lanczos tol 1e-10, exact trace
    assert float((g - g_gen).norm() / g_gen.norm()) < 1e-8  # same Krylov data, only the kernel derivative differs


def test_fused_batch_model_matches_cholesky():
    x, y = _data()
    xb, yb = x.expand(2, *x.shape), torch.stack([y, y.flip(0)])
    batch = torch.Size([2])
    out = {}
    for mode in ("cholesky", "fused"):
        covar = _scaled(gpytorch.kernels.RBFKernel(ard_num_dims=3, batch_shape=batch), batch)
        model = _GP(xb, yb, covar, batch).double()
        model.covar_module.base_kernel.lengthscale = torch.tensor([[[0.3, 0.5, 0.7]], [[0.6, 0.4, 0.2]]])
        out[mode] = _mll_grad(model, xb, yb, mode)
    torch.testing.assert_close(out["fused"][0], out["cholesky"][0], rtol=1e-8, atol=1e-8)
    assert float((out["fused"][1] - out["cholesky"][1]).norm() / out["cholesky"][1].norm()) < 1e-6


def test_fused_input_gradient_matches_cholesky():
    """Inputs that require grad (a feature extractor, deep kernel learning) get the closed-form x gradient."""
    x, y = _data(50)
    grads = {}
    for mode in ("cholesky", "fused"):
        w = torch.eye(3, dtype=torch.float64).requires_grad_()
        z = x @ w
        model = _GP(z.detach(), y, _scaled(gpytorch.kernels.RBFKernel(ard_num_dims=3))).double()
        model.train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
        ctx = gpytorch.settings.max_cholesky_size(10**9) if mode == "cholesky" else lgg.settings.use_lanczos_grad()
        with ctx, lgg.settings.num_probes(50), lgg.settings.lanczos_tol(1e-10), gpytorch.settings.debug(False):
            mll(model(z), y).backward()
        grads[mode] = w.grad
    assert float((grads["fused"] - grads["cholesky"]).norm() / grads["cholesky"].norm()) < 1e-6


def test_fused_float32_close_to_float64_cholesky():
    x, y = _data(200)
    ref_model = _GP(x, y, _scaled(gpytorch.kernels.RBFKernel(ard_num_dims=3))).double()
    _, g_ref = _mll_grad(ref_model, x, y, "cholesky")
    model = _GP(x.float(), y.float(), _scaled(gpytorch.kernels.RBFKernel(ard_num_dims=3)))
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with lgg.settings.use_lanczos_grad(), lgg.settings.num_probes(200):
        mll(model(x.float()), y.float()).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
    # float32 default tol 1e-3: the gradient error is about twice the residual
    # (docs/mathematics.md, "Error estimates and diagnostics")
    assert float((g - g_ref).norm() / g_ref.norm()) < 1e-2


@pytest.mark.parametrize("outputs", [1, 2])
def test_botorch_single_task_gp_fused_matches_cholesky(outputs):
    """BoTorch's SingleTaskGP (RBF with priors; two outputs = a batch kernel over expanded inputs)."""
    botorch = pytest.importorskip("botorch")
    x, y = _data(60)
    y = torch.stack([y, torch.cos(3 * x).sum(-1)], -1)[:, :outputs]
    out = {}
    for mode in ("cholesky", "fused"):
        torch.manual_seed(0)
        model = botorch.models.SingleTaskGP(x, y)
        (train_x,) = model.train_inputs
        assert isinstance(
            fuse_stationary_kernel(model.likelihood(model(train_x)).lazy_covariance_matrix)._linear_op,
            StationaryKernelLinearOperator,
        )
        out[mode] = _mll_grad(model, train_x, model.train_targets, mode)
    torch.testing.assert_close(out["fused"][0], out["cholesky"][0], rtol=1e-8, atol=1e-8)
    assert float((out["fused"][1] - out["cholesky"][1]).norm() / out["cholesky"][1].norm()) < 1e-6


def test_chunked_products_when_above_dense_size():
    x, y = _data(60)
    model = _GP(x, y, _scaled(gpytorch.kernels.MaternKernel(nu=2.5, ard_num_dims=3))).double()
    _, g_ref = _mll_grad(model, x, y, "cholesky")
    with lgg.settings.max_dense_kernel_size(10):
        _, g = _mll_grad(model, x, y, "fused")
    assert float((g - g_ref).norm() / g_ref.norm()) < 1e-6


# ----------------------------------------------------------------------------- what is (not) fused


def _lazy(kernel, x):
    with gpytorch.settings.lazily_evaluate_kernels(True):
        return kernel(x)


@pytest.mark.parametrize(
    "make",
    [
        lambda: gpytorch.kernels.PeriodicKernel(),
        lambda: gpytorch.kernels.RBFKernel() + gpytorch.kernels.MaternKernel(),
        lambda: _scaled(gpytorch.kernels.RBFKernel(active_dims=torch.tensor([0, 1]))),
        lambda: gpytorch.kernels.LinearKernel(),
    ],
)
def test_unsupported_kernels_are_left_to_gpytorch(make):
    x = torch.rand(20, 3, dtype=torch.float64)
    covar = _lazy(make().double(), x)
    assert fuse_stationary_kernel(covar) is covar


def test_supported_kernel_is_fused_with_noise_kept():
    x = torch.rand(20, 3, dtype=torch.float64)
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    covar = lik(
        gpytorch.distributions.MultivariateNormal(
            torch.zeros(20, dtype=torch.float64), _lazy(_scaled(gpytorch.kernels.RBFKernel(ard_num_dims=3)).double(), x)
        )
    ).lazy_covariance_matrix
    fused = fuse_stationary_kernel(covar)
    assert isinstance(fused._linear_op, StationaryKernelLinearOperator)
    assert fused._diag_tensor is covar._diag_tensor
    with torch.no_grad():
        torch.testing.assert_close(fused.to_dense(), covar.to_dense(), rtol=0, atol=1e-14)


def test_fused_kernels_flag_off_keeps_gpytorch_kernel(monkeypatch):
    import lanczos_grad_gp.kernels.derivative as derivative
    import lanczos_grad_gp.kernels.stationary as stationary

    calls = []
    monkeypatch.setattr(stationary, "UnitBlocks", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(derivative, "UnitBlocks", lambda *a, **k: calls.append(1))
    x, y = _data(40)
    model = _GP(x, y, _scaled(gpytorch.kernels.RBFKernel())).double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with lgg.settings.use_lanczos_grad(), lgg.settings.fused_kernels(False):
        mll(model(x), y).backward()
    assert calls == []
