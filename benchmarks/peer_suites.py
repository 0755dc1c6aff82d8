"""Run GPyTorch's and BoTorch's own test suites with ``lanczos_grad_gp.settings.use_lanczos_grad`` on (and off).

Given checkouts of the two repositories at the installed versions, this copies their ``test/`` trees
into a temporary folder (never into this repository), writes a generated ``conftest.py`` there that
imports ``lanczos_grad_gp`` and, in mode ``on``, sets the flag's process-wide default with
``lanczos_grad_gp.settings.use_lanczos_grad.set_default(True)`` (mode ``off`` only imports it, so
the hooks are installed but inert), runs pytest once per directory with ``--junitxml`` and parses the
XML into per-file passed / failed / skipped counts.

Failures under the flag are classified:

* ``internals``: listed in :data:`KNOWN_INTERNALS` (the test counts or mocks internal CG / Cholesky /
  Lanczos calls, so a different but correct computation fails it), with the reason;
* ``also off``: the same test fails with the flag off too (run ``--mode both``): not caused by the flag;
* ``unexplained``: everything else. The goal is none.

The generated conftest also wraps every test in ``lanczos_grad_gp.record_calls()`` and logs how many
likelihood calls took each route (``cholesky`` / ``operator`` / ``lanczos``, README "Which computation
runs"), so the table shows which files exercised Lanczos at all, and it enforces a per-test time limit
(``pytest-timeout`` when installed, else a ``SIGALRM`` in the conftest).

Usage (from the repository root; the checkouts are plain trees that contain ``test/``, e.g.
``git --git-dir=<mirror> archive v1.15.2 test | tar -x -C /tmp/peer/gpytorch``)::

    python -m benchmarks.peer_suites --gpytorch /tmp/peer/gpytorch --botorch /tmp/peer/botorch \
        [--mode on|off|both] [--dirs gpytorch:test/mlls botorch:test/models ...] \
        [--out benchmarks/results/peer_suites]

With ``--mode both`` (the default) the flag-off pass runs only the tests that failed with the flag on
(``--off-scope all`` runs whole directories). A pytest process that outlives ``--dir-timeout`` is
killed and the tests it finished are read from the conftest's log; run the files it did not reach
as their own ``--dirs`` entries, then combine the JSON outputs with ``--merge a.json b.json``
(a file's own run replaces its part of the directory run). Writes ``<out>.json`` (every test's
outcome, per mode) and ``<out>.md`` (the tables). Exit status 1 when an unexplained failure remains.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

#: the directories the issue names; BoTorch has no ``test/fit`` folder, its fitting tests are ``test/test_fit.py``
DEFAULT_DIRS: tuple[str, ...] = (
    "gpytorch:test/examples",
    "gpytorch:test/variational",
    "gpytorch:test/lazy",
    "gpytorch:test/mlls",
    "gpytorch:test/models",
    "botorch:test/models",
    "botorch:test/test_fit.py",
    "botorch:test/acquisition",
    "botorch:test/optim",
)

#: test node ids (``suite:path::Class::test``, fnmatch patterns allowed) that fail under the flag only
#: because they count or mock internal CG / Cholesky / Lanczos calls, with the reason. Decided by
#: reading each test's source and by comparing with the flag off (a test failing both ways is not ours).
_LO_CG_MOCK = (
    "linear_operator's LinearOperatorTestCase._test_inv_quad_logdet runs under max_cholesky_size(0) and asserts "
    "that a mock of linear_operator.utils.linear_cg was called; under the flag the call goes to the Lanczos route "
    "(our threshold follows GPyTorch's, 0) and no CG runs. Its value checks, just before, pass"
)
KNOWN_INTERNALS: dict[str, str] = {
    "gpytorch:test/lazy/test_lazy_evaluated_kernel_tensor.py::*::test_inv_quad_logdet": _LO_CG_MOCK,
    "gpytorch:test/lazy/test_lazy_evaluated_kernel_tensor.py::*::test_inv_quad_logdet_no_reduce": _LO_CG_MOCK,
    "gpytorch:test/lazy/test_lazy_evaluated_kernel_tensor.py::*::test_root_decomposition_cholesky": (
        _LO_CG_MOCK + " (the test ends with _test_inv_quad_logdet(), cholesky=False)"
    ),
    "gpytorch:test/variational/test_grid_interpolation_variational_strategy.py::*::test_training_*": (
        "runs under max_cholesky_size(0) and asserts cg_mock.call_count == 2 (a mock of "
        "linear_operator.utils.linear_cg: the KL term's prior inv_quad_logdet, n = 64, once per forward pass); "
        "under the flag both calls take the Lanczos route (record_calls: 2 x lanczos, n = 64) and CG runs 0 "
        "times. With that one count removed the test passes with the flag on (checked for the "
        "VariationalELBO classes, Cholesky and mean-field: their Cholesky counts, 1 and 0, and the "
        "non-zero-gradient checks hold)"
    ),
}

_CONFTEST = '''\
# Generated by benchmarks/peer_suites.py (mode: {mode}); do not edit.
import json
import os
import signal
import threading
import time

import pytest

import lanczos_grad_gp

MODE = {mode!r}
if MODE == "on":
    lanczos_grad_gp.settings.use_lanczos_grad.set_default(True)
_LOG = {log!r}
_TIMEOUT = {timeout!r}  # seconds per test phase; 0: none
_SIGALRM = {sigalrm!r}  # pytest-timeout is not installed: enforce the limit here


class PeerSuiteTimeout(Exception):
    """Raised by the conftest's SIGALRM handler when a test phase runs past its limit."""


def _on_alarm(signum, frame):
    raise PeerSuiteTimeout(f"test phase exceeded the per-test limit of {{_TIMEOUT}} s (peer_suites conftest)")


def pytest_report_header(config):
    flag = lanczos_grad_gp.settings.use_lanczos_grad.on()
    return [f"lanczos_grad_gp {{lanczos_grad_gp.__version__}} from {{lanczos_grad_gp.__file__}}: "
            f"use_lanczos_grad default on = {{flag}} (mode {{MODE}})"]


def _log(entry):
    with open(_LOG, "a") as fh:
        fh.write(json.dumps(entry) + "\\n")


def _guarded(item, phase):
    alarm = _SIGALRM and _TIMEOUT and threading.current_thread() is threading.main_thread()
    if alarm:
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, _TIMEOUT)
    try:
        with lanczos_grad_gp.record_calls() as calls:
            try:
                return (yield)
            finally:
                counts = getattr(item, "_peer_routes", {{}})
                for info in calls:
                    route = getattr(info, "route", "lanczos")
                    counts[route] = counts.get(route, 0) + 1
                item._peer_routes = counts
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _guarded(item, "setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    assert lanczos_grad_gp.settings.use_lanczos_grad.on() == (MODE == "on"), "flag state lost"
    return (yield from _guarded(item, "call"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    return (yield from _guarded(item, "teardown"))


def pytest_runtest_logreport(report):
    entry = {{"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
             "duration": round(report.duration, 3)}}
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        entry["message"] = crash.message if crash is not None else str(report.longrepr)[-2000:]
    _log(entry)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = time.perf_counter()
    try:
        return (yield)
    finally:
        _log({{"nodeid": item.nodeid, "routes": getattr(item, "_peer_routes", {{}}),
               "wall": round(time.perf_counter() - start, 3)}})


def pytest_collectreport(report):
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr)[-2000:]
        _log({{"nodeid": report.nodeid, "when": "collect", "outcome": "failed", "message": message}})
'''


@dataclass
class TestResult:
    """One test's outcome in one mode."""

    nodeid: str  # suite:path::Class::name
    file: str  # suite:path
    outcome: str  # passed | failed | error | skipped
    message: str = ""
    time: float = 0.0
    routes: dict[str, int] = field(default_factory=dict)


@dataclass
class DirRun:
    """One pytest process: one directory (or file) of one suite, in one mode."""

    target: str
    mode: str
    wall_s: float
    returncode: int | None
    timed_out: bool
    source: str  # junit | log (the process was killed before writing the XML)
    tests: list[TestResult]
    scope: str = "all"  # all | failing (only the tests that failed with the flag on)
    not_reached: list[str] = field(default_factory=list)  # test files the run did not start (killed)
    rerun_note: str = ""
    lanczos_grad_gp_commit: str = ""  # the library's git HEAD when this pytest process started


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()[:300]
    return ""


def _nodeid_from_junit(suite: str, case: ET.Element, root: Path) -> tuple[str, str]:
    """``(nodeid, file)`` of a junit testcase, e.g. ``gpytorch:test/mlls/test_x.py::TestX::test_y``.

    The module comes from ``classname`` (its dotted path, then the class): xunit1's ``file`` attribute
    names the file that *defines* the test method, which for inherited test cases is a base class in
    an installed package. A collection error has the module's dotted path in ``classname`` (or in
    ``name`` when ``classname`` is empty).
    """
    classname, name = case.get("classname", ""), case.get("name", "")
    dotted = classname.split(".") if classname else name.split(".")
    for k in range(len(dotted), 0, -1):
        path = "/".join(dotted[:k]) + ".py"
        if (root / path).is_file():
            if not classname:
                return f"{suite}:{path}", f"{suite}:{path}"
            return f"{suite}:" + "::".join([path, *dotted[k:], name]), f"{suite}:{path}"
    path = case.get("file") or classname or name
    return f"{suite}:{path}::{name}", f"{suite}:{path}"


def parse_junit(xml_path: Path, suite: str, root: Path) -> list[TestResult]:
    """Every testcase of a pytest ``--junitxml`` file (``junit_family=xunit1``)."""
    tree = ET.parse(xml_path)
    results: dict[str, TestResult] = {}
    for case in tree.iter("testcase"):
        nodeid, file = _nodeid_from_junit(suite, case, root)
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = _first_line(child.get("message")) or _first_line(child.text)
                break
        previous = results.get(nodeid)
        # a test that passed and then errored in teardown appears twice; the worse outcome wins
        if previous is not None and previous.outcome in ("failed", "error"):
            continue
        results[nodeid] = TestResult(nodeid, file, outcome, message, float(case.get("time", 0) or 0))
    return list(results.values())


def parse_log(log_path: Path, suite: str) -> tuple[list[TestResult], dict[str, dict[str, int]]]:
    """The conftest's JSON-lines log: outcomes (when the XML is missing) and routes per test."""
    outcomes: dict[str, TestResult] = {}
    routes: dict[str, dict[str, int]] = {}
    if not log_path.is_file():
        return [], routes
    for line in log_path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        nodeid = f"{suite}:{entry['nodeid']}"
        file = f"{suite}:{entry['nodeid'].split('::')[0]}"
        if "routes" in entry:
            routes[nodeid] = entry["routes"]
            continue
        when, outcome = entry.get("when"), entry.get("outcome")
        current = outcomes.get(nodeid)
        if outcome == "failed":
            kind = "failed" if when == "call" else "error"
            if current is None or current.outcome not in ("failed", "error"):
                outcomes[nodeid] = TestResult(nodeid, file, kind, _first_line(entry.get("message")))
        elif outcome == "skipped" and (current is None or current.outcome == "passed"):
            outcomes[nodeid] = TestResult(nodeid, file, "skipped", "")
        elif outcome == "passed" and when == "call" and current is None:
            outcomes[nodeid] = TestResult(nodeid, file, "passed", "", entry.get("duration", 0.0))
    return list(outcomes.values()), routes


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "gpytorch", "linear_operator", "botorch", "pytest", "lanczos_grad_gp"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _git_ref(path: Path, dirty_under: str | None = None) -> str:
    """``HEAD`` of the work tree at ``path``, plus a mark when ``dirty_under`` has uncommitted changes."""
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30, check=True
        )
        ref = out.stdout.strip()
        if dirty_under is not None:
            status = subprocess.run(
                ["git", "-C", str(path), "status", "--porcelain", "--", dirty_under],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            if status.stdout.strip():
                ref += f" + uncommitted changes in {dirty_under}/"
        return ref
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git work tree)"


def prepare(checkout: Path, dest: Path, mode: str, timeout: float, sigalrm: bool) -> Path:
    """Copy ``checkout/test`` into ``dest`` and write the generated ``conftest.py`` and ``pytest.ini``."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copytree(checkout / "test", dest / "test", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (dest / "pytest.ini").write_text("[pytest]\n# generated by benchmarks/peer_suites.py: stops the ini search here\n")
    log = dest / "peer_suites_log.jsonl"
    (dest / "conftest.py").write_text(_CONFTEST.format(mode=mode, log=str(log), timeout=timeout, sigalrm=sigalrm))
    return log


def run_target(
    suite: str,
    target: str,
    root: Path,
    log: Path,
    mode: str,
    *,
    timeout: float,
    dir_timeout: float,
    nice: int,
    threads: int | None,
    extra: list[str],
    use_plugin_timeout: bool,
    select: list[str] | None = None,
) -> DirRun:
    """One pytest process on ``root/target``; results from the junit XML (or the log if it was killed)."""
    tag = target.replace("/", "_").replace(".py", "") + ("_failing" if select else "")
    xml_path = root / f"junit_{tag}.xml"
    for p in (xml_path, log):
        if p.exists():
            p.unlink()
    cmd = [sys.executable, "-m", "pytest", *(select or [target]), "-q", "-rN", "-p", "no:cacheprovider", "--color=no"]
    cmd += ["--rootdir", str(root), "-c", str(root / "pytest.ini"), f"--junitxml={xml_path}"]
    cmd += ["-o", "junit_family=xunit1", "-o", "junit_logging=no", "--continue-on-collection-errors"]
    if use_plugin_timeout and timeout:
        cmd += [f"--timeout={timeout:g}"]
    cmd += extra
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONHASHSEED", "0")
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)

    def _preexec() -> None:
        os.setsid()
        if nice:
            os.nice(nice)

    stdout_path = root / f"stdout_{tag}.txt"
    library = _git_ref(REPO_ROOT, dirty_under="lanczos_grad_gp")
    start = time.perf_counter()
    timed_out = False
    with open(stdout_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_preexec)
        try:
            returncode: int | None = proc.wait(timeout=dir_timeout or None)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            returncode = None
    wall = time.perf_counter() - start
    log_tests, routes = parse_log(log, suite)
    if xml_path.is_file() and not timed_out:
        tests, source = parse_junit(xml_path, suite, root), "junit"
    else:
        tests, source = log_tests, "log"
    for t in tests:
        t.routes = routes.get(t.nodeid, {})
    if not tests and returncode not in (0, 5):
        tail = stdout_path.read_text()[-500:] if stdout_path.is_file() else ""
        tests = [TestResult(f"{suite}:{target}", f"{suite}:{target}", "error", _first_line(tail[-300:]))]
    scope = "failing" if select else "all"
    not_reached: list[str] = []
    if timed_out and not select:
        seen = {t.file for t in tests}
        files = [root / target] if (root / target).is_file() else sorted((root / target).rglob("test_*.py"))
        not_reached = [f"{suite}:{f.relative_to(root)}" for f in files if f"{suite}:{f.relative_to(root)}" not in seen]
    run = DirRun(f"{suite}:{target}", mode, round(wall, 1), returncode, timed_out, source, tests, scope, not_reached)
    run.lanczos_grad_gp_commit = library
    return run


def known_internal(nodeid: str) -> str | None:
    """The reason from :data:`KNOWN_INTERNALS` if ``nodeid`` matches one of its ids / patterns."""
    for pattern, reason in KNOWN_INTERNALS.items():
        if nodeid == pattern or fnmatch.fnmatchcase(nodeid, pattern):
            return reason
    return None


def classify(runs: list[DirRun]) -> dict[str, dict[str, str]]:
    """``nodeid -> {"category", "reason"}`` for every failure with the flag on."""
    off = {t.nodeid: t for r in runs if r.mode == "off" for t in r.tests}
    out: dict[str, dict[str, str]] = {}
    for r in runs:
        if r.mode != "on":
            continue
        for t in r.tests:
            if t.outcome not in ("failed", "error"):
                continue
            reason = known_internal(t.nodeid)
            other = off.get(t.nodeid)
            if reason is not None:
                out[t.nodeid] = {"category": "internals", "reason": reason}
            elif other is not None and other.outcome in ("failed", "error"):
                out[t.nodeid] = {"category": "also off", "reason": f"fails with the flag off too: {other.message}"}
            else:
                status = other.outcome if other is not None else "not run with the flag off"
                out[t.nodeid] = {"category": "unexplained", "reason": f"flag off: {status}"}
    return out


def _route_text(tests: list[TestResult]) -> str:
    totals: dict[str, int] = {}
    hit = 0
    for t in tests:
        for route, count in t.routes.items():
            totals[route] = totals.get(route, 0) + count
        hit += bool(t.routes.get("lanczos"))
    if not totals:
        return "–"
    parts = [f"{k} {totals[k]}" for k in ("cholesky", "operator", "lanczos") if k in totals]
    return ", ".join(parts) + (f" ({hit} tests on Lanczos)" if hit else "")


def _esc(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(meta: dict, runs: list[DirRun], classes: dict[str, dict[str, str]]) -> str:
    modes = sorted({r.mode for r in runs}, key=["on", "off"].index)
    lines = ["# GPyTorch and BoTorch test suites under `use_lanczos_grad`", ""]
    if meta.get("runs_commands"):
        lines += [f"Merged by `{meta['render_command']}` from these runs ({meta['host']}):", ""]
        for c in meta["runs_commands"]:
            lib = c.get("lanczos_grad_gp_commit", "unknown")
            lines.append(f"- finished {c['date']}, {c['wall_s'] / 60:.0f} min, lanczos_grad_gp {lib}: `{c['command']}`")
    else:
        lines += [f"Generated by `{meta['command']}` on {meta['date']} ({meta['host']})."]
        lines.append(f"lanczos_grad_gp at {meta.get('lanczos_grad_gp_commit', 'unknown')}.")
    lines += ["", "| package | version / checkout |", "|---|---|"]
    for k, v in meta["versions"].items():
        lines.append(f"| {k} | {v} |")
    for suite, info in meta["checkouts"].items():
        lines.append(f"| {suite} tests | `{info['path']}`, {info['ref']} |")
    for note in meta.get("notes", []):
        lines += ["", note]
    limit = meta["per_test_timeout_s"]
    lines += ["", f"Per-test limit {limit:g} s ({meta['timeout_mechanism']}), per-directory limit "]
    lines[-1] += f"{meta['dir_timeout_s']:g} s, `nice {meta['nice']}`, threads: {meta['threads'] or 'torch default'}."
    lines += [
        "Mode `on`: the generated conftest calls `lanczos_grad_gp.settings.use_lanczos_grad.set_default(True)`; "
        "mode `off`: it only imports `lanczos_grad_gp` (hooks installed, inert).",
        "Failed counts include errors (setup, teardown, collection). `internals`: listed in `KNOWN_INTERNALS` "
        "(counts or mocks internal CG / Cholesky calls). `also off`: fails with the flag off too (not the flag's). "
        "Routes: likelihood calls per route under the flag, summed over the file's tests.",
        "",
    ]
    lines += ["## Summary", ""]
    for mode in modes:
        mode_runs = [r for r in runs if r.mode == mode]
        c = _counts([t for r in mode_runs for t in r.tests], classes if mode == "on" else None)
        total = sum(len(r.tests) for r in mode_runs)
        wall = sum(r.wall_s for r in mode_runs)
        if mode == "on":
            lines.append(
                f"- flag on: {total} tests, {c['passed']} passed, {c['skipped']} skipped; failed: "
                f"{c['unexplained']} unexplained, {c['internals']} counting internal CG / Cholesky calls, "
                f"{c['also off']} failing with the flag off too; {wall / 60:.0f} min of pytest"
            )
        else:
            scope = "only the tests that failed with it on" if all(r.scope == "failing" for r in mode_runs) else ""
            lines.append(
                f"- flag off ({scope or 'whole directories'}): {total} tests, {c['passed']} passed, "
                f"{c['unexplained']} failed, {c['skipped']} skipped; {wall / 60:.0f} min of pytest"
            )
    lines += ["", "## Per directory", ""]
    header = "| mode | directory | tests | passed | failed (unexplained) | failed (internals) | failed (also off) "
    lines += [header + "| skipped | wall (s) | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for mode in modes:
        for r in (r for r in runs if r.mode == mode):
            c = _counts(r.tests, classes if mode == "on" else None)
            notes = ["only the tests that failed with the flag on"] if r.scope == "failing" else []
            if r.timed_out:
                notes.append("killed at the directory limit: the tests before it, from the conftest log")
            if r.rerun_note:
                notes.append(r.rerun_note)
            if r.lanczos_grad_gp_commit:
                notes.append(f"lanczos_grad_gp {r.lanczos_grad_gp_commit[:8]}{r.lanczos_grad_gp_commit[40:]}")
            note = "; ".join(notes)
            row = f"| {mode} | `{r.target}` | {len(r.tests)} | {c['passed']} | {c['unexplained']} | "
            lines.append(row + f"{c['internals']} | {c['also off']} | {c['skipped']} | {r.wall_s:.0f} | {note} |")
    lines += ["", "With the flag off, every failure is counted under `failed (unexplained)`.", ""]
    for r in runs:
        if r.not_reached:
            lines.append(f"Not reached in `{r.target}` (flag {r.mode}, killed at the directory limit):")
            lines += [f"- `{f}`" for f in r.not_reached]
            lines.append("")
    for mode in modes:
        lines += [f"## Per file, flag {mode}", ""]
        head = "| file | passed | failed (unexplained) | failed (internals) | failed (also off) | skipped | routes |"
        lines += [head, "|---|---|---|---|---|---|---|"]
        for r in (r for r in runs if r.mode == mode):
            by_file: dict[str, list[TestResult]] = {}
            for t in r.tests:
                by_file.setdefault(t.file, []).append(t)
            for file in sorted(by_file):
                c = _counts(by_file[file], classes if mode == "on" else None)
                row = f"| `{file}` | {c['passed']} | {c['unexplained']} | {c['internals']} | {c['also off']} | "
                lines.append(row + f"{c['skipped']} | {_route_text(by_file[file])} |")
        lines.append("")
    on_tests = {t.nodeid: t for r in runs if r.mode == "on" for t in r.tests}
    for category, title in (
        ("unexplained", "Unexplained failures with the flag on"),
        ("internals", "Failures that count internal CG / Cholesky calls (KNOWN_INTERNALS)"),
        ("also off", "Failures with the flag on that also fail with it off (not the flag's)"),
    ):
        items = sorted(k for k, v in classes.items() if v["category"] == category)
        lines += [f"## {title}: {len(items)}", ""]
        for k in items:
            detail = on_tests[k].message if category != "internals" else classes[k]["reason"]
            extra = f" — {classes[k]['reason']}" if category == "unexplained" else ""
            lines.append(f"- `{k}`: {_esc(detail)}{_esc(extra)}")
        lines.append("")
    if any(r.mode == "off" and r.scope == "all" for r in runs):
        on_status = {k: t.outcome for k, t in on_tests.items()}
        only_off = sorted(
            t.nodeid
            for r in runs
            if r.mode == "off"
            for t in r.tests
            if t.outcome in ("failed", "error") and on_status.get(t.nodeid) in ("passed", "skipped")
        )
        lines += [f"## Fail with the flag off but pass with it on: {len(only_off)}", ""]
        lines += [f"- `{k}`" for k in only_off] + [""]
    return "\n".join(lines)


def _counts(tests: list[TestResult], classes: dict[str, dict[str, str]] | None) -> dict[str, int]:
    c = {"passed": 0, "skipped": 0, "unexplained": 0, "internals": 0, "also off": 0}
    for t in tests:
        if t.outcome in ("passed", "skipped"):
            c[t.outcome] += 1
        elif classes is None:
            c["unexplained"] += 1
        else:
            c[classes.get(t.nodeid, {"category": "unexplained"})["category"]] += 1
    return c


def load_runs(path: Path) -> tuple[dict, list[DirRun]]:
    """``(meta, runs)`` of a JSON file this script wrote."""
    payload = json.loads(Path(path).read_text())
    runs = []
    for r in payload["runs"]:
        tests = [TestResult(**t) for t in r.pop("tests")]
        runs.append(DirRun(**r, tests=tests))
    return payload["meta"], runs


def merge(paths: list[Path], refs: dict[str, str | None]) -> tuple[dict, list[DirRun]]:
    """Runs of several JSON files; a later file's run of the same target and mode replaces an earlier one."""
    meta: dict = {}
    by_key: dict[tuple[str, str], DirRun] = {}
    commands: list[dict] = []
    for path in paths:
        meta, runs = load_runs(path)
        commands += meta.get("runs_commands") or [
            {
                "command": meta["command"],
                "date": meta["date"],
                "wall_s": round(sum(r.wall_s for r in runs), 1),
                "lanczos_grad_gp_commit": meta.get("lanczos_grad_gp_commit", "unknown"),
            }
        ]
        for r in runs:
            by_key[(r.target, r.mode)] = r
    runs = list(by_key.values())
    for r in runs:  # files a killed run did not reach (JSON of versions without not_reached)
        suite, _, target = r.target.partition(":")
        checkout = Path(meta.get("checkouts", {}).get(suite, {}).get("path", "/nonexistent"))
        if r.timed_out and r.scope == "all" and not r.not_reached and (checkout / target).is_dir():
            seen = {t.file for t in r.tests}
            files = (f"{suite}:{f.relative_to(checkout)}" for f in sorted((checkout / target).rglob("test_*.py")))
            r.not_reached = [f for f in files if f not in seen]
    # a file re-run on its own (e.g. the files a killed directory run did not reach) replaces that
    # file's tests in the directory run of the same mode
    own = {(r.mode, r.target) for r in runs if r.target.endswith(".py") and r.scope == "all"}
    for r in runs:
        if r.target.endswith(".py"):
            continue
        finished_elsewhere = any((r.mode, t.file) in own for t in r.tests)
        r.tests = [t for t in r.tests if (r.mode, t.file) not in own]
        rerun = [f for f in r.not_reached if (r.mode, f) in own]
        r.not_reached = [f for f in r.not_reached if (r.mode, f) not in own]
        if r.timed_out and (rerun or finished_elsewhere):
            r.rerun_note = "the files it did not reach (or finish) ran on their own: the per-file rows below"
    for suite, ref in refs.items():
        if ref and suite in meta.get("checkouts", {}):
            meta["checkouts"][suite]["ref"] = ref
    meta["merged_from"] = [str(p) for p in paths]
    meta["runs_commands"] = commands
    meta["known_internals"] = KNOWN_INTERNALS
    return meta, runs


def write_outputs(out: Path, meta: dict, runs: list[DirRun]) -> dict[str, dict[str, str]]:
    """Classify, then write ``out.json`` and ``out.md``; returns the classification."""
    classes = classify(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "runs": [asdict(r) for r in runs], "classification": classes}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    out.with_suffix(".md").write_text(render_markdown(meta, runs, classes))
    print(f"[peer_suites] wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return classes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpytorch", type=Path, help="GPyTorch checkout (a folder with test/)")
    parser.add_argument("--botorch", type=Path, help="BoTorch checkout (a folder with test/)")
    parser.add_argument("--gpytorch-ref", default=None, help="provenance of the GPyTorch checkout (tag / commit)")
    parser.add_argument("--botorch-ref", default=None, help="provenance of the BoTorch checkout (tag / commit)")
    parser.add_argument("--mode", choices=("on", "off", "both"), default="both")
    parser.add_argument(
        "--dirs", nargs="+", default=list(DEFAULT_DIRS), help="suite:path entries (default: the issue's list)"
    )
    parser.add_argument(
        "--off-scope",
        choices=("all", "failing"),
        default="failing",
        help="--mode both: the flag-off pass runs whole directories, or only the tests that failed with the flag on",
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "peer_suites")
    parser.add_argument("--workdir", type=Path, default=None, help="where the copies go (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (junit XML, pytest output)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per test phase (0: none)")
    parser.add_argument("--dir-timeout", type=float, default=2400.0, help="seconds per pytest process (0: none)")
    parser.add_argument("--nice", type=int, default=10, help="niceness of the pytest processes")
    parser.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of the pytest processes")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, one shell-quoted string")
    parser.add_argument("--note", action="append", default=[], help="a paragraph for the report's header (repeatable)")
    parser.add_argument(
        "--merge", type=Path, nargs="+", default=None, help="only re-render: combine these JSON outputs (no runs)"
    )
    args = parser.parse_args(argv)
    refs = {"gpytorch": args.gpytorch_ref, "botorch": args.botorch_ref}
    if args.merge:
        meta, runs = merge(args.merge, refs)
        if args.note:
            meta["notes"] = args.note
        meta["render_command"] = "python -m benchmarks.peer_suites " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
        )
        classes = write_outputs(args.out, meta, runs)
        return 1 if any(v["category"] == "unexplained" for v in classes.values()) else 0

    checkouts = {"gpytorch": args.gpytorch, "botorch": args.botorch}
    targets: list[tuple[str, str]] = []
    for entry in args.dirs:
        suite, _, path = entry.partition(":")
        if suite not in checkouts or not path:
            parser.error(f"--dirs entries look like gpytorch:test/examples; got {entry!r}")
        if checkouts[suite] is None:
            parser.error(f"{entry} needs --{suite}")
        if not (checkouts[suite] / path).exists():
            parser.error(f"{checkouts[suite] / path} does not exist")
        targets.append((suite, path))
    modes = ["on", "off"] if args.mode == "both" else [args.mode]
    plugin_timeout = importlib.util.find_spec("pytest_timeout") is not None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="peer_suites_"))
    extra = shlex.split(args.pytest_args)

    roots: dict[tuple[str, str], tuple[Path, Path]] = {}
    for suite in sorted({s for s, _ in targets}):
        for mode in modes:
            dest = workdir / f"{suite}_{mode}"
            log = prepare(checkouts[suite], dest, mode, args.timeout, sigalrm=not plugin_timeout)
            roots[(suite, mode)] = (dest, log)

    common = dict(
        timeout=args.timeout,
        dir_timeout=args.dir_timeout,
        nice=args.nice,
        threads=args.threads,
        extra=extra,
        use_plugin_timeout=plugin_timeout,
    )
    runs: list[DirRun] = []
    for mode in modes:
        for suite, path in targets:
            root, log = roots[(suite, mode)]
            select = None
            if mode == "off" and "on" in modes and args.off_scope == "failing":
                on_run = next(r for r in runs if r.mode == "on" and r.target == f"{suite}:{path}")
                select = sorted({t.nodeid.split(":", 1)[1] for t in on_run.tests if t.outcome in ("failed", "error")})
                if not select:
                    continue
            what = f"{len(select)} failing tests of " if select else ""
            print(f"[peer_suites] {what}{suite}:{path} flag {mode} ...", flush=True)
            run = run_target(suite, path, root, log, mode, select=select, **common)
            runs.append(run)
            bad = sum(t.outcome in ("failed", "error") for t in run.tests)
            ok = sum(t.outcome == "passed" for t in run.tests)
            print(f"[peer_suites]   {ok} passed, {bad} failed in {run.wall_s:.0f} s", flush=True)

    meta = {
        "command": "python -m benchmarks.peer_suites " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "versions": _versions(),
        "lanczos_grad_gp_commit": _git_ref(REPO_ROOT, dirty_under="lanczos_grad_gp"),
        "checkouts": {
            s: {"path": str(p), "ref": refs[s] or _git_ref(p)} for s, p in checkouts.items() if p is not None
        },
        "per_test_timeout_s": args.timeout,
        "timeout_mechanism": "pytest-timeout" if plugin_timeout else "SIGALRM in the generated conftest",
        "dir_timeout_s": args.dir_timeout,
        "off_scope": args.off_scope if "off" in modes and "on" in modes else "all",
        "nice": args.nice,
        "threads": args.threads,
        "workdir": str(workdir),
        "known_internals": KNOWN_INTERNALS,
        "notes": args.note,
    }
    classes = write_outputs(args.out, meta, runs)
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    unexplained = sum(v["category"] == "unexplained" for v in classes.values())
    print(f"[peer_suites] unexplained failures with the flag on: {unexplained}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
