"""Diagnostics policy: ``record_calls`` and the one rule for warning about unconverged results.

A silent wrong answer is the worst defect a numerical routine can have, so every public Lanczos
function either meets its tolerance or raises a ``NumericalWarning`` (linear_operator's) and
reports ``converged=False`` (GPyTorch warns the same way when CG stops early).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from linear_operator.utils.warnings import NumericalWarning

__all__ = ["NumericalWarning", "record_calls", "record", "warn_not_converged"]

_recorders = threading.local()


@contextmanager
def record_calls() -> Iterator[list[Any]]:
    """Collect an :class:`~lanczos_grad_gp.InvQuadLogdetInfo` for every ``inv_quad_logdet`` call in this thread.

    >>> import lanczos_grad_gp as lgg
    >>> with lgg.record_calls() as calls:
    ...     pass
    >>> calls
    []
    """
    stack = getattr(_recorders, "stack", None)
    if stack is None:
        stack = _recorders.stack = []
    calls: list[Any] = []
    stack.append(calls)
    try:
        yield calls
    finally:
        stack.remove(calls)


def record(info: Any) -> None:
    """Append ``info`` to every open :func:`record_calls` list of this thread."""
    for calls in getattr(_recorders, "stack", ()):
        calls.append(info)


def warn_not_converged(where: str, detail: str, advice: str, *, stacklevel: int = 3) -> None:
    """Emit the package's ``NumericalWarning`` for a result that did not meet its tolerance."""
    warnings.warn(
        f"lanczos_grad_gp.{where}: {detail}; the result may be inaccurate (info.converged is False). {advice}",
        NumericalWarning,
        stacklevel=stacklevel + 1,
    )
