"""The state of one :class:`~lanczos_grad_gp.settings.deterministic_objective` block.

A scope maps each covariance key (batch shape, ``n``, dtype, device, options, preconditioner
override) to the parts the GP routine holds fixed within the block: the preconditioner and the
probes of the key's first call (its factor replaced by a fresh one where it left a call unconverged).
It also holds the keys handed to dense Cholesky (``deterministic_dense_size``) and counts the calls that used
the fixed parts, the replacements, the hand-overs and dense calls, and the calls run again with the block's
step cap (``deterministic_max_lanczos_iter``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ObjectiveScope"]


@dataclass
class ObjectiveScope:
    """Fixed parts by covariance key (the mutable state of one block)."""

    frozen: dict[Any, Any] = field(default_factory=dict)
    calls: int = 0  # calls that used fixed parts
    refreshed: int = 0  # held factors replaced by the one built at a call they left unconverged
    refresh_attempts: int = 0  # repeats with a fresh factor (kept or not)
    raised_step_caps: int = 0  # calls run again with deterministic_max_lanczos_iter steps (still at the cap)
    dense: set[Any] = field(default_factory=set)  # keys whose calls the block computes by dense Cholesky
    # every key that fits goes dense (a block restored after its hand-over: benchmarks/fit_replay.py)
    dense_all_keys: bool = False
    estimating_calls: int = 0  # calls of the GP routine in the block that estimate a log-determinant
    dense_handovers: int = 0  # calls still at the step cap that handed their key to dense Cholesky
    # hand-overs after earlier calls of the block, and handed keys whose factorization failed later (back to
    # Lanczos): each changed the block's objective
    dense_switches: int = 0
    dense_calls: int = 0  # calls computed by dense Cholesky (the hand-overs included)
