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
from the run's final value by more than :data:`REBUILD_TOL`, the run is repeated from there, at most
:data:`MAX_RUNS` runs in all. A preconditioner built at ``θ`` makes the estimate exact at ``θ`` when
its rank is full and close to exact nearby, so the reruns settle where the exact optimum is; each
run is one deterministic objective, which is what the line search needs.

Wrapped, while :class:`~lanczos_grad_gp.settings.use_lanczos_grad` is on (otherwise the original
runs untouched):

* ``botorch.optim.core.scipy_minimize`` (and the name imported into ``botorch.optim.fit``):
  ``fit_gpytorch_mll_scipy``, the default optimizer of ``fit_gpytorch_mll``; every retry from
  prior samples is a new run, hence a new scope;
* ``botorch.optim.batched_lbfgs_b.fmin_l_bfgs_b_batched``: the batched independent fits of
  multi-output models.

BoTorch is an optional dependency and importing it changes GPyTorch's global settings, so this
module never imports it: :func:`install_if_imported` patches only modules already in
``sys.modules``, and a post-import hook (a ``sys.meta_path`` finder that only watches the three
module names above) patches them when BoTorch loads them later, lazily or not. So ``import botorch``
before or after ``import lanczos_grad_gp`` both work.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

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


def _scipy_minimize_runs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``scipy_minimize`` in fresh deterministic-objective scopes, rerun while the estimator moved."""

    @functools.wraps(fn)
    def run(closure: Any, parameters: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if settings.use_lanczos_grad.off():
            return fn(closure, parameters, *args, **kwargs)
        with settings.deterministic_objective():
            result = fn(closure, parameters, *args, **kwargs)
            stochastic = settings.deterministic_objective.value().calls > 0
        for _ in range(MAX_RUNS - 1):
            if not stochastic:  # no stochastic log-determinant (e.g. the Cholesky route): nothing to rebuild
                return result
            args, kwargs = _without_x0(args, kwargs)  # the run wrote its end point into the parameters
            with settings.deterministic_objective():
                value = _as_float(closure()[0])  # the rebuilt estimator at the end point
                if not _moved(value, result.fval):
                    return result
                result = fn(closure, parameters, *args, **kwargs)
                stochastic = settings.deterministic_objective.value().calls > 0
        return result

    run.__lgg_original__ = fn  # type: ignore[attr-defined]
    return run


def _as_float(value: Any) -> float:
    return float(value.detach().sum()) if hasattr(value, "detach") else float(value.sum())


def _moved(new: Any, old: Any) -> bool:
    """Whether the estimator rebuilt at a run's end point disagrees with the run's own final value."""
    new, old = np.asarray(new, dtype=float), np.asarray(old, dtype=float)
    return bool(np.any(~np.isfinite(new)) or np.any(np.abs(new - old) > REBUILD_TOL * np.maximum(1.0, np.abs(old))))


def _without_x0(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # args after (closure, parameters): (bounds, callback, x0, ...); x0 None starts from the parameters
    if len(args) > 2:
        args = (*args[:2], None, *args[3:])
    return args, ({**kwargs, "x0": None} if "x0" in kwargs else kwargs)


def _batched_runs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fmin_l_bfgs_b_batched(func, x0, ...) -> (xs, fs, results)`` in fresh scopes, rerun from ``xs``."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if settings.use_lanczos_grad.off():
            return fn(*args, **kwargs)
        with settings.deterministic_objective():
            result = fn(*args, **kwargs)
            stochastic = settings.deterministic_objective.value().calls > 0
        func = args[0] if args else kwargs["func"]
        for _ in range(MAX_RUNS - 1):
            if not stochastic:
                return result
            xs, fs = result[0], result[1]
            args, kwargs = ((args[0], xs, *args[2:]), kwargs) if len(args) > 1 else (args, {**kwargs, "x0": xs})
            with settings.deterministic_objective():
                if not _moved(func(xs)[0], fs):
                    return result
                result = fn(*args, **kwargs)
                stochastic = settings.deterministic_objective.value().calls > 0
        return result

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
        install_if_imported()

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self._loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a target module, asks the other finders and wraps the loader."""

    _names = frozenset(module for module, _ in TARGETS)

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self._names or not _enabled:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
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
            setattr(module, key[1], _WRAPPERS[key[1]](fn))


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
    return [f"{m}.{a}" for m, a in _originals]
