"""Top-k eigenpairs: ``lanczos_grad_gp.eigen.lanczos`` (thick restart) vs ``scipy.sparse.linalg.eigsh`` (ARPACK).

Both solve the same dense float64 RBF kernel matrix ``K = exp(-|x - x'|^2 / (2 l^2)) + noise I`` with the
same ``k``, ``which``, tolerance and Krylov size (``ncv``), each counting operator applications (matvecs).
The eigenvalues must agree to ``10 * tol`` relative (the script fails otherwise). Prints a markdown table.

Data: the UCI protein data set (bundled: ``benchmarks/data/protein/data.csv.gz``, features z-scored, the first
``n`` rows of a seeded permutation), or a synthetic Gaussian sample with ``--synthetic``.

Usage::

    python benchmarks/eigen_vs_eigsh.py --n 5000 --k 10
    python benchmarks/eigen_vs_eigsh.py --n 5000 --k 10 --synthetic --which LA SA
"""

from __future__ import annotations

import argparse
import gzip
import time

import numpy as np
import scipy.sparse.linalg as sla
import torch

from lanczos_grad_gp.eigen import lanczos

from .common import DEFAULT_DATA_DIR

DATA = DEFAULT_DATA_DIR / "protein" / "data.csv.gz"


def load_points(n: int, synthetic: bool, seed: int) -> tuple[np.ndarray, str]:
    rng = np.random.default_rng(seed)
    if synthetic:
        return rng.standard_normal((n, 9)), "synthetic N(0, I_9)"
    if not DATA.exists():
        raise SystemExit(f"protein data not found at {DATA}; pass --synthetic")
    with gzip.open(DATA, "rt") as fh:
        data = np.loadtxt(fh, delimiter=",")
    X = data[:, :-1]  # last column: target
    X = (X - X.mean(0)) / X.std(0)
    return X[rng.permutation(len(X))[:n]], "UCI protein (z-scored)"


def rbf(X: np.ndarray, lengthscale: float, noise: float) -> torch.Tensor:
    Xt = torch.from_numpy(X)
    K = torch.exp(-0.5 * torch.cdist(Xt, Xt).square() / lengthscale**2)
    K = 0.5 * (K + K.T)
    K.diagonal().add_(noise)
    return K.contiguous()


def run_ours(K: torch.Tensor, k: int, which: str, tol: float, ncv: int, seed: int) -> tuple[np.ndarray, int, float]:
    lanczos(K[:50, :50], k=2, which=which, seed=seed)  # warm-up
    t0 = time.perf_counter()
    res = lanczos(K, k=k, which=which, tol=tol, ncv=ncv, seed=seed)
    dt = time.perf_counter() - t0
    if not bool(res.converged.all()):
        raise SystemExit(f"lanczos did not converge for which={which}")
    return res.eigenvalues.numpy(), int(res.iterations), dt


def run_eigsh(K: torch.Tensor, k: int, which: str, tol: float, ncv: int, seed: int) -> tuple[np.ndarray, int, float]:
    A = K.numpy()
    count = [0]

    def matmat(x: np.ndarray) -> np.ndarray:
        count[0] += 1 if x.ndim == 1 else x.shape[1]
        return A @ x

    op = sla.LinearOperator(A.shape, matvec=matmat, matmat=matmat, dtype=A.dtype)
    v0 = np.random.default_rng(seed).standard_normal(A.shape[0])
    t0 = time.perf_counter()
    vals = sla.eigsh(op, k=k, which=which, tol=tol, ncv=ncv, v0=v0, return_eigenvectors=True)[0]
    dt = time.perf_counter() - t0
    return vals, count[0], dt


def order(vals: np.ndarray, which: str) -> np.ndarray:
    key = {"LM": -np.abs(vals), "LA": -vals, "SA": vals}[which]
    return vals[np.argsort(key, kind="stable")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--which", nargs="+", default=["LA", "LM"], choices=["LM", "LA", "SA"])
    p.add_argument("--tol", type=float, default=1e-8)
    p.add_argument("--lengthscale", type=float, default=1.0)
    p.add_argument("--noise", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--synthetic", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    X, source = load_points(args.n, args.synthetic, args.seed)
    K = rbf(X, args.lengthscale, args.noise)
    ncv = min(args.n, max(2 * args.k + 1, 20))
    print(
        f"RBF kernel on {source}, n={args.n}, lengthscale={args.lengthscale}, noise={args.noise}, float64, "
        f"k={args.k}, tol={args.tol:g}, ncv={ncv}, torch threads={torch.get_num_threads()}\n"
    )
    print("| which | method | matvecs | wall time (s) | max rel. diff of eigenvalues |")
    print("|---|---|---:|---:|---:|")
    for which in args.which:
        ours, it_ours, t_ours = run_ours(K, args.k, which, args.tol, ncv, args.seed)
        ref, it_ref, t_ref = run_eigsh(K, args.k, which, args.tol, ncv, args.seed)
        ref = order(ref, which)
        diff = float(np.max(np.abs(ours - ref) / np.abs(ref)))
        if diff > 10 * args.tol:
            raise SystemExit(f"eigenvalues disagree for which={which}: max rel. diff {diff:.2e}")
        print(f"| {which} | lanczos_grad_gp.eigen.lanczos | {it_ours} | {t_ours:.3f} | {diff:.1e} |")
        print(f"| {which} | scipy eigsh (ARPACK) | {it_ref} | {t_ref:.3f} | — |")


if __name__ == "__main__":
    main()
