"""Settings: validation, nesting, exception safety, thread-locality, and the flag path through GPyTorch.

What the user gets:
* a nonsensical value raises ``ValueError`` naming the setting, when the context is *created*
  (before any model code runs) and in ``set_default``;
* contexts nest and restore the previous value on exit, also when the body raises;
* the state is thread-local: a context in one thread is invisible to the others, even when the
  same context object is shared between threads;
* with the flag off, GPyTorch's results are bit-identical to GPyTorch without our hooks;
* ``probe_seed`` makes the MLL a deterministic function of θ; ``None`` draws fresh probes.
"""

from __future__ import annotations

import threading

import gpytorch
import numpy as np
import pytest
import torch
from conftest import gpytorch_feature_flags, restore_gpytorch_feature_flags

import lanczos_grad_gp as lgg
from lanczos_grad_gp import settings as S
from lanczos_grad_gp.app.training import ExactGPModel

VALUE_SETTINGS = [
    S.max_lanczos_iter,
    S.deterministic_max_lanczos_iter,
    S.lanczos_tol,
    S.num_probes,
    S.probe_seed,
    S.max_preconditioner_size,
    S.preconditioner_tol,
    S.deterministic_preconditioner_tol,
    S.check_every,
]
FLAGS = [S.use_lanczos_grad, S.reorthogonalize]

BAD_VALUES = [
    (S.max_lanczos_iter, 0),
    (S.deterministic_max_lanczos_iter, 0),
    (S.deterministic_max_lanczos_iter, 2.5),
    (S.max_lanczos_iter, -3),
    (S.max_lanczos_iter, 2.0),
    (S.max_lanczos_iter, True),
    (S.max_lanczos_iter, "100"),
    (S.max_lanczos_iter, None),
    (S.lanczos_tol, -1e-3),
    (S.lanczos_tol, 1.0),
    (S.lanczos_tol, float("nan")),
    (S.lanczos_tol, "1e-4"),
    (S.lanczos_tol, True),
    (S.num_probes, 0),
    (S.num_probes, 1.5),
    (S.num_probes, False),
    (S.probe_seed, -1),
    (S.probe_seed, 0.5),
    (S.max_preconditioner_size, -1),
    (S.max_preconditioner_size, 10.0),
    (S.preconditioner_tol, -0.1),
    (S.preconditioner_tol, float("inf")),
    (S.preconditioner_tol, float("nan")),
    (S.deterministic_preconditioner_tol, -1e-4),
    (S.deterministic_preconditioner_tol, float("inf")),
    (S.deterministic_preconditioner_tol, float("nan")),
    (S.deterministic_preconditioner_tol, True),
    (S.check_every, 0),
    (S.check_every, None),
    (S.use_lanczos_grad, 1),
    (S.use_lanczos_grad, "yes"),
    (S.use_lanczos_grad, None),
    (S.reorthogonalize, 0),
]


@pytest.mark.parametrize(("cls", "bad"), BAD_VALUES, ids=lambda x: repr(x) if not isinstance(x, type) else x.__name__)
def test_bad_values_raise_naming_the_setting(cls, bad):
    before = cls.value()
    with pytest.raises(ValueError, match=cls.__name__):
        cls(bad)
    with pytest.raises(ValueError, match=cls.__name__):
        cls.set_default(bad)
    assert cls.value() == before  # nothing half-applied


def test_numpy_scalars_are_accepted():
    with S.max_lanczos_iter(np.int64(7)), S.lanczos_tol(np.float64(1e-5)), S.num_probes(np.int32(3)):
        assert S.max_lanczos_iter.value() == 7 and isinstance(S.max_lanczos_iter.value(), int)
        assert S.lanczos_tol.value() == 1e-5
        assert S.num_probes.value() == 3


def test_nesting_and_restore_on_exception():
    base = S.current_settings()
    with S.num_probes(3):
        with S.num_probes(5), S.use_lanczos_grad():
            assert S.num_probes.value() == 5 and S.use_lanczos_grad.on()
        assert S.num_probes.value() == 3 and S.use_lanczos_grad.off()
        with pytest.raises(KeyError), S.num_probes(9), S.use_lanczos_grad(), S.lanczos_tol(1e-3):
            raise KeyError("boom")
        assert S.num_probes.value() == 3 and S.use_lanczos_grad.off() and S.lanczos_tol.value() is None
    assert S.current_settings() == base


def test_same_context_object_reentered():
    ctx = S.max_lanczos_iter(17)
    with S.max_lanczos_iter(3):
        with ctx:
            with ctx:
                assert S.max_lanczos_iter.value() == 17
            assert S.max_lanczos_iter.value() == 17
        assert S.max_lanczos_iter.value() == 3


def test_set_default_is_process_wide_and_contexts_override():
    old = S.num_probes._default
    try:
        S.num_probes.set_default(4)
        seen = []
        th = threading.Thread(target=lambda: seen.append(S.num_probes.value()))
        th.start()
        th.join()
        assert seen == [4]
        with S.num_probes(6):
            assert S.num_probes.value() == 6
        assert S.num_probes.value() == 4
    finally:
        S.num_probes.set_default(old)


def test_thread_local_each_thread_sees_its_own_context():
    """Two threads hold different values at the same time; a third thread sees the defaults."""
    barrier = threading.Barrier(3, timeout=10)
    seen: dict[str, tuple] = {}
    errors: list[BaseException] = []

    def worker(name: str, probes: int, flag: bool) -> None:
        try:
            with S.num_probes(probes), S.use_lanczos_grad(flag):
                barrier.wait()  # all three inside their contexts now
                seen[name] = (S.num_probes.value(), S.use_lanczos_grad.on())
                barrier.wait()
            seen[name + "_after"] = (S.num_probes.value(), S.use_lanczos_grad.on())
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [
        threading.Thread(target=worker, args=("a", 3, True)),
        threading.Thread(target=worker, args=("b", 7, False)),
    ]
    for t in threads:
        t.start()
    with S.num_probes(11):
        barrier.wait()
        mine = (S.num_probes.value(), S.use_lanczos_grad.on())
        barrier.wait()
    for t in threads:
        t.join()
    assert not errors
    assert seen["a"] == (3, True) and seen["b"] == (7, False) and mine == (11, False)
    default = (S.num_probes._default, False)
    assert seen["a_after"] == default and seen["b_after"] == default


def test_shared_context_object_across_threads_restores_per_thread():
    """A module-level context object entered by several threads restores each thread's own value."""
    shared = S.max_lanczos_iter(42)
    barrier = threading.Barrier(2, timeout=10)
    out: dict[int, tuple] = {}

    def worker(i: int, outer: int) -> None:
        with S.max_lanczos_iter(outer):
            with shared:
                barrier.wait()
                inside = S.max_lanczos_iter.value()
                barrier.wait()
            out[i] = (inside, S.max_lanczos_iter.value())

    ts = [threading.Thread(target=worker, args=(i, o)) for i, o in ((0, 5), (1, 9))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert out == {0: (42, 5), 1: (42, 9)}


# ---------------------------------------------------------------------------------------------
# The flag path through GPyTorch


def _model(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g, dtype=torch.float64)
    y = torch.sin(6 * x[:, 0]) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    model = ExactGPModel(x, y, lik).double()
    model.initialize(**{"likelihood.noise": 0.05, "covar_module.base_kernel.lengthscale": 0.3})
    return model, lik, x, y


def _mll_and_grads(model, lik, x, y, seed=None):
    model.zero_grad()
    if seed is not None:
        torch.manual_seed(seed)  # GPyTorch's own iterative path draws random probes
    loss = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)(model(x), y)
    loss.backward()
    return loss.detach().clone(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("path", ["cholesky", "iterative"])
def test_flag_off_is_bit_identical_to_stock_gpytorch(path):
    model, lik, x, y = _model()
    ctx = gpytorch.settings.max_cholesky_size(0 if path == "iterative" else 10_000)
    assert lgg.patching.is_installed()
    with ctx:
        hooked = _mll_and_grads(model, lik, x, y, seed=3)
    lgg.patching.uninstall()
    try:
        assert not lgg.patching.is_installed()
        with ctx:
            stock = _mll_and_grads(model, lik, x, y, seed=3)
    finally:
        lgg.patching.install()
    assert lgg.patching.is_installed()
    assert torch.equal(hooked[0], stock[0])
    for a, b in zip(hooked[1], stock[1], strict=True):
        assert torch.equal(a, b)


def test_install_uninstall_idempotent():
    lgg.patching.install()
    lgg.patching.install()
    assert lgg.patching.is_installed()
    lgg.patching.uninstall()
    lgg.patching.uninstall()
    assert not lgg.patching.is_installed()
    lgg.patching.install()
    assert lgg.patching.is_installed()


def test_stock_route_touches_no_global_setting_by_default(monkeypatch):
    """With lgg's max_cholesky_size at its default (GPyTorch's), the Cholesky route enters no
    process-global linear_operator setting: a thread running stock GPyTorch meanwhile is unaffected."""
    from linear_operator import settings as lo_settings

    calls = []
    original = lo_settings.max_cholesky_size.__enter__

    def spy(self):
        calls.append(self._instance_value)
        return original(self)

    monkeypatch.setattr(lo_settings.max_cholesky_size, "__enter__", spy)
    model, lik, x, y = _model()
    with lgg.settings.use_lanczos_grad(), lgg.record_calls() as infos:
        _mll_and_grads(model, lik, x, y)
    assert [i.route for i in infos] == ["cholesky"] and calls == []
    with lgg.settings.use_lanczos_grad(), lgg.settings.max_cholesky_size(10**6):  # differs from GPyTorch's
        _mll_and_grads(model, lik, x, y)
    assert 10**6 in calls


def test_flag_in_one_thread_does_not_leak_into_another():
    """Thread A trains with the flag on while thread B, at the same time, gets stock GPyTorch bits."""
    model, lik, x, y = _model()
    reference = _mll_and_grads(*_model())  # flag off, stock Cholesky
    barrier = threading.Barrier(2, timeout=30)
    out: dict[str, object] = {}

    def with_flag() -> None:
        m, li, xx, yy = _model()
        # num_probes >= n: the trace is exact, so the flag's MLL matches Cholesky to round-off
        with (
            lgg.settings.use_lanczos_grad(),
            lgg.settings.num_probes(64),
            lgg.settings.lanczos_tol(1e-10),
            lgg.record_calls() as calls,
        ):
            barrier.wait()
            out["flag"] = _mll_and_grads(m, li, xx, yy)
            out["calls"] = len(calls)

    def without_flag() -> None:
        barrier.wait()
        with lgg.record_calls() as calls:
            out["plain"] = _mll_and_grads(model, lik, x, y)
            out["plain_calls"] = len(calls)

    # GPyTorch's own settings are class attributes, and its internals enter them (``evaluate_kernel``
    # runs under ``lazily_evaluate_kernels(False)``, saving the value it saw at construction): two
    # threads running GPyTorch models at once can leave such a flag changed for the whole process
    # (seen in CI: every later kernel evaluated eagerly). That is GPyTorch's, not the flag's; restore
    # them so that the tests after this one see the defaults.
    saved = gpytorch_feature_flags()
    ts = [threading.Thread(target=with_flag), threading.Thread(target=without_flag)]
    try:
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        restore_gpytorch_feature_flags(saved)
    assert out["calls"] == 1 and out["plain_calls"] == 0
    assert torch.equal(out["plain"][0], reference[0])
    flag_val = out["flag"][0]
    assert torch.isfinite(flag_val) and abs(float(flag_val - reference[0])) < 1e-8


@pytest.mark.usefixtures("lanczos_at_every_size")
def test_probe_seed_reproducible_and_none_is_fresh():
    n = 120  # > num_probes: the log-determinant is stochastic
    model, lik, x, y = _model(n)
    with lgg.settings.use_lanczos_grad(), lgg.settings.num_probes(4), lgg.settings.probe_seed(123):
        a = _mll_and_grads(model, lik, x, y)
        b = _mll_and_grads(model, lik, x, y)
    assert torch.equal(a[0], b[0])
    assert all(torch.equal(p, q) for p, q in zip(a[1], b[1], strict=True))
    with lgg.settings.use_lanczos_grad(), lgg.settings.num_probes(4), lgg.settings.probe_seed(124):
        c = _mll_and_grads(model, lik, x, y)
    assert not torch.equal(a[0], c[0])
    torch.manual_seed(0)
    with lgg.settings.use_lanczos_grad(), lgg.settings.num_probes(4), lgg.settings.probe_seed(None):
        d = _mll_and_grads(model, lik, x, y)
        e = _mll_and_grads(model, lik, x, y)
    assert not torch.equal(d[0], e[0])  # fresh probes each call
    assert torch.isfinite(d[0]) and torch.isfinite(e[0])
