"""Memory/scale benchmark: full-size exact-GP MLL + gradient without an ``n x n`` matrix.

Runs ``ours`` (forward-only Lanczos gradients) on an unchanged ``ScaleKernel(RBFKernel(ard))``
model for the whole training set of a UCI data set (protein: 41,157 training rows of 45,730 after
a 90/10 split). Above ``lgg.settings.max_dense_kernel_size`` the fused kernel operator recomputes
row blocks at every product and contracts the gradient by row blocks, so no ``n x n`` matrix is
ever formed (``--chunked-kernel`` wraps the kernel in ``ChunkedKernel`` instead, same operator).
Records wall time, the peak RSS increase (``/proc/self/status`` VmHWM after a reset), the Lanczos
diagnostics, and the ``n`` at which the dense methods stop fitting in memory, from the peak memory
*measured* by ``benchmarks.run`` (``--dense-results``, default ``results/protein10000.json``)::

    python -m benchmarks.scale --dataset protein --dtype float64
    python -m benchmarks.scale --n 5000 --max-iter 10      # a quick check
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from pathlib import Path

import gpytorch
import torch

import lanczos_grad_gp as lgg

from .common import DEFAULT_DATA_DIR, REPO_ROOT, current_peak_rss_mb, make_model, reset_peak_rss
from .common import load_data as _load_subset


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="protein")
    p.add_argument("--n", type=int, default=None, help="rows to use (default: the 90%% training split of all rows)")
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--max-iter", type=int, default=100, help="Lanczos steps cap (the library default)")
    p.add_argument("--num-probes", type=int, default=10)
    p.add_argument("--precond-rank", type=int, default=500)
    p.add_argument("--chunked-kernel", action="store_true", help="wrap the kernel in ChunkedKernel")
    p.add_argument(
        "--max-dense-kernel-size",
        type=int,
        default=None,
        help="lgg.settings.max_dense_kernel_size (default: the library's, 20000): raise it to keep the matrix dense",
    )
    p.add_argument(
        "--dense-results",
        type=Path,
        default=REPO_ROOT / "benchmarks" / "results" / "protein10000.json",
        help="benchmarks.run JSON whose measured peak memory gives the dense methods' n x n multiples",
    )
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--memory-budget-gb", type=float, default=24.0)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.n is None:
        from lanczos_grad_gp.app.datasets import load_uci

        data = load_uci(args.data_dir / args.dataset, seed=0, test_fraction=0.1)
        x, y = data.train_x.to(dtype), data.train_y.to(dtype)
    else:
        x, y = _load_subset(args.dataset, args.n, dtype=dtype, device="cpu", data_dir=args.data_dir)
    n = x.shape[0]
    dense_size = args.max_dense_kernel_size or lgg.settings.max_dense_kernel_size.value()
    model = make_model(x, y, args.noise, chunked=args.chunked_kernel)
    if args.chunked_kernel and args.chunk_size is not None:
        model.covar_module.chunk_size = args.chunk_size
    mll_fn = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    params = [p for _, p in model.named_parameters()]
    gc.collect()
    base = reset_peak_rss()
    t0 = time.perf_counter()
    with (
        lgg.settings.use_lanczos_grad(),
        lgg.settings.max_lanczos_iter(args.max_iter),
        lgg.settings.num_probes(args.num_probes),
        lgg.settings.max_preconditioner_size(args.precond_rank),
        lgg.settings.max_dense_kernel_size(dense_size),
        lgg.record_calls() as calls,
    ):
        mll = mll_fn(model(x), y)
        t_fwd = time.perf_counter() - t0
        grads = torch.autograd.grad(mll, params)
    total = time.perf_counter() - t0
    peak = current_peak_rss_mb() - base
    info = calls[-1]
    bytes_ = torch.finfo(dtype).bits / 8
    result = {
        "dataset": args.dataset,
        "n": n,
        "d": x.shape[1],
        "dtype": args.dtype,
        "noise": args.noise,
        "threads": torch.get_num_threads(),
        "model": "ChunkedKernel" if args.chunked_kernel else "unchanged ScaleKernel(RBFKernel(ard)) under the flag",
        "max_dense_kernel_size": dense_size,
        "kernel_products": "dense" if n <= dense_size else "row blocks",
        "max_iter": args.max_iter,
        "num_probes": args.num_probes,
        "mll": float(mll.detach()),
        "grad": torch.cat([g.reshape(-1) for g in grads]).tolist(),
        "forward_s": t_fwd,
        "total_s": total,
        "peak_rss_increase_mb": peak,
        "dense_nxn_mb": n * n * bytes_ / 2**20,
        "iterations_max": int(info.iterations.max()),
        "preconditioner_rank": info.preconditioner_rank,
        "inv_quad_rel_residual": info.inv_quad_relative_residual.tolist(),
        "logdet_rel_residual_max": float(info.logdet_relative_residual.max()),
        "logdet_standard_error": float(info.logdet_standard_error),
        "converged": info.converged,
        "dense_oom_n_estimates": oom_estimates(args.memory_budget_gb, bytes_, args.dense_results),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_dense" if result["kernel_products"] == "dense" else ""
    path = args.out / f"scale_{args.dataset}_{n}_{args.dtype}{suffix}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "grad"}, indent=1))
    print(f"wrote {path}")


def oom_estimates(budget_gb: float, bytes_per_entry: float, results: Path) -> dict[str, dict[str, float]]:
    """Largest ``n`` with ``c · n² · bytes ≤ budget`` per dense method, ``c`` MEASURED in ``results``.

    ``c = peak_rss_delta_mb / (n² · bytes of that run)`` is each method's peak memory of one
    forward+backward in units of one ``n x n`` matrix, from a ``benchmarks.run`` JSON; the worst
    (largest) ``c`` over that file's configurations is used. Empty when the file is absent.
    """
    if not results.exists():
        return {}
    budget = budget_gb * 2**30
    worst: dict[str, float] = {}
    for row in json.loads(results.read_text()):
        if "peak_rss_delta_mb" not in row or row["method"] == "ours-chunked":
            continue
        nxn_mb = row["n"] ** 2 * (8 if row["dtype"] == "float64" else 4) / 2**20
        worst[row["method"]] = max(worst.get(row["method"], 0.0), row["peak_rss_delta_mb"] / nxn_mb)
    return {
        m: {"nxn_multiple": round(c, 2), "largest_n": int(math.sqrt(budget / (c * bytes_per_entry)))}
        for m, c in sorted(worst.items(), key=lambda kv: kv[1])
    }


if __name__ == "__main__":
    main()
