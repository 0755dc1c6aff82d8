r"""``M X`` for a dense symmetric ``M`` (``n × n``) and a few columns ``X`` (``n × c``), in the fastest layout.

Every Lanczos step of the GP routine multiplies the dense kernel matrix by ``c = t + N`` columns
(one right-hand side and ten probes by default). For such skinny products the speed of the CPU
BLAS depends erratically on ``c`` and on the operands' layout. Measured with MKL on two cores
(torch 2.13, median of 6):

========================  =========  ===========  =========  ===========
shape                     ``M @ X``  ``(XᵀM)ᵀ``   padded     padded
                                                  ``M @ X``  ``(XᵀM)ᵀ``
========================  =========  ===========  =========  ===========
n = 5000, c = 11, f64     53 ms      73 ms        122 ms     43 ms
n = 10000, c = 11, f64    200 ms     252 ms       487 ms     163 ms
n = 10000, c = 11, f32    205 ms     127 ms       76 ms      108 ms
========================  =========  ===========  =========  ===========

("padded": ``X`` with zero columns appended up to a multiple of 8, here 16.) Because ``M`` is
symmetric, ``M X = (Xᵀ M)ᵀ``, and zero columns change nothing but the flops, so all four
candidates compute the same product up to rounding. :func:`symmetric_matmul` times each
candidate twice the first time it sees a shape ``(n, c, dtype, threads)`` on CPU (at
``n ≥`` :data:`TUNE_MIN_SIZE`; at most 8 extra products, once per shape and process) and uses the
fastest from then on, so repeated calls are bitwise reproducible within a process. On other
devices, and for small ``n``, it is ``M @ X``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["symmetric_matmul", "TUNE_MIN_SIZE", "layout_choices", "clear_layout_choices"]

#: the smallest ``n`` whose layout is tuned (below it a product costs well under a millisecond)
TUNE_MIN_SIZE = 2048

_PAD = 8

_Key = tuple[int, int, torch.dtype, int]
_choices: dict[_Key, str] = {}


def _plain(M: Tensor, X: Tensor) -> Tensor:
    return M @ X


def _transposed(M: Tensor, X: Tensor) -> Tensor:
    return (X.mT.contiguous() @ M).mT.contiguous()


def _padded(product: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    def run(M: Tensor, X: Tensor) -> Tensor:
        c = X.shape[-1]
        extra = -c % _PAD
        if extra == 0:
            return product(M, X)
        return product(M, torch.nn.functional.pad(X, (0, extra)))[..., :c].contiguous()

    return run


_CANDIDATES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "plain": _plain,
    "transposed": _transposed,
    "padded": _padded(_plain),
    "padded-transposed": _padded(_transposed),
}


def _tune(M: Tensor, X: Tensor) -> str:
    best, best_t = "plain", float("inf")
    for name, product in _CANDIDATES.items():
        if name.startswith("padded") and X.shape[-1] % _PAD == 0:  # the same product as unpadded
            continue
        elapsed = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            product(M, X)
            elapsed = min(elapsed, time.perf_counter() - t0)
        if elapsed < best_t:
            best, best_t = name, elapsed
    return best


def symmetric_matmul(M: Tensor, X: Tensor) -> Tensor:
    """``M @ X`` for a symmetric ``M`` (``(n, n)``) and ``X`` (``(n, c)``), in the layout timed fastest.

    Batched operands (``M.dim() > 2`` or ``X.dim() > 2``), non-CPU tensors, ``n < TUNE_MIN_SIZE`` and a
    graph that needs gradients go to ``M @ X`` unchanged. The caller guarantees ``M = Mᵀ``.
    """
    if (
        M.device.type != "cpu"
        or M.dim() != 2
        or X.dim() != 2
        or M.shape[-1] < TUNE_MIN_SIZE
        or X.dtype != M.dtype
        or (torch.is_grad_enabled() and (M.requires_grad or X.requires_grad))
    ):
        return M @ X
    key = (M.shape[-1], X.shape[-1], M.dtype, torch.get_num_threads())
    choice = _choices.get(key)
    if choice is None:
        choice = _choices[key] = _tune(M, X)
    return _CANDIDATES[choice](M, X)


def layout_choices() -> dict[_Key, str]:
    """The layouts chosen so far: ``(n, c, dtype, threads) -> name`` (a copy, for benchmarks and tests)."""
    return dict(_choices)


def clear_layout_choices() -> None:
    """Forget the chosen layouts (the next product of each shape is timed again)."""
    _choices.clear()
