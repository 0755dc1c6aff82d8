"""Operator inputs of the eigen-utilities: half precision is promoted (never garbage marked converged), and
GPyTorch lazy kernels run by row blocks without evaluating the ``n × n`` kernel (values and hyperparameter
gradients against dense ``torch.linalg.eigvalsh``)."""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch
from gpytorch.lazy import LazyEvaluatedKernelTensor
from linear_operator import to_linear_operator
from linear_operator.utils.warnings import NumericalWarning

import lanczos_grad_gp as lgg
import lanczos_grad_gp.kernels.chunked as chunked
import lanczos_grad_gp.kernels.stationary as stationary
from lanczos_grad_gp.eigen import deflated_power_iteration, extreme_eigenvalues, lanczos, spectral_density, trace

HALF = (torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def wishart(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2 * n, dtype=torch.float64, generator=g)
    return X @ X.T / (2 * n)


# --------------------------------------------------------------------------------------------
# half precision
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("half", HALF)
def test_half_dense_and_linear_operator_are_promoted(half):
    A = wishart(80).to(half)
    ref = torch.linalg.eigvalsh(A.float().double()).flip(0)[:3]  # the half matrix, exactly, in float64
    for op in (A, to_linear_operator(A)):
        with pytest.warns(NumericalWarning, match="run in float32"):
            res = lanczos(op, k=3, which="LA", seed=0)
        assert res.eigenvalues.dtype == torch.float32 and res.eigenvectors.dtype == torch.float32
        assert torch.allclose(res.eigenvalues.double(), ref, rtol=1e-5)
        assert bool(res.converged.all())


def test_half_matvec_is_promoted_and_its_rounding_is_not_called_converged():
    A = wishart(80).to(torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = lanczos((lambda v: A @ v, 80, torch.bfloat16, "cpu"), k=3, which="LA", seed=0)
    messages = [str(w.message) for w in caught if issubclass(w.category, NumericalWarning)]
    assert any("run in float32" in m for m in messages)
    ref = torch.linalg.eigvalsh(A.double()).flip(0)[:3]
    err = (res.eigenvalues.double() - ref).abs() / ref.abs()
    # a bfloat16 product (relative rounding 4e-3) cannot give tol = 1e-4: every wrong pair is flagged
    assert not bool((res.converged & (err > 1e-4)).any())
    assert any("not converged" in m for m in messages) or bool((err <= 1e-4).all())


def test_half_in_every_eigen_function():
    A = wishart(60).to(torch.float16)
    with pytest.warns(NumericalWarning, match="run in float32"):
        assert trace(A, num_matvecs=4, seed=0).estimate.dtype == torch.float32
    with pytest.warns(NumericalWarning, match="run in float32"):
        assert spectral_density(A, num_probes=2, num_iters=5, seed=0).density.dtype == torch.float32
    with pytest.warns(NumericalWarning, match="run in float32"):
        power = deflated_power_iteration(A, k=1, max_iter=500, seed=0)
    assert float(power.eigenvalues) == pytest.approx(float(torch.linalg.eigvalsh(A.double())[-1]), rel=1e-3)
    with pytest.warns(NumericalWarning, match="run in float32"):
        assert extreme_eigenvalues(A, seed=0).lambda_max.dtype == torch.float32


def test_half_gradient_reaches_the_half_tensor():
    A = wishart(40).to(torch.bfloat16).requires_grad_(True)
    with pytest.warns(NumericalWarning):
        lanczos(A, k=1, which="LA", seed=0).eigenvalues.sum().backward()
    v = torch.linalg.eigh(A.detach().double())[1][:, -1]
    assert A.grad is not None and A.grad.dtype == torch.bfloat16
    assert torch.allclose(A.grad.double(), torch.outer(v, v), atol=2e-2)


# --------------------------------------------------------------------------------------------
# GPyTorch lazy kernels by row blocks
# --------------------------------------------------------------------------------------------


def _forbid_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self, *args, **kwargs):
        raise AssertionError("the n x n kernel was evaluated")

    monkeypatch.setattr(LazyEvaluatedKernelTensor, "evaluate_kernel", boom)
    monkeypatch.setattr(LazyEvaluatedKernelTensor, "to_dense", boom)


def _dense(kernel: gpytorch.kernels.Kernel, X: torch.Tensor, noise: float) -> torch.Tensor:
    with gpytorch.settings.lazily_evaluate_kernels(False):
        K = kernel(X)
    K = K.to_dense() if not isinstance(K, torch.Tensor) else K
    return K + noise * torch.eye(len(X), dtype=X.dtype)


KERNELS = {
    "rbf": lambda: gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()),
    "periodic+matern": lambda: gpytorch.kernels.PeriodicKernel() + gpytorch.kernels.MaternKernel(nu=1.5),
}


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("name", list(KERNELS))
def test_lazy_kernel_runs_by_row_blocks_with_gradients(monkeypatch, name, dtype):
    n = 240
    g = torch.Generator().manual_seed(4)
    X = torch.randn(n, 2, dtype=dtype, generator=g)
    kernel = KERNELS[name]().to(dtype)
    blocks: list[tuple[int, int]] = []
    if name == "rbf":  # the fused operator: row blocks of g(r^2), never its dense matrix
        monkeypatch.setattr(stationary, "fill_matrix", lambda *a, **k: pytest.fail("dense fill"))
    else:  # the generic operator: count the shape of every kernel block
        monkeypatch.setattr(chunked, "_BLOCK_ENTRIES", 40 * n)  # 40-row blocks
        original = chunked.ChunkedKernelLinearOperator._block

        def spy(self, rows, *args, **kwargs):
            out = original(self, rows, *args, **kwargs)
            blocks.append(tuple(out.shape[-2:]))
            return out

        monkeypatch.setattr(chunked.ChunkedKernelLinearOperator, "_block", spy)
    _forbid_dense(monkeypatch)
    tol = 1e-8 if dtype == torch.float64 else 1e-4
    with lgg.settings.max_dense_kernel_size(100):  # n = 240 is "large": products by row blocks
        K = kernel(X).add_diagonal(torch.tensor(0.1, dtype=dtype))
        res = lanczos(K, k=3, which="LA", tol=tol, seed=0)
        res.eigenvalues.sum().backward()
    grads = [p.grad.clone() for p in kernel.parameters()]
    kernel.zero_grad()
    monkeypatch.undo()
    Kd = _dense(kernel, X, 0.1).double()
    ref = torch.linalg.eigvalsh(Kd).flip(0)[:3]
    ref.sum().backward()
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    assert torch.allclose(res.eigenvalues.double(), ref.detach(), rtol=rtol)
    assert bool(res.converged.all())
    for got, p in zip(grads, kernel.parameters(), strict=True):
        assert torch.allclose(got.double(), p.grad.double(), rtol=1e-3, atol=(1e-6 if dtype == torch.float64 else 1e-2))
    if blocks:
        assert max(r * c for r, c in blocks) <= 40 * n < n * n


def test_lazy_kernel_small_n_assembles_from_blocks_once(monkeypatch):
    X = torch.randn(150, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    kernel = gpytorch.kernels.PeriodicKernel().double()
    calls = []
    original = chunked.ChunkedKernelLinearOperator.to_dense

    def spy(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(chunked.ChunkedKernelLinearOperator, "to_dense", spy)
    _forbid_dense(monkeypatch)
    res = lanczos(kernel(X).add_diagonal(torch.tensor(0.01, dtype=torch.float64)), k=2, which="LA", tol=1e-8, seed=0)
    monkeypatch.undo()
    ref = torch.linalg.eigvalsh(_dense(kernel, X, 0.01)).flip(0)[:2]
    assert torch.allclose(res.eigenvalues, ref, rtol=1e-10)
    assert calls == [1]  # n <= max_dense_kernel_size: one dense matrix built from row blocks, reused


def test_lazy_kernel_every_eigen_function(monkeypatch):
    X = torch.randn(120, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    kernel = gpytorch.kernels.RBFKernel().double()
    Kd = _dense(kernel, X, 0.1).detach()
    _forbid_dense(monkeypatch)
    with lgg.settings.max_dense_kernel_size(50):
        K = kernel(X).add_diagonal(torch.tensor(0.1, dtype=torch.float64))
        tr = trace(K, num_matvecs=40, seed=0)
        assert abs(float(tr.estimate) - float(Kd.trace())) <= 5 * float(tr.standard_error)
        ext = extreme_eigenvalues(K, seed=0, tol=1e-8)
        dens = spectral_density(K, num_probes=2, num_iters=10, seed=0)
    ev = torch.linalg.eigvalsh(Kd)
    assert float(ext.lambda_max) == pytest.approx(float(ev[-1]), rel=1e-8)
    assert dens.density.shape == (512,)
