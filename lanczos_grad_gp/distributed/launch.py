"""Run a function on ``p`` local processes inside one process group (tests, benchmarks, quick checks).

On a real cluster use ``torchrun`` (it starts the processes and sets the environment for
``torch.distributed.init_process_group()``); :func:`spawn_local` does the same on one machine with
``torch.multiprocessing.spawn`` and a rendezvous on a temporary file (``file://``), and hands each
rank's return value back to the caller::

    results = spawn_local(my_script, 2, data_path)     # my_script(data_path) on ranks 0 and 1 (gloo)
"""

from __future__ import annotations

import datetime
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["spawn_local"]


def _entry(
    rank: int,
    world_size: int,
    backend: str,
    init_file: str,
    out_dir: str,
    threads: int,
    timeout_s: float,
    fn: Callable[..., Any],
    args: tuple,
) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group(
        backend,
        init_method=Path(init_file).as_uri(),
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        result = fn(*args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn_local(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    threads: int | None = None,
    timeout_s: float = 120.0,
) -> list[Any]:
    """``[fn(*args) on rank r for r in range(world_size)]``, each rank in its own process and process group.

    Args:
        fn: a module-level (picklable) function; it runs after ``init_process_group`` and may use the
            default group. Its return value must be ``torch.save``-able.
        world_size: number of processes ``p``.
        backend: ``"gloo"`` (CPU tensors) or ``"nccl"`` (one CUDA device per rank: select it in ``fn``).
        threads: ``torch.set_num_threads`` per rank (default: the CPU count over ``p``, at least 1).
        timeout_s: the process group's timeout (a rank that never arrives fails the run instead of hanging).

    Raises ``torch.multiprocessing.ProcessRaisedException`` with the rank's traceback if ``fn`` raises.
    """
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // world_size)
    with tempfile.TemporaryDirectory(prefix="lgg_dist_") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        torch.multiprocessing.spawn(
            _entry,
            args=(world_size, backend, init_file, tmp, threads, timeout_s, fn, args),
            nprocs=world_size,
            join=True,
        )
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
