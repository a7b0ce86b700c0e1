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
    """Tests marked `slow` (servers, daemons, whole-graph runs: tens of seconds each) run first, in
    collection order except that tests sharing an expensive session fixture (`pytest.mark.xdist_group`)
    come first and sit together, so that the worker holding them builds it once. (worksteal ignores
    the mark itself; a worker stealing the tail of the other's queue takes ungrouped slow tests. A
    fixture that must be built once whatever the split uses `built_once`.)

    Under pytest-xdist's worksteal (`make test`) the first worker starts with the slow tests and works
    through them while the other runs the quick ones, then steals what is left. Spreading the slow tests
    over both workers from the start was measured and is slower: 13m59s against ~11 min in fresh clones
    (two workers on two cores), their servers, daemons and concurrent runs then compete for the CPU."""

    def group(item: pytest.Item) -> str:
        mark = item.get_closest_marker("xdist_group")
        return (mark.kwargs.get("name") or (mark.args[0] if mark.args else "")) if mark else ""

    index = {id(item): i for i, item in enumerate(items)}
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        if group(item):
            first.setdefault(group(item), i)
    items.sort(
        key=lambda item: (
            item.get_closest_marker("slow") is None,
            not group(item),  # the groups lead: worksteal steals from the tail of a worker's queue
            first.get(group(item), index[id(item)]),  # a group's tests at its first test's place
            index[id(item)],
        )
    )


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The controller (or the only process, without pytest-xdist) stops the session's PostgreSQL server
    once every worker is done with it (tests/two_partitions.py)."""
    if hasattr(session.config, "workerinput"):
        return
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None:
        from tests.two_partitions import stop_pg_server

        stop_pg_server(factory.getbasetemp())


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
    make_demo_drop(inbox, "v0001", n=48, seed=0, n_unlabelled=4)
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
