"""``benchmarks.fit_replay``: a stopped Cholesky reference fit resumed from its evaluation log takes exactly
the path of an uninterrupted fit (L-BFGS-B is deterministic given the same losses and gradients).

Oracle: the same fit run without a log, in the same process (same threads, so bit-identical
computation); the resumed fit must match its fitted parameters and exact MLL bit for bit and must
rewrite the same log. A log from another run must be refused, not silently followed.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("botorch")
fit_quality = pytest.importorskip("benchmarks.fit_quality")


def _data(name: str = "hartmann6", n: int = 30):
    return fit_quality.make_data(name, n, seed=0)


def _path(lines: list[str]) -> list[tuple]:
    """A log's evaluations (after its fingerprint line) without their CPU seconds (which differ run to run)."""
    return [(e["x"], e["loss"], e["grads"]) for e in map(json.loads, lines[1:])]


def test_resumed_fit_takes_the_uninterrupted_path(tmp_path) -> None:
    X, Y = _data()
    plain = fit_quality.fit_once("single", X, Y, "cholesky")
    log = tmp_path / "row-cholesky.jsonl"
    logged = fit_quality.fit_once("single", X, Y, "cholesky", log)
    # the wrapper itself changes nothing
    assert logged.exact_mll == plain.exact_mll and logged.evaluations == plain.evaluations
    assert logged.replayed_evaluations == 0
    lines = log.read_text().splitlines()
    assert len(lines) - 1 == plain.evaluations > 4  # a fingerprint, then one line per closure call

    # "stop" the fit after half its evaluations, then resume
    half = (len(lines) - 1) // 2
    log.write_text("\n".join(lines[: 1 + half]) + "\n")
    resumed = fit_quality.fit_once("single", X, Y, "cholesky", log)
    assert resumed.replayed_evaluations == half
    assert resumed.evaluations == plain.evaluations
    assert resumed.exact_mll == plain.exact_mll  # bit for bit: the same optimum
    assert _path(log.read_text().splitlines()) == _path(lines)  # and the same recorded path

    # a log that is complete replays the whole fit without computing anything
    again = fit_quality.fit_once("single", X, Y, "cholesky", log)
    assert again.replayed_evaluations == plain.evaluations and again.exact_mll == plain.exact_mll


def test_a_log_from_another_run_is_refused(tmp_path) -> None:
    X, Y = _data()
    log = tmp_path / "row-cholesky.jsonl"
    fit_quality.fit_once("single", X, Y, "cholesky", log)
    X2, Y2 = _data("branin")  # other data
    with pytest.raises(RuntimeError, match="another fit"):
        fit_quality.fit_once("single", X2, Y2, "cholesky", log)
    # other data of the same shape: every point asked for would match, so only the fingerprint tells
    X3, Y3 = fit_quality.make_data("hartmann6", 30, seed=1)
    with pytest.raises(RuntimeError, match="another fit"):
        fit_quality.fit_once("single", X3, Y3, "cholesky", log)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    # a changed recorded loss (what changed code would compute) is caught at the first replayed evaluation
    changed = [dict(e) for e in entries]
    changed[1]["loss"] *= 1 + 1e-6
    log.write_text("".join(json.dumps(e) + "\n" for e in changed))
    with pytest.raises(RuntimeError, match="code or settings changed"):
        fit_quality.fit_once("single", X, Y, "cholesky", log)
    # a tampered point in the middle of the log is refused where the fit reaches it
    entries[1 + 3]["x"][0] += 1e-3
    log.write_text("".join(json.dumps(e) + "\n" for e in entries))
    with pytest.raises(RuntimeError, match="evaluation 3 asks"):
        fit_quality.fit_once("single", X, Y, "cholesky", log)


@pytest.mark.parametrize(("kind", "method"), [("single", "flag"), ("single", "lanczos"), ("model_list", "cholesky")])
def test_only_stock_cholesky_single_output_fits_take_a_log(tmp_path, kind: str, method: str) -> None:
    X, Y = _data("branincurrin")
    with pytest.raises(ValueError, match="evaluation_log"):
        fit_quality.fit_once(kind, X, Y, method, tmp_path / "log.jsonl")


def test_cli_refuses_a_log_for_the_flag(tmp_path) -> None:
    with pytest.raises(SystemExit):
        fit_quality.main(["--rows", "branin-single-30", "--methods", "flag", "--evaluation-log", str(tmp_path)])


def test_cli_writes_and_resumes_the_row_log(tmp_path) -> None:
    out, logs = tmp_path / "fq", tmp_path / "logs"
    args = ["--rows", "branin-single-30", "--methods", "cholesky", "--out", str(out), "--evaluation-log", str(logs)]
    fit_quality.main(args)
    first = json.loads(out.with_suffix(".json").read_text())[0]["results"][0]
    assert (logs / "branin-single-30-cholesky.jsonl").exists() and first["replayed_evaluations"] == 0
    fit_quality.main(args)
    second = json.loads(out.with_suffix(".json").read_text())[0]["results"][0]
    assert second["replayed_evaluations"] == first["evaluations"] and second["exact_mll"] == first["exact_mll"]


def test_an_evaluation_that_raised_raises_again_on_replay(tmp_path) -> None:
    from linear_operator.utils.errors import NotPSDError

    from benchmarks.fit_replay import EvaluationLog

    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    calls = []

    def closure():  # a loss that is not PSD-computable at its second point
        calls.append(x.detach().clone())
        if len(calls) == 2:
            raise NotPSDError("matrix not positive definite at this point")
        loss = (x**2).sum()
        return loss, torch.autograd.grad(loss, [x])

    path = tmp_path / "log.jsonl"
    log = EvaluationLog(path, "toy")
    wrapped = log.wrap(closure, {"x": x})
    points = [torch.tensor([0.5, -1.0]), torch.tensor([1.0, 2.0]), torch.tensor([0.25, 0.0])]
    recorded = []
    for point in points:
        with torch.no_grad():
            x.copy_(point)
        try:
            recorded.append(wrapped())
        except NotPSDError:
            recorded.append(None)
    assert recorded[1] is None and len(calls) == 3

    replay = EvaluationLog(path, "toy").wrap(closure, {"x": x})
    for point, first in zip(points, recorded, strict=True):
        with torch.no_grad():
            x.copy_(point)
        if first is None:
            with pytest.raises(NotPSDError, match="not positive definite"):
                replay()
        else:
            loss, (grad,) = replay()
            assert float(loss) == float(first[0]) and torch.equal(grad, first[1][0])
    assert len(calls) == 4  # only the first replayed evaluation was computed again (the check)


def test_a_last_line_cut_by_a_kill_is_computed_again(tmp_path) -> None:
    X, Y = _data()
    log = tmp_path / "row-cholesky.jsonl"
    full = fit_quality.fit_once("single", X, Y, "cholesky", log)
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:6]) + "\n" + lines[6][: len(lines[6]) // 2])  # killed writing evaluation 5
    resumed = fit_quality.fit_once("single", X, Y, "cholesky", log)
    assert resumed.replayed_evaluations == 5 and resumed.exact_mll == full.exact_mll
    assert _path(log.read_text().splitlines()) == _path(lines)
