"""CPU of one GP-routine call (value and gradient) by dense Cholesky against Lanczos at fixed step counts.

The cost model behind ``lgg.settings.deterministic_dense_size``: a deterministic-objective block hands a
covariance to dense Cholesky once a call stays unconverged at ``max_lanczos_iter``; that pays where a dense call
costs less than the steps the Lanczos calls would need. Each Lanczos call here runs exactly ``m`` steps
(tolerance 1e-13, cap ``m``; the table reports the steps actually taken, fewer where Lanczos converged or broke
down first), with the default rank-500 pivoted-Cholesky preconditioner and 10 probes, through the fused RBF
kernel, as under the flag. The lengthscale is ``0.3 · sqrt(d / 6)`` (the same typical scaled distance in every
dimension; at 0.3 a 26-dimensional kernel is nearly the identity and converges in a few steps).

    python -m benchmarks.dense_handover_cost --n 3000 5000 --d 6 --steps 100 300
"""

from __future__ import annotations

import argparse
import time
import warnings

import gpytorch
import torch

import lanczos_grad_gp as lgg
from lanczos_grad_gp.functions.dense_block import dense_inv_quad_logdet
from lanczos_grad_gp.kernels.matcher import fuse_stationary_kernel


def _problem(n: int, d: int, lengthscale: float, noise: float):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=d)).double()
    kernel.base_kernel.lengthscale = lengthscale

    def covariance():
        with lgg.settings.use_lanczos_grad():
            op = fuse_stationary_kernel(kernel(x)).evaluate_kernel()
        return op.add_diagonal(torch.tensor(noise, dtype=torch.float64))

    return covariance, y, list(kernel.parameters())


def _cpu(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def measure(n: int, d: int, steps: list[int], lengthscale: float | None = None, noise: float = 1e-3) -> dict:
    lengthscale = 0.3 * (d / 6) ** 0.5 if lengthscale is None else lengthscale
    covariance, y, params = _problem(n, d, lengthscale, noise)
    taken: dict[int, int] = {}

    def dense() -> None:
        inv_quad, logdet = dense_inv_quad_logdet(covariance(), y, True)
        torch.autograd.grad(inv_quad.sum() + logdet, params)

    def lanczos(m: int) -> None:
        with lgg.settings.lanczos_tol(1e-13), lgg.settings.max_lanczos_iter(m), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # calls end unconverged at their cap, on purpose
            with lgg.record_calls() as calls:
                inv_quad, logdet = lgg.inv_quad_logdet(covariance(), y, logdet=True)
            torch.autograd.grad(inv_quad.sum() + logdet, params)
        taken[m] = int(calls[0].iterations.max())

    out = {"n": n, "d": d, "dense_s": [_cpu(dense)]}
    out["lanczos_s"] = {m: _cpu(lambda m=m: lanczos(m)) for m in steps}
    out["dense_s"].append(_cpu(dense))
    out["steps_taken"] = taken
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", nargs="+", type=int, default=[3000, 5000])
    p.add_argument("--d", type=int, default=6)
    p.add_argument("--steps", nargs="+", type=int, default=[100, 300])
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    columns = " | ".join(f"Lanczos {m} steps, CPU s" for m in args.steps)
    print(f"| n | d | dense call, CPU s (two runs) | {columns} |")
    print("|---|---|---|" + "---|" * len(args.steps))
    for n in args.n:
        r = measure(n, args.d, args.steps)
        dense = " / ".join(f"{s:.2f}" for s in r["dense_s"])
        cells = " | ".join(f"{r['lanczos_s'][m]:.2f} ({r['steps_taken'][m]} steps)" for m in args.steps)
        print(f"| {n} | {args.d} | {dense} | {cells} |")


if __name__ == "__main__":
    main()
