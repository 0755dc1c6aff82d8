"""Gradient error versus Lanczos residual (the paper's central claim) on one SPD matrix.

For ``v^T f(A) v`` with ``f = log`` and ``f = 1/x`` and ``A = A_0 + ε (Θ + Θ^T)``, prints, per
number of Lanczos steps ``m``, the relative residual reported by ``lgg.quad_form`` and the relative
error of the forward-only gradient ``∂/∂Θ`` against the dense float64 oracle (autograd through
``torch.linalg.eigh``), without and with full reorthogonalization.

    python benchmarks/grad_vs_residual.py [--n 200] [--cond 1e3]
"""

from __future__ import annotations

import argparse

import torch

import lanczos_grad_gp as lgg


def spd(n: int, cond: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)) @ Q.T


def dense_grad(A0: torch.Tensor, v: torch.Tensor, f) -> torch.Tensor:
    theta = torch.zeros_like(A0, requires_grad=True)
    lam, U = torch.linalg.eigh(A0 + 0.5 * (theta + theta.T))
    value = v @ (U * f(lam)) @ U.T @ v
    return torch.autograd.grad(value, theta)[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--cond", type=float, default=1e3)
    args = parser.parse_args(argv)
    A0 = spd(args.n, args.cond)
    v = torch.randn(args.n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    steps = [m for m in (10, 20, 40, 80, 120, 160, args.n) if m <= args.n]
    print(f"SPD matrix n = {args.n}, cond = {args.cond:.0e}, float64; relative errors vs dense eigh oracle\n")
    print("| f | reorth | m | relative residual | gradient rel. error | gradient_error_estimate |")
    print("|---|---|---|---|---|---|")
    for name, f in (("log", torch.log), ("inv", torch.reciprocal)):
        ref = dense_grad(A0, v, f)
        for reorth in (False, True):
            for m in steps:
                theta = torch.zeros_like(A0, requires_grad=True)
                value, info = lgg.quad_form(
                    A0 + 0.5 * (theta + theta.T), v, name, max_iter=m, tol=0.0, reorthogonalize=reorth, return_info=True
                )
                (grad,) = torch.autograd.grad(value, theta)
                err = float((grad - ref).norm() / ref.norm())
                print(
                    f"| {name} | {reorth} | {m} | {float(info.relative_residual):.1e} | {err:.1e} "
                    f"| {float(info.gradient_error_estimate):.1e} |"
                )


if __name__ == "__main__":
    main()
