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

#: (label, file suffix, function name) of the phases reported in the summary table
PHASES = [
    ("dense kernel matrix (fused: `fill_matrix`)", "kernels/blocks.py", "fill_matrix"),
    ("GPyTorch kernel build (generic path: `evaluate_kernel`)", "lazy_evaluated_kernel_tensor.py", "evaluate_kernel"),
    ("pivoted-Cholesky preconditioner", "preconditioners/low_rank.py", "pivoted_cholesky_preconditioner"),
    ("log-det control variate", "preconditioners/control_variate.py", "control_variate_term"),
    ("Lanczos loop (`lanczos_tridiag`)", "core/lanczos.py", "lanczos_tridiag"),
    ("gradient factors (`gradient_factors`)", "core/forward_grad.py", "gradient_factors"),
    ("our backward (`forward_only` Function)", "functions/forward_only.py", "backward"),
    ("kernel derivative (`_bilinear_derivative`)", "", "_bilinear_derivative"),
]


def phase_table(prof: cProfile.Profile, forward_s: float, backward_s: float) -> str:
    """Markdown table of the cumulative time of each phase, plus the backward share the issue asks for."""
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    rows, cum = [], {}
    for label, file_suffix, name in PHASES:
        # outermost entry only: recursive/nested calls of the same function are already in its cumtime
        times = [v[3] for (f, _, fn), v in stats.items() if fn == name and f.endswith(file_suffix)]
        cum[name] = max(times) if times else 0.0
        rows.append(f"| {label} | {cum[name]:.3f} |" if times else f"| {label} | not called |")
    lanczos = cum["lanczos_tridiag"]
    bwd = cum["backward"] + cum["gradient_factors"]
    share = f"{bwd / lanczos:.1%}" if lanczos else "–"
    return "\n".join(
        [
            f"forward {forward_s:.3f} s, backward (autograd.grad) {backward_s:.3f} s",
            "",
            "| phase | cumulative s |",
            "|---|---|",
            *rows,
            "",
            f"backward incl. gradient factors / Lanczos loop = {bwd:.3f} / {lanczos:.3f} = {share}",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="protein")
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--noise", type=float, default=0.01)
    p.add_argument("--chunked", action="store_true")
    p.add_argument("--generic", action="store_true", help="fused_kernels(False): GPyTorch's own kernel autograd")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "profile_ours.txt"))
    args = p.parse_args(argv)
    x, y = load_data(args.dataset, args.n, dtype=torch.float64, device="cpu", data_dir=DEFAULT_DATA_DIR)
    model = make_model(x, y, args.noise, chunked=args.chunked)
    mll_fn = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    params = [q for _, q in model.named_parameters()]
    prof = cProfile.Profile()
    fused = lgg.settings.fused_kernels(not args.generic)
    with lgg.settings.use_lanczos_grad(), fused, lgg.record_calls() as calls:
        t0 = time.perf_counter()
        prof.enable()
        mll = mll_fn(model(x), y)
        t1 = time.perf_counter()
        torch.autograd.grad(mll, params)
        prof.disable()
        t2 = time.perf_counter()
    s = io.StringIO()
    s.write(phase_table(prof, t1 - t0, t2 - t1) + "\n")
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
