"""Shift-invert ``lanczos(..., sigma=s)``: the eigenvalues nearest ``s`` (scipy ``eigsh`` convention) against
``torch.linalg.eigvalsh``, inner Lanczos–MINRES solves, the pivoted-Cholesky preconditioner on ``K + D``."""

from __future__ import annotations

import pytest
import torch
from linear_operator.operators import AddedDiagLinearOperator, DenseLinearOperator, DiagLinearOperator

from lanczos_grad_gp.eigen import lanczos
from lanczos_grad_gp.eigen.inputs import prepare_operator
from lanczos_grad_gp.eigen.minres import minres_solve
from lanczos_grad_gp.eigen.shift_invert import shift_invert


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def indefinite(n: int = 80, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    eigs = torch.cat([torch.linspace(-4.0, -1.0, n // 2), torch.linspace(1.0, 4.0, n - n // 2)]).double()
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    A = (Q * eigs) @ Q.T
    return 0.5 * (A + A.T), eigs


def nearest(eigs: torch.Tensor, sigma: float, k: int) -> torch.Tensor:
    return eigs[(eigs - sigma).abs().argsort(stable=True)[:k]]


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("sigma", [0.013, 2.51])  # no ties: the spectrum is symmetric about 0
def test_interior_eigenvalues_nearest_sigma(dtype, sigma):
    A, eigs = indefinite()
    tol = 1e-8 if dtype == torch.float64 else 1e-4
    res = lanczos(A.to(dtype), k=3, sigma=sigma, tol=tol, seed=0)
    ref = nearest(eigs, sigma, 3)
    assert torch.allclose(res.eigenvalues.double(), ref, rtol=10 * tol, atol=10 * tol)
    assert bool(res.converged.all())
    gaps = (res.eigenvalues.double() - sigma).abs()
    assert bool((gaps[1:] >= gaps[:-1] - 1e-12).all())  # ordered by increasing |λ - σ|
    V = res.eigenvectors.double()
    true = torch.linalg.vector_norm(V @ A - res.eigenvalues.double().unsqueeze(-1) * V, dim=-1)
    assert torch.allclose(res.residuals.double(), true, atol=1e-5 if dtype == torch.float32 else 1e-12)
    d = res.diagnostics
    assert d.sigma == sigma and d.solve_matvecs > int(res.iterations) and d.num_matvecs >= d.solve_matvecs


def test_noisy_kernel_uses_the_pivoted_cholesky_preconditioner():
    g = torch.Generator().manual_seed(1)
    X = torch.rand(300, 1, dtype=torch.float64, generator=g)
    K = torch.exp(-0.5 * torch.cdist(X, X).square() / 0.3**2)
    noise = torch.linspace(0.05, 1.0, 300, dtype=torch.float64)  # heteroscedastic: distinct small eigenvalues
    op = AddedDiagLinearOperator(DenseLinearOperator(K), DiagLinearOperator(noise))
    eigs = torch.linalg.eigvalsh(K + torch.diag(noise))
    solver = shift_invert(prepare_operator(op), 0.0, tol=1e-10, max_iter=200)
    assert solver.preconditioner is not None and solver.preconditioner.rank > 0
    res = lanczos(op, k=3, sigma=0.0, tol=1e-8, seed=0)
    assert torch.allclose(res.eigenvalues, eigs[:3], rtol=1e-7)
    assert bool(res.converged.all())


def test_eigenvalue_gradient_through_shift_invert():
    A0, eigs = indefinite(60, seed=2)
    A = A0.clone().requires_grad_(True)
    lanczos(A, k=2, sigma=0.9, tol=1e-10, seed=0).eigenvalues.sum().backward()
    B = A0.clone().requires_grad_(True)
    ev = torch.linalg.eigvalsh(B)
    ev[(ev.detach() - 0.9).abs().argsort()[:2]].sum().backward()
    assert torch.allclose(A.grad, B.grad, atol=1e-7)


def test_minres_solves_indefinite_systems_batched():
    A, _ = indefinite(80, seed=3)
    g = torch.Generator().manual_seed(4)
    B = torch.randn(80, 3, dtype=torch.float64, generator=g)
    out = minres_solve(lambda X: A @ X, B, tol=1e-10, max_iter=400)
    assert bool(out.converged.all())
    assert torch.allclose(out.solution, torch.linalg.solve(A, B), atol=1e-7)
    assert out.iterations.shape == (3,)


def test_sigma_validation():
    A, _ = indefinite(20)
    with pytest.raises(ValueError, match="sigma must be a finite real number"):
        lanczos(A, k=1, sigma=float("nan"))
    with pytest.raises(ValueError, match="solve_max_iter must be an int"):
        lanczos(A, k=1, sigma=0.0, solve_max_iter=0)
