"""End-to-end tests of the command line (``lanczos-grad-gp`` / ``python -m lanczos_grad_gp``)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lanczos_grad_gp.app.cli import format_ms, format_table, main, parse_methods, split_error
from lanczos_grad_gp.app.datasets import load_default
from lanczos_grad_gp.app.training import METHODS, RunResult, fit_and_evaluate, method_context

TINY = ["--data", "concrete", "--n", "120", "--steps", "3", "--no-progress"]


def _table_rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        for label in ("test RMSE", "test NLL", "time per step [ms]", "noise", "outputscale", "mean lengthscale"):
            if line.startswith(label):
                rows[label] = line[len(label) :].split()
    return rows


@pytest.mark.parametrize("method", METHODS)
def test_each_method_end_to_end(method: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*TINY, "--method", method]) == 0
    out = capsys.readouterr().out
    assert "data: concrete (n_train=108, n_test=12, d=8)" in out
    header = next(line for line in out.splitlines() if line.strip() == method)
    assert header
    rows = _table_rows(out)
    assert set(rows) == {"test RMSE", "test NLL", "time per step [ms]", "noise", "outputscale", "mean lengthscale"}
    for cells in rows.values():
        assert len(cells) == 1 and math.isfinite(float(cells[0]))
    assert 0 < float(rows["test RMSE"][0]) < 40  # original scale (MPa), not z-scored
    assert "original y scale" in out


def test_default_methods_and_comma_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(TINY) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[1].split()
    assert header == ["ours", "gpytorch", "cholesky"]
    # the verdict: ours against each baseline, and where Cholesky is the better choice (n = 108 here)
    assert "ours vs Cholesky (exact):" in out and "ours vs GPyTorch default (mBCG):" in out
    assert "At n = 108 Cholesky is the better choice" in out
    assert main([*TINY, "--method", "cholesky,ours", "--method", "gpytorch", "--method", "ours"]) == 0
    header = capsys.readouterr().out.splitlines()[1].split()
    assert header == ["cholesky", "ours", "gpytorch"]


def test_float32_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*TINY, "--dtype", "float32", "--num-probes", "4", "--max-iter", "20", "--seed", "2", "--lr", "0.05"]
    argv += ["--precond-rank", "5"]
    assert main([*argv, "--method", "ours,gpytorch"]) == 0
    out = capsys.readouterr().out
    assert "float32 on cpu" in out and "seed 2" in out


def test_custom_csv_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(60, 2, generator=gen, dtype=torch.float64)
    y = torch.sin(6 * x[:, 0]) + 0.1 * torch.randn(60, generator=gen, dtype=torch.float64)
    path = tmp_path / "mine.csv"
    path.write_text("\n".join(",".join(f"{v:.6f}" for v in row) for row in torch.cat([x, y[:, None]], 1)))
    assert main(["--data", str(path), "--steps", "2", "--no-progress", "--method", "cholesky"]) == 0
    assert "data: mine (n_train=54, n_test=6, d=2)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "adam"], "unknown method 'adam'"),
        (["--method", "ours,bogus"], "unknown method 'bogus'"),
        (["--data", "/nonexistent/file.csv.gz"], "no such file"),
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--n", "-5"], "--n must be a positive integer"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--precond-rank", "-1"], "--precond-rank must be a non-negative integer"),
        (["--test-fraction", "1.5"], "--test-fraction must be in (0, 1)"),
        (["--test-fraction", "0"], "--test-fraction must be in (0, 1)"),
        (["--n", "5"], "--n: 5 rows give 5 training and 0 test rows at --test-fraction 0.1"),
        (["--n", "5"], "at least 6 rows"),
        (["--n", "2", "--test-fraction", "0.5"], "1 training and 1 test rows"),
        (["--dtype", "float16"], "invalid choice"),
        (["--device", "nonsense"], "--device"),
    ],
)
def test_argument_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: lanczos-grad-gp" in err


def test_malformed_data_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "header.csv"
    path.write_text("a,b,y\n1,2,3\n4,5,6\n")
    with pytest.raises(SystemExit) as excinfo:
        main(["--data", str(path)])
    assert excinfo.value.code == 2
    assert "comma-separated numbers" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_data_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str) -> None:
    path = tmp_path / "holes.csv"
    path.write_text("\n".join(f"{i},{2 * i},{bad if i == 3 else i}" for i in range(1, 21)) + "\n")
    with pytest.raises(SystemExit) as excinfo:
        main(["--data", str(path), "--no-progress"])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert str(path) in err and "row(s) 3 " in err and "column(s) 3 (column 3 is the target)" in err
    assert "drop or impute" in err


def test_data_file_too_small_for_a_test_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "four.csv"
    path.write_text("1,2\n2,3\n3,5\n4,4\n")
    with pytest.raises(SystemExit) as excinfo:
        main(["--data", str(path), "--no-progress"])
    assert excinfo.value.code == 2
    assert "four: 4 rows give 4 training and 0 test rows" in capsys.readouterr().err


def test_split_error() -> None:
    assert split_error(6, 0.1) is None and split_error(1030, 0.1) is None
    assert "at least 6 rows" in (split_error(5, 0.1) or "")
    assert "at least 4 rows" in (split_error(3, 0.5) or "")


def test_format_ms() -> None:
    assert format_ms(5.11) == "5110" and format_ms(12.0) == "12000"
    assert [format_ms(s) for s in (0.1234, 0.01234, 0.001234, 0.0)] == ["123", "12.3", "1.23", "0.00"]
    assert format_ms(0.09999) == "100" and format_ms(0.009999) == "10.0"
    assert format_ms(float("nan")) == "-"
    assert all("e" not in format_ms(10.0**k) for k in range(-6, 5))


def test_python_dash_m_subprocess(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "lanczos_grad_gp", "--n", "80", "--steps", "2", "--method", "cholesky"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "test RMSE" in proc.stdout
    assert "cholesky" in proc.stderr  # the tqdm progress bar
    bad = subprocess.run([*cmd[:3], "--method", "nope"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and "unknown method 'nope'" in bad.stderr


def test_demo_default_is_the_bundled_protein_sample() -> None:
    """The demo's default data shows the method's case: 4500 training points, not the 927 of concrete."""
    from lanczos_grad_gp.app.cli import DEMO_DATASET, build_parser, load_data

    args = build_parser().parse_args([])
    args.device, args.dtype = torch.device("cpu"), "float64"
    data = load_data(args)
    assert DEMO_DATASET == "protein5000" and data.name == "protein5000"
    assert (data.num_train, data.num_test, data.dim) == (4500, 500, 9)
    assert args.steps == 20 and parse_methods(args.method) == ["ours", "gpytorch", "cholesky"]


def test_verdict_wording() -> None:
    from lanczos_grad_gp.app.cli import format_verdict
    from lanczos_grad_gp.app.training import Metrics

    def result(method: str, seconds: float, rmse: float) -> RunResult:
        r = RunResult(method=method)
        r.step_times = [1.0, seconds, seconds]
        r.metrics = Metrics(rmse=rmse, nll=0.5)
        return r

    text = format_verdict([result("ours", 1.0, 0.52), result("cholesky", 4.0, 0.52)], 4500)
    assert "ours vs Cholesky (exact): 0.25x the time per step" in text
    assert "below about n = 2000" in text


def test_parse_methods() -> None:
    assert parse_methods(None) == ["ours", "gpytorch", "cholesky"]
    assert parse_methods(["OURS, gpytorch", "ours"]) == ["ours", "gpytorch"]
    with pytest.raises(ValueError, match="choose from"):
        parse_methods([","])


def test_method_context_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="Unknown method"):
        method_context("lbfgs")


def test_format_table_without_metrics() -> None:
    table = format_table([RunResult(method="ours")])
    assert "ours" in table and "test RMSE" in table


def test_methods_agree_on_tiny_problem() -> None:
    """All three back ends optimise the same objective: the fitted models are close."""
    data = load_default(n=150)
    results = {m: fit_and_evaluate(data, m, steps=5, progress=False) for m in METHODS}
    ref = results["cholesky"]
    for method in ("ours", "gpytorch"):
        got = results[method]
        assert abs(got.losses[0] - ref.losses[0]) < 0.05 * abs(ref.losses[0]) + 0.05
        assert abs(got.metrics.rmse - ref.metrics.rmse) < 0.1 * ref.metrics.rmse
        for name, value in ref.hyperparameters.items():
            assert abs(got.hyperparameters[name] - value) < 0.1 * abs(value) + 0.02, (method, name)


def test_objective_accuracy_against_float64_cholesky() -> None:
    """The errors against exact Cholesky: Cholesky's own is round-off; the stochastic methods report theirs."""
    from lanczos_grad_gp.app.training import objective_accuracy

    data = load_default(n=400)
    acc = objective_accuracy(data, ["cholesky", "ours", "gpytorch"], seed=0)
    assert {a.where for a in acc.values()} == {"start"}
    assert acc["cholesky"].loss_error < 1e-12 and acc["cholesky"].gradient_error < 1e-10
    for method in ("ours", "gpytorch"):
        assert math.isfinite(acc[method].gradient_error) and acc[method].gradient_error > 0
    # float64, 360 points: the preconditioner captures most of the kernel and the log-det gradient is
    # variance-reduced (InvQuadLogdetInfo.variance_reduced), so ours is far below a 10-probe estimate
    assert acc["ours"].gradient_error < 0.05
    assert acc["ours"].gradient_error < acc["gpytorch"].gradient_error


def test_objective_accuracy_at_a_fitted_state() -> None:
    """At Cholesky's fitted hyperparameters (a state_dict) the reference is evaluated there, not at the start."""
    from lanczos_grad_gp.app.training import objective_accuracy

    data = load_default(n=200)
    fit = fit_and_evaluate(data, "cholesky", steps=3, progress=False)
    assert fit.final_state is not None
    acc = objective_accuracy(data, ["cholesky", "ours"], state=fit.final_state, seed=0)
    assert acc["cholesky"].where == "Cholesky's fit" and acc["cholesky"].gradient_error < 1e-10
    start = objective_accuracy(data, ["ours"], seed=0)["ours"]
    assert acc["ours"].gradient_error != start.gradient_error  # another point, another error


def test_cli_accuracy_rows_and_switch(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(TINY) == 0
    out = capsys.readouterr().out
    assert "gradient rel. error at start" in out and "-MLL/n error at start" in out
    assert "gradient at start" in out  # the verdict against GPyTorch's default
    assert main([*TINY, "--accuracy", "off"]) == 0
    out = capsys.readouterr().out
    assert "gradient rel. error" not in out and "more accurate" not in out
