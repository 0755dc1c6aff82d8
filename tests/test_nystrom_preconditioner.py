"""The randomized Nyström preconditioner against dense float64 references."""

from __future__ import annotations

import importlib

import pytest
import torch
from linear_operator.operators import AddedDiagLinearOperator, DenseLinearOperator, DiagLinearOperator

import lanczos_grad_gp as lgg
from lanczos_grad_gp.core.preconditioners import nystrom, nystrom_preconditioner


def _rbf(x: torch.Tensor, ls: float) -> torch.Tensor:
    return torch.exp(-0.5 * torch.cdist(x / ls, x / ls).square())


def _problem(n: int, dtype: torch.dtype, *, hetero: bool = False, batch: tuple[int, ...] = (), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, 3, generator=g, dtype=torch.float64)
    K = _rbf(x, 1.2)
    d = torch.full((*batch, n), 0.05, dtype=torch.float64)
    if hetero:
        d = d * (1 + torch.rand(*batch, n, generator=g, dtype=torch.float64))
    A = AddedDiagLinearOperator(DenseLinearOperator(K.to(dtype)), DiagLinearOperator(d.to(dtype)))
    return A, K, d


def _dense_P(P, n: int) -> torch.Tensor:
    """``P = C Cᵀ`` from the applied roots: ``C^{-1} I`` then invert (float64)."""
    eye = torch.eye(n, dtype=P.logdet.dtype).expand(*P.logdet.shape, n, n)
    Cinv = P.inv_root(eye).double()
    return torch.linalg.inv(Cinv.mT @ Cinv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hetero", [False, True])
def test_matches_its_definition(dtype: torch.dtype, hetero: bool) -> None:
    n, r = 80, 20
    A, K, d = _problem(n, dtype, hetero=hetero)
    P = nystrom_preconditioner(A, r)
    assert P is not None and P.rank == r and P.U.dtype == dtype
    Pd = _dense_P(P, n)
    eps = torch.finfo(dtype).eps
    # log det P is the determinant of the applied P (the Lanczos identity log det K = log det P + log det B)
    assert abs(float(P.logdet) - float(torch.logdet(Pd))) <= 1e3 * eps * n
    # P = D^{1/2}(I + UΛUᵀ)D^{1/2} with 0 ⪯ UΛUᵀ ⪯ S: the preconditioned spectrum lies in [1, λ_max]
    Cinv = P.inv_root(torch.eye(n, dtype=dtype)).double()
    B = Cinv @ (K + torch.diag_embed(d)) @ Cinv.mT
    ev = torch.linalg.eigvalsh(0.5 * (B + B.mT))
    assert float(ev[0]) >= 1 - 1e3 * eps * float(ev[-1])
    # the sketch captures the leading eigenspace: B's top eigenvalue is about 1 + λ_{r+1}(S), far below S's
    S = K / (d.sqrt().unsqueeze(-1) * d.sqrt().unsqueeze(-2))
    lam = torch.linalg.eigvalsh(S).flip(-1)
    assert float(ev[-1]) <= 1 + 10 * float(lam[r]) and float(ev[-1]) < 0.1 * float(lam[0])


def test_exact_on_a_low_rank_kernel() -> None:
    n, rank = 60, 5
    g = torch.Generator().manual_seed(1)
    F = torch.randn(n, rank, generator=g, dtype=torch.float64)
    K = F @ F.mT
    A = AddedDiagLinearOperator(DenseLinearOperator(K), DiagLinearOperator(torch.full((n,), 0.1, dtype=torch.float64)))
    P = nystrom_preconditioner(A, 8)
    torch.testing.assert_close(_dense_P(P, n), A.to_dense(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(P.logdet, torch.logdet(A.to_dense()), rtol=1e-10, atol=1e-10)


def test_batched_seeded_and_input_unchanged() -> None:
    A, K, d = _problem(40, torch.float64, batch=(2,))
    before = K.clone()
    P1, P2 = nystrom_preconditioner(A, 10, seed=3), nystrom_preconditioner(A, 10, seed=3)
    assert P1.U.shape == (2, 40, 10) and P1.logdet.shape == (2,)
    assert torch.equal(P1.U, P2.U) and torch.equal(P1.logdet, P2.logdet)
    Pd = _dense_P(P1, 40)  # (2, 40, 40): each entry is D^{1/2}(I + U Λ Uᵀ)D^{1/2} of its own sketch
    for b in range(2):
        torch.testing.assert_close(P1.logdet[b], torch.logdet(Pd[b]), rtol=1e-10, atol=1e-10)
        S = K[b] / (d[b].sqrt().unsqueeze(-1) * d[b].sqrt().unsqueeze(-2))
        approx = (P1.U[b] * ((1 + P1.scale[b]) ** -2 - 1)) @ P1.U[b].mT  # U Λ Uᵀ from scale = (1+Λ)^{-1/2} − 1
        assert float(torch.linalg.eigvalsh(S - approx)[0]) > -1e-8  # U Λ Uᵀ ⪯ S (up to the shift)
    assert torch.equal(K, before)
    assert nystrom_preconditioner(A, 0).rank == 0
    assert nystrom_preconditioner(DenseLinearOperator(A.to_dense()), 10).rank == 0  # not K + D: identity


def test_gp_routine_is_exact_with_it() -> None:
    """Under the override, inv-quad, log-det and their gradients match dense float64 autograd."""
    n = 120
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    ls = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def covariance(ls: torch.Tensor):
        return AddedDiagLinearOperator(
            DenseLinearOperator(_rbf(x, ls)), DiagLinearOperator(torch.full((n,), 0.02, dtype=torch.float64))
        )

    M = covariance(ls).to_dense()
    ref = (y.mT @ torch.linalg.solve(M, y)).squeeze() + torch.logdet(M)
    (ref_grad,) = torch.autograd.grad(ref, ls)
    with (
        lgg.settings.preconditioner_override(nystrom(30)),
        lgg.settings.num_probes(n),  # n probes: the unit vectors, an exact trace
        lgg.settings.lanczos_tol(1e-10),
        lgg.record_calls() as calls,
    ):
        iq, ld = lgg.inv_quad_logdet(covariance(ls), y, logdet=True)
        (grad,) = torch.autograd.grad(iq + ld, ls)
    assert calls[0].preconditioner_rank == 30 and calls[0].converged
    torch.testing.assert_close(iq + ld, ref, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-8)


def test_rejects_a_bad_rank() -> None:
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="rank"):
            nystrom(bad)


def _near_diagonal(n: int, d: int = 16, noise: float = 0.1, seed: int = 5) -> AddedDiagLinearOperator:
    """RBF at lengthscale 1 on ``d`` z-scored inputs: weak correlations that pivot columns cannot capture."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    K = _rbf(x, 1.0)
    return AddedDiagLinearOperator(
        DenseLinearOperator(K), DiagLinearOperator(torch.full((n,), noise, dtype=torch.float64))
    )


def test_pivoted_cholesky_abandons_only_a_hopeless_factor() -> None:
    from lanczos_grad_gp.core.preconditioners import pivoted_cholesky

    A = _near_diagonal(400)
    K = A._linear_op
    trD = 0.1 * 400
    assert pivoted_cholesky(K, 150, abandon_above=trD) is None
    full = pivoted_cholesky(K, 150)
    assert float(K.diagonal().sum() - full.square().sum()) > trD  # it was indeed hopeless
    # a smooth 1-d kernel reaches a small remainder: never abandoned, and the same factor as without
    x = torch.linspace(0, 1, 400, dtype=torch.float64).unsqueeze(-1)
    smooth = DenseLinearOperator(_rbf(x, 0.3))
    L = pivoted_cholesky(smooth, 150, error_tol=1e-8, abandon_above=trD)
    assert L is not None
    torch.testing.assert_close(L, pivoted_cholesky(smooth, 150, error_tol=1e-8))


def test_abandon_keeps_a_factor_whose_decrease_comes_late() -> None:
    """Isolated points first (decrease 1 per column), then 40 clusters of 6 (decrease 6): exact at rank 80."""
    from lanczos_grad_gp.core.preconditioners import pivoted_cholesky

    blocks = [torch.eye(40, dtype=torch.float64)] + [torch.ones(6, 6, dtype=torch.float64)] * 40
    K = DenseLinearOperator(torch.block_diag(*blocks))  # n = 280, rank 80
    L = pivoted_cholesky(K, 80, error_tol=0.28, abandon_above=28.0)
    assert L is not None and L.shape == (280, 80)
    torch.testing.assert_close(L @ L.mT, K.to_dense(), rtol=0, atol=1e-12)
    # batched: the same decision per entry; a hopeless entry (near-diagonal kernel) gives the batch up
    level = torch.full((2,), 28.0, dtype=torch.float64)
    Kb = DenseLinearOperator(torch.stack([K.to_dense(), K.to_dense()]))
    assert pivoted_cholesky(Kb, 80, error_tol=0.28, abandon_above=level) is not None
    hard = _near_diagonal(280)._linear_op.to_dense()
    mixed = DenseLinearOperator(torch.stack([K.to_dense(), hard]))
    assert pivoted_cholesky(mixed, 80, error_tol=0.28, abandon_above=level) is None


def test_default_trades_a_hopeless_greedy_factor_for_the_sketch() -> None:
    from lanczos_grad_gp.core.preconditioners import select_preconditioner

    A = _near_diagonal(400)
    P = select_preconditioner(A, max_rank=64, trace_tol=0.01)
    assert P.kind == "nystrom" and P.rank == 64
    small_cap = select_preconditioner(A, max_rank=32, trace_tol=0.01)  # below the rank the rule needs
    assert small_cap.kind == "pivoted_cholesky"
    x = torch.linspace(0, 1, 400, dtype=torch.float64).unsqueeze(-1)
    smooth = AddedDiagLinearOperator(
        DenseLinearOperator(_rbf(x, 0.3)), DiagLinearOperator(torch.full((400,), 0.1, dtype=torch.float64))
    )
    Q = select_preconditioner(smooth, max_rank=64, trace_tol=0.01)
    assert Q.kind == "pivoted_cholesky" and Q.rank < 64  # met its trace tolerance


@pytest.mark.parametrize("sketch_cost", [0.0, 1e3])
def test_adaptive_rank_follows_the_cost_model(monkeypatch: pytest.MonkeyPatch, sketch_cost: float) -> None:
    """Free sketch columns: doubled while the predicted steps saved beat the larger factor's application;
    costly ones: the first sketch is kept. On a spectrum without decay (d = 16) doubling never pays."""
    ny = importlib.import_module("lanczos_grad_gp.core.preconditioners.nystrom")  # the module, not the factory

    def fake_seconds(fn, like):
        out = fn()
        return out, 1.0 if out.shape[-1] <= 11 else sketch_cost * out.shape[-1] / 64  # a Lanczos product: 1 s

    monkeypatch.setattr(ny, "_seconds", fake_seconds)
    monkeypatch.setattr(ny, "_cost_cache", {})
    A = _near_diagonal(1500, d=8)  # sketch eigenvalues 304, 33, 19, 12 at 1, 32, 64, 128: a decaying spectrum
    P = ny.adaptive_nystrom_preconditioner(A, 512, num_columns=11)
    assert P.kind == "nystrom" and (P.rank > ny.START_RANK if sketch_cost == 0 else P.rank == ny.START_RANK)
    assert P.rank in (64, 128, 256, 512)
    Pd = _dense_P(P, 1500)
    assert abs(float(P.logdet) - float(torch.logdet(Pd))) < 1e-8 * 1500
    flat = ny.adaptive_nystrom_preconditioner(_near_diagonal(1500, d=16), 512, num_columns=11)
    assert flat.rank == ny.START_RANK  # eigenvalues 12, 10.3, 10.2, 10.0: nothing to gain
    # the measured ratio is kept: a second call at the same θ builds the same preconditioner
    again = ny.adaptive_nystrom_preconditioner(A, 512, num_columns=11)
    assert len(ny._cost_cache) == 1 and again.rank == P.rank and torch.equal(again.U, P.U)


def test_gp_routine_under_the_default_choice_matches_cholesky() -> None:
    """The auto choice (Nyström here) changes iterations, never the target: exact trace, tight tolerance."""
    A = _near_diagonal(300, d=12, noise=0.05)
    y = torch.randn(300, 1, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    M = A.to_dense()
    with lgg.settings.num_probes(300), lgg.settings.lanczos_tol(1e-10), lgg.settings.max_preconditioner_size(64):
        with lgg.record_calls() as calls:
            iq, ld = lgg.inv_quad_logdet(A, y, logdet=True)
    assert calls[0].preconditioner_kind == "nystrom" and calls[0].converged
    torch.testing.assert_close(iq.squeeze(), (y.mT @ torch.linalg.solve(M, y)).squeeze(), rtol=1e-8, atol=0)
    torch.testing.assert_close(ld, torch.logdet(M), rtol=1e-8, atol=0)
