"""The preconditioner seam: a small protocol, the default choice and the override hook."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from linear_operator.operators import AddedDiagLinearOperator, DenseLinearOperator, DiagLinearOperator

import lanczos_grad_gp as lgg
from lanczos_grad_gp.core.preconditioners import (
    LowRankPlusDiagPreconditioner,
    Preconditioner,
    identity_preconditioner,
    select_preconditioner,
)

DT = torch.float64


def _kernel_plus_noise(n: int = 60) -> AddedDiagLinearOperator:
    x = torch.linspace(0, 1, n, dtype=DT).unsqueeze(-1)
    K = torch.exp(-0.5 * (x - x.T).square() / 0.1**2)
    return AddedDiagLinearOperator(DenseLinearOperator(K), DiagLinearOperator(torch.full((n,), 1e-2, dtype=DT)))


@dataclass(frozen=True)
class Jacobi:
    """``P = diag(A)``: a user preconditioner that only implements the protocol."""

    inv_sqrt_diag: torch.Tensor
    logdet: torch.Tensor
    rank: int = 0

    def inv_root(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.inv_sqrt_diag.unsqueeze(-1)

    def inv_root_t(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.inv_sqrt_diag.unsqueeze(-1)


def _jacobi(A, max_rank, trace_tol):
    d = A.diagonal().detach()
    return Jacobi(d.rsqrt(), d.log().sum(-1))


def test_default_choice_and_protocol():
    A = _kernel_plus_noise()
    P = select_preconditioner(A, max_rank=20, trace_tol=0.0)
    assert isinstance(P, LowRankPlusDiagPreconditioner) and isinstance(P, Preconditioner) and P.rank == 20
    dense = select_preconditioner(DenseLinearOperator(A.to_dense()), max_rank=20, trace_tol=0.0)
    assert dense.rank == 0  # not K + D: the identity
    assert isinstance(Jacobi(torch.ones(3), torch.zeros(())), Preconditioner)


@pytest.mark.parametrize("override", [_jacobi, lambda A, r, t: identity_preconditioner(A), lambda A, r, t: None])
def test_override_is_used_and_exact(override):
    A = _kernel_plus_noise()
    y = torch.sin(torch.linspace(0, 6, 60, dtype=DT))
    M = A.to_dense()
    ref_iq, ref_ld = float(y @ torch.linalg.solve(M, y)), float(torch.logdet(M))
    with lgg.settings.preconditioner_override(override), lgg.settings.num_probes(64), lgg.settings.lanczos_tol(1e-10):
        with lgg.record_calls() as calls:
            iq, ld = lgg.inv_quad_logdet(A, y.unsqueeze(-1), logdet=True)
    if override(A, 1, 0.0) is not None:  # Jacobi and the identity have no low-rank part
        assert calls[0].preconditioner_rank == 0
    else:  # None from the override: the default pivoted Cholesky
        assert calls[0].preconditioner_rank > 0
    assert abs(float(iq) - ref_iq) < 1e-7 * ref_iq and abs(float(ld) - ref_ld) < 1e-7 * abs(ref_ld)


def test_override_must_return_a_preconditioner():
    with lgg.settings.preconditioner_override(lambda A, r, t: "nope"), pytest.raises(TypeError, match="inv_root"):
        lgg.inv_quad_logdet(_kernel_plus_noise(), logdet=True)
    with pytest.raises(ValueError, match="callable"):
        lgg.settings.preconditioner_override(3)
