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


def test_scripts_of_a_moved_venv_are_named_with_the_fix(tmp_path: Path) -> None:
    """A checkout moved after `make venv`: `.venv/bin/dagster` names the old interpreter, `make check-env`
    passed, and `make demo` died with FileNotFoundError for a file that is there (fresh-machine audit)."""
    from tools.lockfile import moved_scripts

    here = tmp_path / "rw" / ".venv" / "bin"
    here.mkdir(parents=True)
    (here / "dagster").write_text(f"#!{here / 'python'}\nimport sys\n")
    (here / "roadwork").write_text(f"#!/bin/sh\n'''exec' \"{here / 'python3.11'}\" \"$0\" \"$@\"\n' '''\n")
    assert moved_scripts(here) == []
    (here / "dagster").write_text("#!/old/place/rw/.venv/bin/python\nimport sys\n")
    (here / "roadwork").write_text(
        "#!/bin/sh\n'''exec' \"/old/my rw/.venv/bin/python\" \"$0\" \"$@\"\n' '''\n"
    )
    moved = moved_scripts(here)
    assert len(moved) == 2 and "/old/place/rw/.venv/bin/python" in moved[0] and "was moved" in moved[1], moved


def _make(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True, env=env,
        stdin=subprocess.DEVNULL, timeout=60, check=False,
    )  # fmt: skip


def test_make_quotes_state_paths_and_makes_them_absolute(tmp_path: Path) -> None:
    """`make clean-state` in a checkout under "rw v2" ran `rm -rf /x/rw v2/state data`, deleting the
    sibling folder /x/rw; `make demo ROADWORK_STATE=st` died on a relative DAGSTER_HOME."""
    import os

    unset = (
        "ROADWORK_STATE",
        "ROADWORK_INBOX",
        "DAGSTER_HOME",
        "MLFLOW_TRACKING_URI",
    )  # `make test` exports them
    env = {k: v for k, v in os.environ.items() if k not in unset}
    spaced = tmp_path / "rw v2" / "state"
    dry = _make("-n", "clean-state", f"ROADWORK_STATE={spaced}", env=env)
    assert f'rm -rf -- "{spaced}" data' in dry.stdout, dry.stdout + dry.stderr
    relative = _make("-n", "home", "ROADWORK_STATE=st", env=env)
    assert f'mkdir -p "{REPO / "st" / "dagster_home"}"' in relative.stdout, relative.stdout + relative.stderr


def test_make_home_never_overwrites_a_dagster_home_of_your_own(tmp_path: Path) -> None:
    """Any DAGSTER_HOME exported in the shell (a Postgres instance) was replaced by the repository's SQLite
    dagster.yaml whenever the repository's copy was newer."""
    import os

    own = tmp_path / "own home"
    own.mkdir()
    mine = "storage:\n  postgres:\n    postgres_url:\n      env: MY_PG_URL\n"
    (own / "dagster.yaml").write_text(mine)
    os.utime(own / "dagster.yaml", (0, 0))  # older than the repository's
    env = {**os.environ, "DAGSTER_HOME": str(own), "ROADWORK_INBOX": str(tmp_path / "inbox")}
    done = _make("home", env=env)
    assert done.returncode == 0, done.stderr
    assert (own / "dagster.yaml").read_text() == mine and "left as it is" in done.stderr, done.stderr
    fresh = tmp_path / "fresh home"
    assert _make("home", env={**env, "DAGSTER_HOME": str(fresh)}).returncode == 0
    assert (fresh / "dagster.yaml").read_text() == (REPO / "dagster.yaml").read_text()
