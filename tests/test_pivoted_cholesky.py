"""Our lean pivoted Cholesky against linear_operator's (same greedy pivots, same factor)."""

from __future__ import annotations

import pytest
import torch
from linear_operator.operators import DenseLinearOperator

from lanczos_grad_gp.core.preconditioners.pivoted_cholesky import pivoted_cholesky


def kernel(n: int, batch: tuple[int, ...] = (), seed: int = 0) -> torch.Tensor:
    x = torch.rand(*batch, n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.exp(-0.5 * torch.cdist(x, x).square() / 0.3**2)


@pytest.mark.parametrize("batch", [(), (2,), (2, 3)])
def test_matches_linear_operator(batch) -> None:
    K = kernel(60, batch)
    ours = pivoted_cholesky(DenseLinearOperator(K), 20)
    ref = DenseLinearOperator(K).pivoted_cholesky(rank=20)
    # same pivots in the same order give the same columns; compare the low-rank products
    torch.testing.assert_close(ours @ ours.mT, ref @ ref.mT, rtol=1e-10, atol=1e-10)


def test_full_rank_reconstructs_and_stops_on_tolerance() -> None:
    K = kernel(40) + 1e-6 * torch.eye(40, dtype=torch.float64)
    L = pivoted_cholesky(DenseLinearOperator(K), 40)
    torch.testing.assert_close(L @ L.mT, K, rtol=1e-9, atol=1e-9)
    L_tol = pivoted_cholesky(DenseLinearOperator(K), 40, error_tol=1e-2, check_every=1)
    remainder = torch.trace(K - L_tol @ L_tol.mT)
    assert L_tol.shape[-1] < 40 and float(remainder) <= 1e-2


def test_rank_deficient_is_finite() -> None:
    x = torch.rand(30, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    K = x @ x.mT  # rank one
    L = pivoted_cholesky(DenseLinearOperator(K), 10)
    assert torch.isfinite(L).all()
    torch.testing.assert_close(L @ L.mT, K, rtol=1e-10, atol=1e-10)
