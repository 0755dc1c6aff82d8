"""Eigen-utilities against their peers: ``scipy.sparse.linalg.eigsh`` (ARPACK) and hessian-eigenthings.

Problems (every operator application is counted by a wrapper and computed by the same torch product,
the same for every method; scipy gets it through ``torch.from_numpy``):

* ``hessian``: the Hessian of a small MLP's MSE loss (synthetic regression data), top-``k`` by magnitude;
  dense reference ``torch.autograd.functional.hessian`` + ``eigvalsh``. hessian-eigenthings runs on its
  own ``HessianOperator``, scipy and ours on ``lanczos_grad_gp.eigen.curvature.HessianOperator``.
* ``cnn``: the same for a small CNN classifier (two 3x3 convolutions, average pooling, cross-entropy) on
  synthetic 10x10 images.
* ``kernel`` / ``kernel_large``: a dense RBF kernel matrix ``K + σ² I`` (``--n``, default 5000;
  ``--large-n``, default 20000), top-``k`` (``LA``); above ``--dense-max-n`` the reference is ARPACK at
  ``tol=0`` from another start vector (a dense ``eigvalsh`` at n = 20000 takes longer than all the rest).
* ``multiplicity``: the issue's spectrum (10 four times, 5, then ``[0, 4]``), ``k = 4``, ``LA``: which
  methods return a wrong pair marked converged.
* ``shift``: the smallest eigenvalues of a noisy kernel with heteroscedastic noise (distinct small
  eigenvalues under a large spread): plain ``SA`` against shift-invert ``sigma=0``.
* ``memory``: peak RSS of ``lanczos(k(X), k=3)`` on a GPyTorch lazy RBF kernel (subprocesses), ours
  against the old path (``evaluate_kernel()``: GPyTorch's dense evaluation).

hessian-eigenthings' ``lanczos`` is one unrestarted Krylov run of ``max_iter`` steps: it is run with
``max_iter`` = 2k (its default), 50, 100, 200, 400 and reported at the first that marks every pair
converged (its own test), together with its error against the dense reference.

Usage::

    python -m benchmarks.eigen_vs_peers --parts hessian cnn kernel kernel_large multiplicity shift --k 10
    python -m benchmarks.eigen_vs_peers --parts memory --memory-sizes 10000 20000 30000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse.linalg as sla
import torch

from lanczos_grad_gp.eigen import lanczos
from lanczos_grad_gp.eigen.curvature import CurvatureOperator, HessianOperator

RESULTS = Path(__file__).resolve().parent / "results"

try:  # optional peer
    import hessian_eigenthings as he
except ImportError:  # pragma: no cover - reported in the output
    he = None


class Counted(CurvatureOperator):
    """Any ``X -> A X`` callable as a curvature operator that counts applied vectors.

    ``inner``: the operator ``fn`` belongs to; its ``cached_graph()`` block is entered with ours (so a
    Hessian reuses its gradient graph exactly as when passed to the eigen function directly).
    """

    def __init__(self, fn, n: int, dtype: torch.dtype, inner: CurvatureOperator | None = None) -> None:
        super().__init__(n, dtype, torch.device("cpu"))
        self.fn = fn
        self.inner = inner
        self.count = 0

    def cached_graph(self):
        return self.inner.cached_graph() if self.inner is not None else super().cached_graph()

    def _product(self, V: torch.Tensor) -> torch.Tensor:
        self.count += V.shape[-1]
        return self.fn(V)


def rel_errors(vals: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(vals - ref) / np.abs(ref)))


def order(vals: np.ndarray, which: str) -> np.ndarray:
    key = {"LM": -np.abs(vals), "LA": -vals, "SA": vals}[which]
    return vals[np.argsort(key, kind="stable")]


def row(method: str, vals, ref, conv, matvecs: int, seconds: float, tol: float, which: str) -> dict:
    """One table row: ``vals`` sorted by ``which`` against the dense reference ``ref`` (same order)."""
    vals = order(np.asarray(vals, dtype=np.float64), which)
    err = np.abs(vals - ref) / np.abs(ref)
    conv = np.ones(len(vals), bool) if conv is None else np.asarray(conv, bool)
    return {
        "method": method,
        "matvecs": int(matvecs),
        "seconds": round(seconds, 3),
        "max_rel_err": float(err.max()),
        "claimed_converged": int(conv.sum()),
        "wrong_but_converged": int(((err > 10 * tol) & conv).sum()),
    }


def run_ours(op_fn, n, dtype, k, which, tol, seed, ref, label, inner=None, **kw) -> dict:
    op = Counted(op_fn, n, dtype, inner)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = lanczos(op, k=k, which=which, tol=tol, seed=seed, **kw)
    dt = time.perf_counter() - t0
    return row(label, res.eigenvalues.numpy(), ref, res.converged.numpy(), op.count, dt, tol, which)


def torch_product(A: torch.Tensor):
    """``x -> A x`` for scipy through the same torch product (and thread setting) as every other method."""
    return lambda x: (A @ torch.from_numpy(x)).numpy()


def run_eigsh(matvec_np, n, k, which, tol, seed, ref, sigma=None, A=None, inner=None) -> dict:
    count = [0]

    def mm(x: np.ndarray) -> np.ndarray:
        count[0] += 1 if x.ndim == 1 else x.shape[1]
        return matvec_np(x)

    op = sla.LinearOperator((n, n), matvec=mm, matmat=mm, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(n)
    t0 = time.perf_counter()
    if sigma is None:
        with inner.cached_graph() if inner is not None else contextlib.nullcontext():
            vals = sla.eigsh(op, k=k, which=which, tol=tol, v0=v0)[0]
        label = "scipy eigsh (ARPACK)"
    else:  # shift-invert needs the matrix: scipy factorises A - sigma I (LU), no matvec count
        vals = sla.eigsh(A, k=k, sigma=sigma, which="LM", tol=tol, v0=v0)[0]
        label = f"scipy eigsh sigma={sigma:g} (dense LU)"
    dt = time.perf_counter() - t0
    return row(label, vals, ref, None, count[0], dt, tol, which)


def run_he_lanczos(matvec_t, n, dtype, k, which, tol, seed, ref, operator=None) -> dict:
    if he is None:
        return {"method": "hessian-eigenthings lanczos", "note": "not installed"}
    total = 0
    for max_iter in (2 * k, 50, 100, 200, 400):
        max_iter = min(max_iter, n - 1)
        count = [0]
        base = operator if operator is not None else he.LambdaOperator(matvec_t, n, dtype=dtype)
        inner = base.matvec

        def mv(v, inner=inner, count=count):
            count[0] += 1
            return inner(v)

        base.matvec = mv  # instance attribute: counts every product of this run
        t0 = time.perf_counter()
        res = he.lanczos(base, k=k, max_iter=max_iter, tol=tol, which=which, seed=seed)
        dt = time.perf_counter() - t0
        total += count[0]
        if bool(res.converged.all()) or max_iter == n - 1 or max_iter == 400:
            out = row(
                f"hessian-eigenthings lanczos (max_iter={max_iter})",
                res.eigenvalues.numpy(),
                ref,
                res.converged.numpy(),
                count[0],
                dt,
                tol,
                which,
            )
            out["matvecs_all_tries"] = total
            return out
    raise AssertionError("unreachable")


def run_he_power(matvec_t, n, dtype, k, tol, seed, ref, operator=None, max_iter=500, which="LM") -> dict:
    if he is None:
        return {"method": "hessian-eigenthings deflated_power_iteration", "note": "not installed"}
    count = [0]
    base = operator if operator is not None else he.LambdaOperator(matvec_t, n, dtype=dtype)
    inner = base.matvec

    def mv(v):
        count[0] += 1
        return inner(v)

    base.matvec = mv
    t0 = time.perf_counter()
    res = he.deflated_power_iteration(base, k=k, max_iter=max_iter, tol=tol, seed=seed)
    dt = time.perf_counter() - t0
    return row(
        f"hessian-eigenthings deflated_power_iteration (max_iter={max_iter})",
        res.eigenvalues.numpy(),
        ref,
        res.converged.numpy(),
        count[0],
        dt,
        tol,
        which,
    )


# --------------------------------------------------------------------------------------------


def hessian_rows(args, model, x, y, loss) -> tuple[list[dict], int, float]:
    """Every method on the Hessian of ``loss(model(x), y)``: ours and scipy on our operator, peers on theirs."""
    H = HessianOperator(model, loss, x, y)
    n = H.n
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    names = [nm for nm, _ in model.named_parameters()]

    def f(flat):
        parts = torch.split(flat, sizes)
        return loss(
            torch.func.functional_call(
                model, {m: t.reshape(p.shape) for m, t, p in zip(names, parts, params, strict=True)}, (x,)
            ),
            y,
        )

    t0 = time.perf_counter()
    dense = torch.autograd.functional.hessian(f, torch.cat([p.detach().reshape(-1) for p in params]))
    t_dense = time.perf_counter() - t0
    ev = torch.linalg.eigvalsh(0.5 * (dense + dense.T)).numpy()
    k, tol = args.k, args.tol
    ref = order(ev, "LM")[:k]
    dt = torch.float64
    for _ in range(3):  # warm-up (first-call allocations, autograd set-up) so no method pays for it
        H.matmul(torch.randn(n, 4, dtype=dt)), H.matvec(torch.randn(n, dtype=dt))
    rows = [
        run_ours(H.matmul, n, dt, k, "LM", tol, args.seed, ref, "ours lanczos (block_size=1)", inner=H),
        run_ours(H.matmul, n, dt, k, "LM", tol, args.seed, ref, "ours lanczos (block_size=4)", inner=H, block_size=4),
        run_eigsh(lambda v: H.matmul(torch.from_numpy(v)).numpy(), n, k, "LM", tol, args.seed, ref, inner=H),
    ]
    if he is not None:
        mk = lambda: he.HessianOperator(model, [(x, y)], he.supervised_loss(loss))  # noqa: E731
        rows.append(run_he_lanczos(None, n, dt, k, "LM", tol, args.seed, ref, operator=mk()))
        rows.append(run_he_power(None, n, dt, k, tol, args.seed, ref, operator=mk(), max_iter=args.power_iter))
    return rows, n, t_dense


def part_hessian(args) -> dict:
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
    ).double()
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(512, 8, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(-1, keepdim=True)) + 0.1 * torch.randn(512, 1, generator=g, dtype=torch.float64)
    rows, n, t_dense = hessian_rows(args, model, x, y, torch.nn.MSELoss())
    return {
        "problem": f"Hessian of an MLP 8-32-32-1 (tanh), MSE, 512 points, n = {n} parameters, float64, "
        f"k = {args.k}, which = LM, tol = {args.tol:g}; dense reference (autograd.functional.hessian + eigvalsh): "
        f"{t_dense:.1f} s",
        "rows": rows,
    }


def part_cnn(args) -> dict:
    """A small CNN classifier on synthetic 10x10 images (3 classes, cross-entropy): conv, pooling, tanh."""
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 3),
        torch.nn.Tanh(),
        torch.nn.AvgPool2d(2),
        torch.nn.Conv2d(6, 8, 3),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 2 * 2, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 3),
    ).double()
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(256, 1, 10, 10, generator=g, dtype=torch.float64)
    y = (x[:, 0, :5].sum((-1, -2)) > 0).long() + (x[:, 0, 5:].sum((-1, -2)) > 0).long()  # 3 classes
    rows, n, t_dense = hessian_rows(args, model, x, y, torch.nn.CrossEntropyLoss())
    return {
        "problem": f"Hessian of a CNN conv3x3(6)-tanh-avgpool-conv3x3(8)-tanh-linear(16)-tanh-linear(3), "
        f"cross-entropy, 256 synthetic 10x10 images, n = {n} parameters, float64, k = {args.k}, which = LM, "
        f"tol = {args.tol:g}; dense reference (autograd.functional.hessian + eigvalsh): {t_dense:.1f} s",
        "rows": rows,
    }


def rbf(n: int, seed: int, lengthscale: float = 1.0, noise: float = 1e-2, d: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, dtype=torch.float64, generator=g)
    K = torch.exp(-0.5 * torch.cdist(X, X).square() / lengthscale**2)
    K = 0.5 * (K + K.T)
    K.diagonal().add_(noise)
    return K


def kernel_rows(args, n: int) -> dict:
    K = rbf(n, args.seed)
    k, tol = args.k, args.tol
    Kn = K.numpy()
    t0 = time.perf_counter()
    if n <= args.dense_max_n:
        ev = torch.linalg.eigvalsh(K).numpy()
        how = "dense eigvalsh"
    else:  # eigvalsh at n = 20000 takes far longer than every method below together
        ev = sla.eigsh(Kn, k=k, which="LA", tol=0.0, ncv=4 * k, v0=np.random.default_rng(12345).standard_normal(n))[0]
        how = "reference scipy eigsh(tol=0, ncv=4k), another start vector"
    t_ref = time.perf_counter() - t0
    ref = order(ev, "LA")[:k]
    dt = torch.float64
    rows = [
        run_ours(K.__matmul__, n, dt, k, "LA", tol, args.seed, ref, "ours lanczos (block_size=1)"),
        run_ours(K.__matmul__, n, dt, k, "LA", tol, args.seed, ref, "ours lanczos (block_size=4)", block_size=4),
        run_eigsh(torch_product(K), n, k, "LA", tol, args.seed, ref),
        run_he_lanczos(K.__matmul__, n, dt, k, "LA", tol, args.seed, ref),
    ]
    if n <= args.power_max_n:
        rows.append(run_he_power(K.__matmul__, n, dt, k, tol, args.seed, ref, max_iter=args.power_iter, which="LA"))
    else:
        rows.append(
            {
                "method": "hessian-eigenthings deflated_power_iteration",
                "note": f"not run at n > --power-max-n {args.power_max_n} (thousands of products)",
            }
        )
    return {
        "problem": f"RBF kernel K + 0.01 I, n = {n}, 3-d Gaussian inputs, lengthscale 1, float64, k = {k}, "
        f"which = LA, tol = {tol:g}; {how}: {t_ref:.1f} s",
        "rows": rows,
    }


def part_kernel(args) -> dict:
    return kernel_rows(args, args.n)


def part_kernel_large(args) -> dict:
    return kernel_rows(args, args.large_n)


def part_multiplicity(args) -> dict:
    n = 2000
    g = torch.Generator().manual_seed(args.seed)
    eigs = torch.cat([torch.full((4,), 10.0), torch.tensor([5.0]), 4 * torch.rand(n - 5, generator=g)]).double()
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    A = (Q * eigs) @ Q.T
    A = 0.5 * (A + A.T)
    ref = order(eigs.numpy(), "LA")[:4]
    tol = 1e-8
    rows = [
        run_ours(
            A.__matmul__,
            n,
            torch.float64,
            4,
            "LA",
            tol,
            args.seed,
            ref,
            "ours (block_size=1, verify=False)",
            verify=False,
        ),
        run_ours(A.__matmul__, n, torch.float64, 4, "LA", tol, args.seed, ref, "ours (block_size=1, deflated check)"),
        run_ours(A.__matmul__, n, torch.float64, 4, "LA", tol, args.seed, ref, "ours (block_size=4)", block_size=4),
        run_eigsh(torch_product(A), n, 4, "LA", tol, args.seed, ref),
        run_he_lanczos(A.__matmul__, n, torch.float64, 4, "LA", tol, args.seed, ref),
    ]
    return {
        "problem": f"eigenvalue 10 four times, then 5, then U[0, 4]; n = {n}, float64, k = 4, LA, tol = {tol:g}",
        "rows": rows,
    }


def part_shift(args) -> dict:
    n, k, tol = args.shift_n, 5, 1e-8
    g = torch.Generator().manual_seed(args.seed)
    X = torch.rand(n, 1, dtype=torch.float64, generator=g)
    K = torch.exp(-0.5 * torch.cdist(X, X).square() / 0.2**2)
    noise = torch.linspace(0.01, 1.0, n, dtype=torch.float64)
    from linear_operator.operators import AddedDiagLinearOperator, DenseLinearOperator, DiagLinearOperator

    op = AddedDiagLinearOperator(DenseLinearOperator(K), DiagLinearOperator(noise))
    A = K + torch.diag(noise)
    ref = order(torch.linalg.eigvalsh(A).numpy(), "SA")[:k]
    rows = []
    for label, kw in (("ours which=SA", {"which": "SA"}), ("ours sigma=0 (shift-invert)", {"sigma": 0.0})):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = lanczos(op, k=k, tol=tol, seed=args.seed, max_iter=args.shift_budget, **kw)
        dt = time.perf_counter() - t0
        r = row(label, res.eigenvalues.numpy(), ref, res.converged.numpy(), res.diagnostics.num_matvecs, dt, tol, "SA")
        r["outer_iterations"] = int(res.iterations)
        rows.append(r)
    rows.append(run_eigsh(torch_product(A), n, k, "SA", tol, args.seed, ref))
    rows.append(run_eigsh(None, n, k, "SA", tol, args.seed, ref, sigma=0.0, A=A.numpy()))
    return {
        "problem": f"1-d RBF kernel (lengthscale 0.2) + diag(linspace(0.01, 1, n)), n = {n}, float64, k = {k} "
        f"smallest, tol = {tol:g}; ours with max_iter = {args.shift_budget} outer applications",
        "rows": rows,
    }


MEMORY_CHILD = """
import resource, sys, time, torch, gpytorch, warnings
warnings.simplefilter("ignore")
torch.set_num_threads({threads})
import lanczos_grad_gp as lgg
from lanczos_grad_gp.eigen import lanczos
n, mode = {n}, "{mode}"
X = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
k = gpytorch.kernels.RBFKernel().double()  # its lengthscale requires grad: grad mode, as a user calls it
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
K = k(X)
op = K.evaluate_kernel() if mode == "old" else K
with lgg.settings.max_dense_kernel_size(0 if mode == "blocks" else 20000):
    res = lanczos(op, k=3, seed=0, block_size={block})
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
mv, conv = int(res.diagnostics.num_matvecs), bool(res.converged.all())
print(peak / 2**20, base / 2**20, dt, mv, conv, res.eigenvalues.tolist())
"""

LABELS = {
    "ours": "ours (fused RBF; dense g(r^2) while n <= max_dense_kernel_size)",
    "blocks": "ours, max_dense_kernel_size(0): row blocks",
    "old": "old: evaluate_kernel() (GPyTorch dense)",
}


def part_memory(args) -> dict:
    rows = []
    for n in args.memory_sizes:
        for mode in args.memory_modes:
            if mode == "old" and n > args.old_max_n:
                rows.append({"n": n, "path": LABELS[mode], "note": f"not run (> --old-max-n {args.old_max_n})"})
                continue
            code = MEMORY_CHILD.format(n=n, mode=mode, threads=args.threads, block=args.memory_block)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if out.returncode != 0:
                rows.append({"n": n, "path": LABELS[mode], "note": f"failed: {out.stderr.strip().splitlines()[-1:]}"})
                continue
            peak, base, dt, mv, conv, _ = out.stdout.strip().split(" ", 5)
            rows.append(
                {
                    "n": n,
                    "path": LABELS[mode],
                    "peak_rss_gb": round(float(peak), 2),
                    "rss_before_gb": round(float(base), 2),
                    "seconds": round(float(dt), 1),
                    "matvecs": int(mv),
                    "converged": conv == "True",
                }
            )
            print(rows[-1], flush=True)
    return {
        "problem": f"lanczos(RBFKernel()(X), k=3, block_size={args.memory_block}) in grad mode, X ~ N(0, I_3), "
        "float64; peak RSS of a fresh process (ru_maxrss)",
        "rows": rows,
    }


def to_markdown(result: dict) -> str:
    rows = result["rows"]
    keys = []
    for r in rows:
        keys += [key for key in r if key not in keys]
    lines = [f"**{result['problem']}**", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = []
        for key in keys:
            v = r.get(key, "")
            cells.append(f"{v:.1e}" if isinstance(v, float) and key == "max_rel_err" else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--parts",
        nargs="+",
        default=["hessian", "cnn", "kernel", "kernel_large", "multiplicity", "shift"],
        choices=["hessian", "cnn", "kernel", "kernel_large", "multiplicity", "shift", "memory"],
    )
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--large-n", type=int, default=20000, help="n of the part kernel_large")
    p.add_argument("--dense-max-n", type=int, default=8000, help="largest n with a dense eigvalsh reference")
    p.add_argument("--power-max-n", type=int, default=5000, help="largest n for hessian-eigenthings power iteration")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--tol", type=float, default=1e-8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--power-iter", type=int, default=500, help="hessian-eigenthings power iterations per pair")
    p.add_argument("--shift-n", type=int, default=2000)
    p.add_argument("--shift-budget", type=int, default=2000)
    p.add_argument("--memory-sizes", type=int, nargs="+", default=[10000, 20000, 30000])
    p.add_argument("--memory-block", type=int, default=1)
    p.add_argument("--memory-modes", nargs="+", default=["ours", "old"], choices=["ours", "blocks", "old"])
    p.add_argument("--old-max-n", type=int, default=10000, help="largest n for the old dense path (memory)")
    p.add_argument("--tag", default="eigen_vs_peers")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    parts = {
        "hessian": part_hessian,
        "cnn": part_cnn,
        "kernel": part_kernel,
        "kernel_large": part_kernel_large,
        "multiplicity": part_multiplicity,
        "shift": part_shift,
        "memory": part_memory,
    }
    header = (
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, hessian-eigenthings "
        f"{getattr(he, '__version__', 'not installed')}, scipy {__import__('scipy').__version__}"
    )
    print(header)
    out = {"header": header, "results": {}}
    for name in args.parts:
        res = parts[name](args)
        out["results"][name] = res
        print(to_markdown(res), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(out, indent=1))
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()
