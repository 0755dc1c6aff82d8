"""ChunkedKernelLinearOperator / ChunkedKernel against the dense kernel (values, entries, gradients)."""

from __future__ import annotations

import gpytorch
import pytest
import torch
from linear_operator.operators import AddedDiagLinearOperator, DenseLinearOperator, DiagLinearOperator

import lanczos_grad_gp as lgg
from lanczos_grad_gp.kernels import ChunkedKernel, ChunkedKernelLinearOperator, matern_covar, rbf_covar


def _op(n=60, d=3, chunk=7, covar=rbf_covar, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    ls = (torch.rand(1, d, generator=g, dtype=dtype) + 0.5).requires_grad_()
    os_ = torch.tensor(1.3, dtype=dtype, requires_grad=True)
    K = ChunkedKernelLinearOperator(
        x,
        x,
        covar_func=covar,
        num_nonbatch_dimensions={"lengthscale": 2},
        chunk_size=chunk,
        lengthscale=ls,
        outputscale=os_,
    )
    return K, x, ls, os_


def _dense_rbf(x, ls, os_):
    sq = ((x[:, None, :] - x[None, :, :]) / ls).square().sum(-1)
    return os_ * torch.exp(-0.5 * sq)


@pytest.mark.parametrize("chunk", [1, 7, 60, 100])
def test_matmul_diagonal_dense(chunk):
    K, x, ls, os_ = _op(chunk=chunk)
    D = _dense_rbf(x, ls, os_)
    R = torch.randn(60, 4, dtype=torch.float64)
    torch.testing.assert_close(K._matmul(R), D @ R)
    torch.testing.assert_close(K._diagonal(), D.diagonal())
    torch.testing.assert_close(K.to_dense(), D)


def test_get_indices_and_pivoted_cholesky():
    K, x, ls, os_ = _op()
    D = _dense_rbf(x, ls, os_).detach()
    rows = torch.tensor([3, 3, 10, 59])
    cols = torch.tensor([0, 5, 10, 1])
    torch.testing.assert_close(K._get_indices(rows, cols), D[rows, cols])
    full_row = K._get_indices(torch.tensor([[7]]), torch.arange(60).unsqueeze(0))
    torch.testing.assert_close(full_row, D[7:8, :])
    L = K.detach().pivoted_cholesky(rank=20, error_tol=0.0)
    ref = DenseLinearOperator(D).pivoted_cholesky(rank=20, error_tol=0.0)
    torch.testing.assert_close(L, ref)


def test_bilinear_derivative_matches_dense_autograd():
    K, x, ls, os_ = _op(chunk=9)
    L, R = torch.randn(60, 5, dtype=torch.float64), torch.randn(60, 5, dtype=torch.float64)
    grads = K._bilinear_derivative(L, R)
    assert grads[0] is None and grads[1] is None  # x does not require grad
    ref = torch.autograd.grad((L * (_dense_rbf(x, ls, os_) @ R)).sum(), [ls, os_])
    torch.testing.assert_close(grads[2], ref[0])
    torch.testing.assert_close(grads[3], ref[1])


def test_matern_matches_gpytorch():
    x = torch.randn(30, 2, dtype=torch.float64)
    k = gpytorch.kernels.MaternKernel(nu=2.5, ard_num_dims=2).double()
    ls = k.lengthscale.detach()
    ref = k(x).to_dense().detach()
    out = matern_covar(x, x, lengthscale=ls, outputscale=torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)


def test_inv_quad_logdet_on_chunked_operator_matches_dense():
    K, x, ls, os_ = _op(n=80, chunk=11)
    noise = torch.full((80,), 0.1, dtype=torch.float64)
    y = torch.randn(80, 1, dtype=torch.float64)
    with lgg.settings.num_probes(100), lgg.settings.lanczos_tol(1e-10):  # exact trace, converged Lanczos
        iq, ld = lgg.inv_quad_logdet(AddedDiagLinearOperator(K, DiagLinearOperator(noise)), y, logdet=True)
        g = torch.autograd.grad(iq + ld, [ls, os_])
    A = _dense_rbf(x, ls, os_) + torch.diag(noise)
    ref_val = (y.mT @ torch.linalg.solve(A, y)).squeeze() + torch.logdet(A)
    ref = torch.autograd.grad(ref_val, [ls, os_])
    torch.testing.assert_close(iq + ld, ref_val, rtol=1e-6, atol=1e-6)
    for a, b in zip(g, ref, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, lik, chunked):
        super().__init__(x, y, lik)
        self.mean_module = gpytorch.means.ConstantMean()
        k = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=x.shape[-1]))
        self.covar_module = ChunkedKernel(k, chunk_size=13) if chunked else k

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


@pytest.mark.usefixtures("lanczos_at_every_size")
def test_chunked_kernel_in_gpytorch_model_never_forms_dense(monkeypatch):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(120, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(-1))
    results = []
    for chunked in (False, True):
        lik = gpytorch.likelihoods.GaussianLikelihood()
        model = _GP(x, y, lik, chunked).double()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
        if chunked:

            def boom(self):
                raise AssertionError("the n x n kernel was formed")

            monkeypatch.setattr(ChunkedKernelLinearOperator, "to_dense", boom)
            monkeypatch.setattr(ChunkedKernelLinearOperator, "covar_mat", property(boom))
        # exact trace (num_probes >= n) and a fixed number of steps: pivoted Cholesky may break the ties of
        # the constant RBF diagonal differently on the two operators (another, equally valid preconditioner),
        # which would change a stochastic estimate but not the exact one
        with (
            lgg.settings.use_lanczos_grad(),
            lgg.settings.num_probes(120),
            lgg.settings.lanczos_tol(0.0),
            lgg.settings.max_lanczos_iter(60),
        ):
            loss = -mll(model(x), y)
            grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((loss.detach(), [gr.detach() for gr in grads]))
    # converged, exact-trace values: the two operators differ only in round-off and Lanczos residual
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-8, atol=1e-10)
    for a, b in zip(results[0][1], results[1][1], strict=False):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-4)


def test_bad_arguments():
    x = torch.randn(5, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkedKernelLinearOperator(
            x, x, covar_func=rbf_covar, chunk_size=0, lengthscale=torch.ones(1, 2), outputscale=torch.tensor(1.0)
        )
    with pytest.raises(TypeError, match="RBFKernel or MaternKernel"):
        ChunkedKernel(gpytorch.kernels.LinearKernel())
