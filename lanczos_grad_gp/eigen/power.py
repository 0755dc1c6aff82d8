r"""Top-``k`` eigenpairs by power iteration with Hotelling deflation (a baseline to :func:`lanczos`).

From a random unit ``v``, iterate ``v ← A_i v / ‖A_i v‖`` on the deflated operator
``A_i = A − Σ_{j<i} λ_j y_j y_j^\top``; ``v`` converges to the eigenvector of largest ``|λ|`` of
``A_i`` at rate ``|λ_{i+1}/λ_i|^t`` (Golub & Van Loan §7.3, §8.2). Optional Polyak momentum
(De Sa, He, Mitliagkas, Ré & Xu 2017, arXiv:1707.02670): ``x_{t+1} = A_i x_t − β x_{t−1}``,
optimal at ``β = λ_{i+1}²/4``.

Stopping (per pair, per batch entry): the Rayleigh quotient's relative change
``|λ_t − λ_{t−1}|/|λ_t|`` AND the relative residual ``‖A_i v − λ_t v‖/|λ_t|`` are both ``≤ tol``.
Both are computed on device every step; the host checks every ``check_every`` steps whether all
entries converged (no per-step sync). Converged entries freeze. Reported residuals are TRUE
``‖A y_i − λ_i y_i‖`` against the ORIGINAL operator (one batched matmul at the end), and the
eigenvalues are the Rayleigh quotients ``y_i^T A y_i`` from that matmul.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .grad import differentiable_eigenvalues
from .inputs import check_k, check_tol, holds_operator_fixed, prepare_operator, randn, resolve_generator
from .result import EigenResult

__all__ = ["deflated_power_iteration"]


@holds_operator_fixed
def deflated_power_iteration(
    operator: object,
    *,
    k: int,
    max_iter: int = 100,
    tol: float = 1e-4,
    momentum: float = 0.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    check_every: int = 10,
) -> EigenResult:
    """``k`` largest-magnitude eigenpairs by deflated power iteration.

    Args:
        operator: symmetric LinearOperator, dense ``(*b, n, n)`` tensor, or ``(matvec, n)`` tuple.
        k: number of eigenpairs, ``1 ≤ k ≤ n``.
        max_iter: power iterations per eigenpair.
        tol: relative tolerance of the stopping rule (module docstring).
        momentum: Polyak momentum ``β ≥ 0`` (``0``: plain power iteration).
        seed, generator: randomness of the start vectors (one or the other).
        check_every: steps between host-side "all converged?" checks.

    Returns:
        :class:`EigenResult` in the order found (decreasing ``|λ|`` up to convergence error);
        ``iterations`` sums the steps of all ``k`` pairs. Eigenvalues are differentiable
        (``∂λ_i = y_i^T ∂A y_i``).
    """
    tol = check_tol(tol)
    op = prepare_operator(operator)
    k = check_k(k, op.n)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int; got {max_iter!r}.")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not (0 <= momentum < float("inf")):
        raise ValueError(f"momentum must be a finite number >= 0; got {momentum!r}.")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be a positive int; got {check_every!r}.")
    gen = resolve_generator(seed, generator, op.device)
    batch, n, dtype, device = tuple(op.batch_shape), op.n, op.dtype, op.device
    tiny = torch.finfo(dtype).tiny
    V = torch.zeros(*batch, n, 0, dtype=dtype, device=device)  # found eigenvectors
    lams = torch.zeros(*batch, 0, dtype=dtype, device=device)
    iters = torch.zeros(batch, dtype=torch.long, device=device)
    converged = []
    for _ in range(k):

        def deflated(x: Tensor, V: Tensor = V, lams: Tensor = lams) -> Tensor:
            return op.matmul(x) - V @ (lams.unsqueeze(-1) * (V.mT @ x))

        v = randn((*batch, n, 1), gen, dtype, device)
        v = v - V @ (V.mT @ v)
        v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(tiny)
        v_prev = torch.zeros_like(v)
        lam = torch.full((*batch, 1), float("nan"), dtype=dtype, device=device)
        conv = torch.zeros(*batch, 1, dtype=torch.bool, device=device)
        for t in range(max_iter):
            w = deflated(v)  # (*b, n, 1)
            lam_new = (v * w).sum(-2)  # (*b, 1) Rayleigh quotient
            scale = lam_new.abs().clamp_min(tiny)
            resid = torch.linalg.vector_norm(w - lam_new.unsqueeze(-2) * v, dim=-2) / scale
            change = (lam_new - lam).abs() / scale  # NaN at t = 0: not converged
            active = ~conv
            iters = iters + active.squeeze(-1)
            lam = torch.where(active, lam_new, lam)
            conv = conv | ((change <= tol) & (resid <= tol))
            x = w - momentum * v_prev
            s = torch.linalg.vector_norm(x, dim=-2, keepdim=True).clamp_min(tiny)
            upd = (~conv).unsqueeze(-2)
            v_prev = torch.where(upd, v / s, v_prev)
            v = torch.where(upd, x / s, v)
            if (t + 1) % check_every == 0 and bool(conv.all()):  # one host sync per check
                break
        v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(tiny)
        V = torch.cat([V, v], -1)
        lams = torch.cat([lams, lam], -1)
        converged.append(conv)
    AV = op.matmul(V)  # (*b, n, k): TRUE residuals against the original operator
    values = (V * AV).sum(-2)
    residuals = torch.linalg.vector_norm(AV - V * values.unsqueeze(-2), dim=-2)
    values = differentiable_eigenvalues(op.linear_op, V, values)
    return EigenResult(
        eigenvalues=values,
        eigenvectors=V.mT.contiguous(),
        residuals=residuals,
        iterations=iters,
        converged=torch.cat(converged, -1),
    )
