"""GPyTorch's KeOps kernels under the flag (skipped when pykeops is not installed).

KeOps kernels reach our routine as a ``KernelLinearOperator`` evaluated by KeOps (never an n×n
tensor); the routine only uses ``_matmul``, ``diagonal``, ``_get_indices`` and
``_bilinear_derivative``, so values and gradients must equal the dense kernel's path.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch

import lanczos_grad_gp as lgg

pytest.importorskip("pykeops", reason="pykeops is not installed (pip install 'lanczos_grad_gp[keops]')")


class _GP(gpytorch.models.ExactGP):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, keops: bool) -> None:
        super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.ConstantMean()
        base = gpytorch.kernels.keops.RBFKernel if keops else gpytorch.kernels.RBFKernel
        self.covar_module = gpytorch.kernels.ScaleKernel(base(ard_num_dims=x.shape[-1]))

    def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def test_keops_kernel_matches_dense_under_flag() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(300, 3, generator=g, dtype=torch.float64)
    y = torch.sin(4 * x).sum(-1)
    results = []
    for keops in (False, True):
        model = _GP(x, y, keops).double()
        model.train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
        # GPyTorch switches to KeOps only above max_cholesky_size; our routine ignores that setting.
        # Exact trace (num_probes >= n) and a tight tolerance make both results exact to round-off.
        with (
            gpytorch.settings.max_cholesky_size(100),
            lgg.settings.use_lanczos_grad(),
            lgg.settings.num_probes(300),
            lgg.settings.lanczos_tol(1e-10),
        ):
            value = mll(model(x), y)
            grads = torch.autograd.grad(value, list(model.parameters()))
        results.append((value.detach(), torch.cat([gr.reshape(-1) for gr in grads])))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-8, atol=1e-10)
