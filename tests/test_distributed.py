"""Row-sharded kernels over torch.distributed: two gloo processes against one process with the same probes.

One ``spawn_local`` run (two CPU processes, float64, ``file://`` rendezvous) computes every sharded
case; the single-process references are computed here with identical settings
(``max_cholesky_size(0)`` forces Lanczos at this small ``n``; probes seeded by ``probe_seed``, 0).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import gpytorch
import pytest
import torch
import torch.distributed as dist
from linear_operator.operators import CatLinearOperator, DenseLinearOperator

import lanczos_grad_gp as lgg
from lanczos_grad_gp.distributed import DistributedKernel, RowPartition, cat_get_entries, spawn_local

N, D, NOISE = 151, 3, 0.05  # odd n: the two ranks own 75 and 76 rows
RTOL = 1e-8
HAS_GLOO = dist.is_available() and dist.is_gloo_available()
needs_gloo = pytest.mark.skipif(not HAS_GLOO, reason="torch.distributed with the gloo backend is unavailable")


def _data(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, D, generator=g, dtype=torch.float64)
    y = torch.sin(5 * x[:, 0]) + x[:, 1] * x[:, 2] + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    return x, y


def _rbf() -> gpytorch.kernels.Kernel:
    return gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=D))


def _additive() -> gpytorch.kernels.Kernel:  # not fusable: the generic (autograd) path, with active_dims
    rbf = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=2, active_dims=(0, 1)))
    return rbf + gpytorch.kernels.ScaleKernel(gpytorch.kernels.PeriodicKernel(active_dims=(2,)))


#: case -> (kernel factory, max_dense_kernel_size): 10**6 keeps each rank's block dense, 8 forces row blocks
CASES = {
    "fused-dense": (_rbf, 10**6),
    "fused-rowblocks": (_rbf, 8),
    "generic-dense": (_additive, 10**6),
    "generic-rowblocks": (_additive, 8),
}


class _GP(gpytorch.models.ExactGP):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, kernel: gpytorch.kernels.Kernel) -> None:
        super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = kernel

    def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _model(kernel: gpytorch.kernels.Kernel, x: torch.Tensor, y: torch.Tensor, wrap: bool) -> _GP:
    model = _GP(x, y, DistributedKernel(kernel) if wrap else kernel).double()
    model.likelihood.noise = NOISE
    return model


def _base_name(model: _GP, name: str) -> str:
    """A parameter's name in the unwrapped model (the wrapper's ``base_kernel.`` dropped)."""
    if isinstance(model.covar_module, DistributedKernel):
        return name.replace("covar_module.base_kernel.", "covar_module.", 1)
    return name


def _grads(model: _GP) -> dict[str, torch.Tensor]:
    return {_base_name(model, n): p.grad.clone() for n, p in model.named_parameters()}


@contextlib.contextmanager
def _lanczos(dense_size: int) -> Iterator[None]:
    """The flag, Lanczos at every size, and the dense-block limit of the case."""
    with lgg.settings.use_lanczos_grad(), lgg.settings.max_cholesky_size(0):
        with lgg.settings.max_dense_kernel_size(dense_size):
            yield


def _mll_and_grads(model: _GP, x: torch.Tensor, y: torch.Tensor, dense_size: int) -> tuple[float, dict]:
    model.train()
    model.zero_grad()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with _lanczos(dense_size):
        loss = -mll(model(x), y)
    loss.backward()
    return float(loss.detach()), _grads(model)


def _adam(model: _GP, x: torch.Tensor, y: torch.Tensor, steps: int = 5) -> dict[str, torch.Tensor]:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        _mll_and_grads(model, x, y, 10**6)
        optimizer.step()
    return {_base_name(model, n): p.detach().clone() for n, p in model.named_parameters()}


def _sketched(wrap: bool) -> tuple[float, dict, str, int]:
    """A near-diagonal kernel (lengthscale 0.02) under rank ≤ 64: the default abandons the greedy factor for
    the Nyström sketch, whose rank is chosen from measured times (the ranks must agree on them)."""
    import importlib

    ny = importlib.import_module("lanczos_grad_gp.core.preconditioners.nystrom")
    torch.manual_seed(0)
    x, y = _data()
    model = _model(_rbf(), x, y, wrap=wrap)
    kernel = model.covar_module.base_kernel if wrap else model.covar_module
    kernel.base_kernel.lengthscale = 0.02
    start, ny.START_RANK = ny.START_RANK, 8  # sketches of 8, 16, 32, 64: the doubling is decided by timings
    try:
        with lgg.settings.max_preconditioner_size(64), lgg.settings.num_probes(N), lgg.settings.lanczos_tol(1e-10):
            with lgg.record_calls() as calls:
                value, grads = _mll_and_grads(model, x, y, 10**6)
    finally:
        ny.START_RANK = start
    return value, grads, calls[-1].preconditioner_kind, calls[-1].preconditioner_rank


def _column_costs() -> list[float]:
    """The sketch's measured cost ratio on the sharded operator, bare and wrapped (a scaled kernel)."""
    import importlib

    ny = importlib.import_module("lanczos_grad_gp.core.preconditioners.nystrom")
    x, y = _data()
    model = _model(_rbf(), x, y, wrap=True)
    with _lanczos(10**6):
        op = model.covar_module(x).evaluate_kernel().detach()
    omega, _ = torch.linalg.qr(torch.randn(N, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    ones = torch.ones(N, dtype=torch.float64)
    ratios = []
    for operator in (op, op * 2.0):
        ny._cost_cache.clear()
        ratios.append(ny._column_cost(operator, ones, omega, ny._scaled_product(operator, ones, omega), 4))
    return ratios


def _worker() -> dict:
    """Runs on each of the two ranks (inside the process group)."""
    rank = dist.get_rank()
    x, y = _data()
    out: dict = {"rank": rank}
    for case, (factory, dense_size) in CASES.items():
        torch.manual_seed(0)
        model = _model(factory(), x, y, wrap=True)
        with _lanczos(dense_size):
            op = model.covar_module(x).evaluate_kernel()
        out[case] = (*_mll_and_grads(model, x, y, dense_size), type(op).__name__, op.dense, op.local_rows)
    torch.manual_seed(0)
    out["adam"] = _adam(_model(_rbf(), x, y, wrap=True), x, y)
    out["sketched"] = _sketched(wrap=True)
    out["column_cost"] = _column_costs()
    # misuse: unseeded probes, then ranks that disagree on n (rank 1 holds one point more)
    for name, data, seed in (("unseeded", _data(), None), ("mismatch", _data(N + rank), 0)):
        torch.manual_seed(0)
        model = _model(_rbf(), *data, wrap=True)
        try:
            with lgg.settings.probe_seed(seed):
                _mll_and_grads(model, *data, 10**6)
            out[name] = None
        except ValueError as err:
            out[name] = str(err)
    return out


@pytest.fixture(scope="module")
def sharded() -> list[dict]:
    return spawn_local(_worker, 2, threads=1, timeout_s=120)


@pytest.fixture(scope="module")
def references() -> dict:
    """The single-process results (one thread, as each rank: tiny products oversubscribe busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = _data()
        refs = {}
        for case, (factory, dense_size) in CASES.items():
            torch.manual_seed(0)
            refs[case] = _mll_and_grads(_model(factory(), x, y, wrap=False), x, y, dense_size)
        torch.manual_seed(0)
        refs["adam"] = _adam(_model(_rbf(), x, y, wrap=False), x, y)
        refs["sketched"] = _sketched(wrap=False)
        return refs
    finally:
        torch.set_num_threads(threads)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@needs_gloo
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_one_process(sharded, references, case):
    value, grads = references[case]
    expected_type = "ShardedStationaryLinearOperator" if case.startswith("fused") else "ShardedKernelLinearOperator"
    for out in sharded:
        got_value, got_grads, op_type, dense, rows = out[case]
        assert op_type == expected_type
        assert dense == case.endswith("dense")
        assert abs(got_value - value) <= RTOL * abs(value)
        assert got_grads.keys() == grads.keys()
        for name in grads:
            assert _rel(got_grads[name], grads[name]) <= RTOL, (case, name)
    assert [out[case][4] for out in sharded] == [slice(0, 75), slice(75, 151)]
    # the all-gathered products and the all-reduced gradient are the same bits on both ranks
    assert sharded[0][case][0] == sharded[1][case][0]
    assert all(torch.equal(sharded[0][case][1][k], sharded[1][case][1][k]) for k in grads)


@needs_gloo
def test_adam_steps_identical_on_both_ranks(sharded, references):
    first, second = sharded[0]["adam"], sharded[1]["adam"]
    assert first.keys() == references["adam"].keys()
    for name, value in first.items():
        assert torch.equal(value, second[name]), name
        assert _rel(value, references["adam"][name]) <= 1e-7, name
    assert not torch.equal(first["likelihood.noise_covar.raw_noise"], torch.zeros(1, dtype=torch.float64))


@needs_gloo
def test_cost_aware_preconditioner_decided_alike_on_both_ranks(sharded, references):
    """Timed decisions (the sketch's rank) are averaged over the ranks: both build the same preconditioner."""
    value, grads, kind, rank = references["sketched"]
    assert kind == "nystrom"
    first, second = sharded[0]["sketched"], sharded[1]["sketched"]
    assert first[2:] == second[2:] and first[2] == "nystrom"
    assert first[0] == second[0] and all(torch.equal(first[1][k], second[1][k]) for k in grads)
    # the exact trace (N probes) and the tolerance make the value and gradient independent of the rank chosen
    assert abs(first[0] - value) <= 1e-6 * abs(value)
    for name in grads:
        assert _rel(first[1][name], grads[name]) <= 1e-5, name


@needs_gloo
def test_measured_costs_are_averaged_over_the_ranks(sharded):
    """Wall-clock times differ per process; the averaged ratio, bare or wrapped, is the same on both ranks."""
    first, second = sharded[0]["column_cost"], sharded[1]["column_cost"]
    assert first == second and all(r > 0 for r in first)


@needs_gloo
def test_clear_errors_for_misuse(sharded):
    for out in sharded:
        assert "probe_seed" in out["unseeded"]
        assert "disagree on the number of training points n" in out["mismatch"]
        assert "rank 0: 151, rank 1: 152" in out["mismatch"]


def test_missing_process_group_raises():
    if HAS_GLOO and dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    x, y = _data()
    model = _model(_rbf(), x, y, wrap=True)
    with pytest.raises(RuntimeError, match="torch.distributed"):  # "... call init_process_group ..."
        _mll_and_grads(model, x, y, 10**6)


@pytest.mark.parametrize("factory", [_rbf, _additive], ids=["fused", "generic"])
def test_flag_off_eval_and_cholesky_route_are_the_base_kernel(factory):
    """No process group needed: without the flag, in eval mode and on the Cholesky route it IS the base kernel."""
    x, y = _data()
    torch.manual_seed(0)
    ref = _model(factory(), x, y, wrap=False)
    torch.manual_seed(0)
    wrapped = _model(factory(), x, y, wrap=True)
    for model in (ref, wrapped):
        model.train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
        (-mll(model(x), y)).backward()  # flag off
        with lgg.settings.use_lanczos_grad():  # n = 151 <= max_cholesky_size: GPyTorch's Cholesky
            (-mll(model(x), y)).backward()
    for name, grad in _grads(ref).items():
        assert torch.equal(grad, _grads(wrapped)[name]), name
    xt = torch.rand(7, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    preds = []
    for model in (ref, wrapped):
        model.eval()
        with torch.no_grad(), lgg.settings.use_lanczos_grad(), lgg.settings.max_cholesky_size(0):
            post = model(xt)
            preds.append((post.mean, post.variance))
    assert torch.equal(preds[0][0], preds[1][0]) and torch.equal(preds[0][1], preds[1][1])


def test_row_partition_is_balanced_and_contiguous():
    for n, p in ((151, 2), (10, 3), (2, 4), (10**6, 8)):
        part = RowPartition(n, p)
        assert sum(part.sizes) == n and max(part.sizes) - min(part.sizes) <= 1
        assert part.max_rows == math.ceil(n / p)
        assert [part.bounds(r)[0] for r in range(1, p)] == [part.bounds(r)[1] for r in range(p - 1)]


def test_cat_get_entries_matches_dense_and_is_differentiable():
    g = torch.Generator().manual_seed(0)
    theta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    blocks = [theta * torch.randn(m, 9, generator=g, dtype=torch.float64) for m in (4, 5)]
    op = CatLinearOperator(*(DenseLinearOperator(b) for b in blocks), dim=-2, output_device=torch.device("cpu"))
    dense = torch.cat(blocks, -2)
    rows = torch.tensor([[8], [0], [3], [4]])
    cols = torch.tensor([[1, 2, 8]])
    got = cat_get_entries(op, rows, cols)
    assert torch.equal(got, dense[rows, cols])
    (grad,) = torch.autograd.grad(got.sum(), theta, retain_graph=True)
    (expected,) = torch.autograd.grad(dense[rows, cols].sum(), theta)
    assert torch.allclose(grad, expected)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="MultiDeviceKernel needs at least two CUDA devices")
def test_multi_device_kernel_under_the_flag():
    """GPyTorch's single-process multi-GPU kernel against the same kernel on one GPU (generic path, same probes)."""
    x, y = (t.cuda() for t in _data(400))
    torch.manual_seed(0)
    ref = _GP(x, y, _rbf()).double().cuda()
    torch.manual_seed(0)
    devices = [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    multi = _GP(x, y, gpytorch.kernels.MultiDeviceKernel(_rbf(), devices, output_device=devices[0])).double().cuda()
    results = []
    for model in (ref, multi):
        model.likelihood.noise = NOISE
        model.train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
        with lgg.settings.use_lanczos_grad(), lgg.settings.max_cholesky_size(0), lgg.settings.fused_kernels(False):
            loss = -mll(model(x), y)
        loss.backward()
        names = {n.replace("covar_module.module.", "covar_module."): p.grad for n, p in model.named_parameters()}
        results.append((float(loss.detach()), names))
    (v0, g0), (v1, g1) = results
    assert abs(v1 - v0) <= 1e-8 * abs(v0)
    for name, grad in g0.items():
        assert _rel(g1[name], grad) <= 1e-8, name
