"""``LanczosOptions``: the numerical options of ``quad_form`` / ``bilinear_form``, validated early."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core.engine import EngineOptions, default_tol

__all__ = ["LanczosOptions"]


@dataclass(frozen=True)
class LanczosOptions:
    """Numerical options of :func:`quad_form` / :func:`bilinear_form`.

    Attributes:
        max_iter: cap on Lanczos steps (``None``: ``min(10 n, 1000)``). It may exceed ``n``: without
            reorthogonalization the recurrence can need more than ``n`` steps.
        tol: stop a column when its relative function residual is ``≤ tol`` (``None``:
            :func:`default_tol`; ``0``: run ``max_iter`` steps without a stopping test).
        reorthogonalize: full reorthogonalization (off by default; not needed for stability).
        check_every: steps between convergence checks (host syncs).
        compress_tol: share of ``Σ|D|`` of the gradient matrix ``M`` that may be dropped when
            compressing the gradient factors (``None``: ``tol / 100``; the GP routine uses ``tol``,
            where the probe noise dominates).
    """

    max_iter: int | None = None
    tol: float | None = None
    reorthogonalize: bool = False
    check_every: int = 10
    compress_tol: float | None = None

    def __post_init__(self) -> None:
        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_real(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        if self.max_iter is not None and (not is_int(self.max_iter) or self.max_iter < 1):
            raise ValueError(f"max_iter must be a positive integer or None; got {self.max_iter!r}.")
        if self.tol is not None and not (is_real(self.tol) and 0 <= self.tol < 1):
            raise ValueError(f"tol must be a float in [0, 1) or None; got {self.tol!r}.")
        if not is_int(self.check_every) or self.check_every < 1:
            raise ValueError(f"check_every must be a positive integer; got {self.check_every!r}.")
        if self.compress_tol is not None and not (is_real(self.compress_tol) and 0 <= self.compress_tol < 1):
            raise ValueError(f"compress_tol must be a float in [0, 1) or None; got {self.compress_tol!r}.")
        if not isinstance(self.reorthogonalize, bool):
            raise ValueError(f"reorthogonalize must be a bool; got {self.reorthogonalize!r}.")

    def resolved(self, n: int, dtype: torch.dtype) -> tuple[int, float, float]:
        """``(max_iter, tol, compress_tol)`` with defaults filled in for size ``n`` and ``dtype`` (no cap at ``n``)."""
        max_iter = min(10 * n, 1000) if self.max_iter is None else self.max_iter
        tol = default_tol(dtype) if self.tol is None else self.tol
        compress = tol / 100 if self.compress_tol is None else self.compress_tol
        return max_iter, tol, compress

    def engine_options(self, n: int, dtype: torch.dtype) -> EngineOptions:
        """The resolved :class:`~lanczos_grad_gp.core.engine.EngineOptions`."""
        max_iter, tol, compress = self.resolved(n, dtype)
        return EngineOptions(max_iter, tol, self.reorthogonalize, self.check_every, compress)
