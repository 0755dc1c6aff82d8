"""``benchmarks.fit_quality`` end to end on its smallest row (Branin, n = 30; a few seconds).

The benchmark is the evidence for "fits under the flag land where Cholesky's land", so its own
bookkeeping is checked here: the flag's row is routed to Cholesky at this size and lands exactly on
Cholesky's optimum; the forced-Lanczos row runs the Lanczos route and lands within the benchmark's
goal (0.01 nats/point); evaluations and Lanczos calls are counted; reruns of ``main`` merge rows.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("botorch")
fit_quality = pytest.importorskip("benchmarks.fit_quality")


def test_smallest_row_end_to_end(tmp_path) -> None:
    out = tmp_path / "fq"
    fit_quality.main(["--rows", "branin-single-30", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["row"] for r in rows] == ["branin-single-30"]
    by_method = {r["method"]: r for r in rows[0]["results"]}
    assert list(by_method) == ["cholesky", "flag", "lanczos"]
    chol, flag, lanczos = by_method["cholesky"], by_method["flag"], by_method["lanczos"]
    assert chol["gap"] == 0.0 and chol["lanczos_calls"] == 0 and chol["evaluations"] > 0
    # n = 30 is below max_cholesky_size: the flag's fit is Cholesky's, evaluation for evaluation
    assert flag["routes"] == ["cholesky"] and flag["gap"] == pytest.approx(0.0, abs=1e-9)
    assert flag["evaluations"] == chol["evaluations"]
    # forced Lanczos: every evaluation is a Lanczos call, and the fit meets the benchmark's goal
    assert lanczos["routes"] == ["lanczos"] and lanczos["lanczos_calls"] == lanczos["evaluations"] > 0
    assert abs(lanczos["gap"]) < 0.01 and lanczos["abnormal"] == 0
    # n = 30 is below max_preconditioner_size: the factor reaches full rank, nothing is held fixed
    assert lanczos["fixed_calls"] == 0 and lanczos["unconverged_step_share"] == 0.0
    md = out.with_suffix(".md").read_text()
    assert md.count("| branin-single-30 |") == 3

    # a second call with another row keeps the first (results merge by row name, in ROWS order)
    fit_quality.main(["--rows", "hartmann6-single-30", "--methods", "cholesky", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["row"] for r in rows] == ["branin-single-30", "hartmann6-single-30"]
    assert [r["method"] for r in rows[1]["results"]] == ["cholesky"]
