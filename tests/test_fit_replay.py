"""``benchmarks.fit_replay``: a stopped fit resumed from its evaluation log takes exactly the path of an
uninterrupted fit (L-BFGS-B is deterministic given the same losses and gradients): a stock Cholesky fit, and a
fit under the flag (whose deterministic-objective blocks' state the log records).

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
    return [(e["x"], e["loss"], e["grads"]) for e in map(json.loads, lines[1:]) if "x" in e]


def test_resumed_fit_takes_the_uninterrupted_path(tmp_path) -> None:
    X, Y = _data()
    plain = fit_quality.fit_once("single", X, Y, "cholesky")
    log = tmp_path / "row-cholesky.jsonl"
    logged = fit_quality.fit_once("single", X, Y, "cholesky", log)
    # the wrapper itself changes nothing
    assert logged.exact_mll == plain.exact_mll and logged.evaluations == plain.evaluations
    assert logged.replayed_evaluations == 0
    lines = log.read_text().splitlines()
    # a fingerprint, one line per closure call, and the mark of a finished fit
    assert len(lines) - 2 == plain.evaluations > 4 and json.loads(lines[-1]) == {"complete": True}

    # "stop" the fit after half its evaluations, then resume
    half = (len(lines) - 2) // 2
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


@pytest.mark.parametrize(("kind", "method"), [("model_list", "cholesky"), ("batched", "flag")])
def test_only_single_output_fits_take_a_log(tmp_path, kind: str, method: str) -> None:
    X, Y = _data("branincurrin")
    with pytest.raises(ValueError, match="evaluation_log"):
        fit_quality.fit_once(kind, X, Y, method, tmp_path / "log.jsonl")


def test_cli_refuses_a_log_for_a_multi_output_row(tmp_path) -> None:
    with pytest.raises(SystemExit):
        fit_quality.main(["--rows", "branincurrin-model_list-200", "--evaluation-log", str(tmp_path)])


def _capped_lanczos():
    """Lanczos forced with a rank-20 factor and 100 steps: Hartmann6 at n = 200 then holds factors, hands its
    covariance to dense Cholesky in the first L-BFGS run and holds factors again in three reruns."""
    import contextlib

    import lanczos_grad_gp as lgg

    stack = contextlib.ExitStack()
    stack.enter_context(lgg.settings.max_preconditioner_size(20))
    stack.enter_context(lgg.settings.max_lanczos_iter(100))
    return stack


REPORTED = ("exact_mll", "evaluations", "attempts", "abnormal", "numerical_warnings", "routes", "lanczos_calls")
REPORTED += ("mean_lanczos_steps", "unconverged_calls", "fixed_calls", "refreshed_calls", "raised_cap_calls")
REPORTED += ("dense_calls", "dense_handovers", "unconverged_step_share")


def _flag_fit(log=None):
    X, Y = _data(n=200)
    with _capped_lanczos():
        return fit_quality.fit_once("single", X, Y, "lanczos", log)


def test_a_flag_fit_resumes_in_a_handed_over_block(tmp_path) -> None:
    """The flag's fit, stopped in the first run after its hand-over to dense Cholesky, resumes on the path of the
    uninterrupted fit: same fitted model, same reported counts (warnings, Lanczos and dense calls), same log."""
    from benchmarks.fit_replay import EvaluationLog

    plain = _flag_fit()
    log = tmp_path / "row-lanczos.jsonl"
    logged = _flag_fit(log)
    for name in REPORTED:
        assert getattr(logged, name) == getattr(plain, name), name
    lines = log.read_text().splitlines()
    entries = [json.loads(line) for line in lines[1:-1]]  # without the fingerprint and the complete mark
    blocks = [e["block"] for e in entries]
    states = [(e["state"]["frozen"], e["state"]["dense"]) for e in entries]
    assert blocks[0] == 1 and blocks[-1] == 4 and plain.dense_handovers >= 1 and plain.fixed_calls > 0
    assert states[0] == (True, False) and (True, True) in states  # a held factor, then the hand-over
    cut = max(i for i, (b, st) in enumerate(zip(blocks, states, strict=True)) if b == 1 and st[1]) - 3
    log.write_text("\n".join(lines[: 1 + cut]) + "\n")
    assert EvaluationLog(log, json.loads(lines[0])["fingerprint"]).dropped == 0
    resumed = _flag_fit(log)
    assert resumed.replayed_evaluations == cut
    for name in REPORTED:
        assert getattr(resumed, name) == getattr(plain, name), name
    assert _path(log.read_text().splitlines()) == _path(lines)


def test_a_flag_log_cut_where_a_block_holds_a_factor_goes_back_to_a_resumable_point(tmp_path) -> None:
    """In a block that holds a factor (a replay does not rebuild it) the log is cut back to the last evaluation
    after which the fit can go on live; the fit is still the uninterrupted one."""
    from benchmarks.fit_replay import EvaluationLog, resumable

    plain = _flag_fit()
    log = tmp_path / "row-lanczos.jsonl"
    _flag_fit(log)
    lines = log.read_text().splitlines()
    entries = [json.loads(line) for line in lines[1:-1]]
    cut = len(entries) - 2
    assert not resumable(entries[cut - 1])  # the last run holds factors
    log.write_text("\n".join(lines[: 1 + cut]) + "\n")
    kept = EvaluationLog(log, json.loads(lines[0])["fingerprint"])
    assert kept.dropped > 0 and resumable(kept.entries[-1]) and len(kept.entries) == cut - kept.dropped
    resumed = _flag_fit(log)
    assert resumed.replayed_evaluations == len(kept.entries)
    for name in REPORTED:
        assert getattr(resumed, name) == getattr(plain, name), name
    assert _path(log.read_text().splitlines()) == _path(lines)


def test_a_flag_log_with_other_blocks_is_refused(tmp_path) -> None:
    log = tmp_path / "row-lanczos.jsonl"
    _flag_fit(log)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    entries[5]["block"] += 1  # evaluation 4 recorded in another block than the replay puts it in
    log.write_text("".join(json.dumps(e) + "\n" for e in entries))
    with pytest.raises(RuntimeError, match="another block"):
        _flag_fit(log)


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


def test_warnings_of_an_evaluation_are_recorded_and_raised_again(tmp_path) -> None:
    """BoTorch collects a fit attempt's warnings and raises them after it, so a replayed evaluation must raise
    the ones it raised when it was computed (a resumed fit then reports the same NumericalWarnings); the check's
    recomputation of the first one raises none of its own."""
    import warnings

    from linear_operator.utils.warnings import NumericalWarning

    from benchmarks.fit_replay import EvaluationLog

    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)

    def closure():
        warnings.warn("Lanczos stopped at the step cap", NumericalWarning, stacklevel=2)
        loss = (x**2).sum()
        return loss, torch.autograd.grad(loss, [x])

    path = tmp_path / "log.jsonl"
    with pytest.warns(NumericalWarning):
        EvaluationLog(path, "toy").wrap(closure, {"x": x})()
    entry = json.loads(path.read_text().splitlines()[1])
    assert entry["warnings"] == [{"category": f"{NumericalWarning.__module__}:NumericalWarning",
                                  "message": "Lanczos stopped at the step cap"}]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        EvaluationLog(path, "toy").wrap(closure, {"x": x})()  # the check computes it again, then it is replayed
    assert [(w.category, str(w.message)) for w in caught] == [(NumericalWarning, "Lanczos stopped at the step cap")]


def test_code_fingerprint_ignores_prose_not_code(tmp_path) -> None:
    import types

    from benchmarks.fit_replay import code_fingerprint

    package = tmp_path / "pkg"
    package.mkdir()
    module = package / "__init__.py"
    fake = types.SimpleNamespace(__file__=str(module))
    module.write_text('"""Docs."""\n\n\ndef f(x):\n    """Twice x."""\n    return 2 * x  # doubled\n')
    first = code_fingerprint(fake)
    module.write_text('"""Other docs."""\n\n\ndef f(x):\n    """Two times x."""\n    return 2 * x  # other\n')
    assert code_fingerprint(fake) == first
    module.write_text('"""Docs."""\n\n\ndef f(x):\n    """Twice x."""\n    return 3 * x\n')
    assert code_fingerprint(fake) != first


def test_a_finished_flag_log_replays_whole(tmp_path) -> None:
    """The last run of a finished flag fit holds a factor; the log's complete mark keeps it from being cut back."""
    log = tmp_path / "row-lanczos.jsonl"
    plain = _flag_fit(log)
    again = _flag_fit(log)
    assert again.replayed_evaluations == plain.evaluations
    for name in REPORTED:
        assert getattr(again, name) == getattr(plain, name), name
