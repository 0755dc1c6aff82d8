"""Kernels: closed-form stationary profiles, chunked and fused kernel operators, the kernel matcher.

* :mod:`.profiles` — the ONE registry of closed-form stationary kernels (add a kernel here);
* :mod:`.blocks` — in-place row blocks of ``g(r²)``;
* :mod:`.derivative` — the closed-form row-blocked gradient;
* :mod:`.chunked` — ``ChunkedKernelLinearOperator`` (any ``covar_func``, row blocks, autograd per block);
* :mod:`.stationary` — ``StationaryKernelLinearOperator`` (fused: no graph, closed-form gradient);
* :mod:`.matcher` — which GPyTorch kernels fuse, and the flag's fusing hook;
* :mod:`.chunked_kernel` — ``ChunkedKernel``, a GPyTorch kernel that never forms ``n × n``.
"""

from .chunked import ChunkedKernelLinearOperator, default_chunk_size
from .chunked_kernel import ChunkedKernel
from .derivative import stationary_bilinear_derivative
from .matcher import fuse_stationary_kernel, match_stationary_kernel
from .profiles import PROFILES, StationaryProfile, get_profile, kernel_profile, matern_covar, rbf_covar
from .stationary import StationaryKernelLinearOperator

__all__ = [
    "PROFILES",
    "ChunkedKernel",
    "ChunkedKernelLinearOperator",
    "StationaryKernelLinearOperator",
    "StationaryProfile",
    "default_chunk_size",
    "fuse_stationary_kernel",
    "get_profile",
    "kernel_profile",
    "match_stationary_kernel",
    "matern_covar",
    "rbf_covar",
    "stationary_bilinear_derivative",
]
