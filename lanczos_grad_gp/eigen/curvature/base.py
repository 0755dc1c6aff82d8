"""``CurvatureOperator``: a symmetric ``n × n`` operator known only through products with blocks of vectors.

Every eigen-utility accepts one (``lanczos``, ``deflated_power_iteration``, ``spectral_density``,
``trace``, ``extreme_eigenvalues``): it calls :meth:`CurvatureOperator.matmul` once per Lanczos block
with all the block's columns, so an implementation can batch its products (a Hessian-vector product
vectorised over the columns costs far less than one backward pass per column). It also has
hessian-eigenthings' interface (``size``, ``matvec``, ``dtype``, ``device``).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["CurvatureOperator"]


class CurvatureOperator(abc.ABC):
    """A symmetric operator ``A`` (``n × n``) given by products ``A V``.

    Subclasses implement :meth:`_product` for an ``(n, c)`` block (no autograd graph in the result).

    Args:
        n: the size (number of parameters for a curvature matrix).
        dtype, device: of the vectors the operator maps.
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int; got {n!r}.")
        self.n = n
        self.dtype = dtype
        self.device = torch.device(device)

    @property
    def shape(self) -> torch.Size:
        """``(n, n)``."""
        return torch.Size((self.n, self.n))

    @property
    def size(self) -> int:
        """``n`` (hessian-eigenthings' name)."""
        return self.n

    @abc.abstractmethod
    def _product(self, V: Tensor) -> Tensor:
        """``A V`` for ``V`` of shape ``(n, c)``; returns ``(n, c)`` in ``self.dtype``."""

    @contextlib.contextmanager
    def cached_graph(self) -> Iterator[None]:
        """A block in which the operator is fixed, so products may share work (here: nothing to share).

        Every eigen function enters it for the length of its call; :class:`.HessianOperator` reuses
        one gradient graph inside it. Modifying the model inside the block is detected where the
        operator caches (in-place version counters) but is best avoided.
        """
        yield

    def matmul(self, V: Tensor) -> Tensor:
        """``A V`` for ``V`` of shape ``(n,)`` or ``(n, c)`` (detached result of the same shape)."""
        if not isinstance(V, Tensor) or V.dim() not in (1, 2) or V.shape[0] != self.n:
            shape = tuple(V.shape) if isinstance(V, Tensor) else type(V).__name__
            raise ValueError(f"expected a ({self.n},) or ({self.n}, c) tensor; got {shape}.")
        vec = V.dim() == 1
        X = V.detach().to(device=self.device, dtype=self.dtype)
        out = self._product(X.unsqueeze(-1) if vec else X).detach()
        return out.squeeze(-1) if vec else out

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for one ``(n,)`` vector (hessian-eigenthings' name)."""
        return self.matmul(v)

    def __matmul__(self, V: Tensor) -> Tensor:
        return self.matmul(V)

    def to_dense(self) -> Tensor:
        """The dense ``(n, n)`` matrix ``A I`` (``n`` products: for tests and small ``n`` only)."""
        return self.matmul(torch.eye(self.n, dtype=self.dtype, device=self.device))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, dtype={self.dtype}, device={self.device})"
