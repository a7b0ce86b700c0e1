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

import contextlib
import logging
import math
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

__all__ = ["PROCESS_MIN_ITEMS", "parallel_map", "usable_cores"]

log = logging.getLogger(__name__)

# Below this many items a batch stays on threads: ~10 ms of work an image against ~1 s to start a worker.
PROCESS_MIN_ITEMS = 400


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, cpusets) and the cgroup v2 CPU quota
    (`docker --cpus`, a Kubernetes CPU limit, which leave the affinity at every core of the node), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


class _PoolUnavailable(RuntimeError):
    """The worker processes could not be started (no /dev/shm, a sandbox without semaphores)."""


def parallel_map(
    fn: Callable,
    *iterables: Iterable,
    workers: int | None = None,
    min_for_processes: int | None = None,
) -> list:
    """`[fn(*args) for args in zip(*iterables)]`, computed in parallel.

    `fn` must be a module-level function whose arguments and result pickle. `workers`: at most this many
    workers (default: threads `min(8, cores + 2)`, processes one per usable core, at most 8); 1 runs the plain
    loop. A batch of `min_for_processes` (default `PROCESS_MIN_ITEMS`) items or more, with more than one usable
    core and `fn` importable by a worker (not defined in `__main__`), runs in spawned worker processes; should
    the pool fail to start or lose a worker (killed by the OOM killer), the items are computed again on
    threads, with a warning, so the caller still gets every result. An exception `fn` raises is raised as is.
    """
    items = list(zip(*iterables, strict=True))
    if not items:
        return []
    if workers == 1 or len(items) == 1:
        return [fn(*args) for args in items]
    cores = usable_cores()
    threshold = PROCESS_MIN_ITEMS if min_for_processes is None else min_for_processes
    if len(items) >= threshold and cores > 1 and getattr(fn, "__module__", "__main__") != "__main__":
        processes = min(cores, workers or 8)
        try:
            return _in_processes(fn, items, processes)
        except (_PoolUnavailable, BrokenProcessPool) as exc:
            cause = exc.__cause__ or exc
            log.warning(
                "worker processes failed (%s: %s); computing the %d items on threads instead",
                type(cause).__name__,
                cause,
                len(items),
            )
    with ThreadPoolExecutor(max_workers=workers or min(8, cores + 2)) as threads:
        return list(threads.map(fn, *zip(*items)))


@contextlib.contextmanager
def _main_not_reimported():
    """Spawned workers import the parent's `__main__` again (`multiprocessing` does, so that functions defined
    there unpickle): a script without an `if __name__ == "__main__"` guard would run its top level once per
    worker, and the `dagster` CLI's would cost each worker a second of imports. `fn` is never in `__main__`
    here (checked by the caller), so its file and module name are hidden while the workers start."""
    main = sys.modules.get("__main__")
    saved = {name: main.__dict__[name] for name in ("__file__", "__spec__") if main and name in main.__dict__}
    try:
        for name in saved:
            if name == "__spec__":
                main.__spec__ = None
            else:
                del main.__dict__[name]
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)


def _in_processes(fn: Callable, items: list[tuple], processes: int) -> list:
    chunksize = max(1, min(32, len(items) // (4 * processes)))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool:
        try:
            with _main_not_reimported():  # the workers start on the first submit, inside map()
                results = pool.map(fn, *zip(*items), chunksize=chunksize)
        except (OSError, NotImplementedError) as exc:
            raise _PoolUnavailable(str(exc)) from exc
        return list(results)
