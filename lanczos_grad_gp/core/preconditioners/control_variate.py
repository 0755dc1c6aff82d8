r"""The preconditioner as a control variate of the stochastic log-determinant gradient.

Wenger, Pleiss, Hennig, Cunningham & Gardner, "Preconditioning for Scalable Gaussian Process
Hyperparameter Optimization" (ICML 2022): with ``P(θ) ≈ K(θ)`` cheap to differentiate,

.. math::
    ∂ \log\det K = \underbrace{\operatorname{tr}(P^{-1} ∂P)}_{\text{exact, } O(n k^2)}
      + \underbrace{\operatorname{tr}(K^{-1} ∂K - P^{-1} ∂P)}_{\text{probes}} ,

and only the second term, which vanishes as ``P → K``, is estimated. In the GP routine the
probe term of ``z^T \log(B) z`` (``B = C^{-1} K C^{-T}``, ``C`` fixed) already estimates
``tr(K^{-1} ∂K)`` with ``E[\hat z \hat z^T] = P^{-1}`` for ``\hat z = C^{-T} z``; this module
supplies the rest, with the *same* probes:

.. math::
    \operatorname{tr}(G\, ∂P),\qquad G = P^{-1} - \frac1N \sum_p \hat z_p \hat z_p^\top ,

whose expectation is zero (the estimator stays unbiased) and which cancels the probe noise to
the extent that ``P`` tracks ``K``: with a full-rank factor (``P = K``) the log-determinant
gradient is exact for any number of probes. ``G`` is never formed; ``P`` is the pivoted-Cholesky
preconditioner with its pivots ``π`` fixed,

.. math::
    P(θ) = W Q^{-1} W^\top + D,\quad W = K_θ[:, π],\ Q = K_θ[π, π],

so with the interpolation ``R = W Q^{-1} = L L_π^{-1}`` (one triangular solve with the kept factor)

.. math::
    \operatorname{tr}(G\, ∂P) = 2 \langle G R, ∂W\rangle - \langle R^\top G R, ∂Q\rangle
      + \langle \operatorname{diag} G, ∂d\rangle ,

linear in the ``n × k`` block ``W`` (``Q`` is its rows ``π``) and the noise diagonal ``d``: one
differentiable evaluation of ``k`` kernel columns, ``O(n k (k + N + d))`` in all. With ``R``, ``G``
held fixed this is the gradient of the linear function

.. math::
    H(θ) = \operatorname{tr}(G\, M(θ)),\qquad M(θ) = R W^\top + W R^\top - R Q R^\top + D(θ),

``M`` the first-order model of ``P(θ)`` around the ``θ_0`` where ``P`` was built (``M(θ_0) = P``).
``E[H] = 0`` at every ``θ`` and, for Rademacher probes, ``H(θ_0) = n - \frac1N\sum_p \|z_p\|^2 = 0``.
:func:`control_variate_term` returns ``H`` with its value (:func:`logdet_control_variate`, ``H - H.detach()``,
a pure gradient term); the GP routine adds ``H - H.detach()``
(a pure gradient term) when ``P`` was built at this call, and ``H`` itself when ``P`` is held fixed
over many calls (:class:`lanczos_grad_gp.settings.deterministic_objective`), so the value is the
function whose gradient is returned.

**When it helps.** For Rademacher probes the variance of a quadratic-form estimate is twice the
squared off-diagonal Frobenius norm of its matrix, so the control variate lowers the variance iff
``‖C^{-1}(∂K − ∂P)C^{-T}‖ < ‖C^{-1} ∂K C^{-T}‖``: ``∂P`` must track ``∂K``. A low-rank factor that
leaves much of the kernel to the remainder ``K_θ − LL^T`` has a derivative that does not, and the
"reduced" estimate is then *worse* (measured on RBF-ARD GPs, n = 300–600, noise 1e-3–1e-1, 10
probes, 6 seeds: with ``ρ = tr(K_θ − LL^T) / tr(D)`` above 4 the gradient error grew 1.5–3×, at
``ρ ≤ 0.9`` it fell 1.3–50×, to zero for a full-rank factor). The term is therefore used only
when ``ρ ≤`` :data:`MAX_REMAINDER_RATIO` for every batch entry; the pivoted Cholesky's own
stopping rule (``ρ ≤ preconditioner_tol``, 0.01 by default) is far inside it.
"""

from __future__ import annotations

import torch
from linear_operator.operators import DenseLinearOperator, LinearOperator
from torch import Tensor

from ..._compat import added_diag_parts, get_entries

__all__ = ["MAX_REMAINDER_RATIO", "control_variate_term", "kernel_columns", "logdet_control_variate"]

#: largest ``tr(K_θ − LL^T) / tr(D)`` at which the control variate is used (module docstring)
MAX_REMAINDER_RATIO = 1.0


def kernel_columns(op: LinearOperator, pivots: Tensor) -> Tensor:
    """Columns ``op[..., :, π]`` (``(*batch, n, k)``) for per-batch-entry pivots ``π`` (``(*batch, k)``).

    Differentiable when ``op``'s entries are (kernel operators evaluate an ``n × k`` block, never the matrix).
    """
    batch, n, k = op.batch_shape, op.shape[-1], pivots.shape[-1]
    if isinstance(op, DenseLinearOperator):
        dense = op.tensor.expand(*batch, n, n)
        return dense.gather(-1, pivots.unsqueeze(-2).expand(*batch, n, k))
    nb = len(batch)
    batch_idx = [
        torch.arange(size, device=pivots.device).view(*([1] * i), size, *([1] * (nb - i - 1)), 1, 1)
        for i, size in enumerate(batch)
    ]
    row = torch.arange(n, device=pivots.device).view(*([1] * nb), n, 1)
    return get_entries(op, row, pivots.unsqueeze(-2), *batch_idx)


def control_variate_term(A: LinearOperator, precond: object, probes: Tensor, weight: float) -> Tensor | None:
    r"""``H(θ) = tr(G M(θ))`` (``(*batch)``), of gradient ``tr(G ∂P)`` (module docstring); ``None`` if not applicable.

    Args:
        A: the covariance ``K_θ + D`` (an ``AddedDiagLinearOperator``), with its autograd graph.
        precond: the preconditioner the probes were run with; needs ``pivots``, ``factor`` and ``remainder_ratio``
            (:class:`~lanczos_grad_gp.core.preconditioners.LowRankPlusDiagPreconditioner`).
        probes: ``(*batch, n, N)`` the probe vectors ``z_p`` of the log-determinant (not ``C^{-T} z``).
        weight: the probe average's weight, ``1 / N``.
    """
    parts = added_diag_parts(A)
    pivots, L = getattr(precond, "pivots", None), getattr(precond, "factor", None)
    ratio = getattr(precond, "remainder_ratio", None)
    if parts is None or pivots is None or L is None or ratio is None:
        return None
    if not bool((ratio <= MAX_REMAINDER_RATIO).all()):  # one host sync per call, outside any loop
        return None
    with torch.no_grad():
        k_ = pivots.shape[-1]
        L_pi = L.gather(-2, pivots.unsqueeze(-1).expand(*pivots.shape, k_))  # (*batch, k, k) lower triangular
        R = torch.linalg.solve_triangular(L_pi, L, upper=False, left=False)  # (*batch, n, k) R = L L_π^{-1}
    base, diag = parts
    batch, n, k = A.batch_shape, A.shape[-1], pivots.shape[-1]
    with torch.no_grad():
        z_hat = precond.inv_root_t(probes.to(R.dtype))  # (*batch, n, N); E[ẑ ẑ^T] = P^{-1}
        GR = precond.inv_root_t(precond.inv_root(R)) - weight * (z_hat @ (z_hat.mT @ R))  # (*batch, n, k)
        J = R.mT @ GR  # (*batch, k, k) R^T G R
        J = 0.5 * (J + J.mT)
        g_diag = precond.inv_diagonal() - weight * z_hat.square().sum(-1)  # (*batch, n)
    W = kernel_columns(base, pivots).to(R.dtype)  # (*batch, n, k), differentiable
    Q = W.gather(-2, pivots.unsqueeze(-1).expand(*batch, k, k))  # (*batch, k, k) K_θ[π, π]
    d = diag.diagonal()
    d = d.expand(*batch, n) if d.shape[:-1] != batch else d
    cv = 2.0 * (GR * W).sum((-2, -1)) - (J * Q).sum((-2, -1)) + (g_diag * d.to(R.dtype)).sum(-1)
    return cv


def logdet_control_variate(A: LinearOperator, precond: object, probes: Tensor, weight: float) -> Tensor | None:
    """A ``(*batch)`` term of value 0 whose gradient is ``tr(G ∂P)``: :func:`control_variate_term` minus its value."""
    term = control_variate_term(A, precond, probes, weight)
    return None if term is None else term - term.detach()
