"""The flag's hooks keep every structured operator's own exact ``inv_quad_logdet``.

Like GPyTorch, the ``log_prob`` hook calls ``covar.inv_quad_logdet(...)``: only the base-class
method is replaced, so a class that overrides it with an exact structured formula (diagonal,
Kronecker, Cholesky / triangular factors, low rank + diagonal, ...) keeps it under the flag, and a
class that only delegates (block-diagonal, concatenated, batch-repeated) reaches our routine for
its blocks. The test loops over EVERY linear_operator class that overrides ``inv_quad_logdet``, so a
new upstream class fails here until it is added to one of the two tables.
"""

from __future__ import annotations

import inspect

import gpytorch
import linear_operator.operators as ops
import pytest
import torch
from linear_operator.operators import LinearOperator

import lanczos_grad_gp as lgg

DT = torch.float64


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n, generator=g, dtype=DT)
    return X @ X.T / n + torch.eye(n, dtype=DT)


def _pos(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g, dtype=DT) + 0.5


def _lower(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.cholesky(_spd(n, seed))


# classes whose own method is exact: checked with 2 probes, where our stochastic trace would be off
EXACT = {
    "DiagLinearOperator": lambda: ops.DiagLinearOperator(_pos(24, 0)),
    "ConstantDiagLinearOperator": lambda: ops.ConstantDiagLinearOperator(torch.tensor([1.7], dtype=DT), 24),
    "IdentityLinearOperator": lambda: ops.IdentityLinearOperator(24, dtype=DT),
    "CholLinearOperator": lambda: ops.CholLinearOperator(ops.TriangularLinearOperator(_lower(24, 1))),
    "TriangularLinearOperator": lambda: ops.TriangularLinearOperator(_lower(24, 2)),
    "KroneckerProductLinearOperator": lambda: ops.KroneckerProductLinearOperator(_spd(4, 3), _spd(6, 4)),
    "KroneckerProductDiagLinearOperator": lambda: ops.KroneckerProductDiagLinearOperator(
        ops.DiagLinearOperator(_pos(4, 7)), ops.DiagLinearOperator(_pos(6, 8))
    ),
    "KroneckerProductAddedDiagLinearOperator": lambda: ops.KroneckerProductAddedDiagLinearOperator(
        ops.KroneckerProductLinearOperator(_spd(4, 9), _spd(6, 10)),
        ops.ConstantDiagLinearOperator(torch.tensor([0.3], dtype=DT), 24),
    ),
    "SumKroneckerLinearOperator": lambda: ops.SumKroneckerLinearOperator(
        ops.KroneckerProductLinearOperator(_spd(4, 11), _spd(6, 12)),
        ops.KroneckerProductLinearOperator(_spd(4, 13), _spd(6, 14)),
    ),
    "LowRankRootAddedDiagLinearOperator": lambda: ops.LowRankRootAddedDiagLinearOperator(
        ops.LowRankRootLinearOperator(torch.randn(24, 3, generator=torch.Generator().manual_seed(15), dtype=DT)),
        ops.DiagLinearOperator(_pos(24, 16)),
    ),
}

# classes that delegate to their blocks' (or the base class's) method: checked with an exact trace
DELEGATING = {
    "BlockDiagLinearOperator": lambda: ops.BlockDiagLinearOperator(
        ops.DenseLinearOperator(torch.stack([_spd(4, 17), _spd(4, 18), _spd(4, 19)]))
    ),
    "BlockInterleavedLinearOperator": lambda: ops.BlockInterleavedLinearOperator(
        ops.DenseLinearOperator(torch.stack([_spd(4, 20), _spd(4, 21)]))
    ),
    "BatchRepeatLinearOperator": lambda: ops.BatchRepeatLinearOperator(
        ops.DenseLinearOperator(_spd(6, 22)), batch_repeat=torch.Size([2])
    ),
    "CatLinearOperator": lambda: ops.CatLinearOperator(
        *(ops.DenseLinearOperator(r) for r in _spd(8, 23).split(4, dim=-2)), dim=-2
    ),
}

# their own method raises (not invertible / not implemented upstream): the flag must raise the same
UNSUPPORTED = {
    "ZeroLinearOperator": lambda: ops.ZeroLinearOperator(24, 24, dtype=DT),
    "KroneckerProductTriangularLinearOperator": lambda: ops.KroneckerProductTriangularLinearOperator(
        ops.TriangularLinearOperator(_lower(4, 5)), ops.TriangularLinearOperator(_lower(6, 6))
    ),
}


def _overriding_classes() -> set[str]:
    names = set()
    for name in dir(ops):
        cls = getattr(ops, name)
        if inspect.isclass(cls) and issubclass(cls, LinearOperator) and cls is not LinearOperator:
            owner = next(k for k in cls.__mro__ if "inv_quad_logdet" in k.__dict__)
            if owner is not LinearOperator:
                names.add(name)
    return names


def test_every_overriding_class_is_covered():
    assert _overriding_classes() == set(EXACT) | set(DELEGATING) | set(UNSUPPORTED)


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_operators_raise_as_stock(name):
    op = UNSUPPORTED[name]()
    with pytest.raises(Exception) as stock:
        op.inv_quad_logdet(logdet=True)
    with lgg.settings.use_lanczos_grad(), pytest.raises(type(stock.value)):
        op.inv_quad_logdet(logdet=True)


def _dense_reference(op: LinearOperator, rhs: torch.Tensor) -> tuple[float, float]:
    M = op.to_dense()
    if torch.allclose(M, M.mT):
        inv_quad = float((rhs * torch.linalg.solve(M, rhs)).sum())
        return inv_quad, float(torch.logdet(M).sum())
    return float("nan"), float(M.diagonal(dim1=-2, dim2=-1).abs().log().sum())  # triangular: log|det|


@pytest.mark.parametrize("name", sorted(EXACT))
@pytest.mark.usefixtures("lanczos_at_every_size")
def test_exact_structured_inv_quad_logdet_kept_under_flag(name):
    op = EXACT[name]()
    n = op.shape[-1]
    rhs = torch.randn(*op.batch_shape, n, 2, generator=torch.Generator().manual_seed(1), dtype=DT)
    ref_iq, ref_ld = _dense_reference(op, rhs)
    symmetric = ref_iq == ref_iq  # a triangular factor has no inverse quadratic form to check
    with lgg.settings.use_lanczos_grad(), lgg.settings.num_probes(2), lgg.settings.lanczos_tol(1e-12):
        with lgg.record_calls() as calls:
            iq, ld = op.inv_quad_logdet(inv_quad_rhs=rhs if symmetric else None, logdet=True)
    assert abs(float(ld.sum()) - ref_ld) <= 1e-8 * max(1.0, abs(ref_ld)), name
    assert all(c.num_probes == 0 for c in calls), "the log-determinant must not be a probe estimate"
    if symmetric:
        assert abs(float(iq.sum()) - ref_iq) <= 1e-8 * max(1.0, abs(ref_iq)), name


@pytest.mark.parametrize("name", sorted(DELEGATING))
@pytest.mark.usefixtures("lanczos_at_every_size")
def test_delegating_operators_reach_our_routine_and_stay_exact(name):
    op = DELEGATING[name]()
    n = op.shape[-1]
    rhs = torch.randn(*op.batch_shape, n, 2, generator=torch.Generator().manual_seed(2), dtype=DT)
    ref_iq, ref_ld = _dense_reference(op, rhs)
    with lgg.settings.use_lanczos_grad(), lgg.settings.num_probes(64), lgg.settings.lanczos_tol(1e-12):
        with lgg.record_calls() as calls:
            iq, ld = op.inv_quad_logdet(inv_quad_rhs=rhs, logdet=True)
    assert calls, f"{name} did not reach lanczos_grad_gp.inv_quad_logdet under the flag"
    assert all(c.exact_trace for c in calls)
    assert abs(float(ld.sum()) - ref_ld) <= 1e-8 * max(1.0, abs(ref_ld))
    assert abs(float(iq.sum()) - ref_iq) <= 1e-8 * max(1.0, abs(ref_iq))


class _MultitaskGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.MultitaskMean(gpytorch.means.ConstantMean(), num_tasks=2)
        self.covar_module = gpytorch.kernels.MultitaskKernel(gpytorch.kernels.RBFKernel(), num_tasks=2, rank=1)

    def forward(self, x):
        return gpytorch.distributions.MultitaskMultivariateNormal(self.mean_module(x), self.covar_module(x))


@pytest.mark.usefixtures("lanczos_at_every_size")
def test_multitask_kronecker_gp_keeps_exact_logdet_under_flag():
    """The issue's case: a multitask (Kronecker) GP got a stochastic estimate; now its exact formula runs."""
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(0, 1, 40, dtype=DT).unsqueeze(-1)
    noise = 0.1 * torch.randn(40, 2, generator=g, dtype=DT)
    y = torch.stack([torch.sin(6 * x[:, 0]), torch.cos(6 * x[:, 0])], -1) + noise
    # one global noise: a constant diagonal, for which KroneckerProductAddedDiagLinearOperator is exact
    # (with per-task noise it falls back to the base class, i.e. to our routine, like stock's Cholesky)
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2, has_task_noise=False).double()
    model = _MultitaskGP(x, y, likelihood).double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    model.train()
    with gpytorch.settings.max_cholesky_size(10**6):
        ref = mll(model(x), y)
    with lgg.settings.use_lanczos_grad(), lgg.settings.num_probes(2), lgg.settings.lanczos_tol(1e-10):
        with lgg.record_calls() as calls:
            ours = mll(model(x), y)
    # the Kronecker-plus-diagonal operator's own eigendecomposition, not two Rademacher probes
    assert abs(float(ours) - float(ref)) < 1e-8 * abs(float(ref))
    # its inverse quadratic form goes through the base class (our deterministic Lanczos solve, as stock's
    # Cholesky); its log-determinant is never a probe estimate
    assert [c.operator for c in calls if c.route == "operator"] == ["KroneckerProductAddedDiagLinearOperator"]
    assert all(c.num_probes == 0 for c in calls if c.route == "lanczos")
