"""The layout-tuned symmetric product: every candidate computes ``M X``; the choice is cached and reproducible."""

from __future__ import annotations

import pytest
import torch

from lanczos_grad_gp.core import dense_matmul as dm


@pytest.fixture(autouse=True)
def _fresh_choices():
    dm.clear_layout_choices()
    yield
    dm.clear_layout_choices()


def _symmetric(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=dtype)
    return a + a.mT


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [1, 8, 11])
def test_every_candidate_computes_the_product(dtype: torch.dtype, c: int) -> None:
    M = _symmetric(64, dtype)
    X = torch.randn(64, c, generator=torch.Generator().manual_seed(1), dtype=dtype)
    ref = M.double() @ X.double()
    # rounding of a length-64 dot product: a few eps times sum |M_ij X_j|
    bound = 64 * torch.finfo(dtype).eps * (M.abs().double() @ X.abs().double())
    for name, product in dm._CANDIDATES.items():
        out = product(M, X)
        assert out.shape == (64, c) and out.dtype == dtype and out.is_contiguous(), name
        assert bool(((out.double() - ref).abs() <= bound).all()), name


def test_tuned_choice_is_cached_and_reproducible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dm, "TUNE_MIN_SIZE", 32)
    M = _symmetric(48, torch.float64)
    X = torch.randn(48, 11, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    first = dm.symmetric_matmul(M, X)
    key = (48, 11, torch.float64, torch.get_num_threads())
    choices = dm.layout_choices()
    assert set(choices) == {key} and choices[key] in dm._CANDIDATES
    calls = []
    monkeypatch.setattr(dm, "_tune", lambda M, X: calls.append(1) or "plain")
    second = dm.symmetric_matmul(M, X)
    assert not calls, "a shape is timed once per process"
    assert torch.equal(first, second), "calls after the first use the same layout: bitwise equal"
    torch.testing.assert_close(first, M @ X, rtol=1e-12, atol=1e-12)
    assert X.shape == (48, 11)  # the input is not changed (padding copies)


def test_falls_back_to_plain_product(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dm, "TUNE_MIN_SIZE", 32)
    M = _symmetric(40, torch.float64)
    X = torch.randn(3, 40, 5, dtype=torch.float64)  # batched: not tuned
    torch.testing.assert_close(dm.symmetric_matmul(M, X), M @ X)
    small = _symmetric(16, torch.float64)
    dm.symmetric_matmul(small, torch.randn(16, 4, dtype=torch.float64))  # below the size threshold
    Xg = torch.randn(40, 5, dtype=torch.float64, requires_grad=True)
    out = dm.symmetric_matmul(M, Xg)  # a graph is wanted: plain product, differentiable
    out.sum().backward()
    torch.testing.assert_close(Xg.grad, M.sum(-1, keepdim=True).expand(40, 5))
    assert dm.layout_choices() == {}


def test_kernel_operator_uses_it_only_for_the_training_covariance(monkeypatch: pytest.MonkeyPatch) -> None:
    from lanczos_grad_gp.kernels.stationary import StationaryKernelLinearOperator

    monkeypatch.setattr(dm, "TUNE_MIN_SIZE", 32)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 3, generator=g, dtype=torch.float64)
    ls, os_ = torch.full((1, 3), 0.8, dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64)
    rhs = torch.randn(50, 11, generator=g, dtype=torch.float64)
    op = StationaryKernelLinearOperator(x, x, lengthscale=ls, outputscale=os_, dense=True)
    dense = os_ * torch.exp(-0.5 * torch.cdist(x / ls, x / ls).square())
    torch.testing.assert_close(op._matmul(rhs), dense @ rhs, rtol=1e-10, atol=1e-10)
    assert len(dm.layout_choices()) == 1
    x2 = torch.randn(50, 3, generator=g, dtype=torch.float64)  # a cross covariance: not symmetric
    cross = StationaryKernelLinearOperator(x, x2, lengthscale=ls, outputscale=os_, dense=True)
    ref = os_ * torch.exp(-0.5 * torch.cdist(x / ls, x2 / ls).square())
    torch.testing.assert_close(cross._matmul(rhs), ref @ rhs, rtol=1e-10, atol=1e-10)
    assert len(dm.layout_choices()) == 1
