"""Shared fixtures: a small synthetic demo drop (built once per session) and an image-bytes maker."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from roadwork_core.data.synthetic import make_demo_drop


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `slow` (servers, daemons, whole-graph runs: tens of seconds each) run first, spread
    over the pytest-xdist workers (`make test` runs `-n auto --dist worksteal`).

    worksteal hands worker k the k-th contiguous slice of this order at the start; idle workers later
    steal the tail of the longest queue. With every slow test at the front, worker 0 got all of them and
    ran them one after another while the others ran the quick ones (the suite's tail was that chain).
    So the order is one block per worker, each its share of the slow modules (whole modules, balanced by
    their number of slow tests, so module-scoped fixtures are built once) followed by quick tests up to
    the block's even size. Slow tests of other modules that share an expensive session fixture carry
    `pytest.mark.xdist_group(name)` and are kept with that group on one worker (a session fixture is
    built once per worker: the two concurrent graph runs were built twice, ~150 s each)."""
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    quick = [item for item in items if item.get_closest_marker("slow") is None]
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        items[:] = slow + quick
        return
    modules: dict[str, list[pytest.Item]] = {}
    for item in slow:
        group = item.get_closest_marker("xdist_group")
        key = group.kwargs.get("name", group.args[0] if group.args else "") if group else ""
        modules.setdefault(key or item.nodeid.split("::")[0], []).append(item)
    blocks: list[list[pytest.Item]] = [[] for _ in range(workers)]
    for tests in sorted(modules.values(), key=len, reverse=True):  # largest first, to the lightest block
        min(blocks, key=len).extend(tests)
    size = -(-len(items) // workers)  # the slice worksteal gives each worker
    rest = iter(quick)
    for block in blocks:
        block.extend(item for _, item in zip(range(max(0, size - len(block))), rest))
    blocks[-1].extend(rest)
    items[:] = [item for block in blocks for item in block]


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models on a 2-core box: intra-op threads only add contention (about 10x slower under load).
    Subprocesses the tests start (CLI, webserver, daemon) choose their own threads."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mlflow_store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store whose schema MLflow has already migrated. Creating a store runs
    MLflow's ~50 alembic migrations (seconds); the graph tests copy this file to their state folder
    instead (`seed_mlflow_store`). A store created on first use is still what test_cli_materialize and
    the README test run."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}")
    client.search_experiments()  # creates the store: tables, migrations, default experiment
    assert path.stat().st_size > 0, f"MLflow did not create {path}"
    return path


def seed_mlflow_store(template: Path, state: Path) -> Path:
    """Copy the migrated empty store to `state`/mlflow.db, where build_resources and the e2e
    environment point MLflow."""
    state.mkdir(parents=True, exist_ok=True)
    target = state / "mlflow.db"
    shutil.copyfile(template, target)
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
