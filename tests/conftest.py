"""Shared fixtures: a small synthetic demo drop (built once per session) and an image-bytes maker."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from roadwork_core.data.synthetic import make_demo_drop
from tests.two_partitions import pg_server, two_partition_runs  # noqa: F401  (session scenario fixtures)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order for pytest-xdist's worksteal (`make test`: two workers), which gives each worker a contiguous
    share of the list (the first worker the first half) and then lets an idle worker steal the tail of
    another's queue. The tests marked `slow` come in units that one worker runs in one piece: the tests
    sharing an expensive session fixture (`xdist_group`, a mark worksteal itself ignores) or a module (its
    module fixtures). Each share starts with its slow units and is filled up with quick tests: the first
    worker's with the server and daemon scenarios (the groups and tests/e2e: whole-graph runs in other
    processes, much of their time spent waiting on them), the other workers' with the slow tests that
    compute in this process or under torchrun (round robin), so that the quick tests fill in beside both
    and are stolen at the end. A fixture that must be built once whatever the split uses `built_once`.

    Measured on the 2-core CI machine (twenty-second round, same hour): every slow test on the first worker
    6m33s; the units alternating between the workers 6m45s; this order 6m39s; all within the machine's
    run-to-run spread, so the order is chosen for its reasons (the e2e chain no longer runs beside the
    other worker's e2e tests, the in-process slow tests no longer wait behind it). A third worker on two
    cores is slower (7m07s: the processes compete for the cores)."""

    def group(item: pytest.Item) -> str:
        mark = item.get_closest_marker("xdist_group")
        return (mark.kwargs.get("name") or (mark.args[0] if mark.args else "")) if mark else ""

    grouped: dict[str, list[pytest.Item]] = {}
    modules: dict[str, list[pytest.Item]] = {}
    quick: list[pytest.Item] = []
    for item in items:
        if item.get_closest_marker("slow") is None:
            quick.append(item)
        elif group(item):
            grouped.setdefault(group(item), []).append(item)
        else:
            modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    parts: list[list[pytest.Item]] = [[] for _ in range(workers)]
    # the first worker: the server and daemon scenarios (groups, tests/e2e), which wait on their processes
    # much of the time; the others (round robin): the slow tests that compute in process or under torchrun
    serving = [*grouped.values(), *(u for name, u in modules.items() if name.startswith("tests/e2e/"))]
    computing = [u for name, u in modules.items() if not name.startswith("tests/e2e/")]
    for unit in serving:
        parts[0].extend(unit)
    for i, unit in enumerate(computing):
        parts[(i % (workers - 1)) + 1 if workers > 1 else 0].extend(unit)
    ordered, left = [], len(items)
    for k, part in enumerate(parts):  # worksteal's first share: what is left // the workers still to serve
        share = left // (workers - k)
        fill = max(0, share - len(part)) if k < workers - 1 else len(quick)
        ordered += [*part, *quick[:fill]]
        del quick[:fill]
        left -= len(part) + fill
    items[:] = ordered


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The controller (or the only process, without pytest-xdist) stops the session's PostgreSQL server
    once every worker is done with it (tests/two_partitions.py)."""
    if hasattr(session.config, "workerinput"):
        return
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None:
        from tests.two_partitions import stop_pg_server

        stop_pg_server(factory.getbasetemp())


def _restore_bound_paths():
    from roadwork_resources import paths

    saved = dict(paths._bound)
    yield
    paths._bound.clear()
    paths._bound.update(saved)


# `build_resources` records its folders for the process (roadwork_resources.paths.bind_paths), as a run's
# process does once. A test sees what its own and its module's fixtures bound, never what an earlier test
# or module on the same worker bound (a unit test read another module's inbox when the slow tests ran
# before it on its worker).
_paths_bound_by_this_module_only = pytest.fixture(autouse=True, scope="module")(_restore_bound_paths)
_paths_bound_by_this_test_only = pytest.fixture(autouse=True)(_restore_bound_paths)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models on a 2-core box: intra-op threads only add contention (about 10x slower under load).
    Subprocesses the tests start (CLI, webserver, daemon) choose their own threads."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """`build(path)` run once per test session, under pytest-xdist too: the first worker to ask builds
    `<session temp folder>/<name>` under a file lock, every other worker waits for it and reuses it
    (a session-scoped fixture alone is built once per worker). Returns the path; callers only read it.
    A failed build leaves nothing behind, so the next worker to ask builds again and fails the same way."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-<n>/, shared by this session's workers (and by no other session)
    path = root / "built_once" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    done = path.parent / f"{name}.done"
    with FileLock(str(path.parent / f"{name}.lock")):
        if not done.exists():
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def mlflow_store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store whose schema MLflow has already migrated. Creating a store runs
    MLflow's ~50 alembic migrations (seconds); the graph tests copy this file to their state folder
    instead (`seed_mlflow_store`), and the pytest-xdist workers share one (`built_once`). The
    environment's own template (roadwork_resources.mlflow_store, built by `make`) is what
    the whole-graph CLI test (tests/integration/test_graph.py) and the README test start from."""
    from roadwork_resources.mlflow_store import make_template

    def build(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        make_template(folder / "mlflow.db")

    return built_once(tmp_path_factory, "mlflow_template", build) / "mlflow.db"


def seed_mlflow_store(template: Path, state: Path) -> Path:
    """Copy the migrated empty store to `state`/mlflow.db, where build_resources and the e2e
    environment point MLflow (as the resource seeds a fresh store: roadwork_resources.mlflow_store)."""
    from roadwork_resources.mlflow_store import seed_store

    target = state / "mlflow.db"
    if not seed_store(target, template):
        raise FileExistsError(f"{target} exists already: a test state must start without an MLflow store")
    return target


@pytest.fixture(scope="session")
def demo_inbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An inbox holding one ready drop `v0001` of 48 synthetic scenes (+4 unlabelled)."""
    inbox = tmp_path_factory.mktemp("inbox")
    make_demo_drop(inbox, "v0001", n=48, seed=0, n_unlabelled=4, scale=0.5)
    return inbox


@pytest.fixture(scope="session")
def demo_drop(demo_inbox: Path) -> Path:
    return demo_inbox / "v0001"


@pytest.fixture
def image_bytes() -> Callable[..., bytes]:
    """`image_bytes(size=(64, 48), mode="RGB", fmt="JPEG", colour=...)` -> encoded image bytes."""

    def make(size=(64, 48), mode: str = "RGB", fmt: str = "JPEG", colour=None) -> bytes:
        if colour is None:
            colour = {"RGB": (200, 80, 20), "RGBA": (200, 80, 20, 0), "L": 128, "CMYK": (0, 160, 255, 0)}[
                mode
            ]
        buf = io.BytesIO()
        Image.new(mode, size, colour).save(buf, format=fmt)
        return buf.getvalue()

    return make
