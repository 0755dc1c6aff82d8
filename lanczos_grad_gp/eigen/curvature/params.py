"""Parameters and data of the curvature operators: selection, flat <-> per-parameter blocks, batches.

A block of ``c`` flat vectors ``V`` (``(n, c)``, ``n = Σ_p numel(p)``) maps to one ``(c, *p.shape)``
tensor per parameter (the layout of ``torch.autograd.grad(..., is_grads_batched=True)`` and of
``torch.func.vmap``) and back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["select_parameters", "parameter_names", "split_block", "join_block", "Batches", "call_model", "batch_len"]


def select_parameters(model: nn.Module, params: Iterable[Tensor] | None) -> list[Tensor]:
    """``params`` as a list, or every parameter of ``model`` that requires grad; never empty."""
    chosen = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    if not chosen:
        raise ValueError("no parameters to differentiate: the model has none requiring grad (or params is empty).")
    for p in chosen:
        if not isinstance(p, Tensor) or not p.dtype.is_floating_point:
            raise ValueError(f"parameters must be floating-point tensors; got {type(p).__name__}.")
    dtypes = {p.dtype for p in chosen}
    if len(dtypes) != 1:
        raise ValueError(f"all parameters must share one dtype; got {sorted(str(d) for d in dtypes)}.")
    return chosen


def parameter_names(model: nn.Module, params: Sequence[Tensor]) -> list[str]:
    """The names of ``params`` in ``model.named_parameters()`` (for ``torch.func.functional_call``)."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in by_id]
    if missing:
        raise ValueError("method='func' needs params that are parameters of the model (named_parameters()).")
    return [by_id[id(p)] for p in params]


def split_block(V: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """``(n, c)`` -> one ``(c, *p.shape)`` tensor per parameter."""
    out, offset = [], 0
    c = V.shape[-1]
    for p in params:
        k = p.numel()
        out.append(V[offset : offset + k].mT.reshape(c, *p.shape).to(p.dtype))
        offset += k
    return out


def join_block(parts: Sequence[Tensor | None], params: Sequence[Tensor], c: int) -> Tensor:
    """One ``(c, *p.shape)`` tensor (``None``: zero) per parameter -> ``(n, c)``."""
    cols = [
        (torch.zeros(c, p.numel(), dtype=p.dtype, device=p.device) if g is None else g.reshape(c, -1))
        for g, p in zip(parts, params, strict=True)
    ]
    return torch.cat(cols, -1).mT.contiguous()


def batch_len(inputs: Any) -> int:
    """Examples in a batch: the leading dimension of ``inputs`` (of its first tensor for a tuple/list)."""
    first = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
    if not isinstance(first, Tensor) or first.dim() == 0:
        raise ValueError("inputs must be a tensor (or a tuple/list of tensors) with a leading batch dimension.")
    return int(first.shape[0])


def call_model(model: Callable[..., Tensor], inputs: Any) -> Tensor:
    """``model(*inputs)`` for a tuple/list, else ``model(inputs)``."""
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


class Batches:
    """``(inputs, targets)`` batches, re-iterable: one fixed batch, or a data loader read anew at every product.

    Args:
        batches: a sequence of ``(inputs, targets)`` pairs or a re-iterable loader yielding them.
        num_batches: read at most this many batches per product (``None``: all).
        device: where to move the tensors of each batch.
    """

    def __init__(self, batches: Iterable[Any], num_batches: int | None, device: torch.device) -> None:
        if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)):
            raise ValueError(f"num_batches must be a positive int or None; got {num_batches!r}.")
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"num_batches must be a positive int or None; got {num_batches!r}.")
        self._batches = batches
        self._num = num_batches
        self._device = device

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        count = 0
        for batch in self._batches:
            if self._num is not None and count >= self._num:
                break
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError("each batch must be a pair (inputs, targets).")
            count += 1
            yield _to(batch[0], self._device), _to(batch[1], self._device)
        if count == 0:
            raise ValueError("the data loader yielded no batches.")


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(t, device) for t in x)
    return x
