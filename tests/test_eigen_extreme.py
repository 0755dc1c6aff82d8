"""``extreme_eigenvalues`` / ``condition_number`` on invariant start subspaces (Lanczos breakdown) against
``torch.linalg.eigvalsh``: a restart finds the true extremes, or the result says it did not converge."""

from __future__ import annotations

import pytest
import torch
from linear_operator.utils.warnings import NumericalWarning

from lanczos_grad_gp.eigen import condition_number, extreme_eigenvalues

DTYPES = (torch.float32, torch.float64)


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def spectrum_matrix(eigs: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), dtype=torch.float64, generator=g))
    A = (Q * eigs.double()) @ Q.T
    return 0.5 * (A + A.T), Q


def the_issue_matrix(n: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    """κ = 37.7 with an eigenvalue 1 whose eigenvector is the start vector."""
    eigs = torch.linspace(1.0, 37.7, n, dtype=torch.float64)
    return spectrum_matrix(eigs, seed=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eigenvector_start_restarts_and_finds_the_extremes(dtype):
    A, Q = the_issue_matrix()
    v0 = Q[:, 0]  # the eigenvector of λ = 1: the Krylov space is invariant after one step
    kappa = condition_number(A.to(dtype), v0=v0.to(dtype), seed=0, tol=1e-8 if dtype == torch.float64 else 1e-4)
    ext = kappa.extremes
    assert ext.restarts == 1 and bool(kappa.converged)
    assert float(kappa.estimate) == pytest.approx(37.7, rel=1e-3)
    lo, hi = float(kappa.lower), float(kappa.upper)
    assert lo <= 37.7 * (1 + 1e-5) and 37.7 <= hi * (1 + 1e-5)  # the interval holds the truth
    ev = torch.linalg.eigvalsh(A)
    assert float(ext.lambda_max_bounds[0]) <= float(ev[-1]) * (1 + 1e-6) <= float(ext.lambda_max_bounds[1]) * (1 + 2e-6)


def test_invariant_start_without_budget_reports_unconverged_never_a_tight_wrong_interval():
    A, Q = the_issue_matrix()
    v0 = Q[:, 3] + Q[:, 10]  # a 2-dimensional invariant subspace: exact Ritz values 2.86 and 7.2
    with pytest.warns(NumericalWarning, match="not converged"):
        kappa = condition_number(A, v0=v0, seed=0, max_iter=2)
    assert not bool(kappa.converged)
    assert float(kappa.upper) == float("inf")  # not the old [2.5, 2.5]
    assert float(kappa.lower) <= 37.7  # interlacing: still a valid lower bound
    ext = kappa.extremes
    assert float(ext.lambda_max_bounds[1]) == float("inf") and float(ext.lambda_min_bounds[0]) == -float("inf")


def test_few_distinct_eigenvalues_break_down_and_stay_correct():
    # I + rank 2: the Krylov space of a random vector is invariant after 3 steps; its restart breaks down at once
    g = torch.Generator().manual_seed(2)
    U = torch.randn(200, 2, dtype=torch.float64, generator=g)
    B = torch.eye(200, dtype=torch.float64) + U @ U.T
    ev = torch.linalg.eigvalsh(B)
    ext = extreme_eigenvalues(B, seed=0, tol=1e-8)
    assert bool(ext.converged_max) and bool(ext.converged_min)
    assert float(ext.lambda_max) == pytest.approx(float(ev[-1]), rel=1e-10)
    assert float(ext.lambda_min) == pytest.approx(float(ev[0]), rel=1e-10)
    assert int(ext.iterations) <= 10


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_with_one_invariant_start(dtype):
    A, Q = the_issue_matrix(40)
    B, _ = spectrum_matrix(torch.linspace(0.5, 4.0, 40), seed=3)
    ops = torch.stack([A, B]).to(dtype)
    v0 = torch.stack([Q[:, 0], torch.ones(40, dtype=torch.float64)]).to(dtype)
    tol = 1e-8 if dtype == torch.float64 else 1e-4
    ext = extreme_eigenvalues(ops, v0=v0, seed=0, tol=tol)
    ev = torch.linalg.eigvalsh(ops.double())
    rtol = 1e-7 if dtype == torch.float64 else 1e-3
    assert torch.allclose(ext.lambda_max.double(), ev[:, -1], rtol=rtol)
    assert torch.allclose(ext.lambda_min.double(), ev[:, 0], rtol=rtol)
    assert ext.converged_max.tolist() == [True, True] and ext.converged_min.tolist() == [True, True]


def test_v0_validation():
    A, _ = the_issue_matrix(10)
    with pytest.raises(ValueError, match="v0 must be a tensor of shape"):
        extreme_eigenvalues(A, v0=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="nonzero"):
        extreme_eigenvalues(A, v0=torch.zeros(10, dtype=torch.float64))
