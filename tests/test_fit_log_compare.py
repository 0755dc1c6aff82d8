"""``benchmarks.fit_log_compare``: two fits compared at equal evaluation and CPU budgets from their logs.

Oracle: hand-built logs whose best-so-far, budgets and gaps are worked out by hand, and a real pair of
logs written by ``fit_quality`` (stock Cholesky and forced Lanczos on Hartmann6, n = 30) whose whole-log
row must agree with the fits' own exact MLLs.
"""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import fit_log_compare as flc


def _log(path, entries: list[dict]) -> None:
    lines = [json.dumps({"fingerprint": "f"})] + [json.dumps({"x": [0.0], "grads": [[0.0]], **e}) for e in entries]
    path.write_text("\n".join(lines) + "\n" + json.dumps({"complete": True}) + "\n")


def test_best_so_far_uses_exact_losses_only(tmp_path) -> None:
    path = tmp_path / "flag.jsonl"
    _log(
        path,
        [
            {"loss": 1.0, "cpu_s": 2.0, "counts": {"lanczos_calls": 1}},  # an estimate: budget yes, best no
            {"loss": 3.0, "cpu_s": 1.0, "counts": {"dense_calls": 1}},
            {"loss": -5.0, "cpu_s": 1.0, "counts": {"lanczos_calls": 1}},  # lower, but an estimate
            {"loss": 2.0, "cpu_s": 4.0, "counts": {"route:cholesky": 1}},
        ],
    )
    points = flc.trajectory(flc.read_evaluations(path))
    assert [p.evaluations for p in points] == [1, 2, 3, 4]
    assert [p.cpu_s for p in points] == [2.0, 3.0, 4.0, 8.0]
    assert points[0].best_mll == -math.inf and points[0].best_at == 0 and points[0].exact == 0
    assert (points[2].best_mll, points[2].best_at, points[2].exact) == (-3.0, 2, 1)
    assert (points[3].best_mll, points[3].best_at, points[3].exact) == (-2.0, 4, 2)


def test_an_evaluation_that_raised_counts_its_cost_not_a_loss(tmp_path) -> None:
    path = tmp_path / "cholesky.jsonl"
    _log(path, [{"loss": 1.0, "cpu_s": 1.0}, {"error": {"type": "x:Y", "message": "m"}, "cpu_s": 3.0}])
    path.write_text(path.read_text() + '{"x": [0.0], "lo')  # a last line cut short by a kill
    points = flc.trajectory(flc.read_evaluations(path))
    assert len(points) == 2 and points[-1].cpu_s == 4.0 and points[-1].best_mll == -1.0


def test_budgets_and_gap(tmp_path) -> None:
    ref, other = tmp_path / "ref.jsonl", tmp_path / "other.jsonl"
    _log(ref, [{"loss": -0.1 * k, "cpu_s": 10.0} for k in range(1, 11)])  # 10 evaluations, 100 s
    _log(other, [{"loss": -0.05 * k, "cpu_s": 5.0} for k in range(1, 7)])  # 6 evaluations, 30 s
    r, o = flc.read_evaluations(ref), flc.read_evaluations(other)
    points = flc.trajectory(r)
    assert flc.at_evaluations(points, 4).best_mll == pytest.approx(0.4)
    assert flc.at_evaluations(points, 11) is None and flc.at_evaluations(points, 0) is None
    assert flc.at_cpu(points, 35.0).evaluations == 3
    assert flc.at_cpu(points, 5.0) is None  # not one evaluation fits
    assert flc.at_cpu(points, 101.0) is None  # the log ran out first

    table = flc.compare(r, o, [4, 8], [20.0])
    rows = table.splitlines()[2:]
    # 8 evaluations is past the other log: left out; 20 s: the reference has 2 evaluations, the other 4
    assert [row.split(" | ")[0] for row in rows] == ["| 4 evaluations", "| 20 s CPU", "| whole logs"]
    four = rows[0].split(" | ")
    assert float(four[2]) == pytest.approx(0.4) and float(four[5]) == pytest.approx(0.2)
    assert float(four[7]) == pytest.approx(0.2)  # reference minus other: the other is worse
    assert float(four[8].rstrip(" |")) == pytest.approx(0.5)  # 20 s against 40 s
    cpu = rows[1].split(" | ")
    assert float(cpu[7]) == pytest.approx(0.0)  # 0.2 after 20 s each
    assert flc.default_budgets(r, o, steps=3) == ([2, 4, 6], [10.0, 20.0, 30.0])


def test_whole_logs_agree_with_the_fits_exact_mll(tmp_path) -> None:
    pytest.importorskip("botorch")
    fit_quality = pytest.importorskip("benchmarks.fit_quality")
    X, Y = fit_quality.make_data("hartmann6", 30, seed=0)
    results = {}
    for method in ("cholesky", "lanczos"):
        results[method] = fit_quality.fit_once("single", X, Y, method, tmp_path / f"{method}.jsonl")
    ref = flc.read_evaluations(tmp_path / "cholesky.jsonl")
    lanczos = flc.read_evaluations(tmp_path / "lanczos.jsonl")
    assert len(ref) == results["cholesky"].evaluations and len(lanczos) == results["lanczos"].evaluations
    # the Cholesky fit's last accepted iterate is its best evaluated point, and its loss is the exact MLL
    assert flc.trajectory(ref)[-1].best_mll == pytest.approx(results["cholesky"].exact_mll, abs=1e-9)
    # forced Lanczos at n = 30: the factor reaches full rank, but the calls are Lanczos: none counts as exact
    assert all(not flc.is_exact(e) for e in lanczos)
    assert flc.trajectory(lanczos)[-1].exact == 0

    out = tmp_path / "table.md"
    flc.main([str(tmp_path / "cholesky.jsonl"), str(tmp_path / "cholesky.jsonl"), "--out", str(out)])
    whole = [row for row in out.read_text().splitlines() if row.startswith("| whole logs")][0].split(" | ")
    assert float(whole[7]) == 0.0 and float(whole[8].rstrip(" |")) == 1.0  # a log against itself
