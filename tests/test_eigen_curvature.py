"""Curvature operators of a tiny MLP against ``torch.autograd.functional.hessian`` / an explicit ``J^T H_ℓ J``,
and every eigen function on them (float32 and float64, seeded)."""

from __future__ import annotations

import pytest
import torch

from lanczos_grad_gp.eigen import (
    deflated_power_iteration,
    extreme_eigenvalues,
    lanczos,
    spectral_density,
    trace,
)
from lanczos_grad_gp.eigen.curvature import GGNOperator, HessianOperator

DTYPES = (torch.float32, torch.float64)


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def mlp(dtype: torch.dtype, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).to(dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(30, 2, generator=g, dtype=torch.float64).to(dtype)
    return model, x, y


def flat_call(model: torch.nn.Module, params: list[torch.Tensor]):
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]
    sizes = [p.numel() for p in params]
    shapes = [p.shape for p in params]

    def call(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, sizes)
        return torch.func.functional_call(
            model, {k: t.reshape(s) for k, t, s in zip(keys, parts, shapes, strict=True)}, (x,)
        )

    return call, torch.cat([p.detach().reshape(-1) for p in params])


def dense_hessian(model, x, y, loss_fn, params=None):
    params = list(model.parameters()) if params is None else params
    call, flat = flat_call(model, params)
    return torch.autograd.functional.hessian(lambda f: loss_fn(call(f, x), y), flat)


def dense_ggn(model, x, y, loss_fn):
    call, flat = flat_call(model, list(model.parameters()))
    out = call(flat, x).detach()
    J = torch.autograd.functional.jacobian(lambda f: call(f, x), flat).reshape(out.numel(), -1)
    HL = torch.autograd.functional.hessian(lambda o: loss_fn(o.reshape(out.shape), y), out.reshape(-1))
    return J.T @ HL @ J


def atol_for(dtype):
    return 1e-12 if dtype == torch.float64 else 2e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["autograd", "func"])
def test_hessian_matches_autograd_functional_hessian(dtype, method):
    model, x, y = mlp(dtype)
    loss_fn = torch.nn.MSELoss()
    H = HessianOperator(model, loss_fn, x, y, method=method)
    ref = dense_hessian(model, x, y, loss_fn)
    assert H.n == ref.shape[0] == 38 and H.dtype == dtype
    assert torch.allclose(H.to_dense(), ref, atol=atol_for(dtype), rtol=0)
    v = torch.randn(38, dtype=dtype, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(H.matvec(v), ref @ v, atol=10 * atol_for(dtype), rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_loader_average_is_the_full_data_hessian_and_ggn(dtype):
    model, x, y = mlp(dtype, seed=1)
    loss_fn = torch.nn.MSELoss()
    loader = [(x[:12], y[:12]), (x[12:24], y[12:24]), (x[24:], y[24:])]  # ragged last batch (6)
    H = HessianOperator.from_loader(model, loss_fn, loader)
    assert torch.allclose(H.to_dense(), dense_hessian(model, x, y, loss_fn), atol=atol_for(dtype), rtol=0)
    G = GGNOperator.from_loader(model, loss_fn, loader)
    assert torch.allclose(G.to_dense(), dense_ggn(model, x, y, loss_fn), atol=10 * atol_for(dtype), rtol=0)
    first = HessianOperator.from_loader(model, loss_fn, loader, num_batches=1)
    assert torch.allclose(first.to_dense(), dense_hessian(model, x[:12], y[:12], loss_fn), atol=atol_for(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ggn_matches_jacobian_formula_cross_entropy(dtype):
    model, x, _ = mlp(dtype, seed=2)
    labels = torch.tensor([0, 1] * 15)
    loss_fn = torch.nn.CrossEntropyLoss()
    G = GGNOperator(model, loss_fn, x, labels)
    ref = dense_ggn(model, x, labels, loss_fn)
    assert torch.allclose(G.to_dense(), ref, atol=10 * atol_for(dtype), rtol=0)
    assert float(torch.linalg.eigvalsh(ref.double())[0]) > -1e-5  # convex loss: PSD


def test_parameter_subset_is_a_diagonal_block():
    model, x, y = mlp(torch.float64)
    loss_fn = torch.nn.MSELoss()
    last = list(model[2].parameters())
    H = HessianOperator(model, loss_fn, x, y, params=last)
    assert H.n == 14
    assert torch.allclose(H.to_dense(), dense_hessian(model, x, y, loss_fn, params=last), atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_eigen_function_on_the_hessian(dtype):
    model, x, y = mlp(dtype, seed=3)
    loss_fn = torch.nn.MSELoss()
    ref = dense_hessian(model, x, y, loss_fn).double()
    ev = torch.linalg.eigvalsh(ref)
    top = ev[ev.abs().argsort(descending=True)[:3]]
    H = HessianOperator(model, loss_fn, x, y)
    tol = 1e-8 if dtype == torch.float64 else 1e-4
    rtol = 1e-8 if dtype == torch.float64 else 1e-3
    for b in (1, 3):
        res = lanczos(H, k=3, block_size=b, tol=tol, seed=0)
        assert torch.allclose(res.eigenvalues.double(), top, rtol=rtol) and bool(res.converged.all())
    power = deflated_power_iteration(H, k=1, max_iter=2000, tol=tol, seed=0)
    assert float(power.eigenvalues) == pytest.approx(float(top[0]), rel=100 * rtol)
    ext = extreme_eigenvalues(H, tol=tol, seed=0)
    assert float(ext.lambda_max) == pytest.approx(float(ev[-1]), rel=rtol)
    assert float(ext.lambda_min) == pytest.approx(float(ev[0]), rel=rtol, abs=1e-6)
    tr = trace(H, num_matvecs=38 * 3, method="hutch++", seed=0)
    assert abs(float(tr.estimate) - float(ref.trace())) <= 5 * float(tr.standard_error) + 1e-4
    dens = spectral_density(H, num_probes=4, num_iters=20, seed=0)
    assert torch.allclose(dens.weights.double().sum(-1), torch.ones(4, dtype=torch.float64), atol=1e-4)


class _Counting(torch.nn.Module):
    """Wraps a model and counts forward calls (one per batch and product when products are batched)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


def test_products_are_batched_over_the_block():
    model, x, y = mlp(torch.float64)
    counted = _Counting(model)
    H = HessianOperator(counted, torch.nn.MSELoss(), x, y)
    V = torch.randn(38, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    HV = H.matmul(V)
    assert counted.calls == 1  # ONE forward (and one backward) for all 4 columns
    ref = dense_hessian(model, x, y, torch.nn.MSELoss())
    assert torch.allclose(HV, ref @ V, atol=1e-12)


@pytest.mark.parametrize(
    "run",
    [
        lambda H: lanczos(H, k=3, tol=1e-10, seed=0),
        lambda H: deflated_power_iteration(H, k=2, tol=1e-6, max_iter=200, seed=0),
        lambda H: spectral_density(H, num_probes=2, num_iters=10, seed=0),
        lambda H: trace(H, num_matvecs=6, seed=0),
        lambda H: extreme_eigenvalues(H, tol=1e-6, seed=0),
    ],
    ids=["lanczos", "power", "density", "trace", "extreme"],
)
def test_every_eigen_function_builds_the_gradient_graph_once(run):
    """One forward pass per call (the cached gradient graph), the same result as rebuilding it per product."""
    model, x, y = mlp(torch.float64, seed=5)
    counted = _Counting(model)
    H = HessianOperator(counted, torch.nn.MSELoss(), x, y)
    out = run(H)
    assert counted.calls == 1
    assert H._cached is None  # freed when the call ends
    V = torch.randn(38, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    H.matmul(V), H.matmul(V)
    assert counted.calls == 3  # outside an eigen call every product builds its own graph
    if isinstance(out, torch.Tensor) or not hasattr(out, "eigenvalues"):
        return
    ref = torch.linalg.eigvalsh(dense_hessian(model, x, y, torch.nn.MSELoss()))
    got = out.eigenvalues
    assert torch.isclose(got[0].abs(), ref.abs().max(), rtol=1e-5)


def test_cached_graph_is_rebuilt_when_the_model_changes_in_place():
    model, x, y = mlp(torch.float64, seed=6)
    counted = _Counting(model)
    loss = torch.nn.MSELoss()
    H = HessianOperator(counted, loss, x, y)
    V = torch.randn(38, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with H.cached_graph():
        first = H.matmul(V)
        again = H.matmul(V)
        assert counted.calls == 1
        with torch.no_grad():
            model[0].weight.mul_(1.5)  # an optimizer step: in place, version counter bumps
        after_step = H.matmul(V)
        assert counted.calls == 2
        x.mul_(0.5)  # the data changed in place
        after_data = H.matmul(V)
        assert counted.calls == 3
        counted.train(not counted.training)
        H.matmul(V)
        assert counted.calls == 4
    assert torch.equal(first, again)
    assert torch.allclose(after_step, dense_hessian(model, x * 2, y, loss) @ V, atol=1e-12)
    assert torch.allclose(after_data, dense_hessian(model, x, y, loss) @ V, atol=1e-12)


def test_cached_graph_sees_replaced_parameters_other_layers_and_submodule_modes():
    """Changes that are not in-place writes to ``params``: storage replaced, other layers, a submodule's mode."""
    torch.manual_seed(7)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(6, 2)
    ).double()
    model.eval()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = torch.randn(30, 2, generator=g, dtype=torch.float64)
    loss = torch.nn.MSELoss()
    last = list(model[3].parameters())
    H = HessianOperator(model, loss, x, y, params=last)  # the Hessian block of the last layer
    V = torch.randn(14, 2, dtype=torch.float64, generator=g)

    def fresh() -> torch.Tensor:
        return HessianOperator(model, loss, x, y, params=last, cache_graph=False).matmul(V)

    with H.cached_graph():
        H.matmul(V)
        with torch.no_grad():
            model[0].weight.mul_(2.0)  # a layer outside params=
        assert torch.allclose(H.matmul(V), fresh(), atol=1e-13)
        vec = torch.nn.utils.parameters_to_vector(model.parameters())
        torch.nn.utils.vector_to_parameters(1.5 * vec, model.parameters())  # assigns .data: new storage
        assert torch.allclose(H.matmul(V), fresh(), atol=1e-13)
        model[2].train()  # a submodule's mode (dropout on): the operator is random now, but never stale
        assert H._cached is not None and H._graph_state()[0] != H._cached[0]


def test_every_eigen_call_starts_from_a_fresh_graph():
    model, x, y = mlp(torch.float64, seed=8)
    loss = torch.nn.MSELoss()
    H = HessianOperator(model, loss, x, y)
    with H.cached_graph():
        first = lanczos(H, k=1, tol=1e-10, seed=0).eigenvalues
        model[0].weight.data.mul_(1.5)  # invisible to version counters; a new eigen call still sees it
        second = lanczos(H, k=1, tol=1e-10, seed=0).eigenvalues
    ref = torch.linalg.eigvalsh(dense_hessian(model, x, y, loss))
    assert not torch.isclose(first, second)
    assert torch.isclose(second[0].abs(), ref.abs().max(), rtol=1e-9)


def test_batch_norm_in_train_mode_still_builds_one_graph_per_call():
    torch.manual_seed(9)
    inner = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    counted = _Counting(inner.double())
    g = torch.Generator().manual_seed(9)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = torch.randn(40, 1, generator=g, dtype=torch.float64)
    H = HessianOperator(counted, torch.nn.MSELoss(), x, y)
    res = lanczos(H, k=2, tol=1e-8, seed=0)
    assert counted.calls == 1  # the running statistics the forward updated belong to the cached graph
    with torch.no_grad():
        dense = HessianOperator(counted, torch.nn.MSELoss(), x, y, cache_graph=False).to_dense()
    # train-mode BatchNorm normalises with batch statistics: the Hessian does not depend on running stats
    ref = torch.linalg.eigvalsh(0.5 * (dense + dense.T))
    assert torch.allclose(res.eigenvalues.abs(), ref.abs().sort(descending=True).values[:2], rtol=1e-7)


def test_half_precision_and_long_runs_pay_for_true_residuals():
    """Where the stored products are not the operator's at working precision, or rounding over many restarts
    could reach the tolerance, the residuals cost one final product per pair and are the true ones."""
    g = torch.Generator().manual_seed(10)
    Q, _ = torch.linalg.qr(torch.randn(300, 300, dtype=torch.float64, generator=g))
    spec = torch.cat([torch.tensor([10.0, 9.99, 9.98, 9.97]), (torch.rand(296, generator=g) * 2 - 1) * 9.96])
    A = ((Q * spec.double()) @ Q.T).float()
    A = 0.5 * (A + A.T)
    count = [0]

    def mv(v: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return A @ v

    with pytest.warns(Warning):
        res = lanczos((mv, 300, torch.float32, "cpu"), k=4, which="LA", ncv=8, max_iter=6000, tol=1e-7, verify=False)
    Y = res.eigenvectors.mT
    true = torch.linalg.vector_norm((A.double() @ Y.double()) - Y.double() * res.eigenvalues.double(), dim=0)
    eps_a = torch.finfo(torch.float32).eps * 10.0
    assert res.diagnostics.num_matvecs == count[0]
    assert torch.allclose(res.residuals.double(), true, atol=5 * eps_a)
    A16 = A.half()
    with pytest.warns(Warning, match="float32"):
        half = lanczos((lambda v: (A16.float() @ v.float()).half(), 300, torch.float16, "cpu"), k=3, which="LA", seed=0)
    Y = half.eigenvectors.mT
    via_op = torch.linalg.vector_norm((A16.float() @ Y.half().float()).half().float() - Y * half.eigenvalues, dim=0)
    assert torch.allclose(half.residuals, via_op, rtol=1e-3, atol=1e-6)  # the operator's rounding shows


def test_lanczos_counts_every_operator_product():
    """``num_matvecs`` is the number of vectors the operator was applied to, with no hidden extra product."""
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(300, 300, dtype=torch.float64, generator=g))
    A = (Q * torch.linspace(0.1, 10.0, 300, dtype=torch.float64)) @ Q.T
    A = 0.5 * (A + A.T)
    count = [0]

    def mv(v: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return A @ v

    res = lanczos((mv, 300, torch.float64, "cpu"), k=4, which="LA", tol=1e-10, seed=0)
    assert res.diagnostics.num_matvecs == count[0]
    ref = torch.linalg.eigvalsh(A).flip(0)[:4]
    assert torch.allclose(res.eigenvalues, ref, rtol=1e-10)
    true = torch.linalg.vector_norm(A @ res.eigenvectors.T - res.eigenvectors.T * res.eigenvalues, dim=0)
    assert torch.allclose(res.residuals, true, atol=1e-12)  # the stored-product residuals are the true ones


def test_hessian_eigenthings_operator_interface_is_accepted():
    he = pytest.importorskip("hessian_eigenthings")
    model, x, y = mlp(torch.float64, seed=4)
    theirs = he.HessianOperator(model, [(x, y)], he.supervised_loss(torch.nn.MSELoss()))
    ref = torch.linalg.eigvalsh(dense_hessian(model, x, y, torch.nn.MSELoss()))
    res = lanczos(theirs, k=2, tol=1e-8, seed=0)
    assert torch.allclose(res.eigenvalues, ref[ref.abs().argsort(descending=True)[:2]], rtol=1e-8)


def test_curvature_argument_errors():
    model, x, y = mlp(torch.float64)
    with pytest.raises(ValueError, match="method must be"):
        HessianOperator(model, torch.nn.MSELoss(), x, y, method="fd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no parameters"):
        HessianOperator(model, torch.nn.MSELoss(), x, y, params=[])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        HessianOperator(lambda t: t, torch.nn.MSELoss(), x, y)  # type: ignore[arg-type]
    H = HessianOperator(model, torch.nn.MSELoss(), x, y)
    with pytest.raises(ValueError, match=r"expected a \(38,\)"):
        H.matmul(torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="no batches"):
        HessianOperator.from_loader(model, torch.nn.MSELoss(), []).matvec(torch.ones(38, dtype=torch.float64))
