"""Command line: train an exact GP with forward-only Lanczos gradients and compare with GPyTorch.

Usage::

    lanczos-grad-gp                                   # bundled protein sample (4500 points): ours, GPyTorch, Cholesky
    python -m lanczos_grad_gp --method ours,cholesky,gpytorch --steps 100
    lanczos-grad-gp --data my_data.csv.gz --n 5000 --device cuda --dtype float32

The model is ``ConstantMean`` + ``ScaleKernel(RBFKernel(ard_num_dims=d))`` with a
``GaussianLikelihood``, trained with Adam on z-scored data. The final table reports, per method,
test RMSE and mean test negative log predictive density on the *original* ``y`` scale, the mean
wall time per training step, and the fitted hyperparameters on the *z-scored* scale, followed by a
verdict: how ours compares with each baseline in this run, and where Cholesky is the better choice.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .datasets import (
    DEFAULT_DATASET,
    Dataset,
    available_datasets,
    bundled_data_path,
    load_uci,
    min_rows,
    split_sizes,
)
from .training import METHODS, RunResult, fit_and_evaluate, objective_accuracy

__all__ = ["build_parser", "format_ms", "format_table", "format_verdict", "main", "parse_methods", "split_error"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_DEFAULT_METHODS = "ours,gpytorch,cholesky"
#: the demo's default data: large enough (4500 training points) that the method's case shows on a CPU
DEMO_DATASET = "protein5000"
#: below about this many points a dense Cholesky is the better choice on a CPU (exact and faster)
CHOLESKY_CROSSOVER = 2000
#: --accuracy auto measures the objective's errors up to this many training points (a float64 Cholesky)
ACCURACY_MAX_N = 10000
_MIN_TRAIN, _MIN_TEST = 2, 1


def parse_methods(values: Sequence[str] | None) -> list[str]:
    """Flatten repeated / comma-separated ``--method`` values, keep order, drop duplicates.

    Raises:
        ValueError: an unknown method name.
    """
    names = [part.strip().lower() for value in (values or [_DEFAULT_METHODS]) for part in value.split(",")]
    names = [name for name in names if name]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise ValueError(
            f"unknown method {', '.join(map(repr, unknown)) or '(empty)'}; choose from {', '.join(METHODS)}"
        )
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lanczos-grad-gp``."""
    parser = argparse.ArgumentParser(
        prog="lanczos-grad-gp",
        description="Train an exact GP (RBF-ARD) with forward-only Lanczos gradients and compare it with "
        "GPyTorch's Cholesky and iterative paths.",
    )
    parser.add_argument(
        "--data",
        default=None,
        help=f"CSV file (.csv or .csv.gz, no header, last column = target) or a data-set name "
        f"(default: the bundled {DEMO_DATASET!r} sample; {DEFAULT_DATASET!r} is bundled too).",
    )
    parser.add_argument("--n", type=int, default=None, help="use only the first N shuffled rows (train + test)")
    parser.add_argument(
        "--method",
        action="append",
        default=None,
        help=f"{' | '.join(METHODS)}; repeatable or comma-separated (default: {_DEFAULT_METHODS})",
    )
    parser.add_argument("--steps", type=int, default=20, help="Adam steps (default: 20)")
    parser.add_argument("--lr", type=float, default=0.1, help="Adam learning rate (default: 0.1)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float64", help="(default: float64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split and the model (default: 0)")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="held-out share (default: 0.1)")
    parser.add_argument("--num-probes", type=int, default=None, help="log-det probe vectors (ours, gpytorch)")
    parser.add_argument("--max-iter", type=int, default=None, help="max Lanczos/CG iterations (ours, gpytorch)")
    parser.add_argument(
        "--precond-rank", type=int, default=None, help="max pivoted-Cholesky preconditioner rank (ours, gpytorch)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument(
        "--accuracy",
        choices=("auto", "on", "off"),
        default="auto",
        help="measure each method's loss and gradient error against float64 Cholesky at the initial "
        f"hyperparameters (one O(n^3) evaluation; auto: when n_train <= {ACCURACY_MAX_N})",
    )
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate what argparse cannot; exits with status 2 and a message on error."""
    try:
        args.method = parse_methods(args.method)
    except ValueError as exc:
        parser.error(f"--method: {exc}")
    for name in ("n", "steps", "num_probes", "max_iter"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer; got {value}")
    if args.precond_rank is not None and args.precond_rank < 0:
        parser.error(f"--precond-rank must be a non-negative integer; got {args.precond_rank}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive; got {args.lr}")
    if not 0 < args.test_fraction < 1:
        parser.error(f"--test-fraction must be in (0, 1) (test metrics need test rows); got {args.test_fraction}")
    if args.n is not None and (message := split_error(args.n, args.test_fraction)):
        parser.error(f"--n: {message}")
    try:
        args.device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device: {exc}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    if args.data is not None and not Path(args.data).exists() and args.data not in available_datasets():
        parser.error(
            f"--data: no such file {args.data!r} (and not a known data set: {', '.join(available_datasets())})"
        )


def split_error(num_rows: int, test_fraction: float) -> str | None:
    """Why ``num_rows`` rows give fewer than 2 training or 1 test row at ``test_fraction``; ``None`` if not.

    Example:
        >>> split_error(6, 0.1) is None
        True
        >>> print(split_error(5, 0.1))
        5 rows give 5 training and 0 test rows at --test-fraction 0.1; need 2 training and 1 test row: at least 6 rows
    """
    num_train, num_test = split_sizes(num_rows, test_fraction)
    if num_train >= _MIN_TRAIN and num_test >= _MIN_TEST:
        return None
    minimum = min_rows(test_fraction, min_train=_MIN_TRAIN, min_test=_MIN_TEST)
    return (
        f"{num_rows} rows give {num_train} training and {num_test} test rows at --test-fraction {test_fraction}; "
        f"need {_MIN_TRAIN} training and {_MIN_TEST} test row: at least {minimum} rows"
    )


def load_data(args: argparse.Namespace) -> Dataset:
    """The data set the arguments ask for, on the requested device and dtype."""
    source = args.data if args.data is not None else bundled_data_path(DEMO_DATASET)
    data = load_uci(source, n=args.n, seed=args.seed, test_fraction=args.test_fraction, dtype=_DTYPES[args.dtype])
    return data.to(device=args.device)


def _fmt(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}"


def format_ms(seconds: float) -> str:
    """A duration in milliseconds, fixed notation with about 3 significant digits; ``-`` for NaN.

    Example:
        >>> [format_ms(s) for s in (5.11, 0.1234, 0.01234, 0.001234, float("nan"))]
        ['5110', '123', '12.3', '1.23', '-']
    """
    if math.isnan(seconds):
        return "-"
    ms = 1e3 * seconds
    decimals = 0 if ms >= 99.95 else 1 if ms >= 9.995 else 2
    return f"{ms:.{decimals}f}"


def _diag(result: RunResult, key: str) -> str:
    value = result.diagnostics.get(key)
    return "-" if value is None else _fmt(value, 3)


def _iterations(result: RunResult) -> str:
    if "mean_iterations" not in result.diagnostics:
        return "-"
    return f"{result.diagnostics['mean_iterations']:.0f}/{result.diagnostics['max_iterations']:.0f}"


def _accuracy(result: RunResult, key: str) -> str:
    return "-" if result.accuracy is None else f"{getattr(result.accuracy, key):.1e}"


def format_table(results: Sequence[RunResult]) -> str:
    """Side-by-side table, one column per method.

    Rows: test RMSE and NLL (original ``y`` scale), final training loss ``-MLL/n``, mean
    time per step (first step excluded), fitted noise, outputscale and mean lengthscale
    (z-scored scale); where measured, the loss and gradient errors against float64 Cholesky at the
    initial hyperparameters; for ``ours`` also Lanczos iterations per column and preconditioner rank.
    """
    rows: list[tuple[str, list[str]]] = [
        ("test RMSE", [_fmt(r.metrics.rmse) if r.metrics else "-" for r in results]),
        ("test NLL", [_fmt(r.metrics.nll) if r.metrics else "-" for r in results]),
        ("final train loss (-MLL/n)", [_fmt(r.losses[-1]) if r.losses else "-" for r in results]),
        ("time per step [ms]", [format_ms(r.time_per_step) for r in results]),
        ("noise", [_fmt(r.hyperparameters.get("noise", float("nan"))) for r in results]),
        ("outputscale", [_fmt(r.hyperparameters.get("outputscale", float("nan"))) for r in results]),
        ("mean lengthscale", [_fmt(r.hyperparameters.get("mean_lengthscale", float("nan"))) for r in results]),
    ]
    measured = [r.accuracy for r in results if r.accuracy is not None]
    if measured:
        where = measured[0].where
        rows.append((f"-MLL/n error at {where}", [_accuracy(r, "loss_error") for r in results]))
        rows.append((f"gradient rel. error at {where}", [_accuracy(r, "gradient_error") for r in results]))
    if any(r.diagnostics for r in results):
        rows.append(("Lanczos iters (mean/max)", [_iterations(r) for r in results]))
        rows.append(("preconditioner rank", [_diag(r, "preconditioner_rank") for r in results]))
    label_width = max(len(label) for label, _ in rows)
    col_width = max([10] + [len(r.method) for r in results] + [len(c) for _, cells in rows for c in cells])
    header = " " * label_width + "".join(f"  {r.method:>{col_width}}" for r in results)
    lines = [header, "-" * len(header)]
    lines += [f"{label:<{label_width}}" + "".join(f"  {c:>{col_width}}" for c in cells) for label, cells in rows]
    return "\n".join(lines)


def format_verdict(results: Sequence[RunResult], num_train: int) -> str:
    """What this run shows: ours against each baseline (time per step, test RMSE/NLL), and when to use what."""
    by_method = {r.method: r for r in results}
    ours = by_method.get("ours")
    lines = []
    if ours is not None:
        for name, label in (("cholesky", "Cholesky (exact)"), ("gpytorch", "GPyTorch default (mBCG)")):
            other = by_method.get(name)
            if other is None or not other.metrics or not ours.metrics:
                continue
            ratio = ours.time_per_step / other.time_per_step if other.time_per_step > 0 else float("nan")
            accuracy = ""
            if name == "gpytorch" and ours.accuracy and other.accuracy:
                mine, theirs = ours.accuracy.gradient_error, other.accuracy.gradient_error
                times = f"{theirs / mine:.2g}x more accurate" if mine > 0 and theirs >= mine else "not more accurate"
                accuracy = f"; gradient at {ours.accuracy.where} {times} ({mine:.1e} vs {theirs:.1e} relative error)"
            lines.append(
                f"ours vs {label}: {ratio:.2f}x the time per step{accuracy}; test RMSE {_fmt(ours.metrics.rmse)} vs "
                f"{_fmt(other.metrics.rmse)}, test NLL {_fmt(ours.metrics.nll)} vs {_fmt(other.metrics.nll)}."
            )
    if num_train < CHOLESKY_CROSSOVER:
        lines.append(
            f"At n = {num_train} Cholesky is the better choice on a CPU (exact, and faster at this size); under "
            "use_lanczos_grad the flag hands n <= max_cholesky_size (800; 4096 with BoTorch) to Cholesky itself."
        )
    else:
        lines.append(
            f"Cholesky is the better choice below about n = {CHOLESKY_CROSSOVER} on a CPU (exact and fast there); "
            "under use_lanczos_grad the flag hands n <= max_cholesky_size (800; 4096 with BoTorch) to Cholesky "
            "itself. 'ours' here runs Lanczos at every size to show the method."
        )
    return "\n".join(lines)


def describe(data: Dataset, args: argparse.Namespace) -> str:
    """One header line about the run."""
    return (
        f"data: {data.name} (n_train={data.num_train}, n_test={data.num_test}, d={data.dim}); "
        f"{args.steps} Adam steps, lr={args.lr}; {args.dtype} on {args.device}; seed {args.seed}"
    )


_FOOTNOTE = (
    "RMSE and NLL (mean negative log predictive density, noise included) on the original y scale,\n"
    "predictions by exact Cholesky for every method; hyperparameters on the z-scored scale."
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lanczos-grad-gp`` / ``python -m lanczos_grad_gp``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        data = load_data(args)
    except (OSError, ValueError) as exc:
        parser.error(f"--data: {exc}")
    if message := split_error(data.num_train + data.num_test, args.test_fraction):
        parser.error(f"--data: {data.name}: {message}")
    print(describe(data, args), flush=True)
    start = time.perf_counter()
    results = [
        fit_and_evaluate(
            data,
            method,
            steps=args.steps,
            lr=args.lr,
            seed=args.seed,
            num_probes=args.num_probes,
            max_iter=args.max_iter,
            precond_rank=args.precond_rank,
            progress=not args.no_progress,
        )
        for method in args.method
    ]
    measure = args.accuracy == "on" or (args.accuracy == "auto" and data.num_train <= ACCURACY_MAX_N)
    if measure and set(args.method) - {"cholesky"}:
        # at the initial hyperparameters: a fitted state is (near) a stationary point, where the
        # exact gradient is ~0 and a relative gradient error says nothing
        accuracy = objective_accuracy(
            data,
            args.method,
            seed=args.seed,
            num_probes=args.num_probes,
            max_iter=args.max_iter,
            precond_rank=args.precond_rank,
        )
        for result in results:
            result.accuracy = accuracy[result.method]
    print(format_table(results))
    print(_FOOTNOTE)
    print(format_verdict(results, data.num_train))
    print(f"total time {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
