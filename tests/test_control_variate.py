"""The preconditioner as a control variate of the log-determinant gradient (Wenger et al. 2022).

Oracles: ``torch.logdet`` of the dense float64 matrix, differentiated by autograd. What the math
promises, and what is checked:

* a full-rank factor (``P = K``) makes the log-det gradient exact for ANY number of probes (the
  probe term cancels identically); only the Lanczos tolerance is left;
* with a partial factor the estimator stays unbiased: the mean over many probe seeds converges to
  the exact gradient at the Monte-Carlo rate (checked at 4 standard errors);
* the value is never changed (bit-identical with and without);
* it is skipped where it would add variance (``ρ = tr(K − LL^T)/tr(D) > 1``) and says so.
"""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch
from linear_operator.operators import AddedDiagLinearOperator, DenseLinearOperator, DiagLinearOperator

import lanczos_grad_gp as lgg
from lanczos_grad_gp.core.preconditioners.control_variate import MAX_REMAINDER_RATIO

F64 = torch.float64


def _theta(dtype, batch=()):
    ls = torch.full((*batch, 1), 0.35, dtype=dtype, requires_grad=True)
    scale = torch.full((*batch, 1), 1.3, dtype=dtype, requires_grad=True)
    noise = torch.full((*batch, 1), 0.05, dtype=dtype, requires_grad=True)
    return ls, scale, noise


def _kernel(x, ls, scale):
    sq = (x.unsqueeze(-2) - x.unsqueeze(-3)).square().sum(-1)  # (*batch, n, n)
    return scale.unsqueeze(-1) * torch.exp(-0.5 * sq / ls.unsqueeze(-1).square())


def _operator(x, theta):
    ls, scale, noise = theta
    n = x.shape[-2]
    K = _kernel(x, ls, scale)
    return AddedDiagLinearOperator(DenseLinearOperator(K), DiagLinearOperator(noise.expand(*noise.shape[:-1], n)))


def _exact_grad(x, theta):
    ls, scale, noise = (t.detach().double().requires_grad_() for t in theta)
    K = _kernel(x.double(), ls, scale) + noise.unsqueeze(-1) * torch.eye(x.shape[-2], dtype=F64)
    return torch.autograd.grad(torch.logdet(K).sum(), (ls, scale, noise))


def _our_grad(x, theta, **settings):
    with (
        lgg.settings.num_probes(settings.get("probes", 4)),
        lgg.settings.probe_seed(settings.get("seed", 0)),
        lgg.settings.max_preconditioner_size(settings.get("rank", 10_000)),
        lgg.settings.preconditioner_tol(settings.get("tol", 0.0)),
        lgg.settings.preconditioner_control_variate(settings.get("cv", True)),
        lgg.settings.lanczos_tol(settings.get("lanczos_tol", 1e-10 if x.dtype == F64 else 1e-5)),
        lgg.settings.max_lanczos_iter(400),
        lgg.record_calls() as calls,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", lgg.diagnostics.NumericalWarning)
        _, ld = lgg.inv_quad_logdet(_operator(x, theta), logdet=True)
        grads = torch.autograd.grad(ld.sum(), theta)
    return ld.detach(), grads, calls[-1]


def _inputs(n, dtype, batch=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*batch, n, 2, generator=g, dtype=F64).to(dtype)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("probes", [1, 4])
def test_full_rank_factor_gives_the_exact_logdet_gradient_for_any_probe_count(dtype, probes):
    x = _inputs(60, dtype)
    theta = _theta(dtype)
    exact = _exact_grad(x, theta)
    _, ours, info = _our_grad(x, theta, probes=probes)
    assert info.variance_reduced and info.preconditioner_rank > 0
    # Without the control variate, 1-4 Rademacher probes give O(1/sqrt(N)) relative errors (checked below).
    # With it, what is left is round-off: float64 Lanczos at tol 1e-10; float32 pivots and
    # eps·cond(K) with cond(K) ~ n·scale/noise ~ 1.5e3, i.e. ~1e-4 relative.
    rtol = 1e-6 if dtype == F64 else 3e-3
    for o, e in zip(ours, exact, strict=True):
        assert torch.allclose(o.double(), e, rtol=rtol, atol=rtol * float(e.abs().max())), (o, e)
    _, plain, info_plain = _our_grad(x, theta, probes=probes, cv=False)
    assert not info_plain.variance_reduced

    def err(g):
        return max(float(((a.double() - e) / e).abs().max()) for a, e in zip(g, exact, strict=True))

    assert err(plain) > 10 * max(err(ours), rtol / 10)  # the probe noise the control variate removed was real


def test_full_rank_batched_operators_with_different_pivots():
    x = _inputs(40, F64, batch=(3,))
    theta = _theta(F64, batch=(3,))
    with torch.no_grad():
        theta[0][:] = torch.tensor([[0.2], [0.4], [0.7]], dtype=F64)  # different spectra, different pivots
    exact = _exact_grad(x, theta)
    _, ours, info = _our_grad(x, theta, probes=2)
    assert info.variance_reduced
    for o, e in zip(ours, exact, strict=True):
        assert torch.allclose(o, e, rtol=1e-6, atol=1e-6 * float(e.abs().max()))


def test_value_is_unchanged_by_the_control_variate():
    x = _inputs(80, F64)
    theta = _theta(F64)
    with_cv, _, info = _our_grad(x, theta, rank=30, tol=0.0)
    without, _, _ = _our_grad(x, theta, rank=30, tol=0.0, cv=False)
    assert torch.equal(with_cv, without)


def test_partial_factor_stays_unbiased_and_lowers_the_variance():
    """Mean over seeds -> exact at the Monte-Carlo rate; spread smaller than without.

    Rank 20 of n = 120 leaves ρ = tr(K − LL^T)/tr(D) ≈ 0.035: measured spread ratio 0.18-0.28.
    """
    x = _inputs(120, F64, seed=3)
    theta = _theta(F64)
    exact = torch.cat([e.reshape(-1) for e in _exact_grad(x, theta)])
    runs = {True: [], False: []}
    for cv in (True, False):
        for seed in range(40):
            _, g, info = _our_grad(x, theta, probes=2, rank=20, seed=seed, cv=cv, lanczos_tol=1e-10)
            runs[cv].append(torch.cat([t.reshape(-1) for t in g]))
        assert info.variance_reduced == cv
    assert 0 < info.preconditioner_rank < 120
    for cv, samples in runs.items():
        s = torch.stack(samples)  # (seeds, params)
        se = s.std(0) / s.shape[0] ** 0.5
        assert bool(((s.mean(0) - exact).abs() <= 4 * se + 1e-8 * exact.abs()).all()), (cv, s.mean(0), exact, se)
    spread = {cv: torch.stack(s).std(0) for cv, s in runs.items()}
    assert bool((spread[True] < 0.5 * spread[False]).all()), spread


def test_skipped_when_the_factor_leaves_most_of_the_kernel_to_the_remainder():
    x = _inputs(200, F64)
    ls, scale, noise = _theta(F64)
    with torch.no_grad():
        ls.fill_(0.05)  # short lengthscale: a rank-5 factor captures little
        noise.fill_(1e-3)
    _, _, info = _our_grad(x, (ls, scale, noise), rank=5, lanczos_tol=1e-6)
    assert info.preconditioner_rank == 5 and not info.variance_reduced
    assert MAX_REMAINDER_RATIO == 1.0


@pytest.mark.parametrize("fused", [True, False])
def test_gp_model_gradient_exact_with_full_rank_factor(fused):
    """Through GPyTorch (stock kernel and our fused kernel): every hyperparameter's gradient is exact."""
    torch.manual_seed(0)
    x = torch.rand(150, 3, dtype=F64)
    y = torch.sin(5 * x).sum(-1) + 0.05 * torch.randn(150, dtype=F64)
    lik = gpytorch.likelihoods.GaussianLikelihood().double()

    class GP(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, lik)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(ard_num_dims=3))

        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))

    model = GP().double()
    model.covar_module.base_kernel.lengthscale = 0.4
    lik.noise = 0.01
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    params = list(model.parameters())
    with gpytorch.settings.max_cholesky_size(10**6):
        ref = torch.autograd.grad(mll(model(x), y), params)
    with (
        lgg.settings.use_lanczos_grad(),
        lgg.settings.max_cholesky_size(0),
        lgg.settings.fused_kernels(fused),
        lgg.settings.num_probes(3),
        lgg.settings.preconditioner_tol(0.0),
        lgg.settings.lanczos_tol(1e-10),
        lgg.settings.max_lanczos_iter(300),
        lgg.record_calls() as calls,
    ):
        ours = torch.autograd.grad(mll(model(x), y), params)
    assert calls[-1].variance_reduced
    for o, r in zip(ours, ref, strict=True):
        assert torch.allclose(o, r, rtol=1e-6, atol=1e-8), (o, r)
