"""Are the error estimates honest, and does anything fail silently? quad_form / bilinear_form on a random family.

Runs ``lgg.quad_form`` (and, on a subset, ``lgg.bilinear_form`` with ``‖u‖/‖v‖`` up to ``1e±4``) on
a seeded random family of symmetric problems and compares every column with a dense float64
oracle (``torch.linalg.eigh`` of exactly the matrix the library sees; gradient by Daleckii–Krein).
The family, the oracles and the error measures live in ``tests/random_family.py`` (shared with
``tests/test_random_family.py``; this script puts ``tests/`` on ``sys.path`` because tests must not
depend on ``benchmarks/``): sizes 1..400 (log-uniform, n = 1, 2, 3 included), every built-in
``f``, float64 (cond ≤ 1e9, ``A`` scaled by ``10^s``, ``|s| ≤ 20``) and float32 (cond ≤ 1e5,
``|s| ≤ 10``), log-spaced / random / linear / clustered / outlier spectra, batches of 2–3 and up
to 4 columns, Gaussian / ones / unit / invariant-subspace start vectors, ``max_iter`` None / 5 /
n/4 / 5n, default and other tolerances, with and without reorthogonalization.

Per column it records the true value error (absolute, and relative to ``sqrt(uᵀ|f(A)|u · vᵀ|f(A)|v)``),
``info.value_error_estimate``, the true relative gradient error (library gradient symmetrized),
``info.gradient_error_estimate``, ``converged``, whether the call raised a ``NumericalWarning``
(forward or backward) and any exception. It prints (markdown):

(a) estimate coverage per ``f`` × dtype × condition bucket: converged columns, the share whose true
    error is ≤ the estimate (strictly, and with the round-off floor of ``tests/random_family.py``
    added), and the worst ratio true error / estimate;
(b) silent failures: columns with relative value error > 100·tol (tol = 1e-8 float64 / 1e-4
    float32 when ``tol=None``) that report ``converged=True``, and those that raised no
    ``NumericalWarning`` (the same for the gradient), plus exceptions by kind and the worst cases.

Usage (from the repository root)::

    python -m benchmarks.estimate_coverage [--quick] [--out FILE.json] [--cases N] [--seed S]

``--quick``: 400 cases (~15 s on 2 CPU cores); default: 4000 cases (~2–3 min). Raw records go to
``--out`` (default ``benchmarks/results/estimate_coverage.json``; quick: ``..._quick.json``): per case
the ``Case`` (which rebuilds the problem), warnings, exceptions, and one row per column in the order
of ``meta.column_fields``. The markdown tables are also written next to it (``.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the shared family + oracles (tests/random_family.py)

import random_family as rf  # noqa: E402
import torch  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"


def make_cases(count: int, seed: int, bilinear_share: float = 0.2, max_n: int = 400) -> list[rf.Case]:
    """``count`` cases, ``f`` × dtype cycled for balanced tables; a ``bilinear_share`` of bilinear forms."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        f = rf.FUNCTIONS[i % len(rf.FUNCTIONS)]
        dtype = rf.DTYPES[(i // len(rf.FUNCTIONS)) % len(rf.DTYPES)]
        form = "bilinear" if rng.random() < bilinear_share else "quad"
        cases.append(rf.random_case(rng, form=form, f=f, dtype=dtype, max_n=max_n))
    return cases


def flatten(results: list[rf.CaseResult]) -> list[dict]:
    """One row per column (cases that raised contribute no rows; see ``exceptions``)."""
    rows = []
    for res in results:
        c = res.case
        if res.exception is not None or res.grad_exception is not None:
            continue
        thr = rf.SILENT_FACTOR * c.tol_used
        for cr in res.columns:
            r = dict(cr)
            r.update(
                form=c.form, f=c.f, dtype=c.dtype, n=c.n, bucket=rf.cond_bucket(cr["cond_eff"]), warned=res.warned,
                thr=thr, case=c,
            )  # fmt: skip
            r["bad"] = not (cr["rel_err"] <= thr)
            r["gbad"] = not (cr["grad_err"] <= thr)
            r["beyond_floor"] = not (cr["abs_err"] <= cr["value_floor"])
            rows.append(r)
    return rows


def _ratio(err: float, est: float) -> float:
    if not err > 0:
        return 0.0 if err == 0 else math.inf
    return err / est if est > 0 else math.inf


def _pct(num: int, den: int) -> str:
    return f"{100 * num / den:.1f}" if den else "–"


def coverage_table(rows: list[dict], form: str) -> list[str]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["form"] == form:
            groups[(r["f"], r["dtype"], r["bucket"])].append(r)
    out = [
        "| f | dtype | cond | columns | converged | val ≤ est % | val ≤ est+floor % | worst val/est "
        "| grad ≤ est % | grad ≤ est+floor % | worst grad/est |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in rf.FUNCTIONS:
        for dt in rf.DTYPES:
            for b in rf.COND_BUCKETS:
                g = groups.get((f, dt, b))
                if not g:
                    continue
                conv = [r for r in g if r["converged"]]
                cv = sum(r["abs_err"] <= r["value_error_estimate"] for r in conv)
                cvf = sum(r["abs_err"] <= r["value_error_estimate"] + r["value_floor"] for r in conv)
                cg = sum(r["grad_err"] <= r["gradient_error_estimate"] for r in conv)
                cgf = sum(r["grad_err"] <= r["gradient_error_estimate"] + r["grad_floor"] for r in conv)
                wv = max((_ratio(r["abs_err"], r["value_error_estimate"]) for r in conv), default=math.nan)
                wg = max((_ratio(r["grad_err"], r["gradient_error_estimate"]) for r in conv), default=math.nan)
                out.append(
                    f"| {f} | {dt} | {b} | {len(g)} | {len(conv)} | {_pct(cv, len(conv))} | {_pct(cvf, len(conv))} "
                    f"| {wv:.2g} | {_pct(cg, len(conv))} | {_pct(cgf, len(conv))} | {wg:.2g} |"
                )
    return out


def coverage_summary(rows: list[dict]) -> list[str]:
    out = [
        "| form | dtype | converged columns | val ≤ est+floor % | grad ≤ est+floor % | both % |",
        "|---|---|---|---|---|---|",
    ]
    for form in ("quad", "bilinear"):
        for dt in rf.DTYPES:
            conv = [r for r in rows if r["form"] == form and r["dtype"] == dt and r["converged"]]
            v = [r["abs_err"] <= r["value_error_estimate"] + r["value_floor"] for r in conv]
            g = [r["grad_err"] <= r["gradient_error_estimate"] + r["grad_floor"] for r in conv]
            both = sum(a and b for a, b in zip(v, g, strict=True))
            out.append(
                f"| {form} | {dt} | {len(conv)} | {_pct(sum(v), len(conv))} | {_pct(sum(g), len(conv))} "
                f"| {_pct(both, len(conv))} |"
            )
    return out


def silent_table(rows: list[dict]) -> list[str]:
    out = [
        "| form | f | dtype | columns | rel. value err > 100·tol | …and converged=True | …and no warning "
        "| either | …beyond round-off floor | grad err > 100·tol | …converged | …no warning |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    tot = Counter()
    for form in ("quad", "bilinear"):
        for f in rf.FUNCTIONS:
            for dt in rf.DTYPES:
                g = [r for r in rows if r["form"] == form and r["f"] == f and r["dtype"] == dt]
                if not g:
                    continue
                cnt = Counter(
                    cols=len(g),
                    bad=sum(r["bad"] for r in g),
                    conv=sum(r["bad"] and r["converged"] for r in g),
                    unw=sum(r["bad"] and not r["warned"] for r in g),
                    either=sum(r["bad"] and (r["converged"] or not r["warned"]) for r in g),
                    floor=sum(r["bad"] and (r["converged"] or not r["warned"]) and r["beyond_floor"] for r in g),
                    gbad=sum(r["gbad"] for r in g),
                    gconv=sum(r["gbad"] and r["converged"] for r in g),
                    gunw=sum(r["gbad"] and not r["warned"] for r in g),
                )
                tot.update(cnt)
                out.append(
                    f"| {form} | {f} | {dt} | {cnt['cols']} | {cnt['bad']} | {cnt['conv']} | {cnt['unw']} | "
                    f"{cnt['either']} | {cnt['floor']} | {cnt['gbad']} | {cnt['gconv']} | {cnt['gunw']} |"
                )
    out.append(
        f"| **all** | | | **{tot['cols']}** | **{tot['bad']}** | **{tot['conv']}** | **{tot['unw']}** | "
        f"**{tot['either']}** | **{tot['floor']}** | **{tot['gbad']}** | **{tot['gconv']}** | **{tot['gunw']}** |"
    )
    return out


def exception_table(results: list[rf.CaseResult]) -> list[str]:
    cnt: Counter = Counter()
    for res in results:
        cols = res.case.k * math.prod(res.case.batch)
        if res.exception == "NotPSDError":
            key = (
                "NotPSDError, A numerically not PD (fine)" if res.not_pd else "NotPSDError, A is PD (λ_min > n·eps·‖A‖)"
            )
        elif res.exception == "ValueError":
            key = "ValueError"
        elif res.exception is not None:
            key = f"other forward exception: {res.exception}"
        elif res.grad_exception is not None:
            key = f"backward exception: {res.grad_exception.split(':')[0]}"
        else:
            continue
        cnt[key] += 1
        cnt[key + " [columns]"] += cols
    out = ["| outcome | cases | columns |", "|---|---|---|"]
    for key in sorted(k for k in cnt if not k.endswith("[columns]")):
        out.append(f"| {key} | {cnt[key]} | {cnt[key + ' [columns]']} |")
    if len(out) == 2:
        out.append("| (none) | 0 | 0 |")
    return out


def _iter_kind(c: rf.Case) -> str:
    if c.max_iter is None:
        return "None"
    if c.max_iter == 5:
        return "5"
    return "5n" if c.max_iter == 5 * c.n else "n/4"


def options_table(rows: list[dict]) -> list[str]:
    """Silent failures (value, beyond the round-off floor) by max_iter and tol setting."""
    out = [
        "| max_iter | tol | columns | converged | rel. value err > 100·tol | silent (either) | silent beyond floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for it in ("None", "5", "n/4", "5n"):
        for tl in ("default", "other"):
            g = [r for r in rows if _iter_kind(r["case"]) == it and (r["case"].tol is None) == (tl == "default")]
            if not g:
                continue
            silent = [r for r in g if r["bad"] and (r["converged"] or not r["warned"])]
            out.append(
                f"| {it} | {tl} | {len(g)} | {sum(r['converged'] for r in g)} | {sum(r['bad'] for r in g)} | "
                f"{len(silent)} | {sum(r['beyond_floor'] for r in silent)} |"
            )
    return out


def worst_cases(rows: list[dict], count: int = 10, default_options: bool = False) -> list[str]:
    """Silent failures beyond the round-off floor, largest relative value error first, one per case."""
    silent = [r for r in rows if r["bad"] and (r["converged"] or not r["warned"]) and r["beyond_floor"]]
    if default_options:
        silent = [r for r in silent if r["case"].tol is None and r["case"].max_iter is None]
    silent.sort(key=lambda r: -(r["rel_err"] if math.isfinite(r["rel_err"]) else math.inf))
    out = [
        "| rel. value err | value err / est | grad err | grad est | conv | warned | iters | case |",
        "|---|---|---|---|---|---|---|---|",
    ]
    seen = set()
    for r in silent:
        if r["case"].seed in seen:
            continue
        seen.add(r["case"].seed)
        out.append(
            f"| {r['rel_err']:.2e} | {_ratio(r['abs_err'], r['value_error_estimate']):.2g} | {r['grad_err']:.2e} | "
            f"{r['gradient_error_estimate']:.2e} | {r['converged']} | {r['warned']} | {r['iterations']} | "
            f"{r['case'].short()} (batch {r['batch_index']} column {r['column']}: start {r['start']}, "
            f"cond_eff {r['cond_eff']:.1e}) |"
        )
        if len(seen) >= count:
            break
    return out


def worst_coverage(rows: list[dict], form: str, count: int = 6) -> list[str]:
    conv = [r for r in rows if r["converged"] and r["form"] == form]
    key = lambda r: max(  # noqa: E731
        _ratio(r["abs_err"], r["value_error_estimate"] + r["value_floor"]),
        _ratio(r["grad_err"], r["gradient_error_estimate"] + r["grad_floor"]),
    )
    conv.sort(key=lambda r: -key(r))
    out = [
        "| max(err/(est+floor)) | val err | val est | grad err | grad est | iters | case |",
        "|---|---|---|---|---|---|---|",
    ]
    seen = set()
    for r in conv:
        if r["case"].seed in seen or key(r) <= 1:
            continue
        seen.add(r["case"].seed)
        out.append(
            f"| {key(r):.2g} | {r['abs_err']:.2e} | {r['value_error_estimate']:.2e} | {r['grad_err']:.2e} | "
            f"{r['gradient_error_estimate']:.2e} | {r['iterations']} | {r['case'].short()} "
            f"(batch {r['batch_index']} column {r['column']}: start {r['start']}) |"
        )
        if len(seen) >= count:
            break
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="400 cases (< 60 s on 2 cores)")
    parser.add_argument("--cases", type=int, default=None, help="number of cases (default 4000, quick 400)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-n", type=int, default=400)
    parser.add_argument("--out", type=Path, default=None, help="raw records (JSON)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (1: small matrices, robust under load)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    count = args.cases or (400 if args.quick else 4000)
    out = args.out or RESULTS / ("estimate_coverage_quick.json" if args.quick else "estimate_coverage.json")
    cases = make_cases(count, args.seed, max_n=args.max_n)
    t0 = time.perf_counter()
    results = []
    for i, case in enumerate(cases):
        results.append(rf.run_case(case))
        if (i + 1) % 100 == 0:
            print(f"  {i + 1}/{count} cases, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    wall = time.perf_counter() - t0
    rows = flatten(results)

    import lanczos_grad_gp as lgg

    lines = [
        f"# Estimate coverage and silent failures ({'quick' if args.quick else 'full'}, {count} cases, "
        f"seed {args.seed})",
        "",
        f"{len(rows)} columns from {sum(r.exception is None and r.grad_exception is None for r in results)} cases "
        f"that returned; torch {torch.__version__}, {torch.get_num_threads()} threads, {wall:.0f} s; "
        f"library `{Path(lgg.__file__).parent}`.",
        "",
        "## (a) Estimate coverage, quad_form (converged columns)",
        "",
        "`val ≤ est`: |value − oracle| ≤ value_error_estimate; `grad ≤ est`: ‖sym(G) − G*‖_F/‖G*‖_F ≤ "
        "gradient_error_estimate; `+floor`: plus the round-off floor (tests/random_family.py). "
        "Condition bucket: cond(A), or cond(exp(A)) for exp.",
        "",
        *coverage_table(rows, "quad"),
        "",
        "## (a') Estimate coverage, bilinear_form (‖u‖/‖v‖ up to 1e±4)",
        "",
        *coverage_table(rows, "bilinear"),
        "",
        "## Coverage summary (the ≥ 95 % criterion of tests/test_random_family.py)",
        "",
        *coverage_summary(rows),
        "",
        "## (b) Silent failures",
        "",
        "A column fails when its relative value error (|value − oracle| / sqrt(uᵀ|f(A)|u·vᵀ|f(A)|v)) exceeds "
        "100·tol (tol = 1e-8 float64 / 1e-4 float32 when tol=None). It is *silent* if it reports "
        "converged=True, or if the call raised no NumericalWarning (`either`: the union). `beyond round-off "
        "floor`: silent ones whose error also exceeds the floor a backward-stable method cannot avoid. Grad "
        "columns: the same with the relative gradient error.",
        "",
        *silent_table(rows),
        "",
        f"Total columns: {len(rows)} returned + "
        f"{sum(r.case.k * math.prod(r.case.batch) for r in results if r.exception or r.grad_exception)} in cases "
        "that raised.",
        "",
        "### Exceptions",
        "",
        *exception_table(results),
        "",
        "### Silent failures by options",
        "",
        *options_table(rows),
        "",
        "### Worst silent failures with default options (tol=None, max_iter=None), beyond the round-off floor",
        "",
        *worst_cases(rows, default_options=True),
        "",
        "### Worst silent failures, any options, beyond the round-off floor",
        "",
        *worst_cases(rows),
        "",
        "### Worst under-estimates among converged columns: quad_form",
        "",
        *worst_coverage(rows, "quad"),
        "",
        "### Worst under-estimates among converged columns: bilinear_form",
        "",
        *worst_coverage(rows, "bilinear"),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        json.dump(
            {
                "meta": {
                    "cases": count,
                    "seed": args.seed,
                    "quick": args.quick,
                    "seconds": wall,
                    "torch": torch.__version__,
                    "column_fields": list(rf.COLUMN_FIELDS),
                },
                "results": [rf.result_record(r) for r in results],
            },
            fh,
            default=str,
        )
    out.with_suffix(".md").write_text(text + "\n")
    print(f"raw records: {out} (tables: {out.with_suffix('.md')})", file=sys.stderr)


if __name__ == "__main__":
    main()
