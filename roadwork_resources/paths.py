"""Default locations of the embedded set-up: everything mutable lives under one git-ignored state folder.

`ROADWORK_STATE` (default `./state`) holds the Dagster home, the artifact store, the feature cache,
training checkpoints and the MLflow SQLite store. `ROADWORK_INBOX` (default `./data/inbox`) is where
data drops arrive. Both are read once, when the Definitions are built.
"""

from __future__ import annotations

import os
from pathlib import Path


def state_root() -> Path:
    return Path(os.environ.get("ROADWORK_STATE", "state")).absolute()


def inbox_root() -> Path:
    return Path(os.environ.get("ROADWORK_INBOX", "data/inbox")).absolute()


def artifact_root() -> Path:
    return Path(os.environ.get("ROADWORK_ARTIFACTS", str(state_root() / "artifacts"))).absolute()


def default_mlflow_uri() -> str:
    return f"sqlite:///{state_root() / 'mlflow.db'}"
