"""Compare two ``fit_gpytorch_mll`` runs at equal budgets, from their evaluation logs.

A fit whose L-BFGS-B run has not finished has no fitted point to compare, but its evaluation log
(:mod:`benchmarks.fit_replay`) holds every point it evaluated, the loss there and the CPU seconds it took.
Stopping L-BFGS-B after ``k`` evaluations (``options={"maxfun": k}``) returns its current iterate, and the
iterates of L-BFGS-B descend: the iterate after ``k`` evaluations is, up to a line search still under way,
the evaluated point of lowest loss so far. So the best loss among a log's first ``k`` evaluations is what the
fit would have reached on a budget of ``k`` evaluations, and the best loss among the evaluations that fit in
``s`` CPU seconds is what it would have reached in ``s`` seconds. This module tabulates both for a reference
log (stock Cholesky) and another log (the flag), as exact marginal log likelihood per point.

Only exact losses count. A stock Cholesky fit's loss is exact (BoTorch's closure: the negative exact MLL per
point, priors included: what ``fit_quality.exact_mll_per_point`` evaluates). An evaluation under the flag is
exact when none of its calls ran Lanczos (its ``counts`` record no ``lanczos_calls``: Cholesky routing, or a
covariance handed over to dense Cholesky); an evaluation with a Lanczos call holds an estimate and is left
out of the best-so-far (it still counts towards the budget: it cost its evaluation and its CPU). The gap is
the reference's MLL minus the other's (positive: the other fit is worse), as in ``fit_quality``.

Usage::

    python -m benchmarks.fit_log_compare benchmarks/results/fit_logs/pol-single-5000-cholesky.jsonl \\
        benchmarks/results/fit_logs/pol-single-5000-flag.jsonl --out benchmarks/results/pol5000_budgets.md
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BudgetPoint:
    """A fit's state after its first ``evaluations`` evaluations."""

    evaluations: int
    cpu_s: float  # CPU seconds those evaluations took, summed
    best_mll: float  # the highest exact MLL per point among them (-inf when none was exact)
    best_at: int  # the (1-based) evaluation that reached it (0 when none)
    exact: int  # how many of them were exact


def read_evaluations(path: Path) -> list[dict]:
    """The evaluation records of a log, in order (not its fingerprint, completion or cut-off lines)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a last line cut short by a kill
            continue
        if isinstance(record, dict) and "x" in record:
            records.append(record)
    return records


def is_exact(record: dict) -> bool:
    """Whether an evaluation's loss is the exact one (no Lanczos call, and it did not raise)."""
    return "loss" in record and not record.get("counts", {}).get("lanczos_calls", 0)


def trajectory(records: list[dict]) -> list[BudgetPoint]:
    """The running budget and best exact MLL after each evaluation."""
    points, cpu, best, best_at, exact = [], 0.0, -math.inf, 0, 0
    for k, record in enumerate(records, start=1):
        cpu += float(record.get("cpu_s", 0.0))
        if is_exact(record):
            exact += 1
            if -record["loss"] > best:
                best, best_at = -record["loss"], k
        points.append(BudgetPoint(k, cpu, best, best_at, exact))
    return points


def at_evaluations(points: list[BudgetPoint], k: int) -> BudgetPoint | None:
    """The state after ``k`` evaluations (``None`` when the log holds fewer)."""
    return points[k - 1] if 1 <= k <= len(points) else None


def at_cpu(points: list[BudgetPoint], seconds: float) -> BudgetPoint | None:
    """The state after the evaluations that fit in ``seconds`` of CPU (``None`` when the log ran out
    before ``seconds`` or not even one evaluation fits)."""
    if not points or points[-1].cpu_s < seconds:
        return None
    within = [p for p in points if p.cpu_s <= seconds]
    return within[-1] if within else None


def _row(label: str, ref: BudgetPoint | None, other: BudgetPoint | None) -> str:
    if ref is None or other is None:
        return ""
    gap = ref.best_mll - other.best_mll
    return (
        f"| {label} | {ref.evaluations} | {ref.best_mll:.5f} | {ref.cpu_s:.0f} | {other.evaluations} | "
        f"{other.best_mll:.5f} | {other.cpu_s:.0f} | {gap:+.5f} | {other.cpu_s / ref.cpu_s:.2f} |"
    )


def compare(
    reference: list[dict],
    other: list[dict],
    evaluation_budgets: list[int],
    cpu_budgets: list[float],
) -> str:
    """A markdown table of both fits at each evaluation budget and each CPU budget (budgets one of the logs
    has not reached are left out)."""
    ref, oth = trajectory(reference), trajectory(other)
    lines = [
        "| budget | reference evaluations | reference best MLL/pt | reference CPU s | other evaluations | "
        "other best MLL/pt | other CPU s | gap (reference − other) | CPU other / reference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in evaluation_budgets:
        lines.append(_row(f"{k} evaluations", at_evaluations(ref, k), at_evaluations(oth, k)))
    for s in cpu_budgets:
        lines.append(_row(f"{s:.0f} s CPU", at_cpu(ref, s), at_cpu(oth, s)))
    lines.append(_row("whole logs", ref[-1] if ref else None, oth[-1] if oth else None))
    return "\n".join(line for line in lines if line)


def default_budgets(reference: list[dict], other: list[dict], steps: int = 5) -> tuple[list[int], list[float]]:
    """``steps`` evenly spaced evaluation and CPU budgets up to what both logs reached."""
    ref, oth = trajectory(reference), trajectory(other)
    if not ref or not oth:
        return [], []
    k = min(len(ref), len(oth))
    s = min(ref[-1].cpu_s, oth[-1].cpu_s)
    return [round(k * i / steps) for i in range(1, steps + 1)], [s * i / steps for i in range(1, steps + 1)]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path, help="the reference fit's log (stock Cholesky)")
    parser.add_argument("other", type=Path, help="the other fit's log (the flag)")
    parser.add_argument("--evaluations", type=int, nargs="*", help="evaluation budgets (default: 5 up to both)")
    parser.add_argument("--cpu", type=float, nargs="*", help="CPU-second budgets (default: 5 up to both)")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    reference, other = read_evaluations(args.reference), read_evaluations(args.other)
    if not reference or not other:
        raise SystemExit("both logs must hold at least one evaluation")
    evaluation_budgets, cpu_budgets = default_budgets(reference, other)
    table = compare(
        reference,
        other,
        evaluation_budgets if args.evaluations is None else args.evaluations,
        cpu_budgets if args.cpu is None else args.cpu,
    )
    header = f"reference: `{args.reference}` ({len(reference)} evaluations); other: `{args.other}` ({len(other)})\n\n"
    if args.out is not None:
        args.out.write_text(header + table + "\n")
    print(header + table)
    return table


if __name__ == "__main__":
    main()
