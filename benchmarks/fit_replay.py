"""Resume a deterministic ``fit_gpytorch_mll`` run that was stopped part way, by replaying its evaluations.

A reference fit can outlast the machine it runs on (the Cholesky fit of pol at n = 5000 was stopped
unfinished past 9900 s of CPU). L-BFGS-B is deterministic: given the same start and the same loss and
gradient at every point it asks for, it asks for the same points. :class:`EvaluationLog` wraps BoTorch's
loss closure and appends every evaluation (the parameter vector, the loss, the gradients, the CPU seconds
it took) to a JSON-lines file. A later run with the same log answers the points the log holds from the
log, in order, without computing them, and computes (and appends) the rest. A fit stopped and resumed
any number of times therefore takes exactly the path of an uninterrupted one: floats are written with
``repr``, which round-trips float64 exactly; an evaluation that raised is recorded and raises again; a
last line cut short by a kill is dropped and computed again. The log's first line is a fingerprint of the
fit (its data, model kind and method) and a log of another fit is refused; the first replayed evaluation
is computed again and must match its record, which catches a change of code or settings; a point that
differs from the recorded one raises.

The loss of a stock Cholesky fit is a deterministic function of the parameters. Under the flag it is too,
but within one deterministic-objective block (one L-BFGS run) the GP routine also keeps state built at the
calls themselves: the held preconditioner factor and probes, the counters BoTorch's rerun decision reads
(:mod:`lanczos_grad_gp.botorch_hooks`), and the covariances handed to dense Cholesky. So each evaluation also
records its block (a new block is a new scope) and that block's state after it (:func:`block_state`); a
replayed evaluation must fall in the same block, and puts the recorded counters and hand-over back into the
live scope (:func:`restore_block_state`). A held factor is not rebuilt by a replay, so a fit resumes only
after an evaluation whose block held none or had handed its covariance to dense Cholesky (exact values, no
held factor needed): the evaluations after the last such one are dropped from the log and computed again
(and should a resumed block's dense factorization later fail, which sends the call back to the held factor,
the fit stops with a ``RuntimeError`` instead of taking another path).
A flag fit of pol at n = 5000 holds a factor for its first 15 evaluations and hands its covariance over at
the 16th; from there on every evaluation of that run is a resume point. Warnings raised inside an evaluation
are recorded and raised again when it is replayed (BoTorch collects an attempt's warnings and raises them
after it), and each evaluation records the counts the benchmark reports of its calls (Lanczos and dense
calls, steps), so a resumed fit reports the totals of an uninterrupted one. A finished fit's log ends with a
``{"complete": true}`` line and is replayed whole. Since a flag fit depends on the GP routine's rules at every
call (which the check of the first replayed evaluation cannot see), its fingerprint also names the library's
code (syntax trees without docstrings: :func:`code_fingerprint`) and the settings in force.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import lanczos_grad_gp as lgg

#: the counters of a deterministic-objective scope a replay puts back (what BoTorch's rerun decision reads,
#: and what later calls of the GP routine add to)
SCOPE_COUNTERS = (
    "calls",
    "refreshed",
    "refresh_attempts",
    "raised_step_caps",
    "estimating_calls",
    "dense_handovers",
    "dense_switches",
    "dense_calls",
)


def block_state(scope: Any) -> dict[str, Any] | None:
    """What a replay needs of a deterministic-objective scope (``None``: no block open)."""
    if scope is None:
        return None
    state: dict[str, Any] = {name: getattr(scope, name) for name in SCOPE_COUNTERS}
    state["frozen"] = len(scope.frozen)  # covariance keys holding a factor
    state["dense"] = bool(scope.dense) or scope.dense_all_keys
    return state


def restore_block_state(scope: Any, state: dict[str, Any] | None) -> None:
    """Put a recorded :func:`block_state` back into the live scope (its counters, and the hand-over)."""
    if scope is None or state is None:
        return
    for name in SCOPE_COUNTERS:
        setattr(scope, name, state[name])
    scope.dense_all_keys = state["dense"]


def resumable(entry: dict[str, Any]) -> bool:
    """Whether a fit can go on live after ``entry``: its block held no factor, or had handed over (a replay
    does not rebuild a held factor; dense calls do not need one)."""
    state = entry.get("state")  # one key at most: a restored hand-over covers every key (dense_all_keys)
    return state is None or state["frozen"] == 0 or (state["frozen"] == 1 and state["dense"])


def code_fingerprint(package: Any = lgg) -> str:
    """A digest of a package's code without its docstrings and comments (its modules' syntax trees): a fit under
    the flag depends on the GP routine's rules at every call, which the check of the first replayed evaluation
    cannot see, so its log names the code it was written by (editing prose keeps it)."""
    digest = hashlib.sha256()
    for path in sorted(Path(package.__file__).parent.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
                if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
        digest.update(str(path.relative_to(Path(package.__file__).parent)).encode())
        digest.update(ast.dump(tree).encode())
    return digest.hexdigest()


def fit_fingerprint(X: Tensor, Y: Tensor, *labels: str) -> str:
    """A digest of the training data and of ``labels`` (model kind, method, code) that names one fit."""
    digest = hashlib.sha256("|".join(labels).encode())
    for t in (X, Y):
        digest.update(str((tuple(t.shape), t.dtype)).encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class EvaluationLog:
    """The recorded evaluations of one fit (all of BoTorch's attempts, in order), replayed, then extended."""

    def __init__(
        self,
        path: Path,
        fingerprint: str,
        calls: list | None = None,
        summarize: Callable[[list], dict[str, int]] | None = None,
    ) -> None:
        """``fingerprint``: what the fit is of (data, model, method, code); a log of another one is refused.
        ``calls``: the fit's :func:`lgg.record_calls` list, and ``summarize(calls)`` the additive counts the
        benchmark reports of a slice of it; each evaluation records the counts of its own calls, and replayed
        ones add theirs to :attr:`replayed_counts`. Warnings raised inside an evaluation are recorded and
        raised again when it is replayed."""
        self.path = path
        self.calls, self.summarize = calls, summarize
        lines = [line for line in (path.read_text().splitlines() if path.exists() else []) if line.strip()]
        rewrite = not lines
        if lines and not _is_record(lines[-1]):  # a write cut short by a kill: drop it (it is computed again)
            lines.pop()
            rewrite = True
        if not lines:
            lines = [json.dumps({"fingerprint": fingerprint})]
        elif json.loads(lines[0]).get("fingerprint") != fingerprint:
            raise RuntimeError(f"{path}: the log records another fit (other data, model, method or code): not replayed")
        entries = [json.loads(line) for line in lines[1:]]  # any other broken line raises
        self.complete = bool(entries) and entries[-1].get("complete", False)  # a finished fit: replay it all
        if self.complete:
            entries, lines = entries[:-1], lines[:-1]
        keep = len(entries)
        while keep and not self.complete and not resumable(entries[keep - 1]):  # a block holds a factor: go back
            keep -= 1
        self.entries = entries[:keep]
        self.dropped = len(entries) - keep  # evaluations after the last resumable one, computed again
        # the file is rewritten (cut back, or started) only at the first live evaluation, after the check
        self._pending = lines[: keep + 1] if rewrite or keep < len(entries) else None
        self.replayed_counts: dict[str, int] = {}  # what the replayed evaluations' calls counted
        self.check_counts: dict[str, int] = {}  # what the check's recomputation counted (not the fit's)
        self.check_cpu_s = 0.0  # CPU of the check (not the fit's)
        self.block = 0  # the deterministic-objective block of the current evaluation (0: none yet)
        self._scope: Any = None
        self._restored: dict[str, Any] | None = None  # the state a replay put into the live block, if any
        self.checked = False  # the first replayed evaluation is computed again and compared (code changes);
        # that one extra closure call is not an evaluation of the fit (its counters subtract it)
        self.position = 0  # the next recorded evaluation to answer
        self.replayed = 0  # evaluations answered from the log
        self.replayed_cpu_s = 0.0  # CPU the replayed evaluations took when they were computed

    def finish(self) -> None:
        """Mark the fit complete: a later run replays all of it instead of cutting it back."""
        if not self.complete and self.position == len(self.entries):
            self._write_pending()
            with self.path.open("a") as f:
                f.write(json.dumps({"complete": True}) + "\n")
            self.complete = True

    def wrap(
        self, closure: Callable[[], tuple[Tensor, Sequence[Tensor | None]]], parameters: dict[str, Tensor]
    ) -> Callable[[], tuple[Tensor, tuple[Tensor | None, ...]]]:
        """``closure`` answering from the log while it lasts (BoTorch's closure contract: ``(loss, grads)``)."""
        params = list(parameters.values())

        def replaying() -> tuple[Tensor, tuple[Tensor | None, ...]]:
            x = [float(v) for p in params for v in p.detach().reshape(-1).tolist()]
            scope = lgg.settings.deterministic_objective.value()
            if scope is not None and scope is not self._scope:  # BoTorch's wrapper opened a new block
                self._scope, self.block, self._restored = scope, self.block + 1, None
            if self.position < len(self.entries):
                entry = self.entries[self.position]
                if entry["x"] != x or entry.get("block", self.block) != self.block:
                    raise RuntimeError(
                        f"{self.path}: evaluation {self.position} asks for another point (or falls in another "
                        "block) than the log records; the log is from another run (data, code, settings or "
                        "thread count)"
                    )
                if not self.checked:
                    self._check_against(entry, closure)
                self.position += 1
                self.replayed += 1
                self.replayed_cpu_s += entry["cpu_s"]
                _add(self.replayed_counts, entry.get("counts", {}))
                restore_block_state(scope, entry.get("state"))
                self._restored = entry.get("state")
                _raise_again(entry.get("warnings", []))
                if "error" in entry:
                    raise _rebuilt_error(entry["error"])
                grads = tuple(
                    None if g is None else torch.tensor(g, dtype=p.dtype, device=p.device).reshape(p.shape)
                    for g, p in zip(entry["grads"], params, strict=True)
                )
                for p, g in zip(params, grads, strict=True):
                    p.grad = g
                return torch.tensor(entry["loss"], dtype=params[0].dtype, device=params[0].device), grads
            return self._live(closure, x, scope)

        return replaying

    def _live(self, closure: Callable, x: list[float], scope: Any) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        """Compute an evaluation and append it (with its warnings, calls, block and state)."""
        cpu, first = time.process_time(), len(self.calls) if self.calls is not None else 0
        switches = None if scope is None else scope.dense_switches
        error: Exception | None = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                loss, grads = closure()
            except Exception as raised:  # BoTorch's array closure handles some (NotPSDError): replay them too
                error = raised
        entry: dict[str, Any] = {"x": x}
        if error is None:
            entry["loss"] = float(loss)
            entry["grads"] = [None if g is None else g.detach().reshape(-1).tolist() for g in grads]
        else:
            entry["error"] = _error_record(error)
        entry["cpu_s"] = time.process_time() - cpu
        entry["warnings"] = [_warning_record(w) for w in caught]
        if self.calls is not None and self.summarize is not None:
            entry["counts"] = {k: v for k, v in self.summarize(self.calls[first:]).items() if v}
        if scope is not None:
            entry["block"], entry["state"] = self.block, block_state(scope)
            if self._restored is not None and self._restored["frozen"] and scope.dense_switches != switches:
                raise RuntimeError(  # the block went back to its held factor, which a replay does not rebuild
                    f"{self.path}: a resumed block fell back from dense Cholesky to its held factor at evaluation "
                    f"{self.position}; the replay cannot rebuild that factor: delete the log and rerun the fit"
                )
        self._append(entry)
        for w in caught:  # as the closure raised them: BoTorch and the caller see the same warnings
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if error is not None:
            raise error
        return loss, tuple(grads)

    def _check_against(self, entry: dict, closure: Callable[[], tuple[Tensor, Sequence[Tensor | None]]]) -> None:
        """Compute the first replayed evaluation again: a loss that differs beyond the rounding of another
        thread count (relative 1e-8) means the code or settings changed since the log was written. Its
        warnings are dropped (the replay raises the recorded ones), its calls and CPU kept apart."""
        self.checked = True
        cpu, first = time.process_time(), len(self.calls) if self.calls is not None else 0
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            try:
                loss = float(closure()[0])
            except Exception:  # noqa: BLE001 - the recorded evaluation must have raised too
                loss = None
        self.check_cpu_s = time.process_time() - cpu
        if self.calls is not None and self.summarize is not None:
            self.check_counts = self.summarize(self.calls[first:])
        recorded = entry.get("loss")
        same = loss == recorded if loss is None or recorded is None else abs(loss - recorded) <= 1e-8 * abs(recorded)
        if not same:
            raise RuntimeError(
                f"{self.path}: evaluation {self.position} computes loss {loss} where the log records {recorded}; "
                "the code or settings changed since it was written: not replayed"
            )

    def _write_pending(self) -> None:
        """Rewrite the file as this run keeps it (started, or cut back), atomically."""
        if self._pending is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in self._pending))
        os.replace(tmp, self.path)
        self._pending = None

    def _append(self, entry: dict) -> None:
        self._write_pending()
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        self.entries.append(entry)
        self.position += 1


def _warning_record(w: warnings.WarningMessage) -> dict[str, Any]:
    klass = w.category
    return {"category": f"{klass.__module__}:{klass.__qualname__}", "message": str(w.message)}


def _raise_again(records: list[dict[str, Any]]) -> None:
    """Raise recorded warnings again (their class where it can be imported, else ``UserWarning``)."""
    for record in records:
        module, _, name = record["category"].partition(":")
        try:
            klass = getattr(importlib.import_module(module), name)
        except Exception:  # noqa: BLE001 - a class that cannot be imported: keep the message
            klass = UserWarning
        warnings.warn(record["message"], klass, stacklevel=3)


def _add(total: dict[str, int], more: dict[str, int]) -> None:
    for name, value in more.items():
        total[name] = total.get(name, 0) + value


def _difference(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {name: value - before.get(name, 0) for name, value in after.items() if value != before.get(name, 0)}


def _is_record(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _error_record(error: Exception) -> dict[str, str]:
    klass = type(error)
    return {"type": f"{klass.__module__}:{klass.__qualname__}", "message": str(error)}


def _rebuilt_error(record: dict[str, str]) -> Exception:
    """The recorded exception again (its class where it can be imported and built from a message)."""
    module, _, name = record["type"].partition(":")
    try:
        klass = getattr(importlib.import_module(module), name)
        return klass(record["message"])
    except Exception:  # noqa: BLE001 - a class that cannot be rebuilt: keep the message
        return RuntimeError(f"{record['type']}: {record['message']}")
