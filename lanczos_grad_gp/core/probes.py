"""Random start vectors with one seeding policy: Rademacher, Gaussian and unit probes.

* An explicit ``seed`` draws from a fresh local ``torch.Generator`` seeded with it; the GP probes
  are drawn on the CPU and moved, so a seed gives the same probes on every device (and every
  rank of a distributed run).
* An explicit ``generator`` is used as given (it must live on the operator's device type).
* Neither: torch's global RNG on the operator's device.

Example:
    >>> import torch
    >>> z = gp_probes(torch.Size([]), 4, 3, seed=0, dtype=torch.float64, device=torch.device("cpu"))
    >>> z.shape, bool((z.abs() == 1).all())
    (torch.Size([4, 3]), True)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["resolve_generator", "randn", "rademacher", "gp_probes", "unit_probes"]


def resolve_generator(
    seed: int | None, generator: torch.Generator | None, device: torch.device
) -> torch.Generator | None:
    """A local generator: ``generator`` as given, a fresh one seeded by ``seed``, or ``None`` (global RNG)."""
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both.")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}.")
        if torch.device(generator.device).type != device.type:
            raise ValueError(f"generator is on {generator.device} but the operator is on {device}; they must match.")
        return generator
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int or None; got {seed!r}.")
        return torch.Generator(device=device).manual_seed(seed)
    return None


def randn(shape: tuple[int, ...], gen: torch.Generator | None, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Standard normal samples on ``device`` in ``dtype`` from ``gen``."""
    return torch.randn(shape, generator=gen, dtype=dtype, device=device)


def rademacher(shape: tuple[int, ...], gen: torch.Generator | None, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Random ±1 entries on ``device`` in ``dtype`` from ``gen``."""
    bits = torch.randint(0, 2, shape, generator=gen, device=device)
    return (2 * bits - 1).to(dtype)


def gp_probes(
    batch: torch.Size, n: int, num: int, *, seed: int | None, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Rademacher probes ``(*batch, n, num)`` of the stochastic log-determinant.

    With a seed they are drawn on the CPU and moved to ``device``, so every device agrees.
    """
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (*batch, n, num), generator=gen, device="cpu" if gen is not None else device)
    return (2 * bits - 1).to(device=device, dtype=dtype)


def unit_probes(batch: torch.Size, n: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The ``n`` unit vectors ``(*batch, n, n)``: an exact trace (used when ``n ≤ num_probes``)."""
    return torch.eye(n, dtype=dtype, device=device).expand(*batch, n, n)
