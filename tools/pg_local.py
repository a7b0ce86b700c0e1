"""A throw-away PostgreSQL server for tests and local trials of the Postgres instance file.

Debian's server binaries (package `postgresql`, `make postgres-deps`), a data directory of our own,
listening on 127.0.0.1 only, one superuser with trust authentication (nothing but this machine can
connect). PostgreSQL refuses to run as root, so under root the server runs as the `postgres` system
user (created by the Debian package) through `runuser`.

    python tools/pg_local.py start --dir /tmp/roadwork-pg --port 5433   # prints the DAGSTER_PG_* exports
    python tools/pg_local.py stop --dir /tmp/roadwork-pg
    python tools/pg_local.py bindir                                       # where initdb / pg_ctl are
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

SERVICE_USER = "postgres"  # the system user Debian's package creates; the server runs as it under root
INSTALL_HINT = (
    "install them with `make postgres-deps` (Debian/Ubuntu: apt-get install -y postgresql), "
    "or point ROADWORK_PG_BINDIR at the folder holding initdb and pg_ctl"
)


@dataclass(frozen=True)
class PgServer:
    data_dir: Path
    host: str
    port: int
    user: str
    db: str

    def env(self, password: str = "unused-trust-auth") -> dict[str, str]:
        """The variables deploy/dagster-postgres.yaml reads (trust auth accepts any password)."""
        return {
            "DAGSTER_PG_HOST": self.host,
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_USERNAME": self.user,
            "DAGSTER_PG_PASSWORD": password,
            "DAGSTER_PG_DB": self.db,
        }


def bindir() -> Path:
    """The folder of initdb / pg_ctl: ROADWORK_PG_BINDIR, then `pg_config --bindir`, then Debian's layout."""
    candidates: list[Path] = []
    if os.environ.get("ROADWORK_PG_BINDIR"):
        candidates.append(Path(os.environ["ROADWORK_PG_BINDIR"]))
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(Path(out.stdout.strip()))

    def version(path: Path) -> int:
        return int(path.parent.name) if path.parent.name.isdigit() else 0

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise FileNotFoundError(
        f"PostgreSQL server binaries (initdb, pg_ctl) not found (looked in {[str(c) for c in candidates]}); "
        + INSTALL_HINT
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise RuntimeError(
            f"running as root, PostgreSQL must run as another user, but the system user {SERVICE_USER!r} "
            f"does not exist; {INSTALL_HINT} (the package creates it), or run as a non-root user"
        ) from None
    return ["runuser", "-u", SERVICE_USER, "--", *cmd]


def _run(cmd: list[str], what: str, log: Path | None = None) -> None:
    proc = subprocess.run(_as_server_user(cmd), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
        raise RuntimeError(
            f"{what} failed (rc {proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n"
            f"{proc.stderr[-2000:]}\n{tail}"
        )


def unreachable_parent(path: Path) -> Path | None:
    """Under root the server runs as SERVICE_USER, which must pass through every folder above its data folder:
    the first one it cannot (not world-searchable: a TMPDIR under /root, mode 0700), else None."""
    import stat

    for parent in reversed(Path(path).resolve().parents):
        if parent.exists() and not parent.stat().st_mode & stat.S_IXOTH:
            return parent
    return None


def scratch_dir(prefix: str) -> Path:
    """A new temporary folder the server's user can reach: under $TMPDIR when it can, else under /tmp."""
    import tempfile

    base = Path(tempfile.gettempdir())
    if os.geteuid() == 0 and unreachable_parent(base / "x") is not None:
        base = Path("/tmp")
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    path.chmod(0o755)  # the server's user (not root) must reach data/ inside it
    return path


def start(data_dir: Path, port: int | None = None, user: str = "roadwork", db: str = "roadwork") -> PgServer:
    """initdb (when `data_dir` is new) and start a server on 127.0.0.1:`port`; create database `db`."""
    data_dir = Path(data_dir).resolve()
    if os.geteuid() == 0 and (blocked := unreachable_parent(data_dir)) is not None:
        raise RuntimeError(
            f"the server runs as {SERVICE_USER!r}, which cannot pass through {blocked} (mode "
            f"{blocked.stat().st_mode & 0o777:o}) to reach {data_dir}; put the data folder elsewhere (a TMPDIR "
            f"under /tmp or /var/tmp), or `chmod o+x {blocked}`"
        )
    bins = bindir()
    port = port or free_port()
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", user) or not re.fullmatch(r"[a-z_][a-z0-9_]*", db):
        raise ValueError(f"user {user!r} and db {db!r} must be plain lower-case identifiers")
    fresh = not (data_dir / "PG_VERSION").exists()
    data_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        owner = pwd.getpwnam(SERVICE_USER)
        os.chown(data_dir, owner.pw_uid, owner.pw_gid)
    data_dir.chmod(0o700)
    log = data_dir / "server.log"
    if fresh:
        _run(
            [
                str(bins / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                user,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            "initdb",
        )
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='' -c fsync=off"
    _run(
        [str(bins / "pg_ctl"), "-D", str(data_dir), "-l", str(log), "-o", options, "-w", "start"],
        "pg_ctl start",
        log,
    )
    server = PgServer(data_dir=data_dir, host="127.0.0.1", port=port, user=user, db=db)
    if fresh:  # a client connection over TCP (trust auth): needs no server-user switch
        created = subprocess.run(
            [str(bins / "createdb"), "-h", server.host, "-p", str(port), "-U", user, db],
            capture_output=True,
            text=True,
        )
        if created.returncode != 0:
            raise RuntimeError(f"createdb {db} failed (rc {created.returncode}): {created.stderr[-2000:]}")
    return server


def stop(data_dir: Path) -> None:
    """Fast shutdown (open sessions are disconnected); a server that is not running is not an error."""
    data_dir = Path(data_dir).resolve()
    if (data_dir / "postmaster.pid").exists():
        _run([str(bindir() / "pg_ctl"), "-D", str(data_dir), "-m", "fast", "-w", "stop"], "pg_ctl stop")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=["start", "stop", "bindir"])
    parser.add_argument("--dir", type=Path, help="data directory (created on first start)")
    parser.add_argument("--port", type=int, default=5433)
    args = parser.parse_args()
    if args.action == "bindir":
        print(bindir())
        return
    if args.dir is None:
        parser.error(f"{args.action} needs --dir")
    if args.action == "stop":
        stop(args.dir)
        return
    server = start(args.dir, args.port)
    for key, value in server.env().items():
        print(f"export {key}={value}")


if __name__ == "__main__":
    main()
