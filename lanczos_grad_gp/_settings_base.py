"""Base classes of :mod:`lanczos_grad_gp.settings`: a thread-local value with a process-wide default, and a flag.

A context entered in one thread is invisible to the others; every setting has a process-wide default that
threads fall back to (``set_default``); contexts nest and restore the previous value on exit, also when the
body raises.
"""

from __future__ import annotations

import numbers
import threading
from typing import Any, ClassVar

__all__ = ["_thread_local_value", "_thread_local_flag", "_positive_int"]

_UNSET = object()


class _thread_local_value:
    """Base class: a value with a process-wide default and a thread-local override stack.

    Subclasses set ``_default`` and may override ``_validate``.
    """

    _default: ClassVar[Any] = None
    _local: ClassVar[threading.local]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._local = threading.local()

    @classmethod
    def _validate(cls, value: Any) -> Any:
        return value

    @classmethod
    def value(cls) -> Any:
        """The value in force in this thread."""
        return getattr(cls._local, "value", cls._default)

    @classmethod
    def set_default(cls, value: Any) -> None:
        """Change the process-wide default (what threads without an open context see)."""
        cls._default = cls._validate(value)

    def __init__(self, value: Any) -> None:
        self._value = self._validate(value)

    def __enter__(self) -> _thread_local_value:
        local = self.__class__._local
        # The saved values live in the thread-local too: one context object shared by several
        # threads (a module-level ``flag = use_lanczos_grad()``) restores each thread's own value.
        if not hasattr(local, "saved"):
            local.saved = []
        local.saved.append(getattr(local, "value", _UNSET))
        local.value = self._entered_value()
        return self

    def _entered_value(self) -> Any:
        return self._value

    def __exit__(self, *exc: Any) -> bool:
        local = self.__class__._local
        prev = local.saved.pop()
        if prev is _UNSET:
            del local.value
        else:
            local.value = prev
        return False


class _thread_local_flag(_thread_local_value):
    """A boolean feature flag: ``with flag():`` turns it on; ``flag.on()`` asks whether it is on."""

    _default: ClassVar[Any] = False

    @classmethod
    def _validate(cls, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"{cls.__name__} expects a bool state; got {value!r}.")
        return value

    @classmethod
    def on(cls) -> bool:
        """Whether the flag is on in this thread."""
        return bool(cls.value())

    @classmethod
    def off(cls) -> bool:
        """Whether the flag is off in this thread."""
        return not cls.on()

    def __init__(self, state: bool = True) -> None:
        super().__init__(state)


def _positive_int(name: str, value: Any, allow_zero: bool = False) -> int:
    # numbers.Integral admits numpy integers; bool is an int subclass but never a sensible count.
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name} must be {kind} integer; got {value!r}.")
    return int(value)
