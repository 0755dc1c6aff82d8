"""``deterministic_objective``: one smooth estimator per block, its gradient the returned one.

Oracles: central finite differences of the returned value against the returned directional
derivative (they agree to the Lanczos tolerance plus the ``O(h²)`` difference error only when value
and gradient belong to one function), a dense float64 ``logdet`` for unbiasedness (the mean over
probe seeds is within 4 standard errors), and BoTorch's optimizers observed from inside their
closures.

Tolerances: Lanczos runs at ``lanczos_tol = 1e-10``, so value and slope errors are ~1e-10
relative; a central difference with ``h = 1e-4`` adds ``h² f'''/6`` ≈ 1e-9 relative here. The
consistency bound 1e-6 leaves a factor of ~100. Outside a block the same check misses by the
neglected derivative of the preconditioner, measured 1e-2 (rank 30, noise 1e-2) to 2e-4 (rank 120,
noise 0.05): the test asserts it is above 1e-5, i.e. that the check can fail.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading

import gpytorch
import pytest
import torch

import lanczos_grad_gp as lgg
from lanczos_grad_gp.scopes import ObjectiveScope

F64 = torch.float64


class ExactGP(gpytorch.models.ExactGP):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=x.shape[-1]))

    def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def make_data(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=F64)
    y = torch.sin(6 * x).sum(-1) + 0.1 * torch.randn(n, generator=g, dtype=F64)
    return x, (y - y.mean()) / y.std()


def _model(n: int, noise: float, seed: int = 1):
    x, y = make_data(n, d=3, seed=seed)
    model = ExactGP(x, y).double()
    model.likelihood.noise = noise
    model.covar_module.base_kernel.lengthscale = 0.3
    return model, gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model), x, y


def _lanczos(rank: int, tol: float = 1e-10) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(lgg.settings.use_lanczos_grad())
    stack.enter_context(lgg.settings.max_cholesky_size(0))
    stack.enter_context(lgg.settings.max_preconditioner_size(rank))
    stack.enter_context(lgg.settings.lanczos_tol(tol))
    stack.enter_context(lgg.settings.max_lanczos_iter(400))
    # the dense hand-over off: these tests are of the Lanczos rules (tests/test_dense_handover.py: the hand-over)
    stack.enter_context(lgg.settings.deterministic_dense_size(0))
    return stack


class _Path:
    """The loss along ``θ + t d`` for a fixed random direction ``d`` over all parameters."""

    def __init__(self, model, mll, x, y, seed: int = 0) -> None:
        self.model, self.mll, self.x, self.y = model, mll, x, y
        self.params = list(model.parameters())
        g = torch.Generator().manual_seed(seed)
        self.direction = [torch.randn(p.shape, generator=g, dtype=F64) for p in self.params]

    def shift(self, t: float) -> None:
        with torch.no_grad():
            for p, d in zip(self.params, self.direction, strict=True):
                p.add_(t * d)

    def loss_and_slope(self) -> tuple[float, float]:
        loss = -self.mll(self.model(self.x), self.y)
        grads = torch.autograd.grad(loss, self.params)
        return float(loss.detach()), sum(float((g * d).sum()) for g, d in zip(grads, self.direction, strict=True))

    def slope_mismatch(self, move: float, h: float = 1e-4) -> float:
        """``|FD − slope| / |FD|`` at ``θ + move·d``, after a first call at ``θ`` (where a block fixes P)."""
        self.loss_and_slope()
        self.shift(move)
        _, slope = self.loss_and_slope()
        self.shift(h)
        plus, _ = self.loss_and_slope()
        self.shift(-2 * h)
        minus, _ = self.loss_and_slope()
        self.shift(h - move)
        fd = (plus - minus) / (2 * h)
        return abs(fd - slope) / abs(fd)


@pytest.mark.parametrize("noise,rank", [(1e-2, 30), (0.05, 120)], ids=["plain", "control-variate"])
def test_value_and_gradient_are_one_function_in_a_block(noise, rank):
    model, mll, x, y = _model(300, noise)
    path = _Path(model, mll, x, y)
    with _lanczos(rank), lgg.record_calls() as calls:
        fresh = path.slope_mismatch(0.3)
        with lgg.settings.deterministic_objective():
            scoped = path.slope_mismatch(0.3)
    assert calls[0].preconditioner_rank == rank  # rank-limited: the case the block is for
    fixed = [c.fixed_preconditioner for c in calls]
    # outside the block nothing is fixed; inside it, the slope and both difference points share one P
    assert fixed[:4] == [False] * 4 and all(fixed[5:]), fixed
    assert calls[0].variance_reduced == (rank == 120)
    assert scoped <= 1e-6, scoped
    assert fresh > 1e-5, fresh  # outside the block the check fails: the test can fail


def test_block_leaves_the_value_where_the_estimator_is_built():
    model, mll, x, y = _model(400, 0.05)
    with _lanczos(120):
        ref = float(-mll(model(x), y))
        with lgg.settings.deterministic_objective():
            scoped = float(-mll(model(x), y))
            scope = lgg.settings.deterministic_objective.value()
    assert isinstance(scope, ObjectiveScope) and len(scope.frozen) == 1 and scope.calls == 1
    assert abs(scoped - ref) <= 1e-12 * abs(ref)  # tr(G P_0) = n - Σ‖z‖²/N = 0 for Rademacher probes


def test_fixed_estimator_is_unbiased_away_from_where_it_was_built():
    """E[F(θ₁)] = log det K(θ₁) for a preconditioner fixed at θ₀ ≠ θ₁ (mean over 40 probe seeds).

    Lanczos at its default tolerance: its bias (~1e-4 relative per probe) is far below the standard error.
    """
    x, _ = make_data(100, d=3, seed=2)
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).double()

    def covariance(lengthscale: float, noise: float):
        kernel.base_kernel.lengthscale = lengthscale
        with torch.no_grad():
            return kernel(x).evaluate_kernel().add_diagonal(torch.tensor(noise, dtype=F64))

    exact = float(torch.logdet(covariance(0.45, 0.02).to_dense()))
    values = []
    for seed in range(40):
        with _lanczos(6, tol=1e-4), lgg.settings.probe_seed(seed), lgg.settings.deterministic_objective():
            lgg.inv_quad_logdet(covariance(0.3, 0.1), logdet=True)  # fixes P at θ₀
            values.append(float(lgg.inv_quad_logdet(covariance(0.45, 0.02), logdet=True)[1]))
    values_t = torch.tensor(values, dtype=F64)
    se = float(values_t.std() / len(values) ** 0.5)
    assert abs(float(values_t.mean()) - exact) <= 4 * se, (float(values_t.mean()), exact, se)
    assert se > 0  # the estimate is stochastic: the probes, not the preconditioner, decide the value


def test_factor_that_meets_its_tolerance_is_rebuilt_in_a_block():
    """At BO sizes the factor reaches its trace tolerance (exact up to O(ρ)): nothing is fixed, and the call
    is the one outside a block at the block's tolerance (``deterministic_preconditioner_tol``)."""
    model, mll, x, y = _model(120, 0.05)
    path = _Path(model, mll, x, y)
    with _lanczos(500):
        path.shift(0.2)
        with lgg.settings.preconditioner_tol(lgg.settings.deterministic_preconditioner_tol.value()):
            ref = path.loss_and_slope()
        path.shift(-0.2)
        with lgg.settings.deterministic_objective():
            path.loss_and_slope()
            path.shift(0.2)
            scoped = path.loss_and_slope()
            path.shift(-0.2)
            assert not lgg.settings.deterministic_objective.value().frozen
    assert scoped == ref


def test_a_block_tightens_the_trace_tolerance():
    """In a block the pivoted Cholesky stops at ``min(preconditioner_tol, deterministic_preconditioner_tol)``.

    A factor that meets its tolerance is rebuilt at every θ, and a change of pivots moves the value by the
    probe estimate's errors, of standard deviation ``≤ √(2/N) · tol`` per point of ``log det``: 0.0045 at
    the default 0.01.
    """
    model, mll, x, y = _model(300, 0.05)
    with _lanczos(500), lgg.record_calls() as calls:
        mll(model(x), y)
        with lgg.settings.deterministic_objective():
            mll(model(x), y)
            with lgg.settings.preconditioner_tol(1e-6):  # a tighter user tolerance wins
                mll(model(x), y)
            with lgg.settings.deterministic_preconditioner_tol(0.01):  # the old behaviour, on request
                mll(model(x), y)
    tols = [c.options.preconditioner_tol for c in calls]
    ranks = [c.preconditioner_rank for c in calls]
    assert tols == [0.01, 1e-4, 1e-6, 0.01]
    assert ranks[0] == ranks[3] < ranks[1] < ranks[2] < 300, ranks  # all met their tolerance below full rank
    with pytest.raises(ValueError, match="deterministic_preconditioner_tol"):
        lgg.settings.deterministic_preconditioner_tol(-1.0)


@pytest.mark.parametrize("cap,rank,fixed", [(500, 208, False), (160, 120, False), (60, 60, True)])
def test_a_tighter_tolerance_only_where_the_cap_reaches_it(cap, rank, fixed):
    """The block's tighter tolerance is used where it is reached within the cap; otherwise the factor is
    the one outside a block (cut back to where ``preconditioner_tol`` stops it), and it is fixed exactly
    when it misses ``preconditioner_tol`` at its cap.

    This covariance needs rank 120 for 0.01 and 208 for 1e-4 (n = 300). Tightening where the cap cannot
    reach the tolerance made fits that cross the regimes slower (elevators, n = 1000, Lanczos forced: 2.5–2.8×
    the evaluations and 3–4× the CPU, in two runs of two variants).
    """
    model, mll, x, y = _model(300, 0.05)
    with _lanczos(cap), lgg.record_calls() as calls:
        outside = float(mll(model(x), y).detach())
        with lgg.settings.deterministic_objective():
            inside = float(mll(model(x), y).detach())
            frozen = dict(lgg.settings.deterministic_objective.value().frozen)
    assert calls[1].preconditioner_rank == rank, [c.preconditioner_rank for c in calls]
    assert bool(frozen) is fixed and calls[1].fixed_preconditioner is fixed
    if rank < 208 and not fixed:  # the factor outside the block, unchanged: the same value
        assert calls[0].preconditioner_rank == rank and inside == outside


def test_a_held_factor_that_leaves_a_call_unconverged_is_replaced():
    """A factor held since ``θ₀`` can stop preconditioning ``K(θ₁)``: its Lanczos run then stops at the step
    cap, and the truncated estimate is biased (a line search follows such values: elevators, n = 5000,
    went to per-point estimates of +2 against an exact −0.5). The call is repeated with the factor built at
    ``θ₁``, which the block holds from then on (same probes): the value is the one a block opened at ``θ₁``
    gives, and it is within 4 standard errors of the dense ``logdet``.

    Here the held factor (lengthscale 1) needs more than 60 steps at lengthscale 0.05; the fresh one 40.
    """
    x, _ = make_data(300, d=3, seed=2)
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).double()

    def covariance(lengthscale: float):
        kernel.base_kernel.lengthscale = lengthscale
        with torch.no_grad():
            return kernel(x).evaluate_kernel().add_diagonal(torch.tensor(1e-3, dtype=F64))

    with _lanczos(10, tol=1e-6), lgg.record_calls() as calls:
        with lgg.settings.deterministic_objective():  # the held factor's own run, uncapped
            lgg.inv_quad_logdet(covariance(1.0), logdet=True)
            lgg.inv_quad_logdet(covariance(0.05), logdet=True)
        with lgg.settings.max_lanczos_iter(60):
            with lgg.settings.deterministic_objective():
                lgg.inv_quad_logdet(covariance(1.0), logdet=True)
                refreshed = float(lgg.inv_quad_logdet(covariance(0.05), logdet=True)[1])
                again = float(lgg.inv_quad_logdet(covariance(0.05), logdet=True)[1])
                scope = lgg.settings.deterministic_objective.value()
            with lgg.settings.deterministic_objective():
                fresh = float(lgg.inv_quad_logdet(covariance(0.05), logdet=True)[1])
    stale_steps = int(calls[1].iterations.max())
    assert stale_steps > 60 and not calls[1].preconditioner_refreshed, stale_steps  # the cap is what it hits
    assert [c.preconditioner_refreshed for c in calls[2:]] == [False, True, False, False]
    assert all(c.fixed_preconditioner and c.converged for c in calls[2:]), [c.converged for c in calls]
    assert scope.refreshed == scope.refresh_attempts == 1 and scope.calls == 3
    assert int(calls[3].iterations.max()) <= 60 and calls[3].discarded_iterations == 60  # the capped run
    assert calls[4].discarded_iterations == 0
    assert refreshed == again == fresh  # the factor built at θ₁, with the block's probes
    exact = float(torch.logdet(covariance(0.05).to_dense()))
    assert abs(refreshed - exact) <= 4 * float(calls[3].logdet_standard_error), (refreshed, exact)


def _stale_covariance(n: int = 300):
    """``K(lengthscale) + 1e-3 I`` over fixed points, the lengthscale a trainable parameter."""
    x, y = make_data(n, d=3, seed=2)
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).double()

    def covariance(lengthscale: float):
        with torch.no_grad():
            kernel.base_kernel.lengthscale = lengthscale
        return kernel(x).evaluate_kernel().add_diagonal(torch.tensor(1e-3, dtype=F64))

    return covariance, kernel, y.unsqueeze(-1)


def test_a_replaced_factor_gives_the_fresh_blocks_value_and_gradient():
    """With a right-hand side and gradients: after the replacement the call is the one a block opened at
    ``θ₁`` makes (same factor, same probes; the control variate's value zero where its factor was built)."""
    covariance, kernel, rhs = _stale_covariance()
    params = list(kernel.parameters())

    def value_and_grad():
        inv_quad, logdet = lgg.inv_quad_logdet(covariance(0.05), rhs, logdet=True)
        total = inv_quad + logdet
        return float(total), [g.clone() for g in torch.autograd.grad(total, params)]

    with _lanczos(10, tol=1e-6), lgg.settings.max_lanczos_iter(60), lgg.record_calls() as calls:
        with lgg.settings.deterministic_objective():
            with torch.no_grad():
                lgg.inv_quad_logdet(covariance(1.0), rhs, logdet=True)
            replaced = value_and_grad()
        with lgg.settings.deterministic_objective():
            fresh = value_and_grad()
    assert calls[1].preconditioner_refreshed and calls[1].converged
    assert replaced[0] == fresh[0]
    for a, b in zip(replaced[1], fresh[1], strict=True):
        assert torch.equal(a, b)


def test_no_replacement_where_the_fresh_factor_does_not_converge_either():
    """A cap no factor of rank 10 reaches (15 steps): the repeat with the fresh factor is thrown away and the
    block keeps its factor and its objective (the held value, unconverged and warned); the attempts are
    bounded by ``MAX_REFRESH_ATTEMPTS``."""
    from lanczos_grad_gp.functions import block_rules as iql

    covariance, _, _ = _stale_covariance()
    no_raise = lgg.settings.deterministic_max_lanczos_iter(15)  # the raised cap (next tests) off
    with _lanczos(10, tol=1e-6), lgg.settings.max_lanczos_iter(15), no_raise, lgg.record_calls() as calls:
        with lgg.settings.deterministic_objective():
            with pytest.warns(lgg.diagnostics.NumericalWarning):
                first = float(lgg.inv_quad_logdet(covariance(0.05), logdet=True)[1])
                again = float(lgg.inv_quad_logdet(covariance(0.05), logdet=True)[1])
                for _ in range(iql.MAX_REFRESH_ATTEMPTS + 2):
                    lgg.inv_quad_logdet(covariance(0.05), logdet=True)
            scope = lgg.settings.deterministic_objective.value()
    assert first == again  # one function: the held factor's value, not the fresh repeat's
    assert not any(c.preconditioner_refreshed or c.converged for c in calls)
    assert scope.refreshed == 0 and scope.refresh_attempts == iql.MAX_REFRESH_ATTEMPTS
    assert calls[1].discarded_iterations == 15 and calls[-1].discarded_iterations == 0  # attempts ran out


def _block_value_and_grad(covariance, kernel, rhs, lengthscales):
    """Values and kernel gradients of ``inv_quad + logdet`` at each lengthscale, in one block."""
    params, out = list(kernel.parameters()), []
    with lgg.settings.deterministic_objective():
        for lengthscale in lengthscales:
            inv_quad, logdet = lgg.inv_quad_logdet(covariance(lengthscale), rhs, logdet=True)
            total = inv_quad + logdet
            out.append((float(total), [g.clone() for g in torch.autograd.grad(total, params)]))
        scope = lgg.settings.deterministic_objective.value()
    return out, scope


def test_a_call_still_at_the_step_cap_runs_again_with_the_blocks_cap():
    """Where no factor of the rank cap lets a call converge within ``max_lanczos_iter`` (rank 10, 15 steps:
    the held factor's run and the fresh factor's repeat both stop at the cap), the call is run again with
    ``deterministic_max_lanczos_iter`` steps with the block's held factor and probes: a truncated value is
    biased and a line search follows it (Hartmann6, n = 1000, rank cap 20: 0.88 nats/point short without this).

    Oracle: the same block run with ``max_lanczos_iter`` at the raised cap from the start — the same
    estimator (factor built at the first lengthscale, same probes), so the same value and gradient, bit for
    bit; and the dense ``logdet`` (within 4 standard errors).
    """
    covariance, kernel, rhs = _stale_covariance()
    with _lanczos(10, tol=1e-6), lgg.record_calls() as calls:
        with lgg.settings.max_lanczos_iter(15):
            raised, scope = _block_value_and_grad(covariance, kernel, rhs, [1.0, 0.05])
        with lgg.settings.max_lanczos_iter(1000):
            reference, _ = _block_value_and_grad(covariance, kernel, rhs, [1.0, 0.05])
    assert calls[1].step_cap_raised and calls[1].converged and not calls[1].preconditioner_refreshed
    assert calls[1].discarded_iterations == 30  # the held factor's capped run and the fresh factor's repeat
    assert 15 < int(calls[1].iterations.max()) == int(calls[3].iterations.max()) < 1000
    assert calls[0].step_cap_raised and scope.raised_step_caps == 2 and scope.refreshed == 0  # both calls capped
    assert scope.refresh_attempts == 1
    for (value, grads), (ref_value, ref_grads) in zip(raised, reference, strict=True):
        assert value == ref_value
        for a, b in zip(grads, ref_grads, strict=True):
            assert torch.equal(a, b)
    with torch.no_grad():
        dense = covariance(0.05).to_dense()
        exact = float(torch.logdet(dense) + (rhs.mT @ torch.linalg.solve(dense, rhs)).squeeze())
    assert abs(raised[1][0] - exact) <= 4 * float(calls[1].logdet_standard_error), (raised[1][0], exact)


def test_the_raised_cap_only_in_blocks_and_warned_when_it_does_not_suffice():
    """Outside a block a capped call is returned as it is (unconverged, warned: training with Adam averages
    such errors out); in a block a cap that is still too small leaves the call unconverged and warned."""
    covariance, _, _ = _stale_covariance()
    with _lanczos(10, tol=1e-6), lgg.settings.max_lanczos_iter(15), lgg.record_calls() as calls:
        with pytest.warns(lgg.diagnostics.NumericalWarning):
            lgg.inv_quad_logdet(covariance(0.05), logdet=True)
        with lgg.settings.deterministic_max_lanczos_iter(20), lgg.settings.deterministic_objective():
            with pytest.warns(lgg.diagnostics.NumericalWarning, match="after 20 steps"):
                lgg.inv_quad_logdet(covariance(0.05), logdet=True)
    assert not calls[0].step_cap_raised and int(calls[0].iterations.max()) == 15 and not calls[0].converged
    assert calls[1].step_cap_raised and not calls[1].converged and calls[1].options.max_iter == 20
    assert calls[1].discarded_iterations == 15


def test_the_raised_cap_without_a_held_factor():
    """A block call with no factor to hold (preconditioning off) is raised with its own (identity) factor."""
    covariance, _, _ = _stale_covariance()
    with _lanczos(0, tol=1e-6), lgg.settings.max_lanczos_iter(15), lgg.record_calls() as calls:
        with lgg.settings.deterministic_objective():
            raised = float(lgg.inv_quad_logdet(covariance(0.05), logdet=True)[1])
            scope = lgg.settings.deterministic_objective.value()
        with lgg.settings.max_lanczos_iter(1000), lgg.settings.deterministic_objective():
            reference = float(lgg.inv_quad_logdet(covariance(0.05), logdet=True)[1])
    assert calls[0].step_cap_raised and calls[0].converged and not calls[0].fixed_preconditioner
    assert scope.raised_step_caps == 1 and scope.calls == 0 and not scope.frozen
    assert raised == reference and not calls[1].step_cap_raised


def test_a_raised_run_that_finds_the_matrix_not_pd_keeps_the_capped_result(monkeypatch):
    """A NotPSDError in the longer run (round-off the capped run did not meet) must not fail the call or change
    the block: the capped, warned result is returned, and nothing is counted as raised."""
    from linear_operator.utils.errors import NotPSDError

    module = sys.modules["lanczos_grad_gp.functions.inv_quad_logdet"]  # the package re-exports the function
    run = module.lanczos_run

    def failing_when_longer(A, rhs, want_logdet, options, precond, frozen):
        if options.max_iter > 15:
            raise NotPSDError("simulated: a nonpositive Ritz value in the longer run")
        return run(A, rhs, want_logdet, options, precond, frozen)

    covariance, _, _ = _stale_covariance()
    no_raise = lgg.settings.deterministic_max_lanczos_iter(15)
    with _lanczos(10, tol=1e-6), lgg.settings.max_lanczos_iter(15), lgg.record_calls() as calls:
        with no_raise, lgg.settings.deterministic_objective(), pytest.warns(lgg.diagnostics.NumericalWarning):
            capped = float(lgg.inv_quad_logdet(covariance(0.05), logdet=True)[1])
        monkeypatch.setattr(module, "lanczos_run", failing_when_longer)
        with lgg.settings.deterministic_objective():
            with pytest.warns(lgg.diagnostics.NumericalWarning, match="after 15 steps"):
                kept = float(lgg.inv_quad_logdet(covariance(0.05), logdet=True)[1])
            scope = lgg.settings.deterministic_objective.value()
    assert kept == capped and len(calls) == 2
    assert not calls[1].step_cap_raised and not calls[1].converged and calls[1].jitter == 0.0
    assert scope.raised_step_caps == 0 and scope.calls == 1


def test_scope_per_block_thread_local_and_validated():
    assert lgg.settings.deterministic_objective.value() is None
    ctx = lgg.settings.deterministic_objective()
    with ctx:
        first = lgg.settings.deterministic_objective.value()
        seen: list[object] = []
        worker = threading.Thread(target=lambda: seen.append(lgg.settings.deterministic_objective.value()))
        worker.start()
        worker.join()
        assert seen == [None]
        with lgg.settings.deterministic_objective(False):
            assert lgg.settings.deterministic_objective.value() is None
        assert lgg.settings.deterministic_objective.value() is first
    with ctx:  # the same object opens a new, empty scope
        assert lgg.settings.deterministic_objective.value() is not first
    assert lgg.settings.deterministic_objective.value() is None
    with pytest.raises(ValueError, match="bool"):
        lgg.settings.deterministic_objective("yes")
    with pytest.raises(TypeError, match="process-wide default"):
        lgg.settings.deterministic_objective.set_default(True)


# --- BoTorch's L-BFGS runs -----------------------------------------------------------------------

botorch = pytest.importorskip("botorch", reason="botorch is an optional extra")


def _quadratic_closure(parameters, seen):
    def closure():
        seen.append(lgg.settings.deterministic_objective.value())
        loss = ((parameters["x"] - 1.0) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, [parameters["x"]])
        return loss.detach(), [grad]

    return closure


def test_botorch_scipy_minimize_runs_in_a_block_under_the_flag_only():
    from botorch.optim import core, fit

    assert fit.scipy_minimize is core.scipy_minimize  # one wrapper, both names
    for flag in (False, True):
        parameters = {"x": torch.zeros(2, dtype=F64, requires_grad=True)}
        seen: list[object] = []
        with lgg.settings.use_lanczos_grad(flag):
            result = core.scipy_minimize(_quadratic_closure(parameters, seen), parameters)
        assert torch.allclose(parameters["x"], torch.ones(2, dtype=F64), atol=1e-5)
        assert result.fval < 1e-9
        scopes = {id(s) for s in seen}
        if flag:
            assert all(isinstance(s, ObjectiveScope) for s in seen)
            assert len(scopes) == 1  # no stochastic log-determinant in the run: no end-point check, no rerun
        else:
            assert seen and all(s is None for s in seen)


def test_botorch_batched_lbfgs_runs_in_a_block():
    import numpy as np
    from botorch.optim.batched_lbfgs_b import fmin_l_bfgs_b_batched

    seen: list[object] = []

    def func(x, batch_indices=None):
        seen.append(lgg.settings.deterministic_objective.value())
        return ((x - 2.0) ** 2).sum(-1), 2 * (x - 2.0)

    with lgg.settings.use_lanczos_grad():
        xs, fs, _ = fmin_l_bfgs_b_batched(func=func, x0=np.zeros((3, 2)), pass_batch_indices=True)
    assert np.allclose(xs, 2.0, atol=1e-5)
    assert seen and all(isinstance(s, ObjectiveScope) for s in seen)


def test_uninstall_restores_botorch_and_install_wraps_again():
    from botorch.optim import core

    wrapped = core.scipy_minimize
    original = wrapped.__lgg_original__
    lgg.patching.uninstall()
    try:
        assert core.scipy_minimize is original
        assert lgg.botorch_hooks.installed_targets() == []
        with lgg.settings.use_lanczos_grad():  # the flag does not re-patch after an uninstall
            assert core.scipy_minimize is original
    finally:
        lgg.patching.install()
    assert core.scipy_minimize.__lgg_original__ is original


def _prints_ok_in_a_fresh_interpreter(code: str) -> None:
    """Run ``code`` in a new Python process (import order matters to the wrapping) and expect it to print ok."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_botorch_imported_lazily_after_the_library_is_wrapped():
    code = (
        "import lanczos_grad_gp as lgg, botorch, sys\n"
        "assert 'botorch.optim.core' not in sys.modules\n"
        "fit = botorch.fit.fit_gpytorch_mll\n"  # lazy attribute: imports botorch.optim.fit now
        "import botorch.optim.fit as f\n"
        "assert hasattr(f.scipy_minimize, '__lgg_original__'), f.scipy_minimize\n"
        "print('ok')\n"
    )
    _prints_ok_in_a_fresh_interpreter(code)


def test_botorch_imported_before_the_library_gets_one_wrapper_for_both_names():
    """``botorch.optim.fit`` holds ``scipy_minimize`` under its own name; with BoTorch imported first both names
    point to one wrapper, as when BoTorch is imported later (two wrappers of the raw function behaved the same,
    but ``uninstall`` and identity checks such as ``installed_targets`` expect one)."""
    code = (
        "import botorch.optim.core as c, botorch.optim.fit as f\n"
        "import lanczos_grad_gp as lgg\n"
        "assert f.scipy_minimize is c.scipy_minimize, (f.scipy_minimize, c.scipy_minimize)\n"
        "assert hasattr(c.scipy_minimize, '__lgg_original__')\n"
        "print('ok')\n"
    )
    _prints_ok_in_a_fresh_interpreter(code)


def _moving_closure(parameters, scopes):
    """A stand-in for a rank-limited GP objective: each block is a slightly different estimator."""

    def closure():
        scope = lgg.settings.deterministic_objective.value()
        scope.calls += 1  # as the GP routine does when it holds a preconditioner fixed
        if not scopes or scopes[-1] is not scope:
            scopes.append(scope)
        loss = ((parameters["x"] - 1.0) ** 2).sum() + 0.01 * len(scopes)
        (grad,) = torch.autograd.grad(loss, [parameters["x"]])
        return loss.detach(), [grad]

    return closure


def test_reruns_stop_at_max_runs_and_never_follow_a_stopped_run():
    from botorch.optim import core

    from lanczos_grad_gp import botorch_hooks

    with lgg.settings.use_lanczos_grad():
        parameters = {"x": torch.zeros(2, dtype=F64, requires_grad=True)}
        scopes: list[object] = []
        core.scipy_minimize(_moving_closure(parameters, scopes), parameters)
        assert len(scopes) == botorch_hooks.MAX_RUNS  # the estimator "moved" every time: all reruns used

        parameters = {"x": torch.zeros(2, dtype=F64, requires_grad=True)}
        scopes = []
        result = core.scipy_minimize(_moving_closure(parameters, scopes), parameters, options={"maxiter": 1})
        assert result.status.name == "STOPPED" and len(scopes) == 1  # maxiter is the caller's budget

        parameters = {"x": torch.zeros(2, dtype=F64, requires_grad=True)}
        scopes = []
        core.scipy_minimize(_moving_closure(parameters, scopes), parameters, timeout_sec=1e-9)
        assert len(scopes) == 1  # no time left for a rerun


def _replacing_closure(parameters, scopes, replace_in_runs: int):
    """A fixed estimator (the value does not move between blocks) whose first ``replace_in_runs`` runs
    replace their held factor once, as the GP routine does when the held factor leaves a call unconverged."""

    def closure():
        scope = lgg.settings.deterministic_objective.value()
        scope.calls += 1
        if not scopes or scopes[-1] is not scope:
            scopes.append(scope)
            if len(scopes) <= replace_in_runs:
                scope.refreshed += 1
        loss = ((parameters["x"] - 1.0) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, [parameters["x"]])
        return loss.detach(), [grad]

    return closure


@pytest.mark.parametrize("replace_in_runs,runs", [(0, 1), (1, 2), (2, 3), (10, 4)])
def test_a_run_whose_factor_was_replaced_is_rerun(replace_in_runs, runs):
    """The end-point value of a steady estimator does not move, so only a replaced factor (L-BFGS's memory
    then mixes two estimators) triggers a rerun, and reruns still stop at ``MAX_RUNS``. (Elevators, n = 5000:
    the first run stopped at 0.0175 nats/point short of Cholesky's optimum on "relative reduction of f",
    with the rebuilt estimate within 2e-4 of its final value.)"""
    from botorch.optim import core

    from lanczos_grad_gp import botorch_hooks

    parameters = {"x": torch.zeros(2, dtype=F64, requires_grad=True)}
    scopes: list[object] = []
    with lgg.settings.use_lanczos_grad():
        core.scipy_minimize(_replacing_closure(parameters, scopes, replace_in_runs), parameters)
    # a rerun's end-point check and the run share one block; below MAX_RUNS a last block only checks
    assert runs <= botorch_hooks.MAX_RUNS
    assert len(scopes) == runs + (runs < botorch_hooks.MAX_RUNS)
    if runs < botorch_hooks.MAX_RUNS:
        assert scopes[-1].calls == 1  # the check's one evaluation: the value did not move, no rerun
    assert torch.allclose(parameters["x"], torch.ones(2, dtype=F64), atol=1e-5)


def test_a_run_that_switched_to_dense_cholesky_is_rerun_without_fixed_parts():
    """A hand-over after earlier calls changes the objective even where the block held no factor (preconditioning
    off, or factors that meet their tolerance): the run is rerun from its end point all the same."""
    from botorch.optim import core

    parameters = {"x": torch.zeros(2, dtype=F64, requires_grad=True)}
    scopes: list[object] = []

    def closure():
        scope = lgg.settings.deterministic_objective.value()
        if not scopes or scopes[-1] is not scope:
            scopes.append(scope)
            if len(scopes) == 1:
                scope.dense_switches += 1  # as the GP routine counts a hand-over after earlier calls
        loss = ((parameters["x"] - 1.0) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, [parameters["x"]])
        return loss.detach(), [grad]

    with lgg.settings.use_lanczos_grad():
        core.scipy_minimize(closure, parameters)
    assert all(s.calls == 0 for s in scopes)  # no fixed parts anywhere
    assert len(scopes) == 2  # the first run and its rerun (no fixed parts, no change: no further check)
    assert torch.allclose(parameters["x"], torch.ones(2, dtype=F64), atol=1e-5)


def test_a_failing_rerun_keeps_the_previous_result():
    from botorch.optim import core

    parameters = {"x": torch.zeros(2, dtype=F64, requires_grad=True)}
    scopes: list[object] = []
    inner = _moving_closure(parameters, scopes)

    def closure():
        if len(scopes) >= 1 and lgg.settings.deterministic_objective.value() is not scopes[0]:
            raise ValueError("broken in the rerun")
        return inner()

    with lgg.settings.use_lanczos_grad(), pytest.warns(lgg.diagnostics.NumericalWarning, match="previous run"):
        result = core.scipy_minimize(closure, parameters)
    assert result.status.name == "SUCCESS"
    assert torch.allclose(parameters["x"], torch.ones(2, dtype=F64), atol=1e-5)


def test_value_without_gradients_is_the_same_function_in_a_block():
    model, mll, x, y = _model(300, 0.05)
    path = _Path(model, mll, x, y)
    with _lanczos(120), lgg.settings.deterministic_objective():
        path.shift(0.3)
        path.loss_and_slope()  # builds and fixes P here
        path.shift(-0.3)
        with_grad, _ = path.loss_and_slope()
        with torch.no_grad():
            without = float(-mll(model(x), y))
    assert abs(with_grad - without) <= 1e-12 * abs(with_grad)


def test_import_hook_survives_reload_and_copy():
    code = (
        "import copy, importlib, pickle, lanczos_grad_gp as lgg\n"
        "import botorch.optim.core as core\n"
        "assert hasattr(core.scipy_minimize, '__lgg_original__')\n"
        "copy.copy(core.__spec__.loader); pickle.dumps(core.__spec__.loader)\n"
        "importlib.reload(core)\n"
        "assert hasattr(core.scipy_minimize, '__lgg_original__'), 'reload unwrapped'\n"
        "importlib.reload(lgg.botorch_hooks); lgg.botorch_hooks.enable()\n"
        "import botorch.optim.batched_lbfgs_b as b  # two finders now (the old module's and the new): no recursion\n"
        "assert hasattr(b.fmin_l_bfgs_b_batched, '__lgg_original__')\n"
        "print('ok')\n"
    )
    _prints_ok_in_a_fresh_interpreter(code)
