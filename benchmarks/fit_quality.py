"""Fit quality of BoTorch's ``fit_gpytorch_mll`` (L-BFGS-B) with and without the flag.

Run from the repository root::

    python -m benchmarks.fit_quality --quick        # BO sizes, a few minutes on 2 CPU cores
    python -m benchmarks.fit_quality                # every row, including n = 5000 (about an hour)
    python -m benchmarks.fit_quality --rows hartmann6-single-5000
    # a fit that outlasts the machine: rerun the same command to go on where it stopped
    python -m benchmarks.fit_quality --rows pol-single-5000 --methods cholesky \
        --evaluation-log benchmarks/results/fit_logs

For every row the same model class is fitted from the same start (``torch.manual_seed(0)``,
BoTorch's default priors and transforms) by up to three methods (``--methods`` picks a subset;
without ``cholesky`` the gap and CPU ratio are left out):

* ``cholesky`` — stock GPyTorch/BoTorch with ``max_cholesky_size(10**9)`` (the reference);
* ``flag`` — ``lgg.settings.use_lanczos_grad()`` with default routing (Cholesky up to
  ``max_cholesky_size``, which BoTorch sets to 4096 on import; Lanczos above);
* ``lanczos`` — the flag with Lanczos forced at every size (``lgg.settings.max_cholesky_size(0)``),
  only where it differs from ``flag``: what the estimator itself does at BO sizes.

Reported per method: the **exact** marginal log likelihood per data point at the fitted
hyperparameters (a float64 Cholesky evaluation of the fitted model; summed over the outputs of
multi-output models), its gap to Cholesky's (positive: worse than Cholesky), L-BFGS-B ``ABNORMAL``
line-search warnings, our ``NumericalWarning``\\ s, optimizer attempts (BoTorch retries from prior
samples after a failed attempt), the routes taken, CPU time (``process_time``, all threads), and
where the time goes: marginal-likelihood evaluations (calls of
``ExactMarginalLogLikelihood.forward``: per output for ModelListGP), Lanczos calls, their mean
Lanczos steps (the longest column of each run, runs thrown away by a refresh included), how many
calls stopped unconverged (at the step cap) with the share of all Lanczos steps spent in unconverged
runs (thrown-away ones included), and how many ran with the preconditioner held fixed
by a deterministic-objective block (and how many of those replaced a held factor that left the call
unconverged: "refreshed"; and how many calls of a block were run again with the block's step cap,
"raised cap"; and how many were computed by dense Cholesky after a hand-over: "dense"). Goal: every ``flag``
row within 0.01 nats/point of Cholesky, no ABNORMAL warnings, less
CPU than Cholesky from n = 2000 on. Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gpytorch
import torch
from botorch.fit import fit_gpytorch_mll
from botorch.models import ModelListGP, SingleTaskGP
from botorch.optim.closures import get_loss_closure_with_grads
from botorch.optim.fit import fit_gpytorch_mll_scipy
from botorch.optim.utils import get_parameters_and_bounds
from botorch.test_functions import Branin, Hartmann
from botorch.test_functions.multi_objective import BraninCurrin
from gpytorch.mlls import ExactMarginalLogLikelihood, SumMarginalLogLikelihood

import lanczos_grad_gp as lgg
from lanczos_grad_gp.app.datasets import load_uci

from .common import DEFAULT_DATA_DIR, REPO_ROOT, dataset_dir
from .fit_replay import EvaluationLog, code_fingerprint, fit_fingerprint

F64 = torch.float64
SYNTHETIC = {"branin": Branin, "hartmann6": lambda: Hartmann(dim=6), "branincurrin": BraninCurrin}
UCI = ("elevators", "protein", "pol", "kin40k")
#: name -> (data, model kind, n); model kinds: single, fixed_noise, model_list, batched
ROWS: dict[str, tuple[str, str, int]] = {
    f"{data}-{kind}-{n}": (data, kind, n)
    for data, kind, n in [
        ("branin", "single", 30),
        ("branin", "single", 200),
        ("branin", "single", 1000),
        ("hartmann6", "single", 30),
        ("hartmann6", "single", 200),
        ("hartmann6", "single", 1000),
        ("hartmann6", "fixed_noise", 200),
        ("hartmann6", "fixed_noise", 1000),
        ("branincurrin", "model_list", 200),
        ("branincurrin", "batched", 200),
        ("branincurrin", "batched", 1000),
        ("elevators", "single", 1000),
        ("pol", "single", 1000),
        ("hartmann6", "single", 2000),
        ("elevators", "single", 2000),
        ("hartmann6", "single", 5000),
        ("elevators", "single", 5000),
        ("pol", "single", 5000),
    ]
}
QUICK = [name for name, (_, _, n) in ROWS.items() if n <= 200]


def make_data(name: str, n: int, seed: int = 0, data_dir: Path = DEFAULT_DATA_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """``X`` in the unit cube ``(n, d)`` and noisy targets ``Y`` ``(n, m)`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    if name in SYNTHETIC:
        fn = SYNTHETIC[name]()
        X = torch.rand(n, fn.dim, generator=g, dtype=F64)
        lb, ub = fn.bounds.to(F64)
        Y = fn(lb + (ub - lb) * X)
        Y = Y.unsqueeze(-1) if Y.dim() == 1 else Y
        return X, Y + 0.05 * Y.std(0) * torch.randn(Y.shape, generator=g, dtype=F64)
    data = load_uci(dataset_dir(data_dir, name), n=n, seed=seed, test_fraction=0.0)
    x = data.train_x.to(F64)
    X = (x - x.amin(0)) / (x.amax(0) - x.amin(0)).clamp_min(1e-12)  # BoTorch expects the unit cube
    return X, data.train_y.to(F64).unsqueeze(-1)


def make_model(kind: str, X: torch.Tensor, Y: torch.Tensor):
    """The model and its marginal likelihood for ``kind``."""
    torch.manual_seed(0)
    if kind == "single":
        model = SingleTaskGP(X, Y[:, :1])
    elif kind == "fixed_noise":
        model = SingleTaskGP(X, Y[:, :1], train_Yvar=torch.full_like(Y[:, :1], float((0.05 * Y[:, 0].std()) ** 2)))
    elif kind == "batched":
        model = SingleTaskGP(X, Y)  # one batched GP over the outputs
    elif kind == "model_list":
        model = ModelListGP(*(SingleTaskGP(X, Y[:, i : i + 1]) for i in range(Y.shape[-1])))
        return model, SumMarginalLogLikelihood(model.likelihood, model)
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    return model, ExactMarginalLogLikelihood(model.likelihood, model)


def exact_mll_per_point(model) -> float:
    """Exact (Cholesky, float64) marginal log likelihood per data point, summed over outputs."""
    models = model.models if isinstance(model, ModelListGP) else [model]
    total = 0.0
    for m in models:
        mll = ExactMarginalLogLikelihood(m.likelihood, m)
        m.train()
        with gpytorch.settings.max_cholesky_size(10**9), torch.no_grad(), lgg.settings.use_lanczos_grad(False):
            total += float(mll(m(*m.train_inputs), m.train_targets).sum())  # what fit_gpytorch_mll's closure evaluates
    return total


@dataclass
class FitResult:
    method: str
    exact_mll: float
    cpu_s: float
    wall_s: float
    abnormal: int
    numerical_warnings: int
    attempts: int
    routes: list[str] = field(default_factory=list)
    gap: float = 0.0
    evaluations: int = 0
    lanczos_calls: int = 0
    mean_lanczos_steps: float = 0.0
    unconverged_calls: int = 0
    fixed_calls: int = 0
    unconverged_step_share: float = 0.0
    refreshed_calls: int = 0
    raised_cap_calls: int = 0
    replayed_evaluations: int = 0
    dense_calls: int = 0  # calls a block computed by dense Cholesky (deterministic_dense_size)
    dense_handovers: int = 0  # of which, calls that handed their covariance over (their Lanczos steps discarded)


def method_context(method: str) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    if method == "cholesky":
        stack.enter_context(gpytorch.settings.max_cholesky_size(10**9))
    else:
        stack.enter_context(lgg.settings.use_lanczos_grad())
        if method == "lanczos":
            stack.enter_context(lgg.settings.max_cholesky_size(0))
    return stack


def call_counts(calls: list) -> dict[str, int]:
    """What a fit reports of its :func:`lgg.record_calls` entries (additive over slices, so a resumed fit adds
    the replayed evaluations' recorded counts: :mod:`benchmarks.fit_replay`)."""
    lanczos = [c for c in calls if c.route == "lanczos"]
    dense = [c for c in calls if getattr(c, "block_dense", False)]
    steps = [int(c.iterations.max()) for c in lanczos]
    counts = {
        "lanczos_calls": len(lanczos),
        "lanczos_steps": sum(steps),
        # capped runs a refresh, a raised cap or a hand-over to dense Cholesky threw away
        "discarded_steps": sum(c.discarded_iterations for c in lanczos) + sum(c.discarded_iterations for c in dense),
        "unconverged_calls": sum(not c.converged for c in lanczos),
        "unconverged_steps": sum(s for s, c in zip(steps, lanczos, strict=True) if not c.converged),
        "fixed_calls": sum(bool(c.fixed_preconditioner) for c in lanczos),
        "refreshed_calls": sum(bool(c.preconditioner_refreshed) for c in lanczos),
        "raised_cap_calls": sum(bool(c.step_cap_raised) for c in lanczos),
        "dense_calls": len(dense),
        "dense_handovers": sum(c.discarded_iterations > 0 for c in dense),
    }
    for c in calls:
        counts[f"route:{c.route}"] = counts.get(f"route:{c.route}", 0) + 1
    return counts


def fit_once(kind: str, X: torch.Tensor, Y: torch.Tensor, method: str, evaluation_log: Path | None = None) -> FitResult:
    """One fit by ``method``; with ``evaluation_log`` (single-output models only) the fit resumes from, and
    extends, that log of its evaluations (:mod:`benchmarks.fit_replay`)."""
    if evaluation_log is not None and kind not in ("single", "fixed_noise"):
        raise ValueError(
            f"evaluation_log: only a fit of a single-output model can be resumed, got kind {kind!r} (BoTorch fits a "
            "ModelListGP output by output, and a batched model's covariances share one block key)"
        )
    model, mll = make_model(kind, X, Y)
    attempts = 0
    log: EvaluationLog | None = None

    def counting_optimizer(mll, closure=None, **kwargs):
        nonlocal attempts
        attempts += 1
        if log is not None and closure is None:  # BoTorch's own closure, over the parameters it would pick
            parameters = {k: v for k, v in get_parameters_and_bounds(mll)[0].items() if v.requires_grad}
            closure = log.wrap(get_loss_closure_with_grads(mll, parameters=parameters), parameters)
            kwargs["parameters"] = parameters
        return fit_gpytorch_mll_scipy(mll, closure=closure, **kwargs)

    evaluations = 0
    forward = ExactMarginalLogLikelihood.forward

    def counted_forward(*args, **kwargs):  # GPyTorch's Module.__call__ skips forward hooks
        nonlocal evaluations
        evaluations += 1
        return forward(*args, **kwargs)

    # on the class: BoTorch fits a ModelListGP output by output, with a fresh mll for each
    ExactMarginalLogLikelihood.forward = counted_forward
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught, lgg.record_calls() as calls:
            warnings.simplefilter("always")
            if evaluation_log is not None:
                labels = (kind, method)
                if method != "cholesky":  # the GP routine's rules act at every call: name the code and settings
                    labels += (code_fingerprint(), repr(sorted(lgg.settings.current_settings().items())))
                log = EvaluationLog(evaluation_log, fit_fingerprint(X, Y, *labels), calls, call_counts)
            with method_context(method):
                fit_gpytorch_mll(mll, optimizer=counting_optimizer)
            if log is not None:
                log.finish()
    finally:
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        ExactMarginalLogLikelihood.forward = forward
    totals = call_counts(calls)
    # warnings from the caught list: replayed evaluations raise their recorded ones again, the check drops its own
    totals["abnormal"] = sum("ABNORMAL" in str(w.message) for w in caught)
    totals["numerical_warnings"] = sum(issubclass(w.category, lgg.diagnostics.NumericalWarning) for w in caught)
    replayed, replayed_cpu, checks = (log.replayed, log.replayed_cpu_s, int(log.checked)) if log else (0, 0.0, 0)
    if log is not None:  # the replayed evaluations' share, less the check's recomputation of one of them
        replayed_cpu -= log.check_cpu_s  # (the check's CPU is in this run's already)
        for name in set(log.replayed_counts) | set(log.check_counts):
            totals[name] = totals.get(name, 0) + log.replayed_counts.get(name, 0) - log.check_counts.get(name, 0)
    steps, discarded = totals["lanczos_steps"], totals["discarded_steps"]
    return FitResult(
        method=method,
        exact_mll=exact_mll_per_point(model),
        cpu_s=cpu + replayed_cpu,  # a resumed fit: this run's CPU plus what the replayed evaluations took
        wall_s=wall,
        abnormal=totals["abnormal"],
        numerical_warnings=totals["numerical_warnings"],
        attempts=attempts,
        routes=sorted(name.removeprefix("route:") for name, k in totals.items() if name.startswith("route:") and k),
        evaluations=evaluations + replayed - checks,  # the replay's check is not an evaluation of the fit
        replayed_evaluations=replayed,
        lanczos_calls=totals["lanczos_calls"],
        mean_lanczos_steps=(steps + discarded) / max(totals["lanczos_calls"], 1),
        unconverged_calls=totals["unconverged_calls"],
        fixed_calls=totals["fixed_calls"],
        unconverged_step_share=(totals["unconverged_steps"] + discarded) / max(steps + discarded, 1),
        refreshed_calls=totals["refreshed_calls"],
        raised_cap_calls=totals["raised_cap_calls"],
        dense_calls=totals["dense_calls"],
        dense_handovers=totals["dense_handovers"],
    )


METHODS = ("cholesky", "flag", "lanczos")


def run_row(name: str, data_dir: Path, methods: tuple[str, ...] = METHODS, log_dir: Path | None = None) -> dict:
    """One row; with ``log_dir`` each fit resumes from ``<log_dir>/<row>-<method>.jsonl``."""
    data, kind, n = ROWS[name]
    X, Y = make_data(data, n, seed=0, data_dir=data_dir)
    threshold = gpytorch.settings.max_cholesky_size.value()
    wanted = ["cholesky", "flag"] + (["lanczos"] if n <= threshold else [])  # lanczos: only where it differs
    logs = {m: None if log_dir is None else log_dir / f"{name}-{m}.jsonl" for m in wanted}
    results = [fit_once(kind, X, Y, m, logs[m]) for m in wanted if m in methods]
    for r in results:
        r.gap = results[0].exact_mll - r.exact_mll if results[0].method == "cholesky" else float("nan")
    return {"row": name, "data": data, "kind": kind, "n": n, "d": X.shape[-1], "results": [asdict(r) for r in results]}


def _counts(r: dict) -> str:
    """The evaluation and Lanczos-call cells (``-`` for results recorded before they were counted)."""
    if "evaluations" not in r:
        return "- | -"
    if not r["lanczos_calls"]:
        return f"{r['evaluations']} | -"
    cell = f"{r['evaluations']} | {r['lanczos_calls']}: {r['mean_lanczos_steps']:.0f}, {r['unconverged_calls']}"
    if "fixed_calls" in r:
        cell += f" ({r['unconverged_step_share']:.0%} of steps); {r['fixed_calls']} fixed"
    if "refreshed_calls" in r:
        cell += f", {r['refreshed_calls']} refreshed"
    if "raised_cap_calls" in r:
        cell += f", {r['raised_cap_calls']} raised cap"
    if r.get("dense_calls"):
        cell += f"; {r['dense_calls']} dense ({r['dense_handovers']} hand-overs)"
    return cell


def to_markdown(rows: list[dict]) -> str:
    head = (
        "| row | n | method | exact MLL/pt | gap to Cholesky | ABNORMAL | NumericalWarning | attempts | routes "
        "| CPU s | CPU / Cholesky | evaluations | Lanczos calls: mean steps, unconverged (their share of the steps); "
        "calls with a fixed preconditioner, refreshed, raised step cap; dense Cholesky calls (hand-overs) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for row in rows:
        ref = row["results"][0]
        ref_cpu = ref["cpu_s"] if ref["method"] == "cholesky" else float("nan")
        for r in row["results"]:
            lines.append(
                f"| {row['row']} | {row['n']} | {r['method']} | {r['exact_mll']:.4f} | {r['gap']:+.4f} "
                f"| {r['abnormal']} "
                f"| {r['numerical_warnings']} | {r['attempts']} | {', '.join(r['routes']) or '-'} | {r['cpu_s']:.1f} "
                f"| {r['cpu_s'] / max(ref_cpu, 1e-9):.2f} | {_counts(r)} |"
            )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="only the rows with n <= 200")
    p.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=None)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "fit_quality")
    p.add_argument(
        "--evaluation-log",
        type=Path,
        default=None,
        help="folder of resumable fit logs (<row>-<method>.jsonl): a stopped fit goes on where it stopped; "
        "single-output rows only (benchmarks/fit_replay.py)",
    )
    args = p.parse_args(argv)
    names = args.rows or (QUICK if args.quick else list(ROWS))
    if args.evaluation_log is not None and any(ROWS[r][1] not in ("single", "fixed_noise") for r in names):
        p.error("--evaluation-log: only single-output rows (single, fixed_noise) can be resumed")
    out_json = args.out.with_suffix(".json")
    done = json.loads(out_json.read_text()) if out_json.exists() else []
    done = [r for r in done if r["row"] not in names]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; rows: {', '.join(names)}", flush=True)
    for name in names:
        if args.evaluation_log is not None:
            args.evaluation_log.mkdir(parents=True, exist_ok=True)
        row = run_row(name, args.data_dir, tuple(args.methods), args.evaluation_log)
        done.append(row)
        for r in row["results"]:
            print(
                f"{name:28s} {r['method']:9s} exact MLL/pt {r['exact_mll']:9.4f} gap {r['gap']:+.4f} "
                f"abnormal {r['abnormal']} numwarn {r['numerical_warnings']} attempts {r['attempts']} "
                f"routes {','.join(r['routes']) or '-'} cpu {r['cpu_s']:.1f}s evaluations {r['evaluations']} "
                f"lanczos calls {r['lanczos_calls']} (mean steps {r['mean_lanczos_steps']:.0f}, "
                f"unconverged {r['unconverged_calls']}, {r['unconverged_step_share']:.0%} of the steps; "
                f"fixed preconditioner {r['fixed_calls']}, refreshed {r.get('refreshed_calls', 0)}, "
                f"raised cap {r.get('raised_cap_calls', 0)}; dense calls {r.get('dense_calls', 0)}, "
                f"hand-overs {r.get('dense_handovers', 0)})",
                flush=True,
            )
        order = {k: i for i, k in enumerate(ROWS)}
        done.sort(key=lambda r: order.get(r["row"], 10**6))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(done, indent=1))
        args.out.with_suffix(".md").write_text(to_markdown(done))


if __name__ == "__main__":
    main()
