"""Default locations of the embedded set-up: everything mutable lives under one git-ignored state folder.

`ROADWORK_STATE` (default `./state`) holds the Dagster home, the artifact store, the feature cache,
training checkpoints and the MLflow SQLite store. `ROADWORK_INBOX` (default `./data/inbox`) is where
data drops arrive. Both are read once, when the Definitions are built.
"""

from __future__ import annotations

import os
from pathlib import Path

# The folders the Definitions were built with when given explicitly (`build_resources(state=, inbox=)`: tests,
# an embedded set-up): a resource whose path field a run config leaves empty falls back to these before the
# environment, since Dagster drops the Definitions' values of a resource that the run config configures.
_bound: dict[str, Path] = {}


def bind_paths(*, state: Path | None, inbox: Path | None, monitor: Path | None) -> None:
    """Record the folders the latest `build_resources` call was given (None: the environment's)."""
    _bound.clear()
    _bound.update(
        {k: Path(v).absolute() for k, v in (("state", state), ("inbox", inbox), ("monitor", monitor)) if v}
    )


def state_root() -> Path:
    return Path(os.environ.get("ROADWORK_STATE", "state")).absolute()


def inbox_root() -> Path:
    return Path(os.environ.get("ROADWORK_INBOX", "data/inbox")).absolute()


def monitor_root() -> Path:
    """Where monitored production images land: ROADWORK_MONITOR_DIR, else <state>/monitor."""
    env = os.environ.get("ROADWORK_MONITOR_DIR")
    return Path(env).absolute() if env else state_root() / "monitor"


def resolve_env_values(values: dict) -> dict:
    """A resource's run-config values with Dagster's `{env: VAR}` sources read from the environment (as Dagster
    will when it builds the resource); a variable that is not set leaves its field out (Dagster names it)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and set(value) == {"env"}:
            if str(value["env"]) in os.environ:
                out[key] = os.environ[str(value["env"])]
        else:
            out[key] = value
    return out


def resource_default(name: str) -> Path:
    """The folder a resource's empty path field stands for (`state`, `inbox` or `monitor`): the one the
    Definitions were built with (`bind_paths`), else the environment's."""
    if name in _bound:
        return _bound[name]
    if name == "monitor" and "state" in _bound and not os.environ.get("ROADWORK_MONITOR_DIR"):
        return _bound["state"] / "monitor"
    return {"state": state_root, "inbox": inbox_root, "monitor": monitor_root}[name]()


def artifact_root() -> Path:
    return Path(os.environ.get("ROADWORK_ARTIFACTS", str(state_root() / "artifacts"))).absolute()


def default_mlflow_uri() -> str:
    return f"sqlite:///{state_root() / 'mlflow.db'}"
