"""The benchmark baselines: adjoint Lanczos must reproduce dense autograd through the same recurrence."""

from __future__ import annotations

import pytest
import torch
from linear_operator.operators import AddedDiagLinearOperator, DenseLinearOperator, DiagLinearOperator

pytest.importorskip("benchmarks.baselines")
from benchmarks import baselines  # noqa: E402


def _build(x, ls, nz):
    K = torch.exp(-0.5 * torch.cdist(x / ls, x / ls).square())
    return AddedDiagLinearOperator(DenseLinearOperator(K), DiagLinearOperator(nz.expand(x.shape[0])))


@pytest.mark.parametrize("rank", [0, 10])
@pytest.mark.parametrize("m", [3, 8])
def test_adjoint_matches_autograd_through_recurrence(rank, m):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(80, 2, generator=g, dtype=torch.float64)
    ls = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    nz = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    y = torch.randn(80, generator=g, dtype=torch.float64)
    setup = baselines.make_setup(_build(x, ls, nz), y, num_probes=3, probe_seed=0, max_rank=rank, precond_tol=0.0)
    mll_adj, _, _ = baselines.adjoint_lanczos_terms(_build(x, ls, nz), setup, m)
    g_adj = torch.autograd.grad(mll_adj, [ls, nz])
    # oracle: dense autograd through the same fixed-m recurrence
    A, pc = _build(x, ls, nz), setup.precond
    K = A.to_dense()
    alpha, beta = baselines.lanczos_fixed(lambda v: pc.inv_root(K @ pc.inv_root_t(v)), setup.start, m)
    mll_ref, _, _ = baselines.mll_from_terms(alpha, beta, torch.linalg.vector_norm(setup.start, dim=0), setup, 80)
    g_ref = torch.autograd.grad(mll_ref, [ls, nz])
    torch.testing.assert_close(mll_adj, mll_ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_adj, g_ref, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    # autograd through the library loop agrees too (no reorthogonalization)
    mll_bp, _, _ = baselines.backprop_lanczos_terms(_build(x, ls, nz), setup, m)
    for a, b in zip(torch.autograd.grad(mll_bp, [ls, nz]), g_ref, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_tridiag_quad_form_gradcheck():
    alpha = torch.tensor([2.0, 3.0, 2.5, 4.0], dtype=torch.float64, requires_grad=True)
    beta = torch.tensor([0.5, 0.7, 0.2], dtype=torch.float64, requires_grad=True)
    nrm = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    for name in ("inv", "log"):
        fn = baselines.BUILTIN_FUNCTIONS[name]
        assert torch.autograd.gradcheck(lambda a, b, c, fn=fn: baselines.tridiag_quad(fn, a, b, c), (alpha, beta, nrm))
