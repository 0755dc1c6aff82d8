"""linear_operator's own LinearOperatorTestCase suite on LanczosGradLinearOperator.

The suite checks every operation (matmul, getitem, diag, solves, root decompositions, …)
and their gradients against the dense matrix. ``inv_quad_logdet`` / ``logdet`` run our
routine: the test matrices are small (n ≤ num_probes), so the trace is exact and the values
agree with the dense ones to the Lanczos tolerance (1e-6 in float64 / 1e-4 in float32), well
inside linear_operator's own tolerances for these tests.
"""

from __future__ import annotations

import unittest

import pytest
import torch
from conftest import LinearOperatorDefaults
from linear_operator.operators import AddedDiagLinearOperator, DenseLinearOperator, DiagLinearOperator
from linear_operator.test.linear_operator_test_case import LinearOperatorTestCase

import lanczos_grad_gp as lgg


class TestLanczosGradLinearOperator(LinearOperatorDefaults, LinearOperatorTestCase, unittest.TestCase):
    seed = 0
    should_test_sample = True
    should_call_cg = True  # solves are the base's (CG); inv_quad_logdet is ours (checked below)
    should_call_lanczos = True
    should_call_lanczos_diagonalization = True

    def create_linear_op(self) -> lgg.LanczosGradLinearOperator:
        x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
        kernel = torch.exp(-0.5 * torch.cdist(x, x).square()) + 0.1 * torch.eye(5)
        kernel.requires_grad_(True)
        noise = torch.full((5,), 0.5, requires_grad=True)
        return lgg.LanczosGradLinearOperator(
            AddedDiagLinearOperator(DenseLinearOperator(kernel), DiagLinearOperator(noise))
        )

    def evaluate_linear_op(self, linear_op: lgg.LanczosGradLinearOperator) -> torch.Tensor:
        return linear_op.base.to_dense()

    # The base-class versions assert that CG was called for the non-Cholesky branch; ours
    # replaces CG, so check our values and gradients against the dense matrix instead.
    def _test_inv_quad_logdet(self, reduce_inv_quad=True, cholesky=False, linear_op=None):
        linear_op = self.create_linear_op() if linear_op is None else linear_op
        dense = self.evaluate_linear_op(linear_op).detach().requires_grad_(True)
        rhs = torch.randn(5, 2, generator=torch.Generator().manual_seed(2), dtype=linear_op.dtype)
        iq, ld = linear_op.inv_quad_logdet(rhs, logdet=True, reduce_inv_quad=reduce_inv_quad)
        iq_ref = (rhs * torch.linalg.solve(dense, rhs)).sum(-2)
        iq_ref = iq_ref.sum(-1) if reduce_inv_quad else iq_ref
        ld_ref = torch.logdet(dense)
        torch.testing.assert_close(iq, iq_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ld, ld_ref, rtol=1e-4, atol=1e-4)
        (iq.sum() + ld).backward()
        (iq_ref.sum() + ld_ref).backward()
        kernel_grad = linear_op.base._linear_op.tensor.grad
        noise_grad = linear_op.base._diag_tensor._diag.grad
        dense_grad = dense.grad
        torch.testing.assert_close(kernel_grad, dense_grad, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(noise_grad, dense_grad.diagonal(), rtol=1e-3, atol=1e-3)


def test_wrapper_uses_our_routine_without_flag() -> None:
    x = torch.randn(40, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    K = torch.exp(-0.5 * torch.cdist(x, x).square()) + 0.1 * torch.eye(40, dtype=torch.float64)
    op = lgg.LanczosGradLinearOperator(K)
    with lgg.record_calls() as calls:
        ld = op.logdet()
    assert len(calls) == 1 and not calls[0].exact_trace
    # stochastic trace: within 4 standard errors of the probe average (the Lanczos error is ~1e-6)
    assert abs(float(ld - torch.logdet(K))) <= 4 * float(calls[0].logdet_standard_error)
    with lgg.settings.num_probes(40), lgg.record_calls() as calls:  # n <= num_probes: exact trace
        ld = op.logdet()
    assert calls[0].exact_trace
    torch.testing.assert_close(ld, torch.logdet(K), rtol=1e-6, atol=1e-6)


def test_wrapper_rejects_non_square() -> None:
    with pytest.raises(ValueError, match="square"):
        lgg.LanczosGradLinearOperator(torch.randn(3, 4))
