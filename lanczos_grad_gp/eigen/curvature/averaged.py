r"""The data-averaged curvature of a model's loss: the shared part of the Hessian and GGN operators.

For batches ``b`` of sizes ``|b|`` and a mean-reduced loss ``L_b(θ) = loss_fn(model_θ(x_b), y_b)``, the
full-data loss is ``L(θ) = Σ_b w_b L_b(θ)`` with ``w_b = |b| / Σ_b' |b'|`` (exact also for a ragged last
batch), so every curvature product is ``C V = Σ_b w_b C_b V``: one pass over the data per Lanczos
block, with all ``c`` columns of the block in each batch's product.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .base import CurvatureOperator
from .params import Batches, batch_len, parameter_names, select_parameters, split_block

__all__ = ["AveragedCurvature", "LossFn"]

#: ``loss_fn(outputs, targets) -> scalar`` (e.g. ``torch.nn.MSELoss()``, ``torch.nn.CrossEntropyLoss()``)
LossFn = Callable[[Tensor, Any], Tensor]


class AveragedCurvature(CurvatureOperator):
    """Base of :class:`HessianOperator` and :class:`GGNOperator`: parameters, batches, averaging.

    Subclasses implement :meth:`_batch_product` ``(inputs, targets, [(c, *p.shape)]) -> [(c, *p.shape)]``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[Any],
        *,
        params: Iterable[Tensor] | None,
        num_batches: int | None = None,
        needs_names: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (outputs, targets) -> scalar; got {type(loss_fn).__name__}.")
        self.model = model
        self.loss_fn = loss_fn
        self.params = select_parameters(model, params)
        self.names = parameter_names(model, self.params) if needs_names else None
        first = self.params[0]
        super().__init__(sum(p.numel() for p in self.params), first.dtype, first.device)
        self.batches = Batches(batches, num_batches, self.device)

    @abc.abstractmethod
    def _batch_product(self, inputs: Any, targets: Any, vs: Sequence[Tensor]) -> Sequence[Tensor | None]:
        """``C_b V`` of one batch, per parameter ``(c, *p.shape)`` (``None``: zero)."""

    def _product(self, V: Tensor) -> Tensor:
        c = V.shape[-1]
        vs = split_block(V, self.params)
        total: Tensor | None = None
        count = 0
        for inputs, targets in self.batches:
            size = batch_len(inputs)
            with torch.enable_grad():  # curvature products differentiate even inside a caller's no_grad
                parts = self._batch_product(inputs, targets, vs)
            flat = torch.cat(
                [
                    (torch.zeros(c, p.numel(), dtype=p.dtype, device=p.device) if g is None else g.reshape(c, -1))
                    for g, p in zip(parts, self.params, strict=True)
                ],
                -1,
            ).detach()
            total = size * flat if total is None else total + size * flat
            count += size
        assert total is not None  # Batches raises on an empty loader
        return (total / count).mT.contiguous().to(self.dtype)

    def functional_outputs(self, inputs: Any) -> Callable[..., Tensor]:
        """``θ_1, …, θ_P -> model_θ(inputs)`` by ``torch.func.functional_call`` (the model is not modified)."""
        names = self.names or parameter_names(self.model, self.params)
        args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)

        def outputs(*ps: Tensor) -> Tensor:
            return torch.func.functional_call(self.model, dict(zip(names, ps, strict=True)), args)

        return outputs
