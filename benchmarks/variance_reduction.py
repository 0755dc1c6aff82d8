"""Log-det gradient error against probes and preconditioner rank, with and without the control variate.

Run from the repository root::

    python -m benchmarks.variance_reduction                       # four UCI sets, n = 2000 (~15 min, 2 cores)
    python -m benchmarks.variance_reduction --datasets pol --n 1000 --ranks 100 400 --probes 4 10

For each data set (bundled in ``benchmarks/data``), the fixed-hyperparameter model of the other
benchmarks (z-scored data, ScaleKernel(RBF-ARD), lengthscale 1, outputscale 1, ``--noise``) is
evaluated by Cholesky (the reference) and by ours with Lanczos forced, for every preconditioner
rank (``max_preconditioner_size`` with ``preconditioner_tol(0)``, so the rank is exactly the one
asked for unless the factor is exact earlier), probe count and seed, with
``preconditioner_control_variate`` on and off. Reported: the median over seeds of the relative
error of the full gradient vector, the remainder ratio ``ρ = tr(K − LLᵀ)/tr(D)`` of the factor (the
control variate is used when ``ρ ≤ 1``), and whether it was used. Writes ``<out>.json``, ``<out>.md``
and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path

import gpytorch
import torch

import lanczos_grad_gp as lgg
from lanczos_grad_gp.core.preconditioners import pivoted_cholesky

from .common import DEFAULT_DATA_DIR, REPO_ROOT, load_data, make_model


def gradient(model, x, y, context) -> torch.Tensor:
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    params = [p for p in model.parameters() if p.requires_grad]
    with context:
        grads = torch.autograd.grad(mll(model(x), y), params)
    return torch.cat([g.reshape(-1) for g in grads]).detach()


def remainder_ratio(model, x, rank: int, noise: float) -> float:
    with torch.no_grad():
        K = model.covar_module(x).evaluate_kernel()
        L = pivoted_cholesky(K, rank)
        diag = K.diagonal()
        return float((diag - L.square().sum(-1)).clamp_min(0).sum() / (noise * x.shape[0]))


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in args.datasets:
        x, y = load_data(name, args.n, dtype=torch.float64, device="cpu", data_dir=args.data_dir)
        model = make_model(x, y, args.noise)
        ref = gradient(model, x, y, gpytorch.settings.max_cholesky_size(10**9))
        for rank in args.ranks:
            rho = remainder_ratio(model, x, rank, args.noise)
            for probes in args.probes:
                for cv in (False, True):
                    errors, used = [], []
                    for seed in range(args.seeds):
                        ctx = _ours(rank, probes, seed, cv)
                        with lgg.record_calls() as calls, warnings.catch_warnings():
                            warnings.simplefilter("ignore", lgg.diagnostics.NumericalWarning)
                            g = gradient(model, x, y, ctx)
                        errors.append(float((g - ref).norm() / ref.norm()))
                        used.append(bool(calls[-1].variance_reduced))
                    row = {
                        "dataset": name,
                        "n": args.n,
                        "d": x.shape[-1],
                        "noise": args.noise,
                        "rank": rank,
                        "rho": rho,
                        "probes": probes,
                        "control_variate": cv,
                        "used": all(used),
                        "median_grad_rel_err": statistics.median(errors),
                        "max_grad_rel_err": max(errors),
                    }
                    rows.append(row)
                    print(
                        f"{name:10s} rank {rank:5d} rho {rho:9.3g} probes {probes:3d} cv {int(cv)} "
                        f"(used {int(row['used'])}) median err {row['median_grad_rel_err']:.2e}",
                        flush=True,
                    )
    return rows


def _ours(rank: int, probes: int, seed: int, cv: bool):
    import contextlib

    stack = contextlib.ExitStack()
    for ctx in (
        lgg.settings.use_lanczos_grad(),
        lgg.settings.max_cholesky_size(0),
        lgg.settings.max_preconditioner_size(rank),
        lgg.settings.preconditioner_tol(0.0),
        lgg.settings.num_probes(probes),
        lgg.settings.probe_seed(seed),
        lgg.settings.preconditioner_control_variate(cv),
    ):
        stack.enter_context(ctx)
    return stack


def to_markdown(rows: list[dict]) -> str:
    out = [
        "| data set | n | d | rank | ρ = tr(K−LLᵀ)/tr(D) | probes | plain: median grad err | "
        "control variate: median grad err | used | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    key = lambda r: (r["dataset"], r["rank"], r["probes"])  # noqa: E731
    plain = {key(r): r for r in rows if not r["control_variate"]}
    for r in rows:
        if not r["control_variate"]:
            continue
        p = plain[key(r)]
        ratio = r["median_grad_rel_err"] / max(p["median_grad_rel_err"], 1e-300)
        out.append(
            f"| {r['dataset']} | {r['n']} | {r['d']} | {r['rank']} | {r['rho']:.3g} | {r['probes']} "
            f"| {p['median_grad_rel_err']:.2e} | {r['median_grad_rel_err']:.2e} | {'yes' if r['used'] else 'no'} "
            f"| {ratio:.2f} |"
        )
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["dataset"] for r in rows})
    probes = max(r["probes"] for r in rows)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for cv, style in ((False, "o--"), (True, "s-")):
            sel = sorted(
                (r for r in rows if r["dataset"] == name and r["probes"] == probes and r["control_variate"] == cv),
                key=lambda r: r["rank"],
            )
            ax.loglog(
                [r["rank"] for r in sel],
                [r["median_grad_rel_err"] for r in sel],
                style,
                label="control variate" if cv else "plain",
            )
        ax.set_title(f"{name} (n={rows[0]['n']}, {probes} probes)")
        ax.set_xlabel("preconditioner rank")
        ax.set_ylabel("gradient relative error")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["protein", "elevators", "kin40k", "pol"])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--noise", type=float, default=0.01)
    p.add_argument("--ranks", nargs="+", type=int, default=[50, 200, 500, 1000])
    p.add_argument("--probes", nargs="+", type=int, default=[4, 10, 32])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "variance_reduction")
    args = p.parse_args(argv)
    rows = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    args.out.with_suffix(".md").write_text(to_markdown(rows))
    plot(rows, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
