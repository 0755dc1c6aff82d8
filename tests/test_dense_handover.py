"""The dense hand-over of a deterministic-objective block (``deterministic_dense_size``).

A block call still unconverged at ``max_lanczos_iter`` (after the factor replacement was tried) hands its
covariance to dense Cholesky for the rest of the block when ``n ≤ deterministic_dense_size``. Oracles: dense
float64 ``torch.linalg.cholesky`` values and autograd gradients of ``r^T K^{-1} r + log det K`` (the hand-over
computes the same thing in the same dtype, so agreement is to round-off: 1e-10 relative), the raised-step-cap
path for what happens above the size, and BoTorch's ``fit_gpytorch_mll`` with Cholesky for a whole fit.
"""

from __future__ import annotations

import contextlib
import sys

import gpytorch
import pytest
import torch
from linear_operator.utils.errors import NotPSDError

import lanczos_grad_gp as lgg
from lanczos_grad_gp.routing import RouteInfo

F64 = torch.float64


def _capped(rank: int = 10, steps: int = 15) -> contextlib.ExitStack:
    """Lanczos at every size, a rank-10 factor and a 15-step cap: the covariance below needs more."""
    stack = contextlib.ExitStack()
    stack.enter_context(lgg.settings.use_lanczos_grad())
    stack.enter_context(lgg.settings.max_cholesky_size(0))
    stack.enter_context(lgg.settings.max_preconditioner_size(rank))
    stack.enter_context(lgg.settings.lanczos_tol(1e-6))
    stack.enter_context(lgg.settings.max_lanczos_iter(steps))
    return stack


def _problem(n: int = 300, batch: tuple[int, ...] = (), dtype: torch.dtype = F64):
    """``K(lengthscale) + 1e-3 I`` over fixed points (the lengthscale trainable) and a right-hand side."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(*batch, n, 3, generator=g, dtype=F64).to(dtype)
    rhs = torch.randn(*batch, n, 1, generator=g, dtype=F64).to(dtype)
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).to(dtype)

    def covariance(lengthscale: float):
        with torch.no_grad():
            kernel.base_kernel.lengthscale = lengthscale
        return kernel(x).evaluate_kernel().add_diagonal(torch.tensor(1e-3, dtype=dtype))

    return covariance, kernel, rhs


def _value_and_grad(covariance, kernel, rhs, lengthscale: float):
    inv_quad, logdet = lgg.inv_quad_logdet(covariance(lengthscale), rhs, logdet=True)
    total = (inv_quad + logdet).sum()
    return float(total), [g.clone() for g in torch.autograd.grad(total, list(kernel.parameters()))]


def _dense_reference(covariance, kernel, rhs, lengthscale: float):
    K = covariance(lengthscale).to_dense()
    L = torch.linalg.cholesky(K)
    w = torch.linalg.solve_triangular(L, rhs, upper=False)
    total = ((w * w).sum((-2, -1)) + 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)).sum()
    return float(total), list(torch.autograd.grad(total, list(kernel.parameters())))


def _close(value, grads, ref_value, ref_grads, rtol: float = 1e-10) -> None:
    assert abs(value - ref_value) <= rtol * abs(ref_value), (value, ref_value)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.allclose(a, b, rtol=rtol, atol=rtol * float(b.abs().max())), (a, b)


def test_a_call_still_at_the_cap_hands_the_block_to_dense_cholesky():
    """The held factor (lengthscale 1) and the fresh one both stop at 30 steps at lengthscale 0.05 (the fresh one
    needs 50; lengthscale 1 converges in 30): the call is
    computed by dense Cholesky (exact value and gradient), and so is every later call of the block, without
    Lanczos; a converged call before it stays Lanczos, and a new block starts with Lanczos again."""
    covariance, kernel, rhs = _problem()
    with _capped(steps=30), lgg.record_calls() as calls:
        with lgg.settings.deterministic_objective():
            first = _value_and_grad(covariance, kernel, rhs, 1.0)
            handed = _value_and_grad(covariance, kernel, rhs, 0.05)
            later = _value_and_grad(covariance, kernel, rhs, 0.07)
            back = _value_and_grad(covariance, kernel, rhs, 1.0)
            scope = lgg.settings.deterministic_objective.value()
        with lgg.settings.deterministic_objective():
            again = _value_and_grad(covariance, kernel, rhs, 1.0)
    assert [c.route for c in calls] == ["lanczos", "cholesky", "cholesky", "cholesky", "lanczos"]
    assert calls[0].converged and calls[4].converged and isinstance(calls[1], RouteInfo)
    assert "30 steps unconverged" in calls[1].reason and "earlier call" in calls[2].reason
    assert all(c.block_dense for c in calls[1:4]) and calls[1].discarded_iterations == 60  # capped run + repeat
    assert calls[2].discarded_iterations == 0
    assert scope.dense_handovers == 1 and scope.dense_calls == 3 and scope.dense_switches == 1
    assert scope.refresh_attempts == 1 and scope.refreshed == 0 and scope.raised_step_caps == 0
    for got, lengthscale in [(handed, 0.05), (later, 0.07), (back, 1.0)]:
        _close(*got, *_dense_reference(covariance, kernel, rhs, lengthscale))
    assert first[0] == again[0]  # a fresh block: the estimator again
    assert abs(first[0] - back[0]) <= 4 * float(calls[0].logdet_standard_error)


def test_after_a_handover_later_calls_go_dense_without_building_a_factor(monkeypatch):
    """Every later call of a handed-over covariance is computed by Cholesky, also one whose fresh factor would
    meet its trace tolerance (lengthscale 3: rank 24 of the cap 40, Lanczos converges), and no preconditioner
    is built for it (on pol at n = 5000 building it cost 1.5 s of a 15 s dense call, and only 2 of 221 later
    calls had a factor that met its tolerance). Outside the block the same call is Lanczos, with its factor."""
    import importlib

    module = importlib.import_module("lanczos_grad_gp.functions.inv_quad_logdet")
    built = []
    select = module.select_preconditioner
    monkeypatch.setattr(module, "select_preconditioner", lambda *a, **k: built.append(1) or select(*a, **k))
    covariance, kernel, rhs = _problem()
    with _capped(rank=40), lgg.record_calls() as calls:
        with lgg.settings.deterministic_objective():
            _value_and_grad(covariance, kernel, rhs, 0.05)
            at_handover = len(built)
            smooth = _value_and_grad(covariance, kernel, rhs, 3.0)
            rough = _value_and_grad(covariance, kernel, rhs, 0.07)
            scope = lgg.settings.deterministic_objective.value()
        outside = _value_and_grad(covariance, kernel, rhs, 3.0)
    assert [c.route for c in calls] == ["cholesky", "cholesky", "cholesky", "lanczos"]
    assert at_handover >= 1 and len(built) == at_handover + 1  # none for the two later calls, one outside
    assert scope.dense_handovers == 1 and scope.dense_calls == 3 and scope.dense_switches == 0
    assert calls[3].converged and not calls[3].fixed_preconditioner and calls[3].preconditioner_rank < 40
    _close(*smooth, *_dense_reference(covariance, kernel, rhs, 3.0))
    _close(*rough, *_dense_reference(covariance, kernel, rhs, 0.07))
    assert abs(outside[0] - smooth[0]) <= 4 * float(calls[3].logdet_standard_error) + 1e-6 * abs(smooth[0])


def test_a_handover_at_the_blocks_first_call_is_no_change_of_objective():
    covariance, kernel, rhs = _problem()
    with _capped(), lgg.record_calls() as calls, lgg.settings.deterministic_objective():
        value = _value_and_grad(covariance, kernel, rhs, 0.05)
        scope = lgg.settings.deterministic_objective.value()
    assert calls[0].route == "cholesky" and scope.dense_handovers == 1 and scope.dense_switches == 0
    assert scope.refresh_attempts == 0  # nothing to replace at the first call
    _close(*value, *_dense_reference(covariance, kernel, rhs, 0.05))


def test_no_handover_outside_a_block_or_above_the_size():
    """Outside a block a capped call is returned as it is (warned); in a block with ``n`` above
    ``deterministic_dense_size`` (or the size 0) the raised step cap runs instead."""
    covariance, kernel, rhs = _problem()
    with _capped(), lgg.record_calls() as calls:
        with pytest.warns(lgg.diagnostics.NumericalWarning):
            lgg.inv_quad_logdet(covariance(0.05), rhs, logdet=True)
        for size in (299, 0):
            with lgg.settings.deterministic_dense_size(size), lgg.settings.deterministic_objective():
                lgg.inv_quad_logdet(covariance(0.05), rhs, logdet=True)
                scope = lgg.settings.deterministic_objective.value()
            assert scope.dense_handovers == scope.dense_calls == 0 and scope.raised_step_caps == 1
    assert [c.route for c in calls] == ["lanczos"] * 3
    assert not calls[0].converged and calls[1].step_cap_raised and calls[2].step_cap_raised


@pytest.mark.parametrize("size,dense", [(300, False), (425, True)])
def test_a_batch_counts_with_all_its_matrices(size, dense):
    """Two 300 × 300 matrices hold 180000 entries: above 300² = 90000, within 425² = 180625."""
    covariance, kernel, rhs = _problem(batch=(2,))
    with _capped(), lgg.settings.deterministic_dense_size(size), lgg.record_calls() as calls:
        with lgg.settings.deterministic_objective():
            value = _value_and_grad(covariance, kernel, rhs, 0.05)
    assert calls[0].route == ("cholesky" if dense else "lanczos")
    if dense:
        _close(*value, *_dense_reference(covariance, kernel, rhs, 0.05))
    else:
        assert calls[0].step_cap_raised


def test_float32_handover_matches_float32_cholesky():
    covariance, kernel, rhs = _problem(dtype=torch.float32)
    with _capped(), lgg.settings.lanczos_tol(1e-3), lgg.record_calls() as calls:  # 40 steps needed, 15 allowed
        with lgg.settings.deterministic_objective():
            value = _value_and_grad(covariance, kernel, rhs, 0.05)
    assert calls[0].route == "cholesky"
    _close(*value, *_dense_reference(covariance, kernel, rhs, 0.05), rtol=1e-5)


def _fail_on(monkeypatch, module: str, name: str, fails) -> list[int]:
    """Make ``lanczos_grad_gp.functions.<module>.<name>`` raise ``NotPSDError`` at the calls where ``fails(i)``
    (``i`` counts its calls from 0); returns the list of call indices seen."""
    target = sys.modules[f"lanczos_grad_gp.functions.{module}"]
    real, seen = getattr(target, name), []

    def patched(*args, **kwargs):
        seen.append(len(seen))
        if fails(seen[-1]):
            raise NotPSDError("simulated")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, patched)
    return seen


def test_a_failed_factorization_falls_back_to_the_raised_cap(monkeypatch):
    """Where the Cholesky fails even with jitter (``NotPSDError``) the block keeps Lanczos: the raised step cap
    runs, nothing is handed over, and a later call tries the hand-over again."""
    _fail_on(monkeypatch, "dense_block", "psd_safe_cholesky", lambda attempt: attempt == 0)
    covariance, kernel, rhs = _problem()
    with _capped(), lgg.record_calls() as calls, lgg.settings.deterministic_objective():
        lgg.inv_quad_logdet(covariance(0.05), rhs, logdet=True)
        scope = lgg.settings.deterministic_objective.value()
        assert scope.dense_handovers == 0 and not scope.dense
        later = _value_and_grad(covariance, kernel, rhs, 0.05)
    assert calls[0].route == "lanczos" and calls[0].step_cap_raised and calls[0].converged
    assert calls[1].route == "cholesky" and scope.dense_handovers == 1 and scope.dense_switches == 1
    _close(*later, *_dense_reference(covariance, kernel, rhs, 0.05))


def test_a_handed_key_whose_factorization_fails_later_goes_back_to_lanczos(monkeypatch):
    """The switch back is a change of the block's objective (counted, so BoTorch reruns), and the failed
    factorization is not tried a second time in the same call."""
    attempts = _fail_on(monkeypatch, "dense_block", "psd_safe_cholesky", lambda attempt: attempt > 0)
    covariance, kernel, rhs = _problem()
    with _capped(), lgg.record_calls() as calls, lgg.settings.deterministic_objective():
        lgg.inv_quad_logdet(covariance(0.05), rhs, logdet=True)
        lgg.inv_quad_logdet(covariance(0.05), rhs, logdet=True)
        scope = lgg.settings.deterministic_objective.value()
    assert [c.route for c in calls] == ["cholesky", "lanczos"] and len(attempts) == 2
    assert calls[1].step_cap_raised and calls[1].converged
    assert not scope.dense and scope.dense_handovers == 1 and scope.dense_switches == 1


def test_a_jitter_retry_counts_as_one_call_and_says_so(monkeypatch):
    """Lanczos finds the block's first covariance not positive definite; the retry with jitter hands over. That
    is still the block's first call (no change of objective), and the record says the jitter was added."""
    _fail_on(monkeypatch, "inv_quad_logdet", "lanczos_run", lambda attempt: attempt == 0)
    covariance, _, rhs = _problem()
    with _capped(), lgg.record_calls() as calls, lgg.settings.deterministic_objective():
        with pytest.warns(lgg.diagnostics.NumericalWarning, match="jitter"):
            lgg.inv_quad_logdet(covariance(0.05), rhs, logdet=True)
        scope = lgg.settings.deterministic_objective.value()
    assert calls[0].route == "cholesky" and "jitter 1.0e-08 added" in calls[0].reason
    assert scope.estimating_calls == 1 and scope.dense_switches == 0


def test_dense_fits_refuses_operators_it_cannot_gather():
    from linear_operator.operators import DenseLinearOperator, DiagLinearOperator

    from lanczos_grad_gp.functions.dense_block import dense_fits

    A = DenseLinearOperator(torch.eye(4, dtype=F64))
    assert dense_fits(A)
    assert not dense_fits(A + DiagLinearOperator(torch.ones(4, dtype=F64, device="meta")))  # two devices
    with lgg.settings.deterministic_dense_size(3):
        assert not dense_fits(A)


def test_dense_values_without_logdet_or_rhs():
    from lanczos_grad_gp.functions.dense_block import dense_inv_quad_logdet

    covariance, _, rhs = _problem(n=50)
    K = covariance(0.3).to_dense().detach()
    inv_quad, logdet = dense_inv_quad_logdet(covariance(0.3), rhs, False)
    assert torch.allclose(inv_quad, (rhs * torch.linalg.solve(K, rhs)).sum(-2), rtol=1e-10) and logdet == 0
    inv_quad, logdet = dense_inv_quad_logdet(covariance(0.3), None, True)
    assert inv_quad.shape == (0,) and torch.allclose(logdet, torch.logdet(K), rtol=1e-12)


def test_user_tensors_unchanged_and_rhs_gradient():
    covariance, kernel, rhs = _problem()
    rhs = rhs.clone().requires_grad_(True)
    before, version = rhs.detach().clone(), rhs._version
    with _capped(), lgg.settings.deterministic_objective():
        inv_quad, _ = lgg.inv_quad_logdet(covariance(0.05), rhs, logdet=True)
        (grad,) = torch.autograd.grad(inv_quad.sum(), rhs)
    K = covariance(0.05).to_dense().detach()
    assert torch.allclose(grad, 2 * torch.linalg.solve(K, before), rtol=1e-8, atol=1e-10)
    assert torch.equal(rhs.detach(), before) and rhs._version == version


def test_setting_validated():
    with pytest.raises(ValueError, match="deterministic_dense_size"):
        lgg.settings.deterministic_dense_size(-1)
    assert lgg.settings.current_settings()["deterministic_dense_size"] == 5000


def _fit(x, y, flag: bool):
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP

    torch.manual_seed(0)
    model = SingleTaskGP(x, y.unsqueeze(-1))
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with _capped(rank=20, steps=30) if flag else contextlib.nullcontext(), lgg.record_calls() as calls:
        fit_gpytorch_mll(mll)
    model.train()
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10**9):
        exact = float(mll(model(*model.train_inputs), model.train_targets))  # per point, as BoTorch's loss
    return exact, calls


def test_a_fit_that_outgrows_the_cap_lands_on_choleskys_optimum():
    """A BoTorch fit (n = 400, small noise) whose first call converges in 30 Lanczos steps with a rank-20 factor
    and whose later calls need more: with the hand-over it ends within 1e-3 nats/point of Cholesky's fit
    (values after the hand-over are Cholesky's own; the rerun from the end point removes L-BFGS's mixed
    memory). Measured: +0.0002 nats/point (higher than Cholesky's), 36 calls."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(400, 2, generator=g, dtype=F64)
    y = torch.sin(8 * x).sum(-1) + 0.01 * torch.randn(400, generator=g, dtype=F64)
    y = (y - y.mean()) / y.std()
    reference, _ = _fit(x, y, flag=False)
    ours, calls = _fit(x, y, flag=True)
    assert calls[0].route == "lanczos" and calls[0].converged and calls[1].route == "cholesky"
    assert abs(ours - reference) <= 1e-3, (ours, reference)
