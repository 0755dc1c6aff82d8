"""MLL + gradient benchmark: forward-only Lanczos gradients vs Cholesky, GPyTorch CG, and differentiated Lanczos.

Run from the repository root::

    python -m benchmarks.run --quick                     # a few minutes on 2 CPU cores
    python -m benchmarks.run                             # full grid (long)
    python -m benchmarks.run --datasets protein --n 5000 10000 --noise 0.1 0.01
    python -m benchmarks.run --device cuda --dtype float32

For every (dataset, n, noise) all methods run in this process on the same model, operator,
hyperparameters (lengthscale 1 per z-scored dimension, outputscale 1, the given noise), probes
and preconditioner. Reported per method: median forward+backward time over ``--repeats``, the
ratio to ``ours`` from the same run, relative error of the MLL and of the full gradient vector
(raw noise, raw outputscale, raw lengthscales) against Cholesky, and the peak memory of one
forward+backward measured in a fresh subprocess (``ru_maxrss`` delta on CPU,
``torch.cuda.max_memory_allocated`` on CUDA). Writes ``results.json``, ``results.md`` and PNG
plots to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .common import (
    DEFAULT_DATA_DIR,
    DENSE_METHODS,
    METHODS,
    REPO_ROOT,
    current_peak_rss_mb,
    dense_bytes,
    load_data,
    make_model,
    mll_and_grad,
    rel,
    reset_peak_rss,
    timed,
)

ORDER = [
    "cholesky",
    "ours",
    "ours-generic",
    "ours-tight",
    "ours-nystrom",
    "ours-greedy",
    "gpytorch",
    "gpytorch-tight",
    "backprop",
    "backprop-reorth",
    "adjoint",
    "adjoint-fused",
    "ours-chunked",
]
SLOW_METHODS = ("cholesky", "gpytorch-tight", "backprop", "backprop-reorth")
QUICK = {"datasets": ["protein"], "n": [1000, 2000], "noise": [0.01], "repeats": 2}
FULL = {
    "datasets": ["protein", "elevators", "kin40k", "pol"],
    "n": [2000, 5000, 10000],
    "noise": [0.1, 0.01],
    "repeats": 3,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small grid that finishes in a few minutes on 2 cores")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="folder with <name>/data.csv.gz per set (default: the bundled benchmarks/data)",
    )
    p.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        help="UCI names under --data-dir, 'synthetic' (d = 8) or 'synthetic32' (d = 32)",
    )
    p.add_argument("--n", nargs="+", type=int, default=None)
    p.add_argument("--noise", nargs="+", type=float, default=None)
    p.add_argument("--methods", nargs="+", default=ORDER, choices=ORDER)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument(
        "--slow-repeats",
        type=int,
        default=None,
        help=f"repeats of the slow references {SLOW_METHODS} (default: --repeats)",
    )
    p.add_argument("--max-dense-n", type=int, default=20000, help="skip n x n methods above this n")
    p.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    p.add_argument("--tag", default=None, help="file stem of the outputs (default 'quick' or 'full')")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: memory measurement
    args = p.parse_args(argv)
    grid = QUICK if args.quick else FULL
    args.datasets = args.datasets or grid["datasets"]
    args.n = args.n or grid["n"]
    args.noise = args.noise or grid["noise"]
    args.repeats = args.repeats or grid["repeats"]
    args.tag = args.tag or ("quick" if args.quick else "full")
    return args


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def child_main(spec: dict) -> None:
    """Subprocess: one forward+backward of one method; print its peak-memory delta as JSON."""
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    dtype, device = _dtype(spec["dtype"]), spec["device"]
    x, y = load_data(spec["dataset"], spec["n"], dtype=dtype, device=device, data_dir=Path(spec["data_dir"]))
    model = make_model(x, y, spec["noise"], chunked=spec["method"] == "ours-chunked")
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    import gc

    gc.collect()
    before = reset_peak_rss()
    mll_and_grad(model, spec["method"], spec.get("lanczos_steps"))
    out = {"peak_rss_delta_mb": current_peak_rss_mb() - before, "rss_baseline_mb": before}
    if device == "cuda":
        torch.cuda.synchronize()
        out["cuda_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    print("CHILD_RESULT " + json.dumps(out))


def measure_memory(spec: dict) -> dict:
    """Run :func:`child_main` in a fresh interpreter (so peaks of other methods do not mask this one)."""
    cmd = [sys.executable, "-m", "benchmarks.run", "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("CHILD_RESULT "):
            return json.loads(line[len("CHILD_RESULT ") :])
    tail = (proc.stderr or proc.stdout)[-300:]
    return {"error": f"exit {proc.returncode}: {tail}"}


def run_config(args: argparse.Namespace, dataset: str, n: int, noise: float) -> list[dict]:
    """All methods for one (dataset, n, noise); returns one row per method."""
    dtype = _dtype(args.dtype)
    x, y = load_data(dataset, n, dtype=dtype, device=args.device, data_dir=args.data_dir)
    rows: list[dict] = []
    ref_mll, ref_grad, steps = None, None, None
    methods = [m for m in ORDER if m in args.methods]
    if any(m in methods for m in ("backprop", "backprop-reorth", "adjoint", "adjoint-fused")) and "ours" not in methods:
        methods.insert(0, "ours")  # the Lanczos baselines take ours' iteration count
    for method in methods:
        row = {"dataset": dataset, "n": n, "noise": noise, "method": method, "dtype": args.dtype, "device": args.device}
        if method in DENSE_METHODS and n > args.max_dense_n:
            row["skipped"] = f"n > --max-dense-n ({args.max_dense_n}): needs several n x n buffers"
            rows.append(row)
            continue
        model = make_model(x, y, noise, chunked=method == "ours-chunked")
        times, result = [], None
        try:
            repeats = args.slow_repeats if method in SLOW_METHODS and args.slow_repeats else args.repeats
            for _ in range(repeats):
                dt, result = timed(
                    lambda model=model, method=method, steps=steps: mll_and_grad(model, method, steps), args.device
                )
                times.append(dt)
        except Exception as exc:  # report, do not abort the grid
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            continue
        mll, grad, info = result
        row.update(time_s=statistics.median(times), times_s=times, mll=mll, **info)
        if method == "cholesky":
            ref_mll, ref_grad = mll, grad
        if method == "ours":
            steps = info.get("iterations")
        if ref_grad is not None:
            row["mll_rel_err"] = rel(mll, ref_mll)
            row["grad_rel_err"] = rel(grad, ref_grad)
        row["grad"] = grad.tolist()
        if not args.no_memory:
            spec = {
                "dataset": dataset,
                "n": n,
                "noise": noise,
                "method": method,
                "dtype": args.dtype,
                "device": args.device,
                "data_dir": str(args.data_dir),
                "lanczos_steps": steps,
            }
            mem = measure_memory(spec)
            row.update({k: v for k, v in mem.items() if k != "rss_baseline_mb"})
        rows.append(row)
        _log(row)
    ours = next((r for r in rows if r["method"] == "ours" and "time_s" in r), None)
    for r in rows:
        if ours is not None and "time_s" in r:
            r["time_ratio_vs_ours"] = r["time_s"] / ours["time_s"]
    return rows


def _log(row: dict) -> None:
    parts = [f"{row['dataset']} n={row['n']} noise={row['noise']} {row['method']:>15}"]
    for key in ("time_s", "mll_rel_err", "grad_rel_err", "peak_rss_delta_mb", "iterations"):
        if key in row:
            v = row[key]
            parts.append(f"{key}={v:.3g}" if isinstance(v, float) else f"{key}={v}")
    print("  ".join(parts), flush=True)


def _fmt(v: object, spec: str = ".2e") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, spec) if isinstance(v, float) else str(v)


def _precond(row: dict) -> str:
    """``rank`` plus ``(nyström)`` when the sketch was used."""
    rank = _fmt(row.get("preconditioner_rank"))
    return f"{rank} (nyström)" if row.get("preconditioner_kind") == "nystrom" else rank


def markdown(rows: list[dict], header: str) -> str:
    """One markdown table per (dataset, n, noise)."""
    lines = [header, ""]
    key = None
    for r in rows:
        k = (r["dataset"], r["n"], r["noise"])
        if k != key:
            key = k
            lines += [
                "",
                f"**{r['dataset']}, n = {r['n']}, noise = {r['noise']}, {r['dtype']}, {r['device']}**",
                "",
                "| method | time fwd+bwd (s) | ×ours | MLL rel err | grad rel err | peak mem Δ (MiB) | iters "
                "| precond rank |",
                "|---|---|---|---|---|---|---|---|",
            ]
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['method']} | {r.get('skipped') or r.get('error')} | | | | | | |")
            continue
        mem = r.get("cuda_peak_mb", r.get("peak_rss_delta_mb"))
        lines.append(
            f"| {r['method']} | {_fmt(r['time_s'], '.3f')} | {_fmt(r.get('time_ratio_vs_ours'), '.2f')} | "
            f"{_fmt(r.get('mll_rel_err'))} | {_fmt(r.get('grad_rel_err'))} | {_fmt(mem, '.0f')} | "
            f"{_fmt(r.get('iterations'))} | {_precond(r)} |"
        )
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], out: Path, tag: str) -> list[Path]:
    """``time vs n`` and ``gradient error vs time`` PNGs (one panel per dataset × noise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "time_s" in r]
    panels = sorted({(r["dataset"], r["noise"]) for r in ok})
    methods = [m for m in ORDER if any(r["method"] == m for r in ok)]
    paths = []
    for kind in ("time_vs_n", "graderr_vs_time"):
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for ax, (ds, noise) in zip(axes[0], panels, strict=False):
            for m in methods:
                pts = sorted(
                    (r["n"], r["time_s"], r.get("grad_rel_err"))
                    for r in ok
                    if r["method"] == m and r["dataset"] == ds and r["noise"] == noise
                )
                if not pts:
                    continue
                if kind == "time_vs_n":
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
                    ax.set_xlabel("n")
                    ax.set_ylabel("fwd+bwd time (s)")
                    ax.set_xscale("log")
                else:
                    pts = [p for p in pts if p[2] is not None]
                    if pts:
                        ax.plot([p[1] for p in pts], [p[2] for p in pts], "o-", label=m)
                    ax.set_xlabel("fwd+bwd time (s)")
                    ax.set_ylabel("gradient rel. error vs Cholesky")
                    ax.set_xscale("log")
                ax.set_yscale("log")
            ax.set_title(f"{ds}, noise {noise}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{tag}_{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        child_main(json.loads(args.child))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available.")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows: list[dict] = []
    for dataset in args.datasets:
        for n in args.n:
            for noise in args.noise:
                rows += run_config(args, dataset, n, noise)
                (args.out / f"{args.tag}.json").write_text(json.dumps(rows, indent=1))
    elapsed = time.time() - started
    header = (
        f"# MLL + gradient benchmark ({args.tag})\n\n"
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, dtype {args.dtype}, "
        f"median of {args.repeats} repeats ({args.slow_repeats or args.repeats} for {', '.join(SLOW_METHODS)}); "
        f"total wall time {elapsed:.0f} s. "
        f"Memory: ru_maxrss delta of one fwd+bwd in a fresh subprocess (CPU); dense n x n = "
        f"{dense_bytes(max(args.n), _dtype(args.dtype)) / 2**20:.0f} MiB at n = {max(args.n)}.\n\n"
        + "\n".join(f"- `{m}`: {d}" for m, d in METHODS.items() if m in args.methods)
    )
    (args.out / f"{args.tag}.md").write_text(markdown(rows, header))
    plots(rows, args.out, args.tag)
    print(f"wrote {args.out}/{args.tag}.json, .md, _time_vs_n.png, _graderr_vs_time.png ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
