r"""``HessianOperator``: the Hessian ``H = ∇²_θ L(θ)`` of a model's loss as a batched operator.

``H V`` for a block ``V = [v_1, …, v_c]`` of the Lanczos iteration, per batch (averaged as in
:mod:`.averaged`), by one of

* ``method="autograd"`` (default): double backward (Pearlmutter 1994). One forward and one backward
  pass with ``create_graph=True`` give ``g(θ) = ∇_θ L`` with its graph; then
  ``H v = ∇_θ (g^T v)`` for all ``c`` columns in ONE vectorised call
  ``torch.autograd.grad(g, θ, grad_outputs=V, is_grads_batched=True)`` (a loop over the columns
  where an op of the model has no batching rule). Works with any module autograd works with.
* ``method="func"``: torch.func, ``H v = vjp(grad(L), θ)(v)`` (reverse-over-reverse; ``H`` is
  symmetric), the pullback built once per batch and ``vmap``-ed over the columns (needs a model
  ``torch.func.functional_call`` can run).

Example:
    >>> import torch
    >>> from lanczos_grad_gp.eigen import lanczos
    >>> from lanczos_grad_gp.eigen.curvature import HessianOperator
    >>> g = torch.Generator().manual_seed(0)
    >>> model = torch.nn.Linear(3, 1).double()
    >>> x = torch.randn(20, 3, generator=g, dtype=torch.float64)
    >>> y = torch.randn(20, 1, generator=g, dtype=torch.float64)
    >>> H = HessianOperator(model, torch.nn.MSELoss(), x, y)  # least squares: H = 2/N [x 1]^T [x 1]
    >>> X1 = torch.cat([x, torch.ones(20, 1, dtype=torch.float64)], 1)
    >>> bool(torch.allclose(H.to_dense(), 2 * X1.T @ X1 / 20))
    True
    >>> top = lanczos(H, k=2, seed=0)
    >>> bool(torch.allclose(top.eigenvalues, torch.linalg.eigvalsh(2 * X1.T @ X1 / 20).flip(0)[:2]))
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .averaged import AveragedCurvature, LossFn
from .params import call_model

__all__ = ["HessianOperator"]

HvpMethod = Literal["autograd", "func"]


class HessianOperator(AveragedCurvature):
    """Hessian of ``loss_fn(model(inputs), targets)`` w.r.t. the parameters (module docstring).

    Args:
        model: the ``torch.nn.Module`` (put it in ``eval()`` mode: dropout makes ``H`` random).
        loss_fn: ``(outputs, targets) -> scalar``, e.g. ``torch.nn.MSELoss()``.
        inputs: a tensor (``model(inputs)``) or a tuple/list of tensors (``model(*inputs)``).
        targets: whatever ``loss_fn`` takes as its second argument.
        params: the parameters (a subset is a diagonal block of the Hessian); default: all that
            require grad. ``n`` is their total number of entries, in this order.
        method: ``"autograd"`` or ``"func"``.

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
        method: HvpMethod = "autograd",
    ) -> None:
        self._init(model, loss_fn, [(inputs, targets)], params=params, method=method, num_batches=None)

    def _init(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[Any],
        *,
        params: Iterable[Tensor] | None,
        method: str,
        num_batches: int | None,
    ) -> None:
        if method not in ("autograd", "func"):
            raise ValueError(f"method must be 'autograd' or 'func'; got {method!r}.")
        self.method = method
        super().__init__(model, loss_fn, batches, params=params, num_batches=num_batches, needs_names=method == "func")

    @classmethod
    def from_loader(
        cls,
        model: nn.Module,
        loss_fn: LossFn,
        loader: Iterable[Any],
        *,
        params: Iterable[Tensor] | None = None,
        method: HvpMethod = "autograd",
        num_batches: int | None = None,
    ) -> HessianOperator:
        """The Hessian of the data-set loss ``Σ_b (|b|/N) loss_b`` over a re-iterable loader of ``(inputs, targets)``.

        Every product reads the loader once (``num_batches``: only the first batches). A shuffling
        loader gives a different operator at each product; use a fixed order.
        """
        op = cls.__new__(cls)
        op._init(model, loss_fn, loader, params=params, method=method, num_batches=num_batches)
        return op

    def _batch_product(self, inputs: Any, targets: Any, vs: Sequence[Tensor]) -> Sequence[Tensor | None]:
        if self.method == "func":
            return self._hvp_func(inputs, targets, vs)
        return self._hvp_autograd(inputs, targets, vs)

    def _hvp_autograd(self, inputs: Any, targets: Any, vs: Sequence[Tensor]) -> list[Tensor | None]:
        c = vs[0].shape[0]
        with torch.enable_grad():
            loss = self.loss_fn(call_model(self.model, inputs), targets)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]  # others: zero rows of H
            out: list[Tensor | None] = [None] * len(self.params)
            if not live:
                return out
            gs = [grads[i] for i in live]
            ps = [self.params[i] for i in live]
            try:
                hv = torch.autograd.grad(
                    gs, ps, grad_outputs=[vs[i] for i in live], is_grads_batched=True, allow_unused=True
                )
            except RuntimeError:  # an op without a batching rule: one double-backward per column
                cols = [
                    torch.autograd.grad(
                        gs, ps, grad_outputs=[vs[i][j] for i in live], retain_graph=j + 1 < c, allow_unused=True
                    )
                    for j in range(c)
                ]
                hv = tuple(
                    None if cols[0][a] is None else torch.stack([col[a] for col in cols]) for a in range(len(live))
                )
        for i, h in zip(live, hv, strict=True):
            out[i] = h
        return out

    def _hvp_func(self, inputs: Any, targets: Any, vs: Sequence[Tensor]) -> list[Tensor | None]:
        f = self.functional_outputs(inputs)
        loss_fn = self.loss_fn
        primals = tuple(p.detach() for p in self.params)

        def loss(*ps: Tensor) -> Tensor:
            return loss_fn(f(*ps), targets)

        grad = torch.func.grad(loss, argnums=tuple(range(len(primals))))
        # reverse-over-reverse: H is symmetric, so the vjp of the gradient is H v; ONE forward and
        # backward pass, then the double-backward vmap-ed over the columns
        _, vjp_fn = torch.func.vjp(grad, *primals)
        return list(torch.func.vmap(lambda *v: vjp_fn(v))(*vs))
