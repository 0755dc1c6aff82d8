"""The one kernel matcher: which GPyTorch kernels have a closed-form profile, and the fusing hook.

:func:`match_stationary_kernel` is the single place that decides whether a GPyTorch kernel is one of
the registry's profiles (:mod:`.profiles`); both :func:`fuse_stationary_kernel` (the flag's hook) and
:class:`~lanczos_grad_gp.kernels.chunked_kernel.ChunkedKernel` use it.
"""

from __future__ import annotations

from typing import Any

import gpytorch
import torch
from linear_operator.operators import AddedDiagLinearOperator

from .._compat import added_diag_parts, lazy_kernel_parts
from .profiles import PROFILES, StationaryProfile
from .stationary import StationaryKernelLinearOperator

__all__ = ["fuse_stationary_kernel", "match_stationary_kernel"]


def _profile_of(inner: gpytorch.kernels.Kernel) -> StationaryProfile | None:
    for profile in PROFILES.values():
        cls = getattr(gpytorch.kernels, profile.kernel_class)
        if type(inner) is cls and (profile.nu is None or float(getattr(inner, "nu", -1)) == profile.nu):
            return profile
    return None


def match_stationary_kernel(kernel: gpytorch.kernels.Kernel) -> tuple[Any, Any, StationaryProfile] | None:
    """``(inner kernel, ScaleKernel or None, profile)`` when ``kernel`` is a registered stationary kernel.

    Exact types only (a subclass may change ``forward``); ``ScaleKernel(k)`` with ``active_dims`` on
    ``k`` is declined (GPyTorch's ``ScaleKernel`` ignores it), as are kernels without a lengthscale.
    """
    scale = None
    inner = kernel
    if type(kernel) is gpytorch.kernels.ScaleKernel:
        scale, inner = kernel, kernel.base_kernel
        if inner.active_dims is not None:
            return None
    profile = _profile_of(inner)
    if profile is None or getattr(inner, "lengthscale", None) is None:
        return None
    return inner, scale, profile


def fuse_stationary_kernel(covar: Any) -> Any:
    """Replace a lazily evaluated RBF/Matérn (optionally scaled) kernel by :class:`StationaryKernelLinearOperator`.

    Accepts the covariance GPyTorch's exact GPs hand to ``log_prob``: a
    ``LazyEvaluatedKernelTensor`` or ``AddedDiagLinearOperator(LazyEvaluatedKernelTensor, noise)``.
    Anything else (other kernels, sums/products of kernels, ``active_dims`` on a wrapped kernel,
    kernel checkpointing, extra kernel kwargs) is returned unchanged, so GPyTorch's own evaluation
    runs. The value is the same kernel matrix as GPyTorch's up to rounding.
    """
    parts = added_diag_parts(covar)
    if parts is not None:
        base, diag = parts
        inner = fuse_stationary_kernel(base)
        if inner is base:
            return covar
        return AddedDiagLinearOperator(inner, diag)
    lazy = lazy_kernel_parts(covar)
    if lazy is None or lazy["last_dim_is_batch"] or lazy["params"]:
        return covar
    if gpytorch.beta_features.checkpoint_kernel.value():
        return covar
    match = match_stationary_kernel(lazy["kernel"])
    if match is None:
        return covar
    inner, scale, profile = match
    nu = profile.nu
    x1, x2 = lazy["x1"], lazy["x2"]
    if x1.dim() < 2 or x2.dim() < 2:
        return covar
    ls = inner.lengthscale  # (*batch, 1, D or 1)
    if scale is not None:
        os_ = scale.outputscale  # (*batch)
    else:
        os_ = torch.ones(inner.batch_shape, dtype=ls.dtype, device=ls.device)
    # GPyTorch's kernels promote (x / ℓ): float32 inputs with a float64 model give a float64 matrix
    dtype = torch.promote_types(torch.promote_types(x1.dtype, x2.dtype), torch.promote_types(ls.dtype, os_.dtype))
    x1, x2, ls, os_ = (t.to(dtype) for t in (x1, x2, ls, os_))
    try:
        op = StationaryKernelLinearOperator(x1, x2, lengthscale=ls, outputscale=os_, nu=nu)
    except RuntimeError:  # shapes GPyTorch broadcasts differently: keep its own path
        return covar
    if op.shape != covar.shape:
        return covar
    return op
