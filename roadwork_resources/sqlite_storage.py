"""Dagster's SQLite instance storage, with one SQLAlchemy engine per database file instead of one per
connection.

Dagster's SQLite storages build a new engine (`create_engine(..., poolclass=NullPool)`) for every
connection and dispose of it afterwards. A run of the tiny graph opens ~1,850 event-log connections
(~300 events, each written to the run's shard and mirrored into the index shard, plus the reads of
input loading and checks), and building the engine, not opening the SQLite file, is most of each
one's cost: ~1.0-1.2 ms against ~0.3 ms with the engine kept (a SQLite round trip, measured here).

These classes keep the engine and change nothing else: the pool is still `NullPool`, so no connection
outlives its `with` block, no file handle or lock is held between statements, and several processes
(the webserver, the daemon, run workers) share the files exactly as before. The files and their layout
under `base_dir` are Dagster's own (history/runs.db, history/runs/<run_id>.db, schedules/schedules.db),
so an existing $DAGSTER_HOME opens unchanged, and switching back to Dagster's default storage needs no
migration.

dagster.yaml selects it through Dagster's custom instance class, whose `config_defaults` replace only the
default SQLite storage, with the folder Dagster resolved for this instance (the folder of dagster.yaml,
or the temporary home of a `dagster dev` started without DAGSTER_HOME):

    instance_class:
      module: roadwork_resources.sqlite_storage
      class: RoadworkInstance

A `storage:` block in the same file (Postgres: deploy/dagster-postgres.yaml) still takes precedence.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as db
import yaml
from dagster._core.instance import DagsterInstance
from dagster._core.instance.ref import InstanceRef
from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    INDEX_SHARD_NAME,
    SQLITE_BUSY_TIMEOUT_SECONDS,
    SqliteEventLogStorage,
)
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
from dagster._core.storage.schedules.sqlite.sqlite_schedule_storage import SqliteScheduleStorage
from dagster._core.storage.sqlite_storage import (
    DagsterSqliteStorage,
    _event_logs_directory,
    _runs_directory,
    _schedule_directory,
)
from dagster._serdes import ConfigurableClassData
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

__all__ = ["CachedEngineSqliteStorage", "EngineCache", "RoadworkInstance"]

# Engines kept per process: a run worker uses two (its run's shard and the index shard), while a
# long-lived webserver or daemon reads the shards of many runs; the least recently used goes first.
MAX_ENGINES = 64


class EngineCache:
    """A bounded, thread-safe map from SQLite connection string to a NullPool engine."""

    def __init__(self, max_engines: int = MAX_ENGINES, **engine_kwargs):
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_engines
        self._kwargs = engine_kwargs

    def get(self, conn_string: str) -> Engine:
        with self._lock:
            engine = self._engines.get(conn_string)
            if engine is None:
                engine = db.create_engine(conn_string, poolclass=NullPool, **self._kwargs)
                self._engines[conn_string] = engine
                while len(self._engines) > self._max:
                    _, old = self._engines.popitem(last=False)
                    old.dispose()  # NullPool: nothing is open; this only drops the engine
            else:
                self._engines.move_to_end(conn_string)
            return engine

    def __len__(self) -> int:
        return len(self._engines)

    def dispose(self) -> None:
        with self._lock:
            for engine in self._engines.values():
                engine.dispose()
            self._engines.clear()


class CachedEngineSqliteEventLogStorage(SqliteEventLogStorage):
    """SqliteEventLogStorage whose `_connect` keeps each shard's engine (same locking, same init)."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None):
        self._engines = EngineCache(connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS})
        self._tables_seen: set[str] = set()
        super().__init__(base_dir, inst_data)

    def has_table(self, table_name: str) -> bool:
        """Dagster's answer, through the index shard's kept engine, and remembered once a table is there
        (Dagster builds a fresh engine for every call, and asks before each dynamic-partition lookup,
        i.e. for every partitioned input a step loads, and before storing each tagged event). A table the
        migrations created is never dropped; a missing one is asked again, so `dagster instance migrate`
        in another process is seen."""
        if table_name in self._tables_seen:
            return True
        with self._engines.get(self.conn_string_for_shard(INDEX_SHARD_NAME)).connect() as conn:
            present = bool(conn.dialect.has_table(conn, table_name))
        if present:
            self._tables_seen.add(table_name)
        return present

    @contextmanager
    def _connect(self, shard: str) -> Iterator[Connection]:
        with self._db_lock:
            engine = self._engines.get(self.conn_string_for_shard(shard))
            if shard not in self._initialized_dbs:
                self._initdb(engine)
                self._initialized_dbs.add(shard)
            with engine.connect() as conn, conn.begin():
                yield conn

    def dispose(self) -> None:
        super().dispose()
        self._engines.dispose()


class CachedEngineSqliteRunStorage(SqliteRunStorage):
    """SqliteRunStorage whose `connect` keeps its engine."""

    def __init__(self, conn_string: str, inst_data: ConfigurableClassData | None = None):
        self._engines = EngineCache(max_engines=1)
        super().__init__(conn_string, inst_data)

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        with self._engines.get(self._conn_string).connect() as conn, conn.begin():
            yield conn

    def dispose(self) -> None:
        super().dispose()
        self._engines.dispose()


class CachedEngineSqliteScheduleStorage(SqliteScheduleStorage):
    """SqliteScheduleStorage whose `connect` keeps its engine."""

    def __init__(self, conn_string: str, inst_data: ConfigurableClassData | None = None):
        self._engines = EngineCache(max_engines=1)
        super().__init__(conn_string, inst_data)

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        with self._engines.get(self._conn_string).connect() as conn, conn.begin():
            yield conn

    def dispose(self) -> None:
        super().dispose()
        self._engines.dispose()


class CachedEngineSqliteStorage(DagsterSqliteStorage):
    """Dagster's SQLite storage (same files under `base_dir`) built from the cached-engine classes."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None):
        self.base_dir = base_dir
        self._run_storage = CachedEngineSqliteRunStorage.from_local(_runs_directory(base_dir))
        self._event_log_storage = CachedEngineSqliteEventLogStorage(_event_logs_directory(base_dir))
        self._schedule_storage = CachedEngineSqliteScheduleStorage.from_local(_schedule_directory(base_dir))
        self._inst_data = inst_data
        super(DagsterSqliteStorage, self).__init__()

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value) -> CachedEngineSqliteStorage:
        return cls.from_local(inst_data=inst_data, **config_value)


class RoadworkInstance(DagsterInstance):
    """Dagster's instance, whose default storage (no `storage:` in dagster.yaml) is CachedEngineSqliteStorage
    under the instance's own folder; every other default is Dagster's."""

    @classmethod
    def config_schema(cls) -> dict:
        return {}  # no settings of its own: the file is Dagster's schema

    @staticmethod
    def config_defaults(base_dir: str) -> dict:
        defaults = dict(InstanceRef.config_defaults(base_dir))
        defaults["storage"] = ConfigurableClassData(
            __name__,
            CachedEngineSqliteStorage.__name__,
            yaml.dump({"base_dir": base_dir}, default_flow_style=False),
        )
        return defaults
