"""roadwork_resources/sqlite_storage.py: Dagster's SQLite storage with one engine kept per database file,
selected by dagster.yaml's instance_class. Real instances on temporary folders; no mocks."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import yaml
from dagster._core.instance.ref import InstanceRef
from sqlalchemy.pool import NullPool

from roadwork_resources.sqlite_storage import (
    CachedEngineSqliteEventLogStorage,
    CachedEngineSqliteRunStorage,
    CachedEngineSqliteScheduleStorage,
    EngineCache,
    RoadworkInstance,
)

REPO = Path(__file__).resolve().parents[2]


def _home(root: Path, yaml_text: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if yaml_text is None:
        shutil.copy(REPO / "dagster.yaml", root / "dagster.yaml")
    else:
        (root / "dagster.yaml").write_text(yaml_text)
    return root


@dg.asset
def _one() -> int:
    return 1


def _run_once(instance: dg.DagsterInstance) -> str:
    result = dg.materialize([_one], instance=instance)
    assert result.success
    return result.run_id


def test_the_repos_dagster_yaml_gives_the_cached_engine_storage_in_dagsters_own_layout(tmp_path):
    home = _home(tmp_path / "home")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance, RoadworkInstance)
        assert isinstance(instance.run_storage, CachedEngineSqliteRunStorage)
        assert isinstance(instance.event_log_storage, CachedEngineSqliteEventLogStorage)
        assert isinstance(instance.schedule_storage, CachedEngineSqliteScheduleStorage)
        run_id = _run_once(instance)
        # one engine per file, kept: this run's shard and the index shard; NullPool, so nothing stays open
        engines = instance.event_log_storage._engines
        assert len(engines) == 2, len(engines)
        shard = instance.event_log_storage.conn_string_for_shard(run_id)
        assert engines.get(shard) is engines.get(shard)
        assert isinstance(engines.get(shard).pool, NullPool)
    for path in ("history/runs.db", f"history/runs/{run_id}.db", "history/runs/index.db", "schedules/schedules.db"):  # fmt: skip
        assert (home / path).is_file(), f"{path} is not where Dagster's own SQLite storage keeps it"


def test_dagsters_default_storage_and_this_one_read_each_others_folders(tmp_path):
    """Switching dagster.yaml either way needs no migration: same files, same schema."""
    home = _home(tmp_path / "home")
    plain_yaml = "\n".join(
        line for line in (REPO / "dagster.yaml").read_text().splitlines()
        if not line.startswith(("instance_class:", "  module: roadwork_resources", "  class: RoadworkInstance"))
    )  # fmt: skip
    with dg.DagsterInstance.from_config(str(home)) as cached:
        first = _run_once(cached)
    (home / "dagster.yaml").write_text(plain_yaml)
    with dg.DagsterInstance.from_config(str(home)) as plain:
        assert type(plain) is dg.DagsterInstance, type(plain)
        assert plain.get_run_by_id(first).status == dg.DagsterRunStatus.SUCCESS
        assert plain.get_latest_materialization_event(dg.AssetKey("_one")).run_id == first
        second = _run_once(plain)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as cached:
        assert isinstance(cached, RoadworkInstance)
        assert {r.run_id for r in cached.get_runs()} == {first, second}
        assert cached.get_latest_materialization_event(dg.AssetKey("_one")).run_id == second
        steps = [e for e in cached.all_logs(second) if e.is_dagster_event and e.dagster_event_type == dg.DagsterEventType.STEP_SUCCESS]  # fmt: skip
        assert len(steps) == 1


def test_a_temporary_home_like_dagster_devs_keeps_its_storage_in_that_home(tmp_path):
    """`dagster dev` without DAGSTER_HOME reads the repo's dagster.yaml for a temporary folder: the
    storage must follow that folder, not an environment variable."""
    temp_home = tmp_path / ".tmp_dagster_home_x"
    temp_home.mkdir()
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(temp_home), config_dir=str(REPO))) as instance:
        assert isinstance(instance.event_log_storage, CachedEngineSqliteEventLogStorage)
        run_id = _run_once(instance)
    assert (temp_home / "history" / "runs" / f"{run_id}.db").is_file()


def test_a_storage_block_in_the_file_still_wins(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    config = yaml.safe_load((REPO / "dagster.yaml").read_text())
    config["storage"] = {"sqlite": {"base_dir": str(elsewhere)}}
    home = _home(tmp_path / "home", yaml.safe_dump(config))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.event_log_storage).__name__ == "SqliteEventLogStorage"
        run_id = _run_once(instance)
    assert (elsewhere / "history" / "runs" / f"{run_id}.db").is_file()


def test_engine_cache_is_bounded_and_drops_the_least_recently_used(tmp_path):
    cache = EngineCache(max_engines=2)
    urls = [f"sqlite:///{tmp_path / name}.db" for name in "abc"]
    a, b = cache.get(urls[0]), cache.get(urls[1])
    assert cache.get(urls[0]) is a  # a is now the most recent
    cache.get(urls[2])  # evicts b
    assert len(cache) == 2
    assert cache.get(urls[0]) is a
    assert cache.get(urls[1]) is not b, "the least recently used engine should have been dropped"


def test_two_instances_on_one_home_interleave_writes(tmp_path):
    """Two instances (as the daemon and a run worker would be) on the same files, each keeping its
    engines: both runs' events and materializations land; no lock is held between statements."""
    home = _home(tmp_path / "home")
    instances = [dg.DagsterInstance.from_config(str(home)) for _ in range(2)]
    try:
        run_ids = [_run_once(instances[i % 2]) for i in range(4)]
        for instance in instances:
            assert {r.run_id for r in instance.get_runs()} == set(run_ids)
            records = instance.fetch_materializations(dg.AssetKey("_one"), limit=10).records
            assert len(records) == 4
    finally:
        for instance in instances:
            instance.dispose()


def test_has_table_uses_the_kept_engine_and_asks_again_only_for_a_missing_table(tmp_path):
    """Dagster asks `has_table('dynamic_partitions')` before every dynamic-partition lookup (each partitioned
    input a step loads) on a fresh engine; here a table seen once is not asked again, a missing one is."""
    import sqlalchemy as sa

    home = _home(tmp_path / "home")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        storage = instance.event_log_storage
        instance.add_dynamic_partitions("versions", ["v1"])
        index = storage._engines.get(storage.conn_string_for_shard("index"))
        opened: list[int] = []
        sa.event.listen(index, "connect", lambda *a: opened.append(1))
        assert storage.has_table("dynamic_partitions") is True
        asked = len(opened)
        for _ in range(5):
            assert storage.has_table("dynamic_partitions") is True
            assert instance.has_dynamic_partition("versions", "v1")
        assert len(opened) == asked + 5, "has_table opened a connection again for a table it had seen"
        assert storage.has_table("no_such_table") is False
        assert storage.has_table("no_such_table") is False
        assert len(opened) == asked + 7, "a missing table must be asked each time (a migration may add it)"
        with index.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE no_such_table (x INTEGER)")
        assert storage.has_table("no_such_table") is True
