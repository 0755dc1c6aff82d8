"""cProfile of ``lgg.inv_quad_logdet`` (forward + backward of the MLL) for one configuration.

python -m benchmarks.profile_ours --dataset protein --n 10000 --noise 0.01
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import gpytorch
import torch

import lanczos_grad_gp as lgg

from .common import DEFAULT_DATA_DIR, REPO_ROOT, load_data, make_model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="protein")
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--noise", type=float, default=0.01)
    p.add_argument("--chunked", action="store_true")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "profile_ours.txt"))
    args = p.parse_args(argv)
    x, y = load_data(args.dataset, args.n, dtype=torch.float64, device="cpu", data_dir=DEFAULT_DATA_DIR)
    model = make_model(x, y, args.noise, chunked=args.chunked)
    mll_fn = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    params = [q for _, q in model.named_parameters()]
    prof = cProfile.Profile()
    with lgg.settings.use_lanczos_grad(), lgg.record_calls() as calls:
        t0 = time.perf_counter()
        prof.enable()
        mll = mll_fn(model(x), y)
        t1 = time.perf_counter()
        torch.autograd.grad(mll, params)
        prof.disable()
        t2 = time.perf_counter()
    s = io.StringIO()
    s.write(
        f"{args.dataset} n={args.n} noise={args.noise}: forward {t1 - t0:.2f}s backward {t2 - t1:.2f}s; "
        f"iterations max {int(calls[-1].iterations.max())}, preconditioner rank {calls[-1].preconditioner_rank}, "
        f"threads {torch.get_num_threads()}\n"
    )
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(45)
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    with open(args.out, "w") as f:
        f.write(s.getvalue())
    print(s.getvalue()[:6000])


if __name__ == "__main__":
    main()
