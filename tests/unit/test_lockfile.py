"""tools/lockfile.py: the check that `make test` runs before pytest (this environment vs requirements.lock)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tools.lockfile import canonical, compare, read_lock

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements.lock"


def test_lock_pins_the_dagster_family_as_a_pair_and_agrees_with_the_torch_cap() -> None:
    pins = read_lock(LOCK)
    core = pins["dagster"]
    assert core.startswith("1.13."), core
    patch = core.split(".")[2]
    for name in ("dagster-webserver", "dagster-graphql", "dagster-pipes", "dagster-shared"):
        assert pins[name] == core, f"{name} {pins[name]} is not paired with dagster {core}"
    for name in ("dagster-mlflow", "dagster-postgres", "dagster-k8s"):
        assert pins[name] == f"0.29.{patch}", f"{name} {pins[name]} is not paired with dagster {core}"
    assert tuple(int(x) for x in pins["torch"].split("+")[0].split(".")) <= (2, 14, 1)
    assert "roadwork" not in pins, "the project itself must not be in the lock (installed editable on top)"


def test_compare_names_each_difference_and_the_fix() -> None:
    locked = {"dagster": "1.13.27", "dagster-mlflow": "0.29.27", "torch": "2.14.1"}
    have = {"dagster": "1.13.28", "dagster-mlflow": "0.29.27", "extra-pkg": "1.0", "roadwork": "0.1.0"}
    problems = compare(locked, have)
    assert len(problems) == 3, problems
    assert any(
        p.startswith("dagster: locked 1.13.27, installed 1.13.28") and "make venv" in p for p in problems
    )
    assert any(p.startswith("torch: locked 2.14.1, not installed") for p in problems)
    assert any(p.startswith("extra-pkg: installed 1.0 but not in the lock") for p in problems)
    assert compare(locked, {**locked, "roadwork": "0.1.0"}) == []


def test_names_are_compared_canonically() -> None:
    assert canonical("Dagster_MLflow") == canonical("dagster.mlflow") == "dagster-mlflow"


def test_a_malformed_lock_line_is_an_error_naming_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "requirements.lock"
    bad.write_text("# header\ntorch==2.14.1\ndagster>=1.13\n")
    with pytest.raises(SystemExit, match=r"requirements.lock:3: expected `name==version`"):
        read_lock(bad)


def test_check_this_environment_against_a_drifted_lock(tmp_path: Path) -> None:
    """The real check, on this interpreter: the lock as committed passes; one drifted pin fails
    with exit 1 and a message naming the package and `make venv`."""
    ok = subprocess.run(
        [sys.executable, str(REPO / "tools/lockfile.py"), "check", str(LOCK)], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    drifted = tmp_path / "requirements.lock"
    drifted.write_text(
        LOCK.read_text().replace(f"dagster=={read_lock(LOCK)['dagster']}\n", "dagster==1.13.0\n")
    )
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools/lockfile.py"), "check", str(drifted)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "dagster: locked 1.13.0, installed" in proc.stderr and "make venv" in proc.stderr, proc.stderr
