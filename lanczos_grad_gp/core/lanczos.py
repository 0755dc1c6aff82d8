r"""Batched Lanczos tridiagonalization: the one Lanczos loop of the package.

For a symmetric operator :math:`A` (``n x n``) and start vectors :math:`v` (the columns of
``v0``), ``m`` steps of the three-term recurrence

.. math::
    \beta_{j} q_{j+1} = A q_j - \alpha_j q_j - \beta_{j-1} q_{j-1},
    \qquad \alpha_j = q_j^\top A q_j,\ \beta_j = \lVert \cdot \rVert

give an orthonormal-in-exact-arithmetic basis :math:`Q = [q_1, \dots, q_m]` and the
tridiagonal :math:`T = Q^\top A Q` with
:math:`A Q = Q T + \beta_m q_{m+1} e_m^\top` (Golub & Van Loan, *Matrix Computations*, §10.1).

Every column of ``v0`` runs its own recurrence, side by side: each step is ONE call
``matmul(Q_j)`` with all running columns (and all batch entries; a column that has stopped in every
batch entry is left out of the products from the next check on). There is no reorthogonalization
by default; the forward-only gradient of Singh, Barros & Li (arXiv:2605.12801) is stable
without it. A column stops (its later entries become a decoupled padding block) when

* it breaks down, ``β_j ≤ breakdown_tol · ‖A‖_est``: the Krylov space is invariant and the
  answer for that column is exact; we never divide by the small ``β_j``;
* the optional ``stop_fn`` reports it converged. ``stop_fn`` is evaluated only every
  ``check_every`` steps (every ``check_every · ⌊j / (20 check_every)⌋`` steps once ``j`` passes
  ``20 check_every``, i.e. every ~5% of the steps taken), so the loop has no per-step host
  synchronisation and the checks' eigendecompositions stay ``O(m³)`` in total.

``max_iter`` is NOT capped at ``n`` without reorthogonalization: the basis loses orthogonality
and the recurrence may need more than ``n`` steps to converge (Greenbaum 1989: finite-precision
Lanczos behaves like exact Lanczos on a larger matrix with eigenvalues clustered around those of
``A``). With full reorthogonalization it is capped at ``n`` (step ``n`` breaks down in exact
arithmetic; a later vector would be rounding noise).

Scale safety: each column runs on ``A / s_c`` with ``s_c = ‖A q_1‖`` (a scale-safe norm,
:mod:`.norms`) and its ``α, β`` are multiplied back by ``s_c``, so norms inside the loop are
``O(1)`` whatever the scale of ``A`` (``‖A‖ = 1e-25`` in float32 or ``1e200`` in float64
neither underflows to a false breakdown nor overflows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .norms import safe_norm

__all__ = ["LanczosResult", "lanczos_tridiag"]

MatmulFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class LanczosResult:
    """Output of :func:`lanczos_tridiag` for start vectors ``v0`` of shape ``(*batch, n, k)``.

    Attributes:
        basis: ``(*batch, k, m, n)`` Lanczos vectors; row ``j`` of column ``c`` is ``q_{j+1}``.
            Rows after a column stopped are zero.
        alpha: ``(*batch, k, m)`` diagonal of ``T``; entries after a column stopped hold a
            padding value inside the column's spectrum hull (the first Rayleigh quotient),
            decoupled from the active block, so every ``T`` stays a valid input of ``f``.
        beta: ``(*batch, k, m - 1)`` off-diagonal of ``T`` (zero where a column stopped).
        residual_norm: ``(*batch, k)`` the last ``β`` of each column, ``‖r_m‖`` in
            ``A Q = Q T + r_m e_m^T``; ~0 after a breakdown.
        start_norm: ``(*batch, k)`` ``‖v‖`` of each start vector.
        iterations: ``(*batch, k)`` number of Lanczos steps each column took.
        broke_down: ``(*batch, k)`` whether a column stopped on an invariant subspace.
        stopped: ``(*batch, k)`` whether ``stop_fn`` declared the column converged.
        residual_vector: ``(*batch, n, k)`` the unnormalised residual ``r_m`` of each column's
            last step (``A Q = Q T + r_m e_m^T``, ``‖r_m‖ = residual_norm``); the start of a
            thick restart (Wu & Simon 2000). ``None`` only for results built by hand.
    """

    basis: Tensor
    alpha: Tensor
    beta: Tensor
    residual_norm: Tensor
    start_norm: Tensor
    iterations: Tensor
    broke_down: Tensor
    stopped: Tensor
    residual_vector: Tensor | None = None

    @property
    def num_steps(self) -> int:
        """Size ``m`` of the tridiagonal matrices (the largest column iteration count)."""
        return self.alpha.shape[-1]

    def tridiag(self) -> Tensor:
        """Dense tridiagonal matrices ``T``: ``(*batch, k, m, m)``."""
        T = torch.diag_embed(self.alpha)
        if self.num_steps > 1:
            T = T + torch.diag_embed(self.beta, offset=1) + torch.diag_embed(self.beta, offset=-1)
        return T


def lanczos_tridiag(
    matmul: MatmulFn,
    v0: Tensor,
    *,
    max_iter: int,
    reorthogonalize: bool = False,
    stop_fn: Callable[[LanczosResult], Tensor] | None = None,
    check_every: int = 10,
    breakdown_tol: float | None = None,
    allow_zero: bool = False,
    orthogonal_to: Tensor | None = None,
) -> LanczosResult:
    """Run batched Lanczos from the columns of ``v0`` (``(*batch, n, k)``).

    Args:
        matmul: ``X (*batch, n, k') -> A X``; called once per step with the ``k' ≤ k`` columns still
            running (all ``k`` until a check finds a column stopped in every batch entry).
        v0: start vectors as columns (not necessarily normalised).
        max_iter: maximal number of steps ``m`` (may exceed ``n`` without reorthogonalization; see the
            module docstring).
        reorthogonalize: full (twice-is-enough Gram-Schmidt) reorthogonalization against all
            previous vectors of the same column. Off by default.
        stop_fn: called every ``check_every`` steps with the partial result; returns a bool
            ``(*batch, k)`` of converged columns, which then stop.
        check_every: steps between convergence checks (one host sync per check).
        breakdown_tol: a column breaks down when ``β_j ≤ breakdown_tol · ‖A‖_est``, where
            ``‖A‖_est`` is the running max of ``|α_j| + β_j + β_{j-1}``. Default
            ``10·sqrt(n)·eps(dtype)``.
        allow_zero: allow all-zero start columns (they take zero steps); otherwise they raise.
        orthogonal_to: optional ``(*batch, n, l)`` orthonormal vectors (e.g. the kept Ritz vectors
            of a thick restart, Wu & Simon 2000) that every new Lanczos vector is explicitly
            orthogonalised against (twice), so the recurrence runs in their orthogonal
            complement; ``v0`` should already be orthogonal to them. Without this, the
            three-term recurrence amplifies their rounding-level components like a Lanczos
            polynomial evaluated outside the spectrum.
    """
    if not callable(matmul):
        raise TypeError(f"matmul must be a callable X -> A X; got {type(matmul).__name__}.")
    if not isinstance(v0, Tensor):
        raise TypeError(f"v0 must be a torch.Tensor; got {type(v0).__name__}.")
    if v0.dim() < 2:
        raise ValueError(f"v0 must have shape (*batch, n, k); got shape {tuple(v0.shape)}.")
    if v0.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"v0 must be a floating-point tensor of dtype float32 or float64; got dtype {v0.dtype}. Lanczos in half "
            "precision loses all accuracy within a few steps: convert with .float() or .double()."
        )
    if v0.shape[-2] == 0:
        raise ValueError(f"v0 has n = 0 rows; the operator must be at least 1 x 1 (v0 shape {tuple(v0.shape)}).")
    for arg, val in (("max_iter", max_iter), ("check_every", check_every)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{arg} must be a positive integer; got {val!r}.")
    if breakdown_tol is not None and (
        not isinstance(breakdown_tol, (int, float)) or isinstance(breakdown_tol, bool) or not 0 <= breakdown_tol < 1
    ):
        raise ValueError(f"breakdown_tol must be a float in [0, 1) or None; got {breakdown_tol!r}.")
    if stop_fn is not None and not callable(stop_fn):
        raise TypeError(f"stop_fn must be callable or None; got {type(stop_fn).__name__}.")
    *batch, n, k = v0.shape
    # with full reorthogonalization step n breaks down in exact arithmetic; later vectors would be noise
    m = min(int(max_iter), n) if reorthogonalize else int(max_iter)
    eps = torch.finfo(v0.dtype).eps
    if breakdown_tol is None:
        breakdown_tol = 10.0 * (n**0.5) * eps

    start_norm = safe_norm(v0, dim=-2)  # (*batch, k)
    if not bool(torch.isfinite(start_norm).all()):
        raise ValueError("v0 (the start vectors) contains NaN or Inf.")
    nonzero = start_norm > 0
    if not allow_zero and not bool(nonzero.all()):
        raise ValueError("v0 has an all-zero start column: Lanczos needs a nonzero start vector.")

    # buffers grow by doubling (memory follows the steps taken, not max_iter)
    cap = min(m, max(64, 2 * check_every))
    basis = v0.new_zeros(*batch, k, cap, n)
    alpha = v0.new_zeros(*batch, k, cap)
    beta = v0.new_zeros(*batch, k, cap)
    active_hist = torch.zeros(*batch, k, cap + 1, dtype=torch.bool, device=v0.device)
    stopped = torch.zeros(*batch, k, dtype=torch.bool, device=v0.device)
    broke = torch.zeros(*batch, k, dtype=torch.bool, device=v0.device)

    q = v0 / torch.where(nonzero, start_norm, torch.ones_like(start_norm)).unsqueeze(-2)
    q_prev = torch.zeros_like(q)
    resid_vec = torch.zeros_like(q)  # (*batch, n, k) r of each column's last performed step
    beta_prev = v0.new_zeros(*batch, k)
    norm_est = v0.new_zeros(*batch, k)
    active = nonzero.clone()
    finite = torch.ones((), dtype=torch.bool, device=v0.device)  # checked at the host syncs only
    scale = v0.new_ones(*batch, k)  # (*batch, k) s_c: column c runs on A / s_c
    steps = m
    next_check = check_every
    live: Tensor | None = None  # (k',) the columns the operator is applied to; None: all k
    for j in range(m):
        if j == basis.shape[-2]:  # grow (a Python int comparison: no host sync)
            basis, alpha, beta, active_hist = _grow(basis, alpha, beta, active_hist, min(m, 2 * j))
        basis[..., j, :] = q.mT
        active_hist[..., j] = active
        w = _apply(matmul, q, live, j + 1)  # (*batch, n, k)
        if j == 0:
            s0 = safe_norm(w, dim=-2)
            scale = torch.where((s0 > 0) & torch.isfinite(s0), s0, scale)
        w = w / scale.unsqueeze(-2)
        a = (q * w).sum(-2)  # (*batch, k)
        w = w - a.unsqueeze(-2) * q - beta_prev.unsqueeze(-2) * q_prev
        if orthogonal_to is not None:
            for _ in range(2):
                w = w - orthogonal_to @ (orthogonal_to.mT @ w)
        if reorthogonalize:
            prev = basis[..., : j + 1, :]  # (*batch, k, j+1, n)
            wt = w.mT.unsqueeze(-1)  # (*batch, k, n, 1)
            for _ in range(2):
                wt = wt - prev.mT @ (prev @ wt)
            w = wt.squeeze(-1).mT
        b = torch.linalg.vector_norm(w, dim=-2)  # (*batch, k)
        resid_vec = torch.where(active.unsqueeze(-2), w, resid_vec)
        norm_est = torch.maximum(norm_est, a.abs() + b + beta_prev)
        finite = finite & torch.isfinite(a).all() & torch.isfinite(b).all()
        alpha[..., j] = a
        beta[..., j] = b
        broke = broke | (active & (b <= breakdown_tol * norm_est))
        active = active & ~broke
        q_prev = q
        q = w / torch.where(active, b, torch.ones_like(b)).unsqueeze(-2) * active.unsqueeze(-2)
        beta_prev = b * active
        last = j + 1 == m
        if not last and j + 1 == next_check:
            # checks every ``check_every`` steps up to 20 of them, then every ~5% of the steps taken (still
            # multiples of check_every): each check costs an m x m eigendecomposition, so this keeps the
            # total check cost O(m^3) instead of O(m^4 / check_every), overshooting by at most ~5%
            next_check += check_every * max(1, (j + 1) // (20 * check_every))
            _raise_if_nonfinite(finite)
            if stop_fn is not None:
                partial = _assemble(
                    basis, alpha, beta, active_hist, start_norm, stopped, broke, j + 1, resid_vec, scale
                )
                conv = _check_stop(stop_fn(partial), active)
                stopped = stopped | conv
                active = active & ~conv
                q = q * active.unsqueeze(-2)
                beta_prev = beta_prev * active
            running = active.flatten(end_dim=-2).any(0) if batch else active  # (k,) running in some entry
            running_idx = running.nonzero().squeeze(-1)  # (k',) its size is this check's one host sync
            if running_idx.numel() == 0:
                steps = j + 1
                break
            if running_idx.numel() < (k if live is None else live.numel()):
                live = running_idx
    _raise_if_nonfinite(finite)
    return _assemble(basis, alpha, beta, active_hist, start_norm, stopped, broke, steps, resid_vec, scale)


def _grow(
    basis: Tensor, alpha: Tensor, beta: Tensor, active_hist: Tensor, cap: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The loop's buffers with room for ``cap`` steps (zero-padded copies)."""
    extra = cap - basis.shape[-2]
    basis = torch.cat([basis, basis.new_zeros(*basis.shape[:-2], extra, basis.shape[-1])], -2)
    alpha = torch.cat([alpha, alpha.new_zeros(*alpha.shape[:-1], extra)], -1)
    beta = torch.cat([beta, beta.new_zeros(*beta.shape[:-1], extra)], -1)
    active_hist = torch.cat([active_hist, active_hist.new_zeros(*active_hist.shape[:-1], extra)], -1)
    return basis, alpha, beta, active_hist


def _apply(matmul: MatmulFn, q: Tensor, live: Tensor | None, step: int) -> Tensor:
    """``A q`` for ``q`` ``(*batch, n, k)``, applying ``matmul`` to the ``live`` columns only.

    Stopped columns of ``q`` are zero, so their product is zero in exact arithmetic; leaving them out
    makes the operator's work follow the columns still running (a single column costs a third of
    eleven in a dense CPU product at n = 5000).
    """
    x = q if live is None else q.index_select(-1, live)  # (*batch, n, k')
    w = matmul(x)
    if not isinstance(w, Tensor) or w.shape != x.shape or w.dtype != x.dtype:
        raise ValueError(
            f"matmul must map a (*batch, n, k) tensor to one of the same shape {tuple(x.shape)} and dtype "
            f"{x.dtype}; got {_describe(w)} at step {step}."
        )
    if live is None:
        return w
    return q.new_zeros(q.shape).index_copy_(-1, live, w)


def _describe(w: object) -> str:
    if isinstance(w, Tensor):
        return f"shape {tuple(w.shape)}, dtype {w.dtype}"
    return type(w).__name__


def _check_stop(conv: object, active: Tensor) -> Tensor:
    """Validate a ``stop_fn`` result: a bool tensor of the columns' shape ``(*batch, k)``."""
    if not isinstance(conv, Tensor) or conv.dtype != torch.bool or conv.shape != active.shape:
        raise ValueError(
            f"stop_fn must return a bool tensor of shape {tuple(active.shape)} (one entry per column); "
            f"got {_describe(conv)}."
        )
    return conv.to(active.device) & active


def _raise_if_nonfinite(finite: Tensor) -> None:
    if not bool(finite):  # one host sync, only where the loop already synchronises
        raise ValueError(
            "The operator produced NaN or Inf in a matrix-vector product: check A (and the data and "
            "hyperparameters it is built from) for NaN/Inf or overflow."
        )


def _assemble(
    basis: Tensor,
    alpha: Tensor,
    beta: Tensor,
    active_hist: Tensor,
    start_norm: Tensor,
    stopped: Tensor,
    broke: Tensor,
    steps: int,
    residual_vector: Tensor | None = None,
    scale: Tensor | None = None,
) -> LanczosResult:
    """Cut the preallocated buffers to ``steps``, pad the stopped columns' blocks, undo the column scaling."""
    done = active_hist[..., :steps]  # (*batch, k, steps) step j performed
    nxt = active_hist[..., 1 : steps + 1].clone()  # step j+1 performed
    if steps < active_hist.shape[-1] - 1:
        nxt[..., -1] = False  # result cut at `steps`: nothing after
    s = torch.ones_like(start_norm) if scale is None else scale
    a = alpha[..., :steps] * s.unsqueeze(-1)
    pad = torch.where(done[..., :1], a[..., :1], torch.ones_like(a[..., :1]))
    a = torch.where(done, a, pad)
    b_all = beta[..., :steps] * s.unsqueeze(-1)
    off = (b_all * nxt)[..., : steps - 1]
    last_step = done & ~nxt
    residual = (b_all * last_step).sum(-1)
    iterations = done.sum(-1)
    return LanczosResult(
        basis=basis[..., :steps, :],
        alpha=a,
        beta=off,
        residual_norm=residual,
        start_norm=start_norm,
        iterations=iterations,
        broke_down=broke.clone(),
        stopped=stopped.clone(),
        residual_vector=None if residual_vector is None else residual_vector * s.unsqueeze(-2),
    )
