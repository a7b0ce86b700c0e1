"""Per-image work (read, decode, hash) over many files, on every core the process may use.

Hashing one image (`_inspect` of the image table: sha256, decode, a grey copy, 16 small phashes) is a chain of
short Pillow / NumPy / SciPy calls with the GIL held between them, so threads barely scale: 400 demo scenes
on 2 cores took 3.3 s on one thread and 3.1 s on two. Large batches therefore go to worker processes, one per
usable core; small ones stay on threads (they still overlap file reads), where starting processes (~1 s of
imports each) would cost more than it saves.

Workers are spawned, not forked: the caller is often a Dagster step whose process runs other threads (the
MLflow store, gRPC, torch), and a fork copies whatever lock those threads hold at that moment. The results
are those of a plain loop, in input order, whichever way they were computed.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

__all__ = ["PROCESS_MIN_ITEMS", "parallel_map", "usable_cores"]

log = logging.getLogger(__name__)

# Below this many items a batch stays on threads: ~10 ms of work an image against ~1 s to start a worker.
PROCESS_MIN_ITEMS = 400


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: a container's or taskset's limit), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parallel_map(
    fn: Callable,
    *iterables: Iterable,
    workers: int | None = None,
    min_for_processes: int | None = None,
) -> list:
    """`[fn(*args) for args in zip(*iterables)]`, computed in parallel.

    `fn` must be a module-level function whose arguments and result pickle. `workers`: at most this many
    workers (default: threads `min(8, cores + 2)`, processes one per usable core); 1 runs the plain loop.
    A batch of `min_for_processes` (default `PROCESS_MIN_ITEMS`) items or more, with more than one usable
    core, runs in spawned worker processes; should the pool fail to start (no /dev/shm, a sandbox without
    semaphores) or lose a worker (killed by the OOM killer), the items are computed again on threads, with
    a warning, so the caller still gets every result."""
    items = list(zip(*iterables, strict=True))
    if not items:
        return []
    if workers == 1 or len(items) == 1:
        return [fn(*args) for args in items]
    cores = usable_cores()
    if len(items) >= (PROCESS_MIN_ITEMS if min_for_processes is None else min_for_processes) and cores > 1:
        processes = min(cores, workers) if workers else cores
        try:
            return _in_processes(fn, items, processes)
        except (BrokenProcessPool, OSError, NotImplementedError) as exc:
            log.warning(
                "worker processes failed (%s: %s); computing the %d items on threads instead",
                type(exc).__name__,
                exc,
                len(items),
            )
    with ThreadPoolExecutor(max_workers=workers or min(8, cores + 2)) as threads:
        return list(threads.map(fn, *zip(*items)))


def _in_processes(fn: Callable, items: list[tuple], processes: int) -> list:
    chunksize = max(1, min(32, len(items) // (4 * processes)))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool:
        return list(pool.map(fn, *zip(*items), chunksize=chunksize))
