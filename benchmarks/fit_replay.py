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

Only a fit whose loss is a deterministic function of the parameters can be resumed so: the stock
Cholesky fit. The flag's deterministic-objective block holds state built at the calls themselves (its
preconditioner factor, probes, replacements), which a replayed call does not rebuild, so
``benchmarks.fit_quality`` allows a log only for ``--methods cholesky``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor


def fit_fingerprint(X: Tensor, Y: Tensor, *labels: str) -> str:
    """A digest of the training data and of ``labels`` (model kind, method) that names one fit."""
    digest = hashlib.sha256("|".join(labels).encode())
    for t in (X, Y):
        digest.update(str((tuple(t.shape), t.dtype)).encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class EvaluationLog:
    """The recorded evaluations of one fit (all of BoTorch's attempts, in order), replayed, then extended."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        """``fingerprint``: what the fit is of (data, model, method); a log of another one is refused."""
        self.path = path
        lines = [line for line in (path.read_text().splitlines() if path.exists() else []) if line.strip()]
        if lines and not _is_record(lines[-1]):  # a write cut short by a kill: drop it (it is computed again)
            lines.pop()
            path.write_text("".join(line + "\n" for line in lines))
        if not lines:
            path.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
        elif json.loads(lines[0]).get("fingerprint") != fingerprint:
            raise RuntimeError(f"{path}: the log records another fit (other data, model or method): not replayed")
        self.entries = [json.loads(line) for line in lines[1:]]  # any other broken line raises
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
            if self.position < len(self.entries):
                entry = self.entries[self.position]
                if entry["x"] != x:
                    raise RuntimeError(
                        f"{self.path}: evaluation {self.position} asks for another point than the log records; "
                        "the log is from another run (data, code, settings or thread count)"
                    )
                if not self.checked:
                    self._check_against(entry, closure)
                self.position += 1
                self.replayed += 1
                self.replayed_cpu_s += entry["cpu_s"]
                if "error" in entry:
                    raise _rebuilt_error(entry["error"])
                grads = tuple(
                    None if g is None else torch.tensor(g, dtype=p.dtype, device=p.device).reshape(p.shape)
                    for g, p in zip(entry["grads"], params, strict=True)
                )
                for p, g in zip(params, grads, strict=True):
                    p.grad = g
                return torch.tensor(entry["loss"], dtype=params[0].dtype, device=params[0].device), grads
            cpu = time.process_time()
            try:
                loss, grads = closure()
            except Exception as error:  # BoTorch's array closure handles some (NotPSDError): replay them too
                self._append({"x": x, "error": _error_record(error), "cpu_s": time.process_time() - cpu})
                raise
            self._append(
                {
                    "x": x,
                    "loss": float(loss),
                    "grads": [None if g is None else g.detach().reshape(-1).tolist() for g in grads],
                    "cpu_s": time.process_time() - cpu,
                }
            )
            return loss, tuple(grads)

        return replaying

    def _check_against(self, entry: dict, closure: Callable[[], tuple[Tensor, Sequence[Tensor | None]]]) -> None:
        """Compute the first replayed evaluation again: a loss that differs beyond the rounding of another
        thread count (relative 1e-8) means the code or settings changed since the log was written."""
        self.checked = True
        try:
            loss = float(closure()[0])
        except Exception:  # noqa: BLE001 - the recorded evaluation must have raised too
            loss = None
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
