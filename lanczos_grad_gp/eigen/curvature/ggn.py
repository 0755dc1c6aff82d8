r"""``GGNOperator``: the generalised Gauss–Newton matrix ``G = J^T H_ℓ J`` of a model's loss.

With ``f(θ) = model_θ(x)`` (outputs), ``J = ∂f/∂θ`` and ``H_ℓ = ∂²loss/∂f²`` (Schraudolph 2002;
Martens 2020), ``G = Σ_b w_b J_b^T H_{ℓ,b} J_b`` is positive semi-definite for a convex loss and
equals the Fisher information for the canonical likelihoods (MSE: Gaussian, cross-entropy:
categorical). One product per batch, vectorised over the ``c`` columns of the Lanczos block with
``torch.func.vmap``:

.. math::
    G v = J^T \bigl(H_ℓ (J v)\bigr):\quad J v = \mathrm{jvp}(f, θ, v),\
    H_ℓ u = \mathrm{vjp}(∇_f ℓ, f)(u),\ J^T w = \mathrm{vjp}(f, θ)(w).

Example:
    >>> import torch
    >>> from lanczos_grad_gp.eigen.curvature import GGNOperator, HessianOperator
    >>> g = torch.Generator().manual_seed(0)
    >>> model = torch.nn.Linear(3, 2).double()
    >>> x = torch.randn(10, 3, generator=g, dtype=torch.float64)
    >>> y = torch.randn(10, 2, generator=g, dtype=torch.float64)
    >>> G = GGNOperator(model, torch.nn.MSELoss(), x, y)  # a linear model: GGN = Hessian
    >>> bool(torch.allclose(G.to_dense(), HessianOperator(model, torch.nn.MSELoss(), x, y).to_dense()))
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .averaged import AveragedCurvature, LossFn

__all__ = ["GGNOperator"]


class GGNOperator(AveragedCurvature):
    """Generalised Gauss–Newton matrix of ``loss_fn(model(inputs), targets)`` (module docstring).

    Args:
        model: a ``torch.nn.Module`` that ``torch.func.functional_call`` can run.
        loss_fn: ``(outputs, targets) -> scalar``.
        inputs, targets, params: as :class:`~lanczos_grad_gp.eigen.curvature.HessianOperator`.

    Use :meth:`from_loader` for a data loader (the average over its batches).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inputs: Any,
        targets: Any,
        *,
        params: Iterable[Tensor] | None = None,
    ) -> None:
        super().__init__(model, loss_fn, [(inputs, targets)], params=params, needs_names=True)

    @classmethod
    def from_loader(
        cls,
        model: nn.Module,
        loss_fn: LossFn,
        loader: Iterable[Any],
        *,
        params: Iterable[Tensor] | None = None,
        num_batches: int | None = None,
    ) -> GGNOperator:
        """The GGN of the data-set loss ``Σ_b (|b|/N) loss_b`` over a re-iterable loader of ``(inputs, targets)``."""
        op = cls.__new__(cls)
        AveragedCurvature.__init__(op, model, loss_fn, loader, params=params, num_batches=num_batches, needs_names=True)
        return op

    def _batch_product(self, inputs: Any, targets: Any, vs: Sequence[Tensor]) -> Sequence[Tensor | None]:
        f = self.functional_outputs(inputs)
        loss_fn = self.loss_fn
        primals = tuple(p.detach() for p in self.params)
        with torch.enable_grad():
            out, vjp_fn = torch.func.vjp(f, *primals)
        out = out.detach()

        _, hess_fn = torch.func.vjp(torch.func.grad(lambda z: loss_fn(z, targets)), out)  # u -> H_ℓ u (symmetric)

        def ggn_v(*v: Tensor) -> tuple[Tensor, ...]:
            jv = torch.func.jvp(f, primals, v)[1]  # J v: (*outputs), forward mode
            (hjv,) = hess_fn(jv)  # H_ℓ J v
            return vjp_fn(hjv)  # J^T H_ℓ J v

        return list(torch.func.vmap(ggn_v)(*vs))
