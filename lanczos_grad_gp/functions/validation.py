"""Cheap input checks shared by the public entry points (run before any Lanczos step).

Every check costs at most one pass over the data the operator is built from (``O(n²)`` for a
dense matrix, the size of one matrix-vector product) and raises a ``ValueError`` / ``TypeError``
that names the argument and says what to do.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from linear_operator.operators import AddedDiagLinearOperator, DenseLinearOperator, LinearOperator, to_linear_operator
from linear_operator.utils.warnings import NumericalWarning
from torch import Tensor

from .._compat import added_diag_parts, delayed_error
from ..core.norms import safe_matrix_norm

__all__ = [
    "broadcast_rhs",
    "check_dtype",
    "check_finite_operator",
    "check_operator",
    "check_symmetric",
    "first_order_only",
    "relative_asymmetry",
    "symmetrize_like_stock",
]

_DOUBLE_BACKWARD_MSG = (
    b"lanczos_grad_gp: the forward-only Lanczos gradient is first-order only; differentiating it again "
    b"(create_graph=True: Hessians, Hessian-vector products, gradient penalties) is not supported. "
    b"Use a dense/Cholesky computation (flag off) for second derivatives."
)


def first_order_only(backward: Any) -> Any:
    """Like ``torch.autograd.function.once_differentiable``, but ALWAYS makes a double backward fail loudly.

    ``once_differentiable`` only guards when the incoming gradient requires grad; for the common
    ``torch.autograd.grad(loss, θ, create_graph=True)`` it does not, and the user gets gradients
    without ``grad_fn`` and a puzzling "does not require grad" error (or silently zero second
    derivatives). Here every output gradient carries a node that raises a clear RuntimeError, and
    that node is connected to the Function's saved inputs (``θ``): a second
    ``torch.autograd.grad(g, θ, allow_unused=True)`` reaches it and raises instead of silently
    returning ``None``.
    """

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: Any) -> Any:
        create_graph = torch.is_grad_enabled()  # True inside backward only with create_graph=True
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not create_graph:
            return outputs
        outs = outputs if isinstance(outputs, tuple) else (outputs,)
        err_fn = delayed_error(_DOUBLE_BACKWARD_MSG, len(outs))
        saved = [t for t in getattr(ctx, "saved_tensors", ()) if isinstance(t, Tensor) and t.requires_grad]
        anchor = sum(t.sum() * 0 for t in saved) if saved else None  # 0, with θ in its graph

        def connect(t: Any) -> Any:
            if not isinstance(t, Tensor):
                return t
            if anchor is not None and t.is_floating_point():
                return t.detach() + anchor.to(t.dtype)
            t = t.detach()
            t.requires_grad_(True)
            return t

        wrapped = err_fn(*[connect(t) for t in outs])
        wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
        return wrapped if isinstance(outputs, tuple) else wrapped[0]

    return wrapper


def relative_asymmetry(M: Tensor, name: str = "A", what: str = "") -> float:
    """Estimate of ``max_batch ‖M − Mᵀ‖_F / ‖M‖_F`` for a dense ``M``; ``ValueError`` on NaN/Inf.

    ``X`` holds 4 fixed Gaussian probes, so the estimate is two thin products — ``O(n²)`` time,
    ``O(n)`` extra memory (no ``n x n`` temporaries) — using ``E‖B x‖² = ‖B‖_F²``. A NaN or Inf entry
    makes ``M X`` non-finite (NaN·x is NaN), so the same product finds it.
    """
    if M.numel() == 0:
        return 0.0
    with torch.no_grad():
        Md = M.detach()
        gen = torch.Generator().manual_seed(0)
        X = torch.randn(Md.shape[-1], 4, generator=gen, dtype=torch.float64).to(device=Md.device, dtype=Md.dtype)
        peak = Md.abs().amax((-2, -1), keepdim=True)  # scale first: entries of 1e200 or 1e-30 are fine
        if not bool(torch.isfinite(peak).all()):
            raise ValueError(f"{name} contains NaN or Inf{what}. {_NAN_ADVICE}")
        Ms = Md / torch.where(peak > 0, peak, torch.ones_like(peak))
        MX = Ms @ X
        if not bool(torch.isfinite(MX).all()):
            raise ValueError(f"{name} contains NaN or Inf{what}. {_NAN_ADVICE}")
        asym = safe_matrix_norm(MX - Ms.mT @ X)
        size = safe_matrix_norm(MX)
        rel = torch.where(size > 0, asym / torch.where(size > 0, size, torch.ones_like(size)), asym)
        return float(rel.max())


def check_symmetric(M: Tensor, name: str = "A", what: str = "") -> None:
    """Dense ``M``: ``ValueError`` on NaN/Inf, or when ``‖M − Mᵀ‖_F > sqrt(eps) · ‖M‖_F`` (:func:`relative_asymmetry`).

    Round-off asymmetry of a kernel matrix is ``O(eps)``, far below the threshold; a genuinely
    non-symmetric matrix is far above it. Lanczos silently assumes symmetry.
    """
    worst = relative_asymmetry(M, name, what)
    tol = torch.finfo(M.dtype).eps ** 0.5
    if not worst <= tol:
        raise ValueError(
            f"{name} must be symmetric, but ‖{name} − {name}ᵀ‖_F / ‖{name}‖_F ≈ {worst:.2e} > sqrt(eps) = {tol:.1e}. "
            f"Lanczos needs a symmetric (Hermitian) operator: pass 0.5 * ({name} + {name}.mT) if the asymmetry "
            "is round-off."
        )


def symmetrize_like_stock(A: Any) -> Any:
    r"""The flag's forgiveness: a dense covariance asymmetric beyond ``sqrt(eps)`` is replaced by ``(A + Aᵀ)/2``.

    Stock GPyTorch never checks symmetry (Cholesky reads one triangle, CG uses ``A`` as given), and
    float32 posterior covariances are asymmetric at the 1e-2 level from round-off alone; under the flag
    such a covariance gets a ``NumericalWarning`` instead of an error. Only ``DenseLinearOperator``\ s
    (alone or as the base of an ``AddedDiagLinearOperator``) are checked; the direct
    :func:`lanczos_grad_gp.inv_quad_logdet` keeps the strict check.
    """
    parts = added_diag_parts(A)
    dense = parts[0] if parts is not None else A
    if not isinstance(dense, DenseLinearOperator):
        return A
    T = dense.tensor
    rel = relative_asymmetry(T, "A", " (the covariance operator)")
    if rel <= torch.finfo(T.dtype).eps ** 0.5:
        return A
    warnings.warn(
        f"lanczos_grad_gp: the covariance ({T.dtype}, n={T.shape[-1]}) is not symmetric "
        f"(‖A − Aᵀ‖_F / ‖A‖_F ≈ {rel:.1e}); using (A + Aᵀ)/2, as round-off asymmetry calls for.",
        NumericalWarning,
        stacklevel=4,
    )
    sym = DenseLinearOperator(0.5 * (T + T.mT))
    return AddedDiagLinearOperator(sym, parts[1]) if parts is not None else sym


_NAN_ADVICE = (
    "Check the data and the hyperparameters it is built from (e.g. a NaN lengthscale, outputscale or noise "
    "after a diverged optimizer step, or NaN inputs)."
)


def check_dtype(dtype: torch.dtype, name: str) -> None:
    """``ValueError`` unless ``dtype`` is float32 or float64 (Lanczos in half precision is garbage)."""
    if dtype not in (torch.float32, torch.float64):
        advice = (
            " Lanczos in half precision loses all accuracy within a few steps: convert with .float() or .double()."
            if dtype in (torch.float16, torch.bfloat16)
            else ""
        )
        raise ValueError(f"{name} must be a floating-point tensor of dtype float32 or float64; got {dtype}.{advice}")


def check_operator(A: Any, name: str = "A", what: str = "") -> LinearOperator:
    """Validate ``A`` (dense tensor or LinearOperator) and return it as a LinearOperator.

    Checks: type, square ``(*batch, n, n)`` shape with ``n ≥ 1``, floating dtype, no NaN/Inf in the
    tensors it is built from (dense entries, kernel inputs and hyperparameters, noise), and — for
    dense matrices — symmetry (:func:`check_symmetric`).
    """
    if isinstance(A, Tensor):
        if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
            raise ValueError(f"{name} must be a square (*batch, n, n) matrix; got shape {tuple(A.shape)}.")
    elif not isinstance(A, LinearOperator):
        raise TypeError(f"{name} must be a LinearOperator or a torch.Tensor; got {type(A).__name__}.")
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{name} must be square with shape (*batch, n, n); got shape {tuple(A.shape)}.")
    check_dtype(A.dtype, name)
    if A.shape[-1] == 0:
        raise ValueError(f"{name} has size n = 0; it must be at least 1 x 1.")
    if isinstance(A, Tensor):
        check_symmetric(A, name, what)  # also finds NaN/Inf
        return to_linear_operator(A)
    if isinstance(A, DenseLinearOperator):
        check_symmetric(A.tensor, name, what)
        return A
    A = A.evaluate_kernel()  # a lazily evaluated GPyTorch kernel becomes the operator it stands for
    for t in A.representation():  # kernel inputs, hyperparameters, noise, dense blocks
        if isinstance(t, Tensor) and t.is_floating_point() and t.numel() and not _all_finite(t.detach()):
            raise ValueError(f"{name} contains NaN or Inf{what}. {_NAN_ADVICE}")
    return A


def check_finite_operator(A: Any, name: str = "A", what: str = "") -> None:
    """``ValueError`` if the tensors ``A`` is built from contain NaN/Inf (no shape or symmetry checks).

    The check of the Cholesky route: GPyTorch's own computation runs next, with its own jitter and
    symmetry handling, but a NaN never passes silently.
    """
    tensors = (A,) if isinstance(A, Tensor) else A.evaluate_kernel().representation()
    for t in tensors:
        if isinstance(t, Tensor) and t.is_floating_point() and t.numel() and not _all_finite(t.detach()):
            raise ValueError(f"{name} contains NaN or Inf{what}. {_NAN_ADVICE}")


def _all_finite(t: Tensor) -> bool:
    """Whether ``t`` has no NaN/Inf, in one reduction without an ``n x n`` boolean temporary.

    A NaN or Inf entry makes the sum non-finite; only a sum that overflows from finite entries
    needs the elementwise check (one host sync either way).
    """
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def broadcast_rhs(A: LinearOperator, rhs: Tensor, name: str, nan_hint: str = "") -> tuple[LinearOperator, Tensor]:
    """Broadcast the batch shapes of ``A`` and of the columns ``rhs`` (``(*batch, n, k)``); reject NaN/Inf.

    Returns ``A`` expanded (lazily) and ``rhs`` expanded to the common batch shape.
    """
    n = A.shape[-1]
    if not bool(torch.isfinite(rhs).all()):
        raise ValueError(f"{name} contains NaN or Inf{nan_hint}.")
    try:
        batch = torch.broadcast_shapes(A.batch_shape, rhs.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"batch shapes of A {tuple(A.batch_shape)} and {name} {tuple(rhs.shape[:-2])} do not broadcast."
        ) from None
    if A.batch_shape != batch:
        A = A.expand(*batch, n, n)
    return A, rhs.expand(*batch, n, rhs.shape[-1])


def check_inv_quad_logdet_args(A: Any, rhs: Tensor | None, logdet: bool) -> tuple[LinearOperator, Tensor | None, bool]:
    """The arguments of :func:`~lanczos_grad_gp.inv_quad_logdet`, checked before any work.

    Returns ``(A, rhs as (*batch, n, k) or None, whether rhs was a vector)``.
    """
    if logdet is not None and not isinstance(logdet, bool):
        raise ValueError(f"logdet must be a bool; got {logdet!r}.")
    # type, square, n >= 1, float dtype, finite data/hyperparameters, symmetric if dense (before any work)
    A = check_operator(A, "A", " (the covariance operator)")
    if rhs is None:
        if not logdet:
            raise ValueError("Either inv_quad_rhs or logdet=True must be given.")
        return A, None, False
    if not isinstance(rhs, Tensor):
        raise TypeError(f"inv_quad_rhs must be a torch.Tensor; got {type(rhs).__name__}.")
    if rhs.dtype != A.dtype or (A.device is not None and rhs.device != A.device):
        raise ValueError(
            f"inv_quad_rhs ({rhs.dtype}, {rhs.device}) must match A's dtype and device ({A.dtype}, {A.device})."
        )
    n = A.shape[-1]
    is_vector = A.dim() == 2 and rhs.dim() == 1
    r = rhs.unsqueeze(-1) if is_vector else rhs
    if r.dim() != A.dim() or r.shape[-2] != n:
        raise ValueError(
            f"inv_quad_rhs must have shape (*batch, n) for a 2-D A or (*batch, n, k) with n = {n}; "
            f"got {tuple(rhs.shape)} for A of shape {tuple(A.shape)}."
        )
    A, r = broadcast_rhs(A, r, "inv_quad_rhs", " (check the training targets and the mean function)")
    return A, r, is_vector
