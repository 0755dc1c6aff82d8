"""Training benchmark: Adam on the exact-GP MLL with each back end, then test RMSE / NLL and wall time.

Reuses :func:`lanczos_grad_gp.app.training.fit_and_evaluate` (ConstantMean + ScaleKernel(RBF-ARD),
GaussianLikelihood, the same initial hyperparameters for every method; predictions by Cholesky)::

    python -m benchmarks.train --quick          # n = 1000 per data set, 10 steps
    python -m benchmarks.train                  # n = 5000, 50 steps
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lanczos_grad_gp.app.datasets import load_uci
from lanczos_grad_gp.app.training import fit_and_evaluate

from .common import DEFAULT_DATA_DIR, REPO_ROOT, dataset_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--datasets", nargs="+", default=["protein", "elevators", "kin40k", "pol"])
    p.add_argument("--n", type=int, default=None, help="rows per data set (train + 10%% test)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--methods", nargs="+", default=["ours", "gpytorch", "cholesky"])
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="folder with <name>/data.csv.gz per set (default: the bundled benchmarks/data)",
    )
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    p.add_argument("--tag", default=None, help="file stem of the outputs (default 'train_quick' or 'train_full')")
    args = p.parse_args(argv)
    n = args.n or (1000 if args.quick else 5000)
    steps = args.steps or (10 if args.quick else 50)
    tag = args.tag or ("train_quick" if args.quick else "train_full")
    rows = []
    for ds in args.datasets:
        data = load_uci(
            dataset_dir(args.data_dir, ds), n=n, seed=0, test_fraction=0.1, dtype=getattr(torch, args.dtype)
        )
        for method in args.methods:
            t0 = time.perf_counter()
            res = fit_and_evaluate(data, method, steps=steps, lr=args.lr, seed=0, progress=False)
            row = {
                "dataset": ds,
                "n_train": data.num_train,
                "method": method,
                "steps": steps,
                "wall_s": time.perf_counter() - t0,
                "time_per_step_s": res.time_per_step,
                "final_loss": res.losses[-1],
                "test_rmse": res.metrics.rmse,
                "test_nll": res.metrics.nll,
                **res.hyperparameters,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{tag}.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "| data set | n train | method | steps | wall (s) | s/step | final -MLL/n | test RMSE | test NLL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['n_train']} | {r['method']} | {r['steps']} | {r['wall_s']:.1f} | "
            f"{r['time_per_step_s']:.3f} | {r['final_loss']:.4f} | {r['test_rmse']:.4f} | {r['test_nll']:.4f} |"
        )
    (args.out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
