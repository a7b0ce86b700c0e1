"""An empty, fully migrated MLflow SQLite store, made once per environment and copied into place.

MLflow creates a `sqlite:///` store on first use by running its ~50 schema migrations: 3-4 s of one
core here, paid by the first run of every fresh state folder (`make demo` after `make clean-state`, a
test's temporary home, a benchmark repeat). `make` builds the store once per environment, when it
installs the lock (`python -m roadwork_resources.mlflow_store`), into `<venv>/share/roadwork/`, named
by the MLflow version that migrated it. `seed_store` copies it to a store path that does not exist
yet; without a template (another MLflow version, an environment `make` did not build) MLflow creates
the store itself, as before.

The copy differs from what MLflow would create in one value: the `Default` experiment's artifact
location, which MLflow derives from the current directory (`./mlruns`), is set to `mlartifacts/0` beside
the database, inside the state folder like the `roadwork` experiment's artifacts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path


def template_path() -> Path:
    """Where this environment's template lives: `<sys.prefix>/share/roadwork/mlflow-store-<version>.db`."""
    return Path(sys.prefix) / "share" / "roadwork" / f"mlflow-store-{version('mlflow')}.db"


def _set_default_artifact_location(db: Path, location: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
            (location.resolve().as_uri(),),
        )
    conn.close()


def make_template(path: Path | None = None) -> Path:
    """Create the empty store through MLflow itself (tables, migrations, the Default experiment) in a
    temporary folder, then move it into place atomically. Returns its path."""
    import mlflow

    path = path or template_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        db = Path(tmp) / "store.db"
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
        if not db.is_file() or db.stat().st_size == 0:
            raise RuntimeError(f"MLflow did not create its store at {db}")
        os.replace(db, path)
    return path


def seed_store(db: Path, template: Path | None = None) -> bool:
    """Copy the template to `db` if `db` does not exist (or is empty) and the template does. The caller
    holds the store's init lock. Returns whether it copied."""
    template = template or template_path()
    if (db.exists() and db.stat().st_size > 0) or not template.is_file():
        return False
    db.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{db.name}.", suffix=".tmp", dir=db.parent)
    os.close(fd)
    try:
        shutil.copyfile(template, tmp)
        _set_default_artifact_location(Path(tmp), db.parent / "mlartifacts" / "0")
        os.replace(tmp, db)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, default=None, help="default: " + str(template_path()))
    args = parser.parse_args(argv)
    print(f"MLflow store template: {make_template(args.path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
