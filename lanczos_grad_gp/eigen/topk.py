r"""Top-``k`` eigenpairs by thick-restart block Lanczos, verified by a deflated check.

The iteration (:mod:`.block`) grows a block Krylov space ``span(V, AV, A²V, …)`` from ``b`` random
columns (``block_size``), fully reorthogonalised, with explicit Rayleigh–Ritz on the stored basis
and its products: Ritz pairs ``(θ_i, y_i)`` with TRUE residuals ``‖A y_i − θ_i y_i‖``, thick restarts
when the basis reaches ``ncv`` vectors (Wu & Simon 2000; Saad 2011, §8.4). A pair is converged when
its residual is ``≤ tol · max(|θ_i|, ε^{2/3}‖A‖) + 100 ε ‖A‖`` (the ARPACK rule).

Multiplicities: a block of ``b`` vectors finds up to ``b`` copies of a repeated eigenvalue; a single
vector sees one vector per eigenspace, and its residuals look perfect while a copy is missing. So
after convergence a deflated check (:mod:`.verify`) searches ``span(Y)^⊥`` from a fresh random block:
a Ritz value there beyond the least wanted returned eigenvalue proves a pair is missing, the
iteration restarts from the found vectors plus the new direction, and a pair the last check does
not support is reported unconverged with a ``NumericalWarning``.

Shift-invert (``sigma``): the eigenvalues nearest ``σ`` as the largest of ``(A − σI)^{-1}``
(:mod:`.shift_invert`).

Example:
    >>> import torch
    >>> from lanczos_grad_gp.eigen import lanczos
    >>> X = torch.randn(200, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> A = X @ X.T
    >>> res = lanczos(A, k=3, tol=1e-10, seed=0)
    >>> bool(torch.allclose(res.eigenvalues, torch.linalg.eigvalsh(A).flip(0)[:3]))
    True
    >>> Q, _ = torch.linalg.qr(torch.randn(100, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    >>> B = (Q * torch.cat([torch.full((4,), 10.0), torch.linspace(0, 5, 96)]).double()) @ Q.T  # 10 four times
    >>> lanczos(B, k=4, which="LA", block_size=4, seed=0).eigenvalues
    tensor([10.0000, 10.0000, 10.0000, 10.0000], dtype=torch.float64)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal, get_args

import torch
from torch import Tensor

from ..diagnostics import warn_not_converged
from .block import KrylovOptions, KrylovOutcome, block_krylov, compute_dtype
from .grad import differentiable_eigenvalues
from .inputs import PreparedOperator, check_k, check_tol, holds_operator_fixed, prepare_operator, resolve_generator
from .result import EigenResult, LanczosDiagnostics
from .ritz import sort_key
from .shift_invert import ShiftInvert, shift_invert
from .verify import verify_and_repair

__all__ = ["lanczos", "Which", "sort_key", "check_which"]

Which = Literal["LM", "LA", "SA"]


def check_which(which: object) -> str:
    if which not in get_args(Which):
        raise ValueError(f"which must be one of {get_args(Which)}; got {which!r}.")
    return str(which)


def _positive_int(name: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")
    return value


def _options(
    n: int, k: int, b: int, which: str, tol: float, max_iter: int | None, ncv: int | None, check_every: int | None
) -> KrylovOptions:
    """Resolve the defaults: ``ncv = max(2k + 1, 20, k + 4b)``, ``keep ≈ k + (ncv − k)/2``, budget."""
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < k):
        raise ValueError(
            f"max_iter must be an int >= k={k} (the Krylov space must hold k Ritz vectors); got {max_iter!r}."
        )
    if ncv is None:
        ncv = min(n, max(2 * k + 1, 20, k + 4 * b))
        if max_iter is not None:
            ncv = max(min(ncv, max_iter), min(k + 1, n))
    elif isinstance(ncv, bool) or not isinstance(ncv, int) or not (min(k + 1, n) <= ncv <= n):
        raise ValueError(f"ncv must be an int with min(k + 1, n) <= ncv <= n = {n}; got {ncv!r}.")
    if max_iter is None:
        max_iter = max(1000, 50 * ncv)
    if check_every is None:
        check_every = max(1, (ncv - k) // (4 * b))
    check_every = _positive_int("check_every", check_every)
    keep = max(min(k, ncv - 1), min(ncv - 1, k + max(1, (ncv - k) // 2)))
    return KrylovOptions(
        k=k,
        block_size=b,
        which=which,
        tol=tol,
        ncv=ncv,
        keep=max(keep, 1),
        max_matvecs=max_iter,
        check_every=check_every,
    )


def _final_pairs(op: PreparedOperator, V: Tensor, sigma: float) -> tuple[Tensor, Tensor, Tensor]:
    """Rayleigh–Ritz of ``A`` on ``span(V)`` with ONE product: values (nearest ``sigma`` first), vectors, residuals."""
    Vq, _ = torch.linalg.qr(V)
    AV = op.matmul(Vq)  # the one extra matmul for TRUE residuals
    cdt = compute_dtype(op.dtype, op.device)
    H = (Vq.mT @ AV).to(cdt)
    theta, Z = torch.linalg.eigh(0.5 * (H + H.mT))
    order = (theta - sigma).abs().argsort(dim=-1, stable=True)
    theta, Z = theta.gather(-1, order), Z.gather(-1, order.unsqueeze(-2).expand_as(Z)).to(op.dtype)
    Y, AY = Vq @ Z, AV @ Z
    values = theta.to(op.dtype)
    residuals = torch.linalg.vector_norm(AY - Y * values.unsqueeze(-2), dim=-2)
    return values, Y, residuals


def _stored_products_trusted(
    op: PreparedOperator, opts: KrylovOptions, outcome: KrylovOutcome, values: Tensor, anorm: Tensor, tol: float
) -> bool:
    """Whether the stored products ``A Y = (A Q) Z`` give the true residuals to well within ``tol``.

    ``A Y`` is recombined from products the operator returned, with the coefficients of ``Y``; each
    restart adds a rounding error of about ``√ncv ε ‖A‖``. Trusted when that bound, over an upper
    bound of the restarts, is below a tenth of every pair's tolerance, and the products are the
    operator's at the working precision (a half-precision operator rounds its input, so its stored
    products are ``A fl(q)``, not ``A q``). Otherwise the residuals cost one final product per pair.
    """
    if op.promoted:
        return False
    eps = torch.finfo(op.dtype).eps
    restarts = 1 + outcome.matvecs // max(1, opts.ncv - opts.keep)
    drift = (opts.ncv**0.5) * restarts * eps * anorm  # (*b,)
    scale = torch.maximum(values.abs(), eps ** (2.0 / 3.0) * anorm.unsqueeze(-1))  # (*b, k)
    return bool((drift.unsqueeze(-1) <= 0.1 * tol * scale).all())


@holds_operator_fixed
def lanczos(
    operator: object,
    *,
    k: int,
    max_iter: int | None = None,
    tol: float = 1e-4,
    reorthogonalize: bool | None = None,
    which: Which = "LM",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    ncv: int | None = None,
    check_every: int | None = None,
    block_size: int = 1,
    verify: bool | int = True,
    sigma: float | None = None,
    solve_tol: float | None = None,
    solve_max_iter: int = 500,
) -> EigenResult:
    r"""``k`` eigenpairs of a symmetric operator by thick-restart block Lanczos (see the module docstring).

    Args:
        operator: symmetric LinearOperator (GPyTorch lazy kernels by row blocks), dense ``(*b, n, n)``
            tensor, :class:`~lanczos_grad_gp.eigen.curvature.CurvatureOperator` (Hessian / GGN), an
            object with hessian-eigenthings' interface, or a ``(matvec, n[, dtype, device])`` tuple.
            Batched operators give batched results; half precision runs in float32 (warned).
        k: number of eigenpairs, ``1 ≤ k ≤ n``.
        max_iter: budget of operator applications (vectors, all blocks and restarts; repairs after a
            deflated check share it). ``None``: ``max(1000, 50 · ncv)``. A budget ``≤ ncv`` is a single
            unrestarted run with a Krylov dimension of ``max_iter`` (the hessian-eigenthings meaning).
        tol: relative residual ``‖A y − θ y‖ / |θ|`` at which a pair is converged.
        reorthogonalize: ``None``/``True``: full reorthogonalization (Ritz vectors need an orthonormal
            basis; the basis never exceeds ``ncv`` vectors, so it costs ``O(ncv · n)`` per vector).
            ``False``: only against the kept Ritz vectors and the last two blocks, with a Rayleigh–Ritz
            that does not assume orthonormality (:mod:`.ritz`).
        which: ``"LM"`` largest magnitude, ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic
            (ignored with ``sigma``).
        seed: seed of a local ``torch.Generator`` on the operator's device for the random blocks.
        generator: an explicit ``torch.Generator`` (on the operator's device) instead of ``seed``.
        ncv: basis size per cycle; ``None``: ``min(n, max(2k + 1, 20, k + 4 b))`` (ARPACK's for ``b = 1``).
        check_every: blocks between convergence checks inside a cycle.
        block_size: ``b`` columns per Lanczos block; multiplicities up to ``b`` are found directly, one
            operator call per block (a Hessian operator batches its ``b`` products).
        verify: run the deflated check after convergence (``True``: ``max(10, ncv // 2)`` applications;
            an int: that many). ``False``: ``converged`` reflects the residuals only.
        sigma: shift-invert: the ``k`` eigenvalues nearest ``sigma`` (scipy ``eigsh`` convention),
            ordered by increasing ``|λ − σ|``.
        solve_tol: relative residual of the shift-invert inner solves (``None``: ``max(tol/10, 100 ε)``).
        solve_max_iter: Lanczos–MINRES steps per inner solve.

    Returns:
        :class:`EigenResult` with :class:`LanczosDiagnostics`; eigenvalues are differentiable w.r.t. the
        operator's tensors (``∂λ_i = y_i^T ∂A y_i``, one ``_bilinear_derivative`` call in backward).
        Unconverged or unsupported pairs raise a ``NumericalWarning`` and have ``converged=False``.

    Raises:
        ValueError: ``k`` outside ``[1, n]``, non-square or non-symmetric dense input, bad ``which``,
            negative ``tol``, bad ``max_iter``/``ncv``/``block_size``, ``seed`` with ``generator``.
    """
    which = check_which(which)
    tol = check_tol(tol)
    op = prepare_operator(operator)
    n = op.n
    k = check_k(k, n)
    b = _positive_int("block_size", block_size)
    if b > n:
        raise ValueError(f"block_size={b} exceeds the operator size n={n}.")
    if isinstance(verify, bool):
        steps = None if verify else 0
    else:
        steps = _positive_int("verify", verify)
    opts = _options(n, k, b, "LM" if sigma is not None else which, tol, max_iter, ncv, check_every)
    if steps is None:
        steps = max(10, opts.ncv // 2)
    opts = replace(opts, full_reorth=True if reorthogonalize is None else bool(reorthogonalize))
    gen = resolve_generator(seed, generator, op.device)
    eps = torch.finfo(op.dtype).eps
    solver: ShiftInvert | None = None
    matmul = op.matmul
    if sigma is not None:
        stol = max(tol / 10, 100 * eps) if solve_tol is None else check_tol(solve_tol)
        solver = shift_invert(op, sigma, tol=stol, max_iter=_positive_int("solve_max_iter", solve_max_iter))
        matmul = solver
    shape = (op.batch_shape, n, op.dtype, op.device)
    outcome = block_krylov(matmul, shape, opts, gen)
    main_matvecs = outcome.matvecs
    checked = None
    if steps > 0:
        checked = verify_and_repair(
            matmul, shape, opts, outcome, steps=steps, budget=max(0, opts.max_matvecs - outcome.matvecs), gen=gen
        )
        outcome = checked.outcome
    final_products = 0
    if solver is None:
        values, vecs = outcome.values.to(op.dtype), outcome.vectors
        anorm = torch.maximum(values.abs().amax(-1), outcome.anorm.to(op.dtype))
        products = outcome.products
        if not _stored_products_trusted(op, opts, outcome, values, anorm, tol):
            products = op.matmul(vecs)  # TRUE residuals: one product per pair
            final_products = k
        residuals = torch.linalg.vector_norm(products - vecs * values.unsqueeze(-2), dim=-2)
    else:  # the products S y are one inverse-iteration step better than y (module shift_invert)
        values, vecs, residuals = _final_pairs(op, outcome.products, float(sigma))  # type: ignore[arg-type]
        anorm = torch.clamp_min(values.abs().amax(-1), abs(float(sigma)))  # type: ignore[arg-type]
        final_products = k
    # the final test allows 10x the requested tolerance plus a rounding floor of ~100 eps ||A||; with the
    # stored products it restates the iteration's own test, with a final product it checks it
    scale = torch.maximum(values.abs(), eps ** (2.0 / 3.0) * anorm.unsqueeze(-1))
    conv = outcome.converged & (residuals <= 10 * tol * scale + 100 * eps * anorm.unsqueeze(-1))
    if checked is not None:
        conv = conv & checked.supported
    if not bool(conv.all()):
        detail = (
            f"{int((~conv).sum())} of {conv.numel()} eigenpairs not converged (residual above tol, or the "
            "deflated check found an eigenvalue beyond them)"
        )
        warn_not_converged("eigen.lanczos", detail, "Raise max_iter or ncv, or use block_size >= the multiplicity.")
    extra = checked.matvecs if checked is not None else 0
    diag = LanczosDiagnostics(
        block_size=b,
        num_matvecs=(solver.matvecs if solver is not None else main_matvecs + extra) + final_products,
        verified=checked.verified
        if checked is not None
        else torch.zeros(op.batch_shape, dtype=torch.bool, device=op.device),
        checks=checked.checks if checked is not None else 0,
        repairs=checked.repairs if checked is not None else 0,
        sigma=None if sigma is None else float(sigma),
        solve_matvecs=solver.matvecs if solver is not None else 0,
        solve_worst_residual=solver.worst_residual if solver is not None else 0.0,
    )
    values = differentiable_eigenvalues(op.linear_op, vecs, values)
    return EigenResult(
        eigenvalues=values,
        eigenvectors=vecs.mT.contiguous(),
        residuals=residuals,
        iterations=outcome.iterations,
        converged=conv,
        diagnostics=diag,
    )
