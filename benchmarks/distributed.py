"""Row-sharded exact-GP MLL + gradient over ``torch.distributed``: time and peak memory per rank for p ranks.

Every rank loads the same data and an identically initialised ``DistributedKernel(ScaleKernel(RBF-ARD))``
model (lengthscale 1, outputscale 1, the given noise; Lanczos at every ``n``, library defaults
otherwise) and runs ONE timed MLL forward + backward. Recorded per rank: the wall time (after a
barrier), the peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) before and after
the computation (its increase is the computation's memory), CUDA's peak allocation on GPUs, and the
MLL and gradient, so that the ranks and the values of different ``p`` can be compared.

On one CPU machine (``torch.multiprocessing.spawn``, gloo, ``cores / p`` threads per rank)::

    python -m benchmarks.distributed                          # p = 1 and 2, protein, n = 20000, float64
    python -m benchmarks.distributed --n 10000 --procs 1 2    # a smaller run

On a multi-GPU node (``torchrun`` starts the ranks; nccl, one GPU per rank)::

    torchrun --standalone --nproc_per_node=8 -m benchmarks.distributed --torchrun --device cuda \\
        --dataset synthetic --n 1000000 --dtype float32 --tag distributed_gpu8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

import gpytorch
import torch
import torch.distributed as dist

import lanczos_grad_gp as lgg
from lanczos_grad_gp.app.datasets import load_uci
from lanczos_grad_gp.distributed import DistributedKernel, spawn_local

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "benchmarks" / "data"
RESULTS = REPO_ROOT / "benchmarks" / "results"


class _GP(gpytorch.models.ExactGP):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, noise: float) -> None:
        super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.ZeroMean()
        base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=x.shape[-1]))
        base.outputscale = 1.0
        base.base_kernel.lengthscale = torch.ones(1, x.shape[-1])
        self.covar_module = DistributedKernel(base)
        self.likelihood.noise = noise

    def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _data(dataset: str, n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rows on every rank: a seeded subsample of a bundled UCI set, or a seeded smooth 8-d function."""
    if dataset == "synthetic":
        g = torch.Generator().manual_seed(0)
        x = torch.rand(n, 8, generator=g, dtype=torch.float64) * 4 - 2
        f = torch.sin(x @ torch.linspace(0.3, 1.2, 8, dtype=torch.float64))
        y = f + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
        x, y = (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()
    else:
        data = load_uci(DATA_DIR / dataset, n=n, seed=0, test_fraction=0.0)
        x, y = data.train_x, data.train_y
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def run_rank(dataset: str, n: int, noise: float, dtype_name: str, device_name: str) -> dict:
    """One rank's measurement (inside an initialised process group)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    x, y = _data(dataset, n, getattr(torch, dtype_name), device)
    model = _GP(x, y, noise).to(device=device, dtype=x.dtype)
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    params = [p for _, p in model.named_parameters()]
    rss_before = _peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    t0 = time.perf_counter()
    with lgg.settings.use_lanczos_grad(), lgg.settings.max_cholesky_size(0), lgg.record_calls() as calls:
        value = mll(model(x), y)
    grads = torch.autograd.grad(value, params)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    info = calls[-1]
    return {
        "rank": rank,
        "world_size": world,
        "n": n,
        "rows": (rank * n // world, (rank + 1) * n // world),
        "seconds": seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_rss_before_mb": rss_before,
        "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "mll": float(value.detach()),
        "grad": torch.cat([g.reshape(-1) for g in grads]).detach().cpu().double().tolist(),
        "iterations": int(info.iterations.max()),
        "preconditioner_rank": int(info.preconditioner_rank),
        "converged": bool(info.converged),
    }


def _write(results: list[dict], args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "dataset": args.dataset,
        "n": args.n,
        "noise": args.noise,
        "dtype": args.dtype,
        "device": args.device,
        "cpu_count": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    (RESULTS / f"{args.tag}.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
    ref = next((r for r in results if r["world_size"] == 1), results[0])
    g_ref = torch.tensor(ref["grad"])
    lines = [
        f"# Row-sharded MLL + gradient ({args.dataset}, n = {args.n}, noise {args.noise}, {args.dtype}, {args.device})",
        "",
        f"`python -m benchmarks.distributed {' '.join(args.argv)}`; {os.cpu_count()} CPU cores shared by all ranks, "
        f"load average at the end {meta['loadavg_at_end'][0]:.1f}. One forward + backward per configuration.",
        "",
        "| p | rank | rows | time (s) | peak RSS (MB) | RSS increase (MB) | Lanczos steps | precond. rank | "
        "MLL rel. diff vs p=1 | grad rel. diff vs p=1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        g = torch.tensor(r["grad"])
        lines.append(
            f"| {r['world_size']} | {r['rank']} | {r['rows'][0]}–{r['rows'][1]} | {r['seconds']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['peak_rss_before_mb']:.0f} | {r['iterations']} | "
            f"{r['preconditioner_rank']} | {abs(r['mll'] - ref['mll']) / abs(ref['mll']):.1e} | "
            f"{float((g - g_ref).norm() / g_ref.norm()):.1e} |"
        )
    (RESULTS / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="protein", help="a bundled UCI set (benchmarks/data) or 'synthetic'")
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="world sizes p to run one after the other")
    p.add_argument("--torchrun", action="store_true", help="ranks started by torchrun (env://); --procs is ignored")
    p.add_argument("--tag", default="distributed_cpu", help="results file stem in benchmarks/results")
    args = p.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    job = (args.dataset, args.n, args.noise, args.dtype, args.device)
    if args.torchrun:
        if args.device == "cuda":  # one GPU per rank, selected before the group's first collective
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        mine = run_rank(*job)
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        if dist.get_rank() == 0:
            _write(gathered, args)
        dist.destroy_process_group()
        return
    results: list[dict] = []
    for world in args.procs:
        threads = max(1, math.floor((os.cpu_count() or 1) / world))
        results += spawn_local(run_rank, world, *job, threads=threads, timeout_s=3600)
        print(f"p = {world}: {[round(r['seconds'], 1) for r in results[-world:]]} s", flush=True)
    _write(results, args)


if __name__ == "__main__":
    main()
