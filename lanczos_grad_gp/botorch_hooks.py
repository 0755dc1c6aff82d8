"""Under the flag, each of BoTorch's L-BFGS runs optimizes one deterministic objective.

L-BFGS-B's line search assumes that the values and gradients it is given belong to one smooth
function. On the Lanczos route the log-determinant is an estimate built with a preconditioner
``P(θ)``; rebuilt at every ``θ`` (new pivots, a new factor), consecutive evaluations belong to
different estimators, and the line search fails (``ABNORMAL``) or stops on a worse point. The
wrappers installed here open a fresh :class:`~lanczos_grad_gp.settings.deterministic_objective`
scope around each run, so a rank-limited preconditioner and the probes of the run's first such
evaluation hold for the whole run (docs/mathematics.md, "Deterministic objectives").

A preconditioner fixed at the start point can suit the end point badly (a fit typically lowers
the noise by orders of magnitude): the estimate's variance grows away from where it was built, and
the run ends on the optimum of a noisier estimate. So after each run the estimator is rebuilt at the
end point (a new scope: new preconditioner, same probes) and evaluated once; if that value differs
from the run's final value by more than :data:`REBUILD_TOL`, or the run replaced a held factor (one that
left a call unconverged) or handed a covariance to dense Cholesky (the run's objective changed there, and
L-BFGS's curvature pairs mix the two objectives), the run is repeated from there, at most :data:`MAX_RUNS`
runs in all. A preconditioner built at ``θ`` makes the estimate exact at ``θ`` up to ``O(ρ)`` when it meets
its trace tolerance, and reruns only happen after runs that held a rank-limited one fixed or changed their
objective; their estimator is then built near the optimum, where its spread is smallest. Each run is one
deterministic objective, which is what the line search needs. Reruns never follow a run that
stopped on ``maxiter``, a timeout or a callback, and share the caller's ``timeout_sec``.

Wrapped, while :class:`~lanczos_grad_gp.settings.use_lanczos_grad` is on (otherwise the original
runs untouched):

* ``botorch.optim.core.scipy_minimize`` (and the name imported into ``botorch.optim.fit``):
  ``fit_gpytorch_mll_scipy``, the default optimizer of ``fit_gpytorch_mll``; every retry from
  prior samples is a new run, hence a new scope;
* ``botorch.optim.batched_lbfgs_b.fmin_l_bfgs_b_batched``: the batched independent fits of
  multi-output models. ``botorch.generation.gen`` binds this name when it is imported, so its
  acquisition optimization is wrapped too when it is imported after ``lanczos_grad_gp``; that has no
  effect (no log-determinant is estimated there, so no block holds anything and no rerun happens).
  Copies bound by ``from ... import`` before ``lanczos_grad_gp`` was imported are not wrapped, and
  those bound after it keep the wrapper after ``uninstall()`` (it then calls the original directly).

BoTorch is an optional dependency and importing it changes GPyTorch's global settings, so this
module never imports it: :func:`install_if_imported` patches only modules already in
``sys.modules``, and a post-import hook (a ``sys.meta_path`` finder that only watches the three
module names above) patches them when BoTorch loads them later, lazily or not. So ``import botorch``
before or after ``import lanczos_grad_gp`` both work.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from linear_operator.utils.warnings import NumericalWarning

from . import settings

__all__ = ["enable", "install_if_imported", "uninstall", "installed_targets"]

#: (module, attribute) pairs that are L-BFGS runs of BoTorch's model fitting
TARGETS: tuple[tuple[str, str], ...] = (
    ("botorch.optim.core", "scipy_minimize"),
    ("botorch.optim.fit", "scipy_minimize"),
    ("botorch.optim.batched_lbfgs_b", "fmin_l_bfgs_b_batched"),
)

#: L-BFGS runs per call at most: the first, and reruns from the previous run's end point
MAX_RUNS = 4
#: a rerun happens when the estimator rebuilt at the end point differs from the run's final value by
#: more than this, relative to ``max(1, |value|)`` (BoTorch's losses are per data point: 1e-3 nats/point)
REBUILD_TOL = 1e-3

_lock = threading.Lock()
_originals: dict[tuple[str, str], Callable[..., Any]] = {}
_enabled = False  # set by lanczos_grad_gp.patching.install(), cleared by its uninstall()


def _active() -> bool:
    return _enabled and settings.use_lanczos_grad.on()


def _fixed_parts_used() -> bool:
    """Whether the open block held a preconditioner fixed (a rank-limited, stochastic estimate; a run whose
    objective changed, :func:`_factor_replaced`, is rerun whether or not it held one)."""
    return settings.deterministic_objective.value().calls > 0


def _factor_replaced() -> bool:
    """Whether the open block replaced a held factor that left a call unconverged, or handed a covariance to
    dense Cholesky after earlier calls (either way the run's objective changed)."""
    scope = settings.deterministic_objective.value()
    return scope.refreshed > 0 or scope.dense_switches > 0


def _rerun_failed(error: BaseException) -> None:
    warnings.warn(
        f"lanczos_grad_gp: a rerun of BoTorch's L-BFGS with the estimator rebuilt at the previous run's end "
        f"point failed ({type(error).__name__}: {error}); the previous run's result is kept.",
        NumericalWarning,
        stacklevel=3,
    )


def _scipy_minimize_runs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``scipy_minimize`` in fresh deterministic-objective scopes, rerun while the estimator moved.

    Reruns only follow a run that ended by itself (not on ``maxiter``, a timeout or a callback's
    ``StopIteration``: status ``STOPPED``), get what is left of ``timeout_sec``, and are skipped when the
    run held no preconditioner fixed. Errors in the check or a rerun keep the previous result (warned).
    """

    @functools.wraps(fn)
    def run(closure: Any, parameters: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if not _active():
            return fn(closure, parameters, *args, **kwargs)
        start = time.monotonic()
        call = {"args": args, "kwargs": kwargs}

        def next_run(result: Any) -> _Rerun | None:
            if getattr(result.status, "name", "") == "STOPPED":
                return None
            a, kw = _without_x0(call["args"], call["kwargs"])  # the run wrote its end point into the parameters
            timeout = kw.get("timeout_sec", a[5] if len(a) > 5 else None)
            if timeout is not None:
                left = timeout - (time.monotonic() - start)
                if left <= 0:
                    return None
                if len(a) > 5:
                    a = (*a[:5], left, *a[6:])
                else:
                    kw = {**kw, "timeout_sec": left}
            call["args"], call["kwargs"] = a, kw
            snapshot = {name: p.detach().clone() for name, p in parameters.items()}
            return (
                functools.partial(_closure_value, closure),
                result.fval,
                functools.partial(fn, closure, parameters, *a, **kw),
                functools.partial(_restore_parameters, parameters, snapshot),
            )

        return _repeat_runs(functools.partial(fn, closure, parameters, *args, **kwargs), next_run)

    run.__lgg_original__ = fn  # type: ignore[attr-defined]
    return run


#: what a rerun needs: (value at the end point, the run's final value, run again, restore the end point)
_Rerun = tuple[Callable[[], Any], Any, Callable[[], Any], Callable[[], None]]


def _repeat_runs(first: Callable[[], Any], next_run: Callable[[Any], _Rerun | None]) -> Any:
    """Run ``first`` in a fresh block, then rerun (at most :data:`MAX_RUNS` runs in all) while it held parts
    fixed or changed its objective, ``next_run(result)`` plans a rerun (``None``: the run was stopped, or no
    time is left) and the rebuilt estimator's value moved or the run's objective changed
    (:func:`_rerun_if_moved`)."""
    with settings.deterministic_objective():
        result = first()
        changed = _factor_replaced()
        rerun = _fixed_parts_used() or changed
    for _ in range(MAX_RUNS - 1):
        plan = next_run(result) if rerun else None
        if plan is None:
            return result
        new, rerun, changed = _rerun_if_moved(*plan, always=changed)
        if new is None:
            return result
        result = new
    return result


def _rerun_if_moved(
    evaluate: Callable[[], Any],
    old: Any,
    run_again: Callable[[], Any],
    restore: Callable[[], None],
    always: bool = False,
) -> tuple[Any, bool, bool]:
    """In a fresh block: the rebuilt estimator's value at the end point; rerun when it moved from ``old``,
    or ``always`` (the previous run's objective changed: L-BFGS's curvature pairs mixed two estimators).

    Returns ``(new result, whether the rerun held parts fixed, whether it replaced a held factor)``, or
    ``(None, False, False)``: no rerun (the value did not move or is not finite), or the check / rerun raised
    (``restore()`` puts the end point back, warned).
    """
    with settings.deterministic_objective():
        try:
            values = np.asarray(evaluate(), dtype=float)
            if not np.all(np.isfinite(values)) or not (always or _moved(values, old)):
                return None, False, False
            new = run_again()
        except Exception as error:  # our rerun, not the caller's run: keep the good result
            restore()
            _rerun_failed(error)
            return None, False, False
        changed = _factor_replaced()
        return new, _fixed_parts_used() or changed, changed


def _closure_value(closure: Any) -> float:
    return _as_float(closure()[0])


def _restore_parameters(parameters: dict[str, Any], snapshot: dict[str, Any]) -> None:
    with torch.no_grad():
        for name, p in parameters.items():
            p.copy_(snapshot[name])


def _batched_values(func: Any, xs: Any) -> Any:
    return func(xs)[0]


def _batched_restore(func: Any, xs: Any) -> None:
    with contextlib.suppress(Exception):  # the closure writes the state it evaluates: put the end point back
        func(xs)


def _as_float(value: Any) -> float:
    return float(value.detach().sum()) if hasattr(value, "detach") else float(np.sum(value))


def _moved(new: Any, old: Any) -> bool:
    """Whether the estimator rebuilt at a run's end point disagrees with the run's own final value."""
    new, old = np.asarray(new, dtype=float), np.asarray(old, dtype=float)
    return bool(np.any(np.abs(new - old) > REBUILD_TOL * np.maximum(1.0, np.abs(old))))


def _without_x0(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # args after (closure, parameters): (bounds, callback, x0, method, options, timeout_sec)
    if len(args) > 2:
        args = (*args[:2], None, *args[3:])
    return args, ({**kwargs, "x0": None} if "x0" in kwargs else kwargs)


def _batched_runs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fmin_l_bfgs_b_batched(func, x0, ...) -> (xs, fs, results)`` in fresh scopes, rerun from ``xs``.

    As :func:`_scipy_minimize_runs`; no rerun after an entry stopped at ``maxiter`` (``warnflag`` 1).
    """

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not _active():
            return fn(*args, **kwargs)
        func = args[0] if args else kwargs["func"]

        def next_run(result: Any) -> _Rerun | None:
            if any(r.get("warnflag", 0) == 1 for r in result[2]):
                return None
            xs, fs = result[0], result[1]
            a, kw = ((args[0], xs, *args[2:]), kwargs) if len(args) > 1 else (args, {**kwargs, "x0": xs})
            return (
                functools.partial(_batched_values, func, xs),
                fs,
                functools.partial(fn, *a, **kw),
                functools.partial(_batched_restore, func, xs),
            )

        return _repeat_runs(functools.partial(fn, *args, **kwargs), next_run)

    run.__lgg_original__ = fn  # type: ignore[attr-defined]
    return run


_WRAPPERS = {"scipy_minimize": _scipy_minimize_runs, "fmin_l_bfgs_b_batched": _batched_runs}


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then wraps the targets of the module it loaded."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        with _lock:  # a (re)loaded module has fresh, unwrapped functions
            for key in [k for k in _originals if k[0] == module.__name__]:
                del _originals[key]
        install_if_imported()

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... for tracebacks and inspect
        if name == "_loader" or name.startswith("__"):  # copy / pickle probe dunders before __init__ ran
            raise AttributeError(name)
        return getattr(self._loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a target module, asks the other finders and wraps the loader."""

    _names = frozenset(module for module, _ in TARGETS)

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self._names or not _enabled:
            return None
        for finder in list(sys.meta_path):
            if isinstance(finder, _PostImportFinder) or type(finder).__name__ == "_PostImportFinder":
                continue  # this one, or a copy left by a reload of this module: never each other
            if not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


_finder = _PostImportFinder()


def enable() -> None:
    """Allow wrapping (``lanczos_grad_gp.patching.install()``): wrap what is imported, and what loads later."""
    global _enabled
    _enabled = True
    with _lock:
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
    install_if_imported()


def install_if_imported() -> None:
    """Wrap the targets whose modules are imported (idempotent, cheap when nothing is new)."""
    if not _enabled or all(key in _originals or key[0] not in sys.modules for key in TARGETS):
        return
    with _lock:
        for key in TARGETS:
            module = sys.modules.get(key[0])
            if key in _originals or module is None:
                continue
            fn = getattr(module, key[1], None)
            if fn is None:
                continue
            original = getattr(fn, "__lgg_original__", None)
            if original is not None:  # already ours (a module imported under another name)
                _originals[key] = original
                continue
            _originals[key] = fn
            setattr(module, key[1], _wrapper_of(fn, key))


def _wrapper_of(fn: Callable[..., Any], key: tuple[str, str]) -> Callable[..., Any]:
    """The wrapper already made for ``fn`` under another name (``from core import scipy_minimize`` in a module
    imported before lanczos_grad_gp: one wrapper, both names), or a new one."""
    for (module_name, attr), original in _originals.items():
        current = getattr(sys.modules.get(module_name), attr, None)
        if original is fn and (module_name, attr) != key and getattr(current, "__lgg_original__", None) is fn:
            return current
    return _WRAPPERS[key[1]](fn)


def uninstall() -> None:
    """Restore BoTorch's functions (``lanczos_grad_gp.patching.uninstall()``) until :func:`enable`."""
    global _enabled
    _enabled = False
    with _lock:
        if _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
        for (module_name, attr), fn in list(_originals.items()):
            module = sys.modules.get(module_name)
            if module is not None and getattr(getattr(module, attr, None), "__lgg_original__", None) is fn:
                setattr(module, attr, fn)
            del _originals[(module_name, attr)]


def installed_targets() -> list[str]:
    """The wrapped functions, as ``module.attribute``."""
    with _lock:
        return [f"{m}.{a}" for m, a in _originals]
