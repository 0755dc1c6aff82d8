"""Oracle tests of :mod:`lanczos_grad_gp.eigen` against ``torch.linalg.eigvalsh`` and ARPACK (``eigsh``).

Every random matrix and start vector is seeded. float32 uses ``tol=1e-4``, float64 ``tol=1e-8``.
"""

from __future__ import annotations

import doctest
import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from linear_operator import to_linear_operator

from lanczos_grad_gp.core.lanczos import lanczos_tridiag
from lanczos_grad_gp.eigen import (
    EigenResult,
    condition_number,
    deflated_power_iteration,
    extreme_eigenvalues,
    lanczos,
    spectral_density,
    trace,
)

DTYPES = (torch.float32, torch.float64)
WHICH = ("LM", "LA", "SA")
UCI = Path(__file__).parents[1].parent / "shared" / "data" / "uci"


@pytest.fixture(autouse=True)
def _one_thread():
    """Small dense products: one thread avoids oversubscription on shared CPUs (restored afterwards)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tol_for(dtype: torch.dtype) -> float:
    return 1e-8 if dtype == torch.float64 else 1e-4


def wishart(n: int, p: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, dtype=torch.float64, generator=g)
    return (X @ X.T / p).to(dtype)


def with_spectrum(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``Q diag(eigs) Q^T`` with a seeded Haar-random ``Q`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), dtype=torch.float64, generator=g))
    A = (Q * eigs) @ Q.T
    return 0.5 * (A + A.T)


def rbf(X: torch.Tensor, lengthscale: float = 1.0, noise: float = 1e-2) -> torch.Tensor:
    K = torch.exp(-0.5 * torch.cdist(X, X).square() / lengthscale**2)
    return K + noise * torch.eye(len(X), dtype=X.dtype)


def reference(A: torch.Tensor, k: int, which: str) -> torch.Tensor:
    ev = torch.linalg.eigvalsh(A.double())
    if which == "LA":
        return ev.flip(-1)[..., :k]
    if which == "SA":
        return ev[..., :k]
    idx = ev.abs().argsort(dim=-1, descending=True)[..., :k]
    return ev.gather(-1, idx)


def check_result(A: torch.Tensor, res: EigenResult, k: int, which: str, tol: float, rtol_vals: float) -> None:
    """Values vs eigvalsh, TRUE residuals recomputed, orthonormal vectors, converged flags."""
    ref = reference(A, k, which)
    scale = torch.linalg.eigvalsh(A.double()).abs().amax(-1, keepdim=True)
    assert res.eigenvalues.shape == ref.shape
    err = (res.eigenvalues.double() - ref).abs() / scale
    assert float(err.max()) <= rtol_vals, f"eigenvalue error {float(err.max()):.2e}"
    V = res.eigenvectors.double()
    resid = torch.linalg.vector_norm(V @ A.double() - res.eigenvalues.double().unsqueeze(-1) * V, dim=-1)
    eps = torch.finfo(A.dtype).eps
    assert torch.allclose(res.residuals.double(), resid, atol=100 * eps * float(scale.max()), rtol=1e-3)
    bound = 10 * tol * res.eigenvalues.double().abs() + 1e3 * eps * scale
    assert bool((resid <= bound).all()), f"residuals {resid} above {bound}"
    eye = torch.eye(k, dtype=torch.float64)
    assert float((V @ V.mT - eye).abs().max()) <= 1e3 * eps
    assert bool(res.converged.all())


# --------------------------------------------------------------------------------------------
# lanczos: values, vectors, residuals
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("k", [1, 6])
def test_lanczos_wishart_vs_eigvalsh(dtype, which, k):
    A = wishart(200, 400, dtype, seed=1)
    tol = tol_for(dtype)
    res = lanczos(A, k=k, which=which, tol=tol, seed=0)
    check_result(A, res, k, which, tol, rtol_vals=1e-12 if dtype == torch.float64 else 1e-5)
    assert res.iterations.dtype == torch.long and int(res.iterations) >= k
    assert res.eigenvalues.dtype == dtype and res.eigenvectors.shape == (k, 200)


@pytest.mark.parametrize("which", WHICH)
def test_lanczos_matches_scipy_eigsh(which):
    sla = pytest.importorskip("scipy.sparse.linalg")
    A = wishart(300, 600, torch.float64, seed=2)
    k = 6
    ref = sla.eigsh(A.numpy(), k=k, which=which, tol=1e-10, v0=np.ones(300))[0]
    key = {"LM": lambda x: -np.abs(x), "LA": lambda x: -x, "SA": lambda x: x}[which]
    ref = torch.from_numpy(ref[np.argsort(key(ref), kind="stable")])
    res = lanczos(A, k=k, which=which, tol=1e-10, seed=0)
    assert torch.allclose(res.eigenvalues, ref, rtol=1e-10, atol=1e-12)


# Kernel matrices: the bottom of the spectrum is a cluster at the noise level with relative gaps far
# below tol, so SA there is a test of patience, not of correctness; SA is covered on Wishart,
# indefinite and clustered matrices above.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["LA", "LM"])
def test_lanczos_generated_kernel_matrix(dtype, which):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(400, 3, dtype=torch.float64, generator=g)
    # float32 cannot resolve eigenvalues below ~eps·‖K‖: keep cond(K) moderate there
    K = rbf(X, lengthscale=0.7, noise=1e-2 if dtype == torch.float64 else 1.0).to(dtype)
    tol = tol_for(dtype)
    res = lanczos(K, k=10, which=which, tol=tol, seed=0)
    check_result(K, res, 10, which, tol, rtol_vals=1e-10 if dtype == torch.float64 else 1e-5)


def _concrete_features() -> torch.Tensor:
    path = UCI / "concrete" / "data.csv.gz"
    if not path.exists():
        pytest.skip(f"shared UCI data not found at {path} (expected ../shared/data next to the repo)")
    with gzip.open(path, "rt") as fh:
        data = np.loadtxt(fh, delimiter=",")
    X = torch.from_numpy(data[:, :-1])  # last column is the target
    return (X - X.mean(0)) / X.std(0)


@pytest.mark.shared_data
@pytest.mark.parametrize("which", ["LA", "LM"])
def test_lanczos_concrete_kernel_matrix(which):
    X = _concrete_features()
    K = rbf(X, lengthscale=2.0, noise=1e-2)  # (1030, 1030) float64
    res = lanczos(K, k=8, which=which, tol=1e-8, seed=0)
    check_result(K, res, 8, which, 1e-8, rtol_vals=1e-10)


def test_lanczos_clustered_spectrum():
    n = 300
    cluster = 10.0 * (1 + 1e-3 * torch.arange(6, dtype=torch.float64))  # relative gaps 1e-3
    rest = torch.linspace(0.0, 8.0, n - 6, dtype=torch.float64)
    A = with_spectrum(torch.cat([cluster, rest]), seed=4)
    res = lanczos(A, k=6, which="LA", tol=1e-10, seed=0)
    check_result(A, res, 6, "LA", 1e-10, rtol_vals=1e-12)


def test_lanczos_nearly_degenerate_pairs():
    n = 200
    top = torch.tensor([10.0, 10.0 * (1 - 1e-7), 9.0, 9.0 * (1 - 1e-7)], dtype=torch.float64)
    A = with_spectrum(torch.cat([top, torch.linspace(0.0, 5.0, n - 4, dtype=torch.float64)]), seed=5)
    res = lanczos(A, k=4, which="LA", tol=1e-10, seed=0)
    check_result(A, res, 4, "LA", 1e-10, rtol_vals=1e-12)


def test_lanczos_exact_multiplicity_found_after_breakdown():
    # 12 x 12 with a triple eigenvalue: the Krylov space breaks down, fresh start vectors find the copies.
    eigs = torch.tensor([5.0, 5.0, 5.0, 4.0, 3.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05], dtype=torch.float64)
    A = with_spectrum(eigs, seed=6)
    res = lanczos(A, k=12, which="LA", tol=1e-10, seed=0)
    assert torch.allclose(res.eigenvalues, eigs, atol=1e-12)
    assert float(res.residuals.max()) < 1e-10


@pytest.mark.parametrize("which", WHICH)
def test_lanczos_indefinite(which):
    eigs = torch.cat([torch.linspace(-10.0, -1.0, 50), torch.linspace(0.5, 8.0, 100)]).double()
    A = with_spectrum(eigs, seed=7)
    res = lanczos(A, k=4, which=which, tol=1e-10, seed=0)
    check_result(A, res, 4, which, 1e-10, rtol_vals=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lanczos_batched(dtype):
    A = wishart(150, 300, torch.float64, seed=8)
    B = torch.stack(
        [A, 2 * A + torch.eye(150, dtype=torch.float64), with_spectrum(torch.linspace(-1.0, 0.9, 150).double())]
    )
    B = B.to(dtype)
    tol = tol_for(dtype)
    for which in WHICH:
        res = lanczos(B, k=3, which=which, tol=tol, seed=0)
        assert res.eigenvalues.shape == (3, 3) and res.eigenvectors.shape == (3, 3, 150)
        assert res.iterations.shape == (3,) and res.converged.shape == (3, 3)
        check_result(B, res, 3, which, tol, rtol_vals=1e-11 if dtype == torch.float64 else 1e-5)


def test_lanczos_matvec_tuple_and_linear_operator_agree_with_dense():
    A = wishart(120, 240, torch.float64, seed=9)
    dense = lanczos(A, k=3, tol=1e-10, seed=0)
    tup = lanczos((lambda v: A @ v, 120), k=3, tol=1e-10, seed=0)
    lop = lanczos(to_linear_operator(A), k=3, tol=1e-10, seed=0)
    for other in (tup, lop):
        assert torch.allclose(other.eigenvalues, dense.eigenvalues, rtol=1e-12)
        assert int(other.iterations) == int(dense.iterations)


def test_lanczos_max_iter_is_a_budget_and_reports_unconverged():
    A = with_spectrum(torch.linspace(1.0, 1.1, 300).double(), seed=10)  # tiny relative gaps
    res = lanczos(A, k=5, which="SA", max_iter=25, tol=1e-12, seed=0)
    assert int(res.iterations) <= 25
    assert not bool(res.converged.all())
    # residuals are still the TRUE ones
    V = res.eigenvectors
    true = torch.linalg.vector_norm(V @ A - res.eigenvalues.unsqueeze(-1) * V, dim=-1)
    assert torch.allclose(res.residuals, true, atol=1e-13)


def test_lanczos_without_reorthogonalization_still_accurate_values():
    A = wishart(200, 400, torch.float64, seed=11)
    res = lanczos(A, k=4, which="LA", tol=1e-8, reorthogonalize=False, seed=0)
    assert torch.allclose(res.eigenvalues, reference(A, 4, "LA"), rtol=1e-8)


# --------------------------------------------------------------------------------------------
# reproducibility
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["lanczos", "power"])
def test_seed_and_generator_reproducible(fn):
    A = wishart(100, 200, torch.float64, seed=12)

    def run(**kw):
        if fn == "lanczos":
            return lanczos(A, k=3, tol=1e-6, **kw)
        return deflated_power_iteration(A, k=2, max_iter=300, tol=1e-4, **kw)

    a, b = run(seed=3), run(seed=3)
    c = run(generator=torch.Generator().manual_seed(3))
    for other in (b, c):
        assert torch.equal(a.eigenvalues, other.eigenvalues)
        assert torch.equal(a.eigenvectors, other.eigenvectors)
        assert torch.equal(a.iterations, other.iterations)
    d = run(seed=4)
    assert not torch.equal(a.eigenvectors, d.eigenvectors)


def test_generator_state_advances():
    A = wishart(80, 160, torch.float64, seed=13)
    g = torch.Generator().manual_seed(0)
    first = trace(A, num_matvecs=5, generator=g).estimate
    second = trace(A, num_matvecs=5, generator=g).estimate
    assert not torch.equal(first, second)


# --------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", WHICH)
def test_eigenvalue_gradient_matches_dense_autograd(dtype, which):
    """d/dθ Σ w_i λ_i(A(θ)) for A(θ) = X diag(exp θ) X^T − 1.5 I (indefinite, simple eigenvalues)."""
    g = torch.Generator().manual_seed(14)
    X = torch.randn(60, 120, dtype=torch.float64, generator=g) / 120**0.5
    theta0 = 0.3 * torch.randn(120, dtype=torch.float64, generator=g)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def build(theta):
        return (X * theta.exp()) @ X.T - 1.5 * torch.eye(60, dtype=theta.dtype)

    theta = theta0.clone().to(dtype).requires_grad_(True)
    tol = 1e-10 if dtype == torch.float64 else 1e-4  # gradient error ~ residual / gap
    res = lanczos(build(theta.double()).to(dtype), k=3, which=which, tol=tol, seed=0)
    (res.eigenvalues * w.to(dtype)).sum().backward()

    theta_ref = theta0.clone().requires_grad_(True)
    ev = torch.linalg.eigvalsh(build(theta_ref))
    order = {"LA": ev.flip(0)[:3], "SA": ev[:3], "LM": ev[ev.detach().abs().argsort(descending=True)[:3]]}[which]
    (order * w).sum().backward()
    scale = float(theta_ref.grad.abs().max())
    atol = (1e-7 if dtype == torch.float64 else 1e-3) * scale
    assert torch.allclose(theta.grad.double(), theta_ref.grad, rtol=0, atol=atol)


def test_eigenvalue_gradient_to_dense_matrix_and_power_iteration():
    A0 = wishart(50, 100, torch.float64, seed=15)
    A = A0.clone().requires_grad_(True)
    lanczos(A, k=2, which="LA", tol=1e-10, seed=0).eigenvalues.sum().backward()
    B = A0.clone().requires_grad_(True)
    torch.linalg.eigvalsh(B)[-2:].sum().backward()
    assert torch.allclose(A.grad, B.grad, atol=1e-9)
    C = A0.clone().requires_grad_(True)
    deflated_power_iteration(C, k=1, max_iter=2000, tol=1e-10, seed=0).eigenvalues.sum().backward()
    D = A0.clone().requires_grad_(True)
    torch.linalg.eigvalsh(D)[-1].backward()
    assert torch.allclose(C.grad, D.grad, atol=1e-6)


def test_no_graph_without_requires_grad():
    A = wishart(40, 80, torch.float64, seed=16)
    res = lanczos(A, k=2, seed=0)
    assert res.eigenvalues.grad_fn is None and not res.eigenvectors.requires_grad


# --------------------------------------------------------------------------------------------
# deflated power iteration
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_power_iteration_top_k_true_residuals(dtype):
    eigs = torch.cat([torch.tensor([10.0, 7.0, 5.0]), torch.linspace(0.0, 3.0, 97)]).double()
    A = with_spectrum(eigs, seed=17).to(dtype)
    tol = tol_for(dtype) if dtype == torch.float32 else 1e-7
    res = deflated_power_iteration(A, k=3, max_iter=2000, tol=tol, seed=0)
    assert torch.allclose(res.eigenvalues.double(), eigs[:3], rtol=10 * tol)
    V = res.eigenvectors
    true = torch.linalg.vector_norm(V @ A - res.eigenvalues.unsqueeze(-1) * V, dim=-1)
    assert torch.allclose(res.residuals, true, atol=50 * torch.finfo(dtype).eps * 10)
    assert bool(res.converged.all())


def test_power_iteration_momentum_reduces_iterations():
    eigs = torch.cat([torch.tensor([1.0]), torch.linspace(0.0, 0.9, 149)]).double()
    A = with_spectrum(eigs, seed=18)
    plain = deflated_power_iteration(A, k=1, max_iter=3000, tol=1e-8, seed=0)
    fast = deflated_power_iteration(A, k=1, max_iter=3000, tol=1e-8, momentum=0.9**2 / 4, seed=0)
    assert bool(plain.converged.all()) and bool(fast.converged.all())
    assert int(fast.iterations) < int(plain.iterations)
    assert torch.allclose(fast.eigenvalues, plain.eigenvalues, rtol=1e-8)


def test_power_iteration_batched():
    B = torch.stack([with_spectrum(torch.linspace(0, 1, 60).double() ** 3, seed=s) for s in (19, 20)])
    res = deflated_power_iteration(B, k=2, max_iter=2000, tol=1e-6, seed=0)
    assert res.eigenvalues.shape == (2, 2) and res.iterations.shape == (2,)
    assert torch.allclose(res.eigenvalues, reference(B, 2, "LM"), rtol=1e-5)


# --------------------------------------------------------------------------------------------
# trace, density, extremes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_trace_hutchinson_and_hutchpp(dtype):
    eigs = 1.0 / torch.arange(1, 301, dtype=torch.float64) ** 2  # fast decay: Hutch++ shines
    A = with_spectrum(eigs, seed=21).to(dtype)
    exact = float(eigs.sum())
    h = trace(A, num_matvecs=60, seed=0)
    assert h.num_matvecs == 60 and h.estimate.dtype == dtype
    assert abs(float(h.estimate) - exact) <= 5 * float(h.standard_error)
    hpp = trace(A, num_matvecs=60, method="hutch++", seed=0)
    assert abs(float(hpp.estimate) - exact) <= 5 * float(hpp.standard_error) + 1e-5
    assert abs(float(hpp.estimate) - exact) < abs(float(h.estimate) - exact)
    assert float(hpp.standard_error) < float(h.standard_error)


def test_trace_exact_on_diagonal_and_batched():
    D = torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64))
    assert float(trace(D, num_matvecs=1, seed=0).estimate) == pytest.approx(1275.0, rel=1e-14)
    assert math.isinf(float(trace(D, num_matvecs=1, seed=0).standard_error))
    B = torch.stack([D, 2 * D])
    est = trace(B, num_matvecs=3, seed=0).estimate
    assert torch.allclose(est, torch.tensor([1275.0, 2550.0], dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_spectral_density_moments(dtype):
    eigs = torch.cat([torch.linspace(1.0, 2.0, 150), torch.linspace(8.0, 9.0, 50)]).double()
    A = with_spectrum(eigs, seed=22).to(dtype)
    d = spectral_density(A, num_probes=20, num_iters=40, grid=2000, seed=0)
    assert d.nodes.shape == (20, 40) and d.weights.shape == (20, 40) and d.density.shape == (2000,)
    assert torch.allclose(d.weights.double().sum(-1), torch.ones(20, dtype=torch.float64), atol=1e-5)
    mass = float(torch.trapezoid(d.density.double(), d.grid.double()))
    assert mass == pytest.approx(1.0, abs=1e-3)
    mean = float(torch.trapezoid(d.grid.double() * d.density.double(), d.grid.double()))
    assert mean == pytest.approx(float(eigs.mean()), rel=0.05)
    upper = d.grid > 5.0
    frac = float(torch.trapezoid(d.density[upper].double(), d.grid[upper].double()))
    assert frac == pytest.approx(0.25, abs=0.06)


def test_spectral_density_custom_grid_and_sigma():
    A = wishart(100, 200, torch.float64, seed=23)
    grid = torch.linspace(-1.0, 5.0, 300, dtype=torch.float64)
    d = spectral_density(A, num_probes=4, num_iters=20, grid=grid, sigma=0.1, seed=0)
    assert torch.equal(d.grid, grid) and d.sigma == 0.1 and bool((d.density >= 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_eigenvalues_bounds_and_condition_number(dtype):
    K = wishart(200, 400, torch.float64, seed=24)
    ev = torch.linalg.eigvalsh(K)
    Kd = K.to(dtype)
    ext = extreme_eigenvalues(Kd, tol=tol_for(dtype), seed=0)
    slack = 1e-5 * float(ev[-1]) if dtype == torch.float32 else 1e-12
    lo, hi = ext.lambda_max_bounds.double()
    assert float(lo) - slack <= float(ev[-1]) <= float(hi) + slack
    lo, hi = ext.lambda_min_bounds.double()
    assert float(lo) - slack <= float(ev[0]) <= float(hi) + slack
    kappa = condition_number(Kd, tol=tol_for(dtype), seed=0)
    true = float(ev[-1] / ev[0])
    assert float(kappa.lower) <= true * (1 + 1e-4) and true <= float(kappa.upper) * (1 + 1e-4)
    assert float(kappa.estimate) == pytest.approx(true, rel=1e-3)


# --------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    A = wishart(10, 20, torch.float64)
    with pytest.raises(ValueError, match="exceeds the operator size"):
        lanczos(A, k=11)
    with pytest.raises(ValueError, match="k must be >= 1"):
        lanczos(A, k=0)
    with pytest.raises(ValueError, match="must be square"):
        lanczos(torch.ones(4, 5, dtype=torch.float64), k=1)
    nonsym = A.clone()
    nonsym[0, 1] += 1.0
    with pytest.raises(ValueError, match="must be symmetric"):
        lanczos(nonsym, k=1)
    with pytest.raises(ValueError, match="which must be one of"):
        lanczos(A, k=1, which="SM")
    with pytest.raises(ValueError, match="tol must be a finite number >= 0"):
        lanczos(A, k=1, tol=-1e-3)
    with pytest.raises(ValueError, match="either seed or generator"):
        lanczos(A, k=1, seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="max_iter must be an int >= k"):
        lanczos(A, k=3, max_iter=2)
    with pytest.raises(TypeError, match="LinearOperator, a dense"):
        lanczos([[1.0]], k=1)
    with pytest.raises(ValueError, match="matvec must map"):
        lanczos((lambda v: v[:2], 5), k=1)
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        lanczos(torch.full((3, 3), float("nan"), dtype=torch.float64), k=1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        deflated_power_iteration(A, k=0)
    with pytest.raises(ValueError, match="momentum"):
        deflated_power_iteration(A, k=1, momentum=-0.1)
    with pytest.raises(ValueError, match="method must be"):
        trace(A, num_matvecs=5, method="girard")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_matvecs must be an int >= 3"):
        trace(A, num_matvecs=2, method="hutch++")
    with pytest.raises(ValueError, match="num_probes must be a positive int"):
        spectral_density(A, num_probes=0, num_iters=5)
    with pytest.raises(ValueError, match="positive definite"):
        condition_number(A - 2 * torch.eye(10, dtype=torch.float64), seed=0)


def test_symmetry_check_is_dtype_aware():
    A = wishart(30, 60, torch.float32)
    noisy = A + 1e-7 * torch.randn(30, 30, generator=torch.Generator().manual_seed(0))  # float32 rounding level
    lanczos(noisy.float(), k=1, seed=0)  # accepted
    with pytest.raises(ValueError, match="relative asymmetry"):
        lanczos(A + 1e-3 * torch.triu(torch.ones(30, 30)), k=1)


# --------------------------------------------------------------------------------------------
# the lanczos_tridiag options used by thick restart, and the docstring examples
# --------------------------------------------------------------------------------------------


def test_lanczos_tridiag_residual_vector_and_orthogonal_to():
    A = wishart(80, 160, torch.float64, seed=25)
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(80, 5, dtype=torch.float64, generator=g))
    v0 = torch.randn(80, 1, dtype=torch.float64, generator=g)
    v0 = v0 - U @ (U.T @ v0)
    res = lanczos_tridiag(A.matmul, v0, max_iter=15, reorthogonalize=True, orthogonal_to=U)
    Q = res.basis[0].T  # (n, m)
    assert float((U.T @ Q).abs().max()) < 1e-13
    assert float((U.T @ res.residual_vector).abs().max()) < 1e-13
    # A Q = Q T + r e_m^T holds on span(U)^⊥: P A Q = Q T + r e_m^T with P = I − U U^T
    PAQ = A @ Q - U @ (U.T @ (A @ Q))
    E = PAQ - Q @ res.tridiag()[0]
    E[:, -1] -= res.residual_vector[:, 0]
    assert float(E.abs().max()) < 1e-12
    assert float(torch.linalg.vector_norm(res.residual_vector)) == pytest.approx(float(res.residual_norm), rel=1e-12)


def test_docstring_examples():
    import importlib

    for name in ("topk", "trace"):
        mod = importlib.import_module(f"lanczos_grad_gp.eigen.{name}")
        failures, _ = doctest.testmod(mod, raise_on_error=False, verbose=False)
        assert failures == 0


# --------------------------------------------------------------------------------------------
# slower: a larger kernel matrix (LA, k = 20) and a larger Wishart matrix (SA, k = 10)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lanczos_larger_problems():
    g = torch.Generator().manual_seed(26)
    X = torch.randn(2000, 3, dtype=torch.float64, generator=g)
    K = rbf(X, lengthscale=0.5, noise=1e-3)
    res = lanczos(K, k=20, which="LA", tol=1e-8, seed=0)
    check_result(K, res, 20, "LA", 1e-8, rtol_vals=1e-10)
    W = wishart(1000, 2000, torch.float64, seed=27)
    res = lanczos(W, k=10, which="SA", tol=1e-8, max_iter=4000, seed=0)  # dense MP edge: many restarts
    check_result(W, res, 10, "SA", 1e-8, rtol_vals=1e-10)
