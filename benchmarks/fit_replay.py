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
held factor needed): the evaluations after the last such one are dropped from the log and computed again.
For a flag fit of pol at n = 5000 that is every evaluation after the first call of each block, since the
covariance is handed over at once. Each evaluation also records the counts the benchmark reports
(warnings, Lanczos and dense calls), so a resumed fit reports the same totals as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
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
    state["frozen"] = bool(scope.frozen)
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
    state = entry.get("state")
    return state is None or not state["frozen"] or state["dense"]


def fit_fingerprint(X: Tensor, Y: Tensor, *labels: str) -> str:
    """A digest of the training data and of ``labels`` (model kind, method) that names one fit."""
    digest = hashlib.sha256("|".join(labels).encode())
    for t in (X, Y):
        digest.update(str((tuple(t.shape), t.dtype)).encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class EvaluationLog:
    """The recorded evaluations of one fit (all of BoTorch's attempts, in order), replayed, then extended."""

    def __init__(self, path: Path, fingerprint: str, counts: Callable[[], dict[str, int]] | None = None) -> None:
        """``fingerprint``: what the fit is of (data, model, method); a log of another one is refused.
        ``counts``: the fit's running totals of what the benchmark reports (warnings, calls); each evaluation
        records how much it added, and replayed ones add it to :attr:`replayed_counts`."""
        self.path = path
        self.counts = counts
        lines = [line for line in (path.read_text().splitlines() if path.exists() else []) if line.strip()]
        if lines and not _is_record(lines[-1]):  # a write cut short by a kill: drop it (it is computed again)
            lines.pop()
            path.write_text("".join(line + "\n" for line in lines))
        if not lines:
            path.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
        elif json.loads(lines[0]).get("fingerprint") != fingerprint:
            raise RuntimeError(f"{path}: the log records another fit (other data, model or method): not replayed")
        entries = [json.loads(line) for line in lines[1:]]  # any other broken line raises
        keep = len(entries)
        while keep and not resumable(entries[keep - 1]):  # inside a block that holds a factor: go back
            keep -= 1
        if keep < len(entries):
            path.write_text("".join(line + "\n" for line in lines[: keep + 1]))
        self.entries = entries[:keep]
        self.dropped = len(entries) - keep  # evaluations after the last resumable one, computed again
        self.replayed_counts: dict[str, int] = {}  # what the replayed evaluations added to ``counts``
        self.check_counts: dict[str, int] = {}  # what the check's recomputation added (not the fit's)
        self.block = 0  # the deterministic-objective block of the current evaluation (0: none yet)
        self._scope: Any = None
        self.checked = False  # the first replayed evaluation is computed again and compared (code changes);
        # that one extra closure call is not an evaluation of the fit (its counters subtract it)
        self.position = 0  # the next recorded evaluation to answer
        self.replayed = 0  # evaluations answered from the log
        self.replayed_cpu_s = 0.0  # CPU the replayed evaluations took when they were computed

    def wrap(
        self, closure: Callable[[], tuple[Tensor, Sequence[Tensor | None]]], parameters: dict[str, Tensor]
    ) -> Callable[[], tuple[Tensor, tuple[Tensor | None, ...]]]:
        """``closure`` answering from the log while it lasts (BoTorch's closure contract: ``(loss, grads)``)."""
        params = list(parameters.values())

        def replaying() -> tuple[Tensor, tuple[Tensor | None, ...]]:
            x = [float(v) for p in params for v in p.detach().reshape(-1).tolist()]
            scope = lgg.settings.deterministic_objective.value()
            if scope is not None and scope is not self._scope:  # BoTorch's wrapper opened a new block
                self._scope, self.block = scope, self.block + 1
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
                    restore_block_state(scope, entry.get("state"))  # the check added to the live counters
                self.position += 1
                self.replayed += 1
                self.replayed_cpu_s += entry["cpu_s"]
                _add(self.replayed_counts, entry.get("counts", {}))
                restore_block_state(scope, entry.get("state"))
                if "error" in entry:
                    raise _rebuilt_error(entry["error"])
                grads = tuple(
                    None if g is None else torch.tensor(g, dtype=p.dtype, device=p.device).reshape(p.shape)
                    for g, p in zip(entry["grads"], params, strict=True)
                )
                for p, g in zip(params, grads, strict=True):
                    p.grad = g
                return torch.tensor(entry["loss"], dtype=params[0].dtype, device=params[0].device), grads
            cpu, before = time.process_time(), self._counts()
            try:
                loss, grads = closure()
            except Exception as error:  # BoTorch's array closure handles some (NotPSDError): replay them too
                self._append({"x": x, "error": _error_record(error), **self._context(cpu, before, scope)})
                raise
            grads_list = [None if g is None else g.detach().reshape(-1).tolist() for g in grads]
            self._append({"x": x, "loss": float(loss), "grads": grads_list, **self._context(cpu, before, scope)})
            return loss, tuple(grads)

        return replaying

    def _counts(self) -> dict[str, int]:
        return {} if self.counts is None else self.counts()

    def _context(self, cpu: float, before: dict[str, int], scope: Any) -> dict[str, Any]:
        """What an evaluation records besides its values: CPU, the counts it added, its block and its state."""
        entry: dict[str, Any] = {"cpu_s": time.process_time() - cpu, "counts": _difference(self._counts(), before)}
        if scope is not None:
            entry["block"], entry["state"] = self.block, block_state(scope)
        return entry

    def _check_against(self, entry: dict, closure: Callable[[], tuple[Tensor, Sequence[Tensor | None]]]) -> None:
        """Compute the first replayed evaluation again: a loss that differs beyond the rounding of another
        thread count (relative 1e-8) means the code or settings changed since the log was written."""
        self.checked = True
        before = self._counts()
        try:
            loss = float(closure()[0])
        except Exception:  # noqa: BLE001 - the recorded evaluation must have raised too
            loss = None
        self.check_counts = _difference(self._counts(), before)
        recorded = entry.get("loss")
        same = loss == recorded if loss is None or recorded is None else abs(loss - recorded) <= 1e-8 * abs(recorded)
        if not same:
            raise RuntimeError(
                f"{self.path}: evaluation {self.position} computes loss {loss} where the log records {recorded}; "
                "the code or settings changed since it was written: not replayed"
            )

    def _append(self, entry: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        self.entries.append(entry)
        self.position += 1


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
