"""lanczos_tridiag: the recurrence itself (reconstruction, batching, breakdown, stopping, bad inputs).

Tolerances: Lanczos with full (twice-is-enough) reorthogonalization produces ``Q`` orthonormal to
``O(sqrt(n)·eps)`` and ``T`` with ``‖Q^T A Q − T‖ = O(sqrt(n)·eps·‖A‖)`` (each entry is an ``n``-term
inner product with random rounding signs); we allow ``C·sqrt(n)·eps`` with ``C = 10`` for the ``m``
Gram–Schmidt sweeps. The three-term relation ``A Q = Q T + β q e_m^T`` holds to the same order even
WITHOUT reorthogonalization (Paige 1976): only orthogonality is lost, not the local recurrence.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import eps, spd_matrix

from lanczos_grad_gp.core.lanczos import lanczos_tridiag

DTYPES = (torch.float64, torch.float32)


def lanczos_tol(dtype, n):
    return 10 * math.sqrt(n) * eps(dtype)


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_lanczos_reconstructs_A(dtype):
    n = 60
    A = spd_matrix(n, 100.0, seed=0, dtype=dtype)
    res = lanczos_tridiag(A.matmul, randn(n, 1, seed=1, dtype=dtype), max_iter=n, reorthogonalize=True)
    assert int(res.iterations) == n and res.num_steps == n
    Q = res.basis[0].T.to(torch.float64)  # (n, m): columns q_1..q_m
    T = res.tridiag()[0].to(torch.float64)
    A64 = A.to(torch.float64)
    normA = float(torch.linalg.matrix_norm(A64, ord=2))
    tol = lanczos_tol(dtype, n)
    I = torch.eye(n, dtype=torch.float64)
    assert float((Q.T @ Q - I).abs().max()) < tol
    assert float(torch.linalg.matrix_norm(Q.T @ A64 @ Q - T, ord=2)) < tol * normA
    assert float(torch.linalg.matrix_norm(Q @ T @ Q.T - A64, ord=2)) < tol * normA
    # T is symmetric tridiagonal by construction, and the last β (no q_{n+1} exists) is at round-off
    assert float(res.residual_norm) < tol * normA


@pytest.mark.parametrize("dtype", DTYPES)
def test_three_term_relation_holds_without_reorthogonalization(dtype):
    n, m = 200, 120
    A = spd_matrix(n, 1e3, seed=2, dtype=dtype)
    res = lanczos_tridiag(A.matmul, randn(n, 1, seed=3, dtype=dtype), max_iter=m + 1)
    Qall = res.basis[0].T.to(torch.float64)  # (n, m+1)
    Q, q_next = Qall[:, :m], Qall[:, m]
    T = res.tridiag()[0, :m, :m].to(torch.float64)
    beta_m = float(res.beta[0, m - 1])
    A64 = A.to(torch.float64)
    R = A64 @ Q - Q @ T - beta_m * torch.outer(q_next, torch.eye(m, dtype=torch.float64)[-1])
    normA = float(torch.linalg.matrix_norm(A64, ord=2))
    assert float(torch.linalg.matrix_norm(R, ord=2)) < lanczos_tol(dtype, n) * normA
    # ... although orthogonality is long gone (the regime the forward-only gradient must survive)
    assert float((Q.T @ Q - torch.eye(m, dtype=torch.float64)).abs().max()) > 0.1


@pytest.mark.parametrize("reorthogonalize", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_columns_equal_single_runs(dtype, reorthogonalize):
    n, k, m = 40, 3, 15
    A = torch.stack([spd_matrix(n, 30.0, seed=s, dtype=dtype) for s in (0, 1)])  # (2, n, n)
    V = randn(2, n, k, seed=4, dtype=dtype)
    V[1, :, 2] *= 1e3  # start norms differ wildly: normalisation is per column
    res = lanczos_tridiag(A.matmul, V, max_iter=m, reorthogonalize=reorthogonalize)
    assert res.basis.shape == (2, k, m, n) and res.alpha.shape == (2, k, m) and res.beta.shape == (2, k, m - 1)
    g = torch.Generator().manual_seed(7)
    for b in range(2):
        for c in range(k):
            v = V[b, :, c : c + 1]
            one = lanczos_tridiag(A[b].matmul, v, max_iter=m, reorthogonalize=reorthogonalize)
            # Batched and single BLAS calls round differently, and the recurrence amplifies rounding the
            # way it amplifies the loss of orthogonality (Paige), so no fixed constant bounds the
            # difference. Its scale D is the run's sensitivity to rounding-level perturbations, which we
            # sample: three re-runs from v ∘ (1 + ε r) (r standard normal), D their largest deviation
            # from the single run. The batched run is one more such sample, so |batched − single| is
            # about D; allow 4 D plus the round-off floor. A column mixed up with another (the bug
            # this test guards against) differs by O(1).
            perturbed = [
                lanczos_tridiag(
                    A[b].matmul,
                    v * (1 + eps(dtype) * torch.randn(v.shape, generator=g, dtype=torch.float64).to(dtype)),
                    max_iter=m,
                    reorthogonalize=reorthogonalize,
                )
                for _ in range(3)
            ]
            scale = float(one.alpha.abs().max())
            floor = lanczos_tol(dtype, n)

            def dev(x: torch.Tensor, y: torch.Tensor) -> float:
                return float((x.to(torch.float64) - y.to(torch.float64)).abs().max())

            for field, s in (("alpha", scale), ("beta", scale), ("basis", 1.0)):
                single = getattr(one, field)[0]
                D = max(dev(getattr(p, field)[0], single) for p in perturbed)
                got = getattr(res, field)[b, c]
                assert dev(got, single) <= 4 * D + floor * s, (field, dev(got, single), D)
            assert torch.isclose(res.start_norm[b, c], one.start_norm[0], rtol=4 * eps(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_breakdown_on_invariant_subspaces(dtype):
    n = 50
    g = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.linspace(1.0, 3.0, n, dtype=torch.float64)
    A = ((Q * lam) @ Q.T).to(dtype)
    A = 0.5 * (A + A.T)
    V = torch.stack(
        [
            3.0 * Q[:, 7],  # eigenvector: invariant after 1 step
            Q[:, [2, 20, 40]] @ torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64),  # 3-dim invariant subspace
            randn(n, seed=6),  # generic
        ],
        dim=-1,
    ).to(dtype)
    res = lanczos_tridiag(A.matmul, V, max_iter=n, check_every=4)
    assert res.broke_down.tolist()[:2] == [True, True]
    assert res.iterations.tolist()[:2] == [1, 3]
    for t in (res.alpha, res.beta, res.basis, res.residual_norm):
        assert torch.isfinite(t).all()
    assert float(res.residual_norm[:2].abs().max()) < lanczos_tol(dtype, n) * 3.0
    # Ritz values of the broken-down columns are the exact eigenvalues (the padding block is decoupled
    # and holds the first Rayleigh quotient, also an eigenvalue here); basis rows after the stop are zero
    T = res.tridiag().to(torch.float64)
    tol = lanczos_tol(dtype, n) * 3.0
    assert abs(float(T[0, 0, 0]) - float(lam[7])) < tol
    ritz = torch.linalg.eigvalsh(T[1, :3, :3])
    assert float((ritz - lam[[2, 20, 40]].sort().values).abs().max()) < tol
    assert float(T[1, 2, 3].abs()) == 0.0 and float(res.basis[1, 3:].abs().max()) == 0.0


def test_zero_start_vector():
    A = spd_matrix(10, 5.0, seed=0)
    V = randn(10, 2, seed=0)
    V[:, 1] = 0
    with pytest.raises(ValueError, match="all-zero start column"):
        lanczos_tridiag(A.matmul, V, max_iter=5)
    res = lanczos_tridiag(A.matmul, V, max_iter=5, allow_zero=True)
    assert res.iterations.tolist() == [5, 0]
    assert torch.isfinite(res.alpha).all() and float(res.basis[1].abs().max()) == 0.0


@pytest.mark.parametrize("check_every", [1, 3, 5])
def test_stop_fn_called_only_every_check_every_steps(check_every):
    n = 60
    A = spd_matrix(n, 1e3, seed=1)
    calls = []

    def stop(partial):
        calls.append(partial.num_steps)
        return torch.full(partial.start_norm.shape, partial.num_steps >= 14)

    res = lanczos_tridiag(A.matmul, randn(n, 2, seed=2), max_iter=n, stop_fn=stop, check_every=check_every)
    expected_stop = check_every * math.ceil(14 / check_every)
    assert all(c % check_every == 0 for c in calls) and calls[-1] == expected_stop
    assert res.stopped.all() and not res.broke_down.any()
    assert res.iterations.tolist() == [expected_stop] * 2 and res.num_steps == expected_stop


def test_stopped_column_is_padded_and_decoupled():
    n = 40
    A = spd_matrix(n, 50.0, seed=3)

    def stop(partial):  # stop column 0 at the first check, never column 1
        return torch.tensor([True, False])

    res = lanczos_tridiag(A.matmul, randn(n, 2, seed=4), max_iter=20, stop_fn=stop, check_every=5)
    assert res.iterations.tolist() == [5, 20] and res.stopped.tolist() == [True, False]
    assert float(res.beta[0, 4:].abs().max()) == 0.0 and float(res.basis[0, 5:].abs().max()) == 0.0
    alone = lanczos_tridiag(A.matmul, randn(n, 2, seed=4)[:, :1], max_iter=5)
    assert torch.allclose(res.alpha[0, :5], alone.alpha[0], rtol=1e-13)
    assert torch.allclose(res.residual_norm[0], alone.residual_norm[0], rtol=1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
def test_stopped_columns_leave_the_products(dtype):
    """After a check, the operator sees only the columns still running in some batch entry.

    Column 0 stops in both batch entries at the first check; column 1 stops in entry 0 at the second
    check, which keeps it in the products for entry 1, and in entry 1 at the fourth; column 2 never
    stops. The products carry 3, then 2, then 1 columns, and the columns still
    running match a run of the same columns whose products always carry all three (a stopped column's
    product is zero, so leaving it out changes nothing but the rounding of a product with fewer columns,
    ``O(sqrt(n)·eps·‖A‖)`` per step).
    """
    n, m = 50, 30
    A = torch.stack([spd_matrix(n, 80.0, seed=5), spd_matrix(n, 30.0, seed=6)]).to(dtype)  # (2, n, n)
    v0 = randn(2, n, 3, seed=7, dtype=dtype)
    widths = []

    def matmul(x):
        widths.append(x.shape[-1])
        return A @ x

    def stop(partial):
        done = torch.zeros(2, 3, dtype=torch.bool)
        done[:, 0] = True
        done[0, 1] = partial.num_steps >= 10
        done[1, 1] = partial.num_steps >= 20
        return done

    res = lanczos_tridiag(matmul, v0, max_iter=m, stop_fn=stop, check_every=5)
    assert widths == [3] * 5 + [2] * 15 + [1] * 10
    assert res.iterations.tolist() == [[5, 10, m], [5, 20, m]]
    alone = lanczos_tridiag(lambda x: A @ x, v0, max_iter=m)  # every column, all m steps
    tol = lanczos_tol(dtype, n) * float(torch.linalg.matrix_norm(A, ord=2).max())
    for b, c, steps in ((0, 2, m), (1, 2, m), (1, 1, 20), (0, 1, 10)):
        assert torch.allclose(res.alpha[b, c, :steps], alone.alpha[b, c, :steps], rtol=0, atol=100 * tol)
    assert float(res.basis[0, 1, 10:].abs().max()) == 0.0 and float(res.basis[:, 0, 5:].abs().max()) == 0.0


def test_max_iter_is_clipped_to_n_only_with_reorthogonalization():
    A = spd_matrix(8, 5.0, seed=0)
    res = lanczos_tridiag(A.matmul, randn(8, 1, seed=1), max_iter=100, reorthogonalize=True)
    assert res.num_steps == 8
    # without reorthogonalization the recurrence may run past n (lost orthogonality needs more steps);
    # here it breaks down near step n, so it stops at the first check after it, never at 100
    res = lanczos_tridiag(A.matmul, randn(8, 1, seed=1), max_iter=100, check_every=10)
    assert 8 <= res.num_steps <= 100 and int(res.iterations) >= 8


def test_max_iter_beyond_n_converges_where_n_steps_do_not():
    """The issue's example: eigenvalues logspace(-8, 0), v = ones, f = 1/x; n steps lose orthogonality."""
    import lanczos_grad_gp as lgg

    n = 50
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(-8, 0, n, dtype=torch.float64)
    A = (Q * lam) @ Q.T
    A = 0.5 * (A + A.T)
    v = torch.ones(n, dtype=torch.float64)
    exact = float(v @ torch.linalg.solve(A, v))
    with pytest.warns(Warning):  # n steps: not converged, and it says so
        short, info = lgg.quad_form(A, v, "inv", max_iter=n, return_info=True)
    assert not bool(info.converged)
    value, info = lgg.quad_form(A, v, "inv", max_iter=5000, tol=1e-6, return_info=True)
    assert int(info.iterations) > n  # ran past n
    # the attainable accuracy is ε κ ≈ 2e-8 relative; the estimate covers the true error
    err = abs(float(value) - exact)
    assert err <= float(info.value_error_estimate), (err, float(info.value_error_estimate))
    assert err / exact < 1e-4


@pytest.mark.parametrize(
    "kwargs, v0, match",
    [
        (dict(max_iter=0), None, "max_iter"),
        (dict(max_iter=3, check_every=0), None, "check_every"),
        (dict(max_iter=3), torch.ones(6, dtype=torch.float64), r"\(\*batch, n, k\)"),
        (dict(max_iter=3), torch.ones(6, 1, dtype=torch.int64), "floating-point"),
        (dict(max_iter=3), torch.full((6, 1), float("nan"), dtype=torch.float64), "NaN or Inf"),
    ],
)
def test_lanczos_bad_arguments(kwargs, v0, match):
    A = spd_matrix(6, 5.0, seed=0)
    v0 = randn(6, 1, seed=0) if v0 is None else v0
    with pytest.raises(ValueError, match=match):
        lanczos_tridiag(A.matmul, v0, **kwargs)
