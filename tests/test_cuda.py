"""The same computations on a CUDA device agree with the CPU (skipped without CUDA).

Everything must stay on the operator's device: no silent host round trips, results on the device.
"""

from __future__ import annotations

import pytest
import torch

import lanczos_grad_gp as lgg

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine"),
]


def _kernel(n: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    x = torch.rand(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    K = torch.exp(-0.5 * torch.cdist(x, x).square() / 0.3**2) + 0.1 * torch.eye(n, dtype=torch.float64)
    return K.to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quad_form_on_cuda_matches_cpu(dtype) -> None:
    v = torch.randn(300, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = {}
    for device in ("cpu", "cuda"):
        A = _kernel(300, device, dtype).requires_grad_(True)
        value = lgg.quad_form(A, v.to(device=device, dtype=dtype), "log", max_iter=60)
        (grad,) = torch.autograd.grad(value.sum(), A)
        assert value.device.type == device and grad.device.type == device
        out[device] = (value.double().cpu(), grad.double().cpu())
    tol = 1e-8 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(out["cuda"][0], out["cpu"][0], rtol=tol, atol=tol)
    torch.testing.assert_close(out["cuda"][1], out["cpu"][1], rtol=10 * tol, atol=10 * tol)


def test_gp_flag_on_cuda_matches_cpu() -> None:
    from linear_operator.operators import AddedDiagLinearOperator, DenseLinearOperator, DiagLinearOperator

    y = torch.randn(400, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    res = {}
    for device in ("cpu", "cuda"):
        K = _kernel(400, device, torch.float64)
        noise = torch.full((400,), 0.05, dtype=torch.float64, device=device)
        A = AddedDiagLinearOperator(DenseLinearOperator(K), DiagLinearOperator(noise))
        iq, ld = lgg.inv_quad_logdet(A, y.to(device), logdet=True)  # probes drawn on the CPU: same on both
        assert iq.device.type == device
        res[device] = torch.stack([iq, ld]).cpu()
    torch.testing.assert_close(res["cuda"], res["cpu"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dense", [True, False])
def test_fused_kernel_model_on_cuda_matches_cpu(dense) -> None:
    """The fused stationary kernel (dense matrix or row blocks) gives the CPU value and gradient on CUDA."""
    import gpytorch

    from lanczos_grad_gp.app.training import make_model

    x = torch.rand(500, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.sin(6 * x).sum(-1)
    out = {}
    for device in ("cpu", "cuda"):
        model = make_model(x.to(device), y.to(device))
        model.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=2.5, ard_num_dims=3))
        model = model.to(device=device, dtype=torch.float64)
        model.train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
        size = 10**6 if dense else 10
        with lgg.settings.use_lanczos_grad(), lgg.settings.max_dense_kernel_size(size):
            value = mll(model(x.to(device)), y.to(device))
            grads = torch.autograd.grad(value, list(model.parameters()))
        assert value.device.type == device and all(g.device.type == device for g in grads)
        out[device] = torch.cat([value.reshape(1), *(g.reshape(-1) for g in grads)]).cpu()
    torch.testing.assert_close(out["cuda"], out["cpu"], rtol=1e-6, atol=1e-8)
