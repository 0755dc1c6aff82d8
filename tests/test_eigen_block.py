"""Block Lanczos and the deflated check of :func:`lanczos_grad_gp.eigen.lanczos`: repeated and near-equal
eigenvalues against ``torch.linalg.eigvalsh`` (seeded, float32 and float64)."""

from __future__ import annotations

import warnings

import pytest
import torch
from linear_operator.utils.warnings import NumericalWarning

from lanczos_grad_gp.eigen import lanczos
from lanczos_grad_gp.eigen.basis import orthonormalize
from lanczos_grad_gp.eigen.block import compute_dtype
from lanczos_grad_gp.eigen.curvature import CurvatureOperator
from lanczos_grad_gp.eigen.inputs import prepare_operator
from lanczos_grad_gp.eigen.verify import deflated_check

DTYPES = (torch.float32, torch.float64)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small dense products: one thread avoids oversubscription on shared CPUs (restored afterwards)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tol_for(dtype: torch.dtype) -> float:
    return 1e-8 if dtype == torch.float64 else 1e-4


def with_spectrum(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), dtype=torch.float64, generator=g))
    A = (Q * eigs.double()) @ Q.T
    return 0.5 * (A + A.T)


def reference(A: torch.Tensor, k: int, which: str) -> torch.Tensor:
    ev = torch.linalg.eigvalsh(A.double())
    if which == "LA":
        return ev.flip(-1)[..., :k]
    if which == "SA":
        return ev[..., :k]
    return ev.gather(-1, ev.abs().argsort(dim=-1, descending=True)[..., :k])


def four_tens(n: int = 100, dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
    """The issue's spectrum: 10 four times, then 5, then [0, 4]."""
    eigs = torch.cat([torch.full((4,), 10.0), torch.tensor([5.0]), torch.linspace(0.0, 4.0, n - 5)])
    return with_spectrum(eigs, seed).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("mult", [2, 3])
def test_block_finds_multiplicity_up_to_block_size(dtype, which, mult):
    # the block alone (no deflated check) sees `mult` copies when block_size >= mult
    sign = -1.0 if which == "SA" else 1.0
    eigs = torch.cat([sign * torch.full((mult,), 6.0), sign * torch.tensor([5.5, 5.0]), torch.linspace(-2, 2, 110)])
    A = with_spectrum(eigs, seed=mult).to(dtype)
    k = mult + 2
    res = lanczos(A, k=k, which=which, block_size=mult, verify=False, tol=tol_for(dtype), seed=0)
    scale = 6.0
    err = (res.eigenvalues.double() - reference(A, k, which)).abs().max() / scale
    assert float(err) <= (1e-10 if dtype == torch.float64 else 1e-5)
    assert bool(res.converged.all())
    V = res.eigenvectors.double()
    assert float((V @ V.mT - torch.eye(k, dtype=torch.float64)).abs().max()) <= 1e3 * torch.finfo(dtype).eps
    assert res.diagnostics.block_size == mult


@pytest.mark.parametrize("dtype", DTYPES)
def test_issue_example_single_vector_is_repaired_by_the_check(dtype):
    A = four_tens(dtype=dtype)
    plain = lanczos(A, k=4, which="LA", verify=False, tol=tol_for(dtype), seed=0)
    # without the check a single vector misses a copy and calls the substitute converged
    assert float(plain.eigenvalues[-1]) == pytest.approx(5.0, rel=1e-3)
    assert bool(plain.converged.all())
    res = lanczos(A, k=4, which="LA", tol=tol_for(dtype), seed=0)
    assert torch.allclose(res.eigenvalues.double(), torch.full((4,), 10.0, dtype=torch.float64), rtol=1e-5)
    assert bool(res.converged.all()) and bool(res.diagnostics.verified)
    assert res.diagnostics.checks >= 2 and res.diagnostics.repairs >= 1
    assert res.diagnostics.num_matvecs >= int(res.iterations)


def test_deflated_check_detects_the_missing_copy():
    A = four_tens()
    wrong = lanczos(A, k=4, which="LA", verify=False, seed=0)
    assert float(wrong.eigenvalues[-1]) == pytest.approx(5.0, rel=1e-3)
    op = prepare_operator(A)
    shape = (op.batch_shape, op.n, op.dtype, op.device)
    cdt = compute_dtype(op.dtype, op.device)
    anorm = torch.tensor(10.0, dtype=torch.float64)

    def gen(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    found = (wrong.eigenvalues.to(cdt), wrong.eigenvectors.mT, wrong.residuals)
    # an independent start (seed 1): the run's own start vector (seed 0) has no component along the missing copy
    chk = deflated_check(op.matmul, shape, found, which="LA", tol=1e-4, steps=10, block_size=1, anorm=anorm, gen=gen(1))
    assert bool(chk.missed)
    assert float(chk.values[0]) == pytest.approx(10.0, rel=1e-8)  # the missing copy, found in span(Y)^⊥
    assert chk.supported.tolist() == [True, True, True, False]  # 5 is displaced; the three 10s are supported
    right = lanczos(A, k=4, which="LA", block_size=4, verify=False, tol=1e-10, seed=0)
    found = (right.eigenvalues.to(cdt), right.eigenvectors.mT, right.residuals)
    chk = deflated_check(op.matmul, shape, found, which="LA", tol=1e-4, steps=10, block_size=1, anorm=anorm, gen=gen(1))
    assert not bool(chk.missed) and bool(chk.supported.all())


def test_unrepaired_miss_is_reported_unconverged_with_a_warning():
    A = four_tens()
    plain = lanczos(A, k=4, which="LA", verify=False, seed=0)
    budget = int(plain.iterations) + 1  # room for the check, none for a repair
    with pytest.warns(NumericalWarning, match="not converged"):
        res = lanczos(A, k=4, which="LA", seed=0, max_iter=budget)
    assert res.converged.tolist() == [True, True, True, False]
    assert not bool(res.diagnostics.verified)


def _trial(t: int, dtype: torch.dtype, verify: bool = True) -> tuple[int, int, int]:
    """One seeded random problem with repeated / near-equal groups: (wrong and converged, wrong, pairs)."""
    g = torch.Generator().manual_seed(1000 + t)
    n = int(torch.randint(40, 160, (1,), generator=g))
    k = int(torch.randint(1, 9, (1,), generator=g))
    which = ("LA", "SA", "LM")[t % 3]
    groups = []
    for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
        v = float(torch.rand(1, generator=g)) * 5 + 5
        mult = int(torch.randint(1, 5, (1,), generator=g))
        rel = (0.0, 1e-12, 1e-9, 1e-6, 1e-3)[int(torch.randint(0, 5, (1,), generator=g))]
        groups += [v * (1 + rel * i) for i in range(mult)]
    top = torch.tensor(groups, dtype=torch.float64) * (-1.0 if which == "SA" or (which == "LM" and t % 2) else 1.0)
    eigs = torch.cat([top, 4 * torch.rand(n - len(groups), generator=g, dtype=torch.float64)])
    A = with_spectrum(eigs, t).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        res = lanczos(A, k=k, which=which, tol=tol_for(dtype), seed=t, verify=verify)
    err = (res.eigenvalues.double() - reference(A, k, which)).abs() / eigs.abs().max()
    wrong = err > (1e-5 if dtype == torch.float64 else 1e-3)
    return int((wrong & res.converged).sum()), int(wrong.sum()), k


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_multiplicities_never_wrong_and_converged(dtype):
    # 300 trials of this family (test below) without the check: 79 of 1347 pairs wrong and converged (float64)
    out = [_trial(t, dtype) for t in range(30)]
    assert sum(o[0] for o in out) == 0
    assert sum(o[2] for o in out) > 60
    # the family does trip the unverified single-vector iteration (the failure the check removes)
    assert sum(_trial(t, dtype, verify=False)[0] for t in range(30)) > 0


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_multiplicities_300_trials(dtype):
    out = [_trial(t, dtype) for t in range(300)]
    assert sum(o[0] for o in out) == 0


def test_batched_entries_with_different_multiplicities():
    a = with_spectrum(torch.cat([torch.full((3,), 7.0), torch.linspace(0, 5, 57)]), seed=2)
    b = with_spectrum(torch.linspace(0, 7, 60), seed=3)
    B = torch.stack([a, b])
    res = lanczos(B, k=3, which="LA", tol=1e-10, seed=0)
    assert torch.allclose(res.eigenvalues, reference(B, 3, "LA"), atol=1e-9)
    assert bool(res.converged.all()) and res.diagnostics.verified.tolist() == [True, True]
    assert res.iterations.shape == (2,)


def test_local_reorthogonalization_block():
    A = four_tens(n=150)
    res = lanczos(A, k=5, which="LA", block_size=4, reorthogonalize=False, tol=1e-8, seed=0)
    assert torch.allclose(res.eigenvalues, reference(A, 5, "LA"), rtol=1e-8)
    assert bool(res.converged.all())


class _CountingOperator(CurvatureOperator):
    """A dense matrix as a curvature operator that records the width of every block it is applied to."""

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__(A.shape[-1], A.dtype, A.device)
        self.A = A
        self.widths: list[int] = []

    def _product(self, V: torch.Tensor) -> torch.Tensor:
        self.widths.append(V.shape[-1])
        return self.A @ V


def test_block_size_is_the_width_of_each_operator_call():
    op = _CountingOperator(four_tens())
    res = lanczos(op, k=4, which="LA", block_size=4, tol=1e-8, seed=0)
    assert torch.allclose(res.eigenvalues, torch.full((4,), 10.0, dtype=torch.float64), rtol=1e-8)
    assert max(op.widths) == 4 and op.widths.count(4) >= len(op.widths) - 2  # a cycle's last block may be narrower
    assert sum(op.widths) == res.diagnostics.num_matvecs


def test_exact_multiplicity_and_small_sizes():
    for n in (1, 2, 3, 5):
        A = with_spectrum(torch.linspace(-1.0, 1.0, n) if n > 1 else torch.ones(1), seed=n)
        for k in range(1, n + 1):
            for b in range(1, n + 1):
                res = lanczos(A, k=k, which="LA", block_size=b, tol=1e-10, seed=0)
                assert torch.allclose(res.eigenvalues, reference(A, k, "LA"), atol=1e-9)
                assert bool(res.converged.all())
    eye = lanczos(torch.eye(40, dtype=torch.float64), k=5, seed=0)
    assert torch.allclose(eye.eigenvalues, torch.ones(5, dtype=torch.float64)) and bool(eye.converged.all())


def test_orthonormalize_replaces_dependent_columns():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(30, 5, dtype=torch.float64, generator=g))
    w = torch.randn(30, 1, dtype=torch.float64, generator=g)
    W = torch.cat([w, w, Q[:, :1], 1e-30 * w], -1)  # a duplicate, a column in span(Q), a tiny column
    P = orthonormalize(W, Q, ref=torch.tensor(1.0, dtype=torch.float64), gen=g)
    assert P.shape == (30, 4)
    assert float((P.T @ P - torch.eye(4, dtype=torch.float64)).abs().max()) < 1e-13
    assert float((Q.T @ P).abs().max()) < 1e-13


def test_bad_block_arguments():
    A = four_tens(n=20)
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        lanczos(A, k=2, block_size=0)
    with pytest.raises(ValueError, match="exceeds the operator size"):
        lanczos(A, k=2, block_size=21)
    with pytest.raises(ValueError, match="verify must be an int >= 1"):
        lanczos(A, k=2, verify=-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_lanczos_and_shift_invert_on_cuda(dtype):
    A = four_tens(dtype=dtype)
    tol = tol_for(dtype)
    for kw in ({"block_size": 4}, {"block_size": 1}, {"sigma": 9.9}):
        res = lanczos(A.cuda(), k=4, which="LA", tol=tol, seed=0, **kw)
        assert res.eigenvalues.device.type == "cuda" and bool(res.converged.all())
        torch.testing.assert_close(
            res.eigenvalues.cpu().double(), torch.full((4,), 10.0, dtype=torch.float64), rtol=10 * tol, atol=10 * tol
        )
