"""Flag-gated hooks that route GPyTorch / BoTorch exact GPs through :func:`inv_quad_logdet`.

Two hooks, installed once on ``import lanczos_grad_gp`` and inert while
:class:`~lanczos_grad_gp.settings.use_lanczos_grad` is off (they call the original
function, so results are bit-identical to stock GPyTorch). While it is on, each call is routed
by :func:`lanczos_grad_gp.routing.choose_route`: small covariances (``n ≤ max_cholesky_size``)
run GPyTorch's stock exact computation with the flag off for that call, operators with their
own structured ``inv_quad_logdet`` keep it, the rest go to Lanczos.

* ``gpytorch.distributions.MultivariateNormal.log_prob`` — stock GPyTorch only reaches
  ``inv_quad_logdet`` when ``fast_computations.log_prob`` is on, which BoTorch turns off at
  import (docs/mathematics.md, "Integration with GPyTorch, linear_operator and BoTorch"). While
  the flag is on, the hook takes the fast path itself (the same steps as GPyTorch's own fast
  branch, gpytorch 1.15) without touching the process-global ``fast_computations`` setting, so
  other threads are unaffected. Like GPyTorch, it calls ``covar.inv_quad_logdet(...)``: the
  operator's own method decides.
* ``linear_operator.LinearOperator.inv_quad_logdet`` — the base-class method, bypassing the
  ``max_cholesky_size`` switch. Operators whose class overrides ``inv_quad_logdet`` with an
  exact structured formula (diagonal, Kronecker, triangular/Cholesky factors) keep it, so a
  multitask Kronecker GP keeps its exact log-determinant under the flag.

Under the flag, BoTorch's L-BFGS runs each get one deterministic objective (:mod:`.botorch_hooks`).

``uninstall()`` restores the originals.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Any

import torch
from gpytorch.distributions import MultivariateNormal
from linear_operator import settings as lo_settings
from linear_operator.operators import LinearOperator
from torch import Tensor

from . import botorch_hooks, settings
from ._compat import validate_mvn_sample
from .diagnostics import record
from .functions.validation import check_finite_operator, symmetrize_like_stock
from .routing import choose_route

__all__ = ["install", "uninstall", "is_installed"]

_lock = threading.Lock()
_originals: dict[str, Any] = {}


def _lanczos_log_prob(self: MultivariateNormal, value: Tensor) -> Tensor:
    """GPyTorch's fast ``log_prob`` branch (gpytorch 1.15, ``MultivariateNormal.log_prob``)."""
    validate_mvn_sample(self, value)
    mean, covar = self.loc, self.lazy_covariance_matrix
    diff = value - mean
    if diff.shape[:-1] != covar.batch_shape:
        if len(diff.shape[:-1]) < len(covar.batch_shape):
            diff = diff.expand(covar.shape[:-1])
        else:
            padded = (*(1 for _ in range(diff.dim() + 1 - covar.dim())), *covar.batch_shape)
            covar = covar.repeat(*(d // c for d, c in zip(diff.shape[:-1], padded, strict=True)), 1, 1)
    if settings.fused_kernels.on():
        from .kernels.matcher import fuse_stationary_kernel

        covar = fuse_stationary_kernel(covar)
    covar = covar.evaluate_kernel()
    route = choose_route(covar)
    if route is not None and route.route == "operator":
        record(route)
    dtype = torch.promote_types(diff.dtype, covar.dtype)  # as stock: float32 data with a float64 model
    if covar.dtype != dtype:
        covar = covar.to(dtype)
    diff = diff.to(dtype)
    # the operator's own method: the flag-gated base-class hook below, or an exact structured override
    inv_quad, logdet = covar.inv_quad_logdet(inv_quad_rhs=diff.unsqueeze(-1), logdet=True)
    return -0.5 * (inv_quad + logdet + diff.size(-1) * math.log(2 * math.pi))


def _check_finite_log_prob(mvn: MultivariateNormal, value: Tensor) -> None:
    """The Cholesky route's input check: NaN/Inf in the targets, mean or covariance raise, as on our route."""
    if not bool(torch.isfinite(value).all() & torch.isfinite(mvn.loc).all()):
        raise ValueError("inv_quad_rhs contains NaN or Inf (check the training targets and the mean function).")
    check_finite_operator(mvn.lazy_covariance_matrix, "A", " (the covariance operator)")


def _stock(fn: Any, *args: Any) -> Any:
    """GPyTorch's own computation for one call: the flag off, Cholesky up to our threshold.

    linear_operator's ``max_cholesky_size`` is process-global (a class attribute, not thread-local
    like our settings), so it is only entered when our threshold differs from it: by default
    (``lgg.settings.max_cholesky_size`` None, i.e. GPyTorch's own) nothing global changes, and a
    thread running stock GPyTorch meanwhile is unaffected.
    """
    ours = settings.max_cholesky_size.value()  # None: GPyTorch's own threshold, already in force
    with settings.use_lanczos_grad(False), contextlib.ExitStack() as stack:
        if ours is not None and ours != lo_settings.max_cholesky_size.value():
            stack.enter_context(lo_settings.max_cholesky_size(ours))
        return fn(*args)


def install() -> None:
    """Install the hooks (idempotent), including BoTorch's L-BFGS scopes (:mod:`.botorch_hooks`)."""
    botorch_hooks.enable()
    with _lock:
        if _originals:
            return
        orig_log_prob = MultivariateNormal.log_prob
        orig_iqld = LinearOperator.inv_quad_logdet

        @functools.wraps(orig_log_prob)
        def log_prob(self: MultivariateNormal, value: Tensor) -> Tensor:
            if settings.use_lanczos_grad.on():
                route = choose_route(self.lazy_covariance_matrix, check_operator=False)
                if route is None:
                    return _lanczos_log_prob(self, value)
                record(route)
                _check_finite_log_prob(self, value)
                return _stock(orig_log_prob, self, value)
            return orig_log_prob(self, value)

        @functools.wraps(orig_iqld)
        def inv_quad_logdet(
            self: LinearOperator,
            inv_quad_rhs: Tensor | None = None,
            logdet: bool | None = False,
            reduce_inv_quad: bool | None = True,
        ):
            if settings.use_lanczos_grad.on():
                route = choose_route(self, check_operator=False)
                if route is None:
                    from .functions.inv_quad_logdet import inv_quad_logdet as ours

                    op = symmetrize_like_stock(self.evaluate_kernel())  # as forgiving as stock: no asymmetry error
                    if inv_quad_rhs is not None and inv_quad_rhs.dtype != op.dtype:  # promote, as log_prob does
                        dtype = torch.promote_types(inv_quad_rhs.dtype, op.dtype)
                        op, inv_quad_rhs = op.to(dtype), inv_quad_rhs.to(dtype)
                    return ours(op, inv_quad_rhs, bool(logdet), bool(reduce_inv_quad))
                record(route)
                check_finite_operator(self, "A", " (the covariance operator)")
                if inv_quad_rhs is not None and not bool(torch.isfinite(inv_quad_rhs).all()):
                    raise ValueError("inv_quad_rhs contains NaN or Inf.")
                return _stock(orig_iqld, self, inv_quad_rhs, logdet, reduce_inv_quad)
            return orig_iqld(self, inv_quad_rhs, logdet, reduce_inv_quad)

        _originals["log_prob"] = orig_log_prob
        _originals["inv_quad_logdet"] = orig_iqld
        MultivariateNormal.log_prob = log_prob
        LinearOperator.inv_quad_logdet = inv_quad_logdet


def uninstall() -> None:
    """Restore GPyTorch's, linear_operator's and BoTorch's original functions."""
    botorch_hooks.uninstall()
    with _lock:
        if not _originals:
            return
        MultivariateNormal.log_prob = _originals.pop("log_prob")
        LinearOperator.inv_quad_logdet = _originals.pop("inv_quad_logdet")


def is_installed() -> bool:
    """Whether the hooks are in place."""
    return bool(_originals)
