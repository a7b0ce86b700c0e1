"""tools/pg_local.py: where the throwaway PostgreSQL server of the Postgres tests may keep its data."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tools import pg_local


def test_the_data_folder_goes_where_the_server_user_can_reach(tmp_path: Path, monkeypatch) -> None:
    """Under root the server runs as `postgres`; with TMPDIR under a private folder (`$HOME/tmp`, /root at
    0700) initdb failed with a bare "Permission denied" (a fresh-machine audit)."""
    private = tmp_path / "priv"
    (private / "tmp").mkdir(parents=True)
    private.chmod(0o700)
    assert pg_local.unreachable_parent(private / "tmp" / "pg") is not None
    monkeypatch.setattr(tempfile, "tempdir", str(private / "tmp"))
    made = pg_local.scratch_dir("roadwork-pg-test-")
    try:
        if os.geteuid() == 0:
            assert pg_local.unreachable_parent(made / "data") is None, made
            with pytest.raises(RuntimeError, match=r"cannot pass through .*chmod o\+x"):
                pg_local.start(private / "tmp" / "pg")
        else:
            assert made.parent == private / "tmp"  # not root: the server runs as this user
    finally:
        shutil.rmtree(made, ignore_errors=True)
