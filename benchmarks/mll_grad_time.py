"""Median time of one MLL + gradient under the flag, per data set: a quick A/B of two code versions.

Run from the repository root (and once more with ``PYTHONPATH`` pointing at the other version)::

    python -m benchmarks.mll_grad_time --datasets protein elevators pol synthetic32 --n 4000 --noise 0.05

Fixed hyperparameters as in the other benchmarks (lengthscale 1 per z-scored dimension, outputscale 1),
torch threads ``--threads``; ``--repeats`` evaluations, the first a warm-up, median of the rest.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import gpytorch
import torch

import lanczos_grad_gp as lgg

from .common import DEFAULT_DATA_DIR, load_data, make_model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["protein", "elevators", "pol", "synthetic32"])
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"lanczos_grad_gp from {lgg.__file__}, threads {torch.get_num_threads()}")
    for name in args.datasets:
        x, y = load_data(name, args.n, dtype=torch.float64, device="cpu", data_dir=DEFAULT_DATA_DIR)
        model = make_model(x, y, args.noise)
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
        params = list(model.parameters())
        times = []
        for _ in range(args.repeats):
            with lgg.settings.use_lanczos_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", lgg.diagnostics.NumericalWarning)
                t0 = time.perf_counter()
                torch.autograd.grad(mll(model(x), y), params)
                times.append(time.perf_counter() - t0)
        rest = times[1:] or times
        summary = f"median fwd+bwd {statistics.median(rest):.3f} s  all {[round(t, 2) for t in times]}"
        print(f"{name:12s} {summary}", flush=True)


if __name__ == "__main__":
    main()
