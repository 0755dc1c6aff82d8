"""Memory/scale benchmark: full-size exact-GP MLL + gradient with the row-chunked kernel operator.

Runs ``ours`` (forward-only Lanczos gradients) on :class:`lanczos_grad_gp.kernel_ops.ChunkedKernel`
for the whole training set of a UCI data set (protein: 41,157 training rows of 45,730 after a
90/10 split), so no ``n x n`` matrix is ever formed; records wall time, the peak RSS increase
(``/proc/self/status`` VmHWM after a reset), the Lanczos diagnostics, and the ``n`` at which the
dense methods stop fitting in memory from the measured ``peak ≈ c · n² · bytes`` constants::

    python -m benchmarks.scale --dataset protein --dtype float64 --max-iter 20
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
from lanczos_grad_gp.kernel_ops import default_chunk_size

from .common import DEFAULT_DATA_DIR, REPO_ROOT, current_peak_rss_mb, make_model, reset_peak_rss
from .common import load_data as _load_subset


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="protein")
    p.add_argument("--n", type=int, default=None, help="rows to use (default: the 90%% training split of all rows)")
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--max-iter", type=int, default=20, help="Lanczos steps cap (bounds the time)")
    p.add_argument("--num-probes", type=int, default=10)
    p.add_argument("--precond-rank", type=int, default=200)
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--memory-budget-gb", type=float, default=24.0)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.n is None:
        from lanczos_grad_gp.datasets import load_uci

        data = load_uci(args.data_dir / args.dataset, seed=0, test_fraction=0.1)
        x, y = data.train_x.to(dtype), data.train_y.to(dtype)
    else:
        x, y = _load_subset(args.dataset, args.n, dtype=dtype, device="cpu", data_dir=args.data_dir)
    n = x.shape[0]
    model = make_model(x, y, args.noise, chunked=True)
    if args.chunk_size is not None:
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
        "chunk_size": args.chunk_size or default_chunk_size(n),
        "max_iter": args.max_iter,
        "num_probes": args.num_probes,
        "mll": float(mll),
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
        "dense_oom_n_estimates": oom_estimates(args.memory_budget_gb, bytes_),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"scale_{args.dataset}_{n}_{args.dtype}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "grad"}, indent=1))
    print(f"wrote {path}")


#: ASSUMED peak memory of one fwd+bwd of the dense methods in units of one n x n matrix (kernel,
#: its autograd intermediates / factor / gradient buffer). Not yet fitted: replace with
#: peak_rss_delta_mb / dense_nxn_mb from benchmarks.run results at n = 5000-10000.
DENSE_MATRIX_MULTIPLES = {
    "cholesky": 6.0,
    "gpytorch": 4.0,
    "ours (dense kernel)": 3.0,
    "backprop": 5.0,
    "adjoint": 3.0,
}


def oom_estimates(budget_gb: float, bytes_per_entry: float) -> dict[str, int]:
    """Largest ``n`` with ``c · n² · bytes ≤ budget`` for each dense method (``c`` above)."""
    budget = budget_gb * 2**30
    return {m: int(math.sqrt(budget / (c * bytes_per_entry))) for m, c in DENSE_MATRIX_MULTIPLES.items()}


if __name__ == "__main__":
    main()
