"""Artifact IO manager: typed, atomic, checksummed storage per asset and partition.

Layout: `<root>/<asset key path>/<partition>/` holding the artifact files and the record `_artifact.json`
(kind, class, sha256 and size of every file). A partition directory is built under a temporary name
and renamed into place, so a reader sees the previous complete artifact or the new one, never a mix.

Kinds (chosen from the output value):
- pandas DataFrame          -> data.parquet
- pydantic BaseModel        -> artifact.json (the class is recorded; only roadwork_core classes load)
- dict[str, torch.Tensor]   -> tensors.safetensors
- pathlib.Path (directory)  -> dir/ (a copy; bundles, model directories)
- dict / list of JSON types -> value.json
Anything else is refused: nothing is ever pickled.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import importlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
from pydantic import BaseModel, PrivateAttr

from roadwork_core.io import atomic_dir, sha256_file

RECORD_FILE = "_artifact.json"
_ALLOWED_CLASS_PREFIX = "roadwork_core."


class ArtifactTypeError(TypeError):
    pass


_SCRATCH_PREFIX = "roadwork-artifact-"
_LOCK_SUFFIX = ".owner"
# scratch directories handed out and not yet moved into the store, each with the open file descriptor
# of its owner lock: a step that fails after new_artifact_dir() never returns its directory, so the
# process removes what is left when it exits. A process killed outright (SIGKILL, the OOM killer) runs
# no exit handler; its scratch is swept by the next process that asks for one (see _sweep_dead_scratch).
_SCRATCH_OPEN: dict[Path, int] = {}
_SWEPT = False


def _release(path: Path) -> None:
    fd = _SCRATCH_OPEN.pop(path, None)
    lock = path.with_name(path.name + _LOCK_SUFFIX)
    with contextlib.suppress(OSError):
        lock.unlink()
    if fd is not None:
        os.close(fd)


def _remove_open_scratch() -> None:
    for path in list(_SCRATCH_OPEN):
        shutil.rmtree(path, ignore_errors=True)
        _release(path)


atexit.register(_remove_open_scratch)


def _sweep_dead_scratch(tmp: Path) -> list[Path]:
    """Remove the scratch directories of processes that died without their exit handlers.

    Every scratch directory `X` has a sibling `X.owner` that its process holds an exclusive `flock` on
    for as long as it lives; the kernel drops the lock when the process dies, however it dies. A lock
    this process can take therefore belongs to a dead owner (on this host or in another container
    sharing the folder), and its directory is garbage. Returns the directories removed."""
    import fcntl

    removed = []
    for lock in tmp.glob(f"{_SCRATCH_PREFIX}*{_LOCK_SUFFIX}"):
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue  # gone meanwhile, or not ours to open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # held: its owner is alive
            continue
        try:
            scratch = lock.with_name(lock.name[: -len(_LOCK_SUFFIX)])
            shutil.rmtree(scratch, ignore_errors=True)
            lock.unlink(missing_ok=True)
            removed.append(scratch)
        finally:
            os.close(fd)
    return removed


def new_artifact_dir(name: str) -> Path:
    """A scratch directory for an asset to fill and return; the IO manager moves it into the store.
    Left over (the step failed before returning it), it is removed when the process exits; left over by
    a killed process, by the next process that asks for a scratch directory."""
    import fcntl
    import tempfile

    global _SWEPT
    tmp = Path(tempfile.gettempdir())
    if not _SWEPT:
        _SWEPT = True
        _sweep_dead_scratch(tmp)
    path = Path(tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{name}-", dir=tmp))
    # lock under a name the sweep does not match, then rename: no sweep can take a fresh owner's lock
    lock = path.with_name(path.name + _LOCK_SUFFIX)
    fd = os.open(lock.with_name(lock.name + "-new"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(lock.with_name(lock.name + "-new"), lock)
    _SCRATCH_OPEN[path] = fd
    return path


def _is_tensor_dict(obj: Any) -> bool:
    if not isinstance(obj, dict) or not obj:
        return False
    import torch

    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _write_error(dest: Path, exc: Exception) -> OSError:
    """An I/O failure while writing `dest` (disk full, quota, permissions) as an OSError naming it.

    pyarrow and safetensors report ENOSPC without the file name (safetensors not even as an OSError)."""
    code = getattr(exc, "errno", None)
    if code is None:
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else errno.EIO
    reason = os.strerror(code) if code else str(exc)
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = f"make {dest.parent} writable by the user the runs run as (uid {os.getuid()}) and rerun"
    elif code == errno.EFBIG:
        fix = "raise the file size limit (`ulimit -f`; the weights alone can be GBs) and rerun"
    else:  # ENOSPC, EDQUOT, EIO and the rest
        fix = f"free space under {dest.parent} (or raise the quota) and rerun"
    return OSError(
        code,
        f"could not write the artifact {dest}: {reason} ({type(exc).__name__}: {exc}); nothing was "
        f"replaced, the previous artifact there (if any) is intact. Fix: {fix}",
    )


def write_artifact(dest: Path, obj: Any) -> dict:
    """Write `obj` as a typed artifact directory at `dest` atomically; return its record."""
    from safetensors import SafetensorError

    dest = Path(dest)
    try:
        return _write_artifact(dest, obj)
    except (OSError, SafetensorError) as exc:
        raise _write_error(dest, exc) from exc


def _write_artifact(dest: Path, obj: Any) -> dict:
    with atomic_dir(dest) as tmp:
        if isinstance(obj, pd.DataFrame):
            kind, cls = "dataframe", None
            obj.to_parquet(tmp / "data.parquet", index=False)
        elif isinstance(obj, BaseModel):
            kind, cls = "pydantic", f"{type(obj).__module__}.{type(obj).__qualname__}"
            (tmp / "artifact.json").write_text(obj.model_dump_json(indent=2))
        elif _is_tensor_dict(obj):
            from safetensors.torch import save_file

            kind, cls = "tensors", None
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in obj.items()}, str(tmp / "tensors.safetensors")
            )
        elif isinstance(obj, Path):
            if not obj.is_dir():
                raise ArtifactTypeError(f"a Path artifact must be a directory; {obj} is not one")
            kind, cls = "directory", None
            if obj.name.startswith(_SCRATCH_PREFIX):
                shutil.move(str(obj), tmp / "dir")  # scratch from new_artifact_dir: move, don't copy
                _release(obj)
            else:
                shutil.copytree(obj, tmp / "dir", symlinks=False)
        elif isinstance(obj, dict | list):
            kind, cls = "json", None
            try:
                (tmp / "value.json").write_text(json.dumps(obj, indent=2, allow_nan=True))
            except TypeError as exc:
                raise ArtifactTypeError(
                    f"value is not JSON-serialisable ({exc}); return a pydantic model"
                ) from exc
        else:
            raise ArtifactTypeError(
                f"the artifact IO manager stores DataFrames, pydantic models, dicts of tensors, directories "
                f"and JSON values; got {type(obj).__name__}. It never pickles: convert the value to one of those."
            )
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = f.relative_to(tmp).as_posix()
            files[rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        record = {"kind": kind, "class": cls, "files": files}
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2))
    return record


def _load_class(name: str) -> type[BaseModel]:
    if not name.startswith(_ALLOWED_CLASS_PREFIX):
        raise ArtifactTypeError(
            f"refusing to load artifact class {name!r}: only {_ALLOWED_CLASS_PREFIX}* classes load"
        )
    module, _, qual = name.rpartition(".")
    cls = getattr(importlib.import_module(module), qual)
    if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
        raise ArtifactTypeError(f"{name} is not a pydantic model")
    return cls


class ArtifactCorruptError(OSError):
    """An artifact whose files no longer match the sizes and sha256 its record holds, or cannot be decoded."""


# files verified in this process: (path, size, mtime_ns, inode, ctime_ns) -> sha256. Runs use the in-process
# executor, so each file is hashed once per run however many steps read it (the classifier's weights: 5 reads).
_VERIFIED: dict[tuple, str] = {}


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def _rematerialize(src: Path) -> str:
    asset, partition = src.parent.name, src.name
    return (
        f"materialize `{asset}` for {partition} again (dagster asset materialize --select '{asset}*' "
        f"--partition {partition}: its downstream assets were made from the damaged files too)"
    )


def verify_artifact(src: Path, record: dict) -> None:
    """Every file the record lists has its recorded size and sha256 (size first: a truncation costs no hash);
    ArtifactCorruptError naming the file and the fix otherwise. A bit flipped at rest in a classifier's weights
    or a calibrator's JSON used to be read back silently and shipped in a bundle whose checks all passed."""
    for name, meta in sorted(record.get("files", {}).items()):
        path = src / name
        try:
            key = _stat_key(path)
        except OSError as err:
            raise ArtifactCorruptError(
                errno.ENOENT, f"artifact file {path} is missing ({err.strerror}); {_rematerialize(src)}"
            ) from err
        if key[1] != meta.get("bytes"):
            raise ArtifactCorruptError(
                errno.EIO,
                f"artifact file {path} holds {key[1]} bytes, its record {src / RECORD_FILE} says {meta.get('bytes')}:"
                f" it was truncated or changed after it was written; {_rematerialize(src)}",
            )
        if _VERIFIED.get(key) == meta.get("sha256"):
            continue
        digest = sha256_file(path)
        if digest != meta.get("sha256"):
            raise ArtifactCorruptError(
                errno.EIO,
                f"artifact file {path} has sha256 {digest[:16]}..., its record says {str(meta.get('sha256'))[:16]}...:"
                f" it changed after it was written (disk error, an edit by hand); {_rematerialize(src)}",
            )
        _VERIFIED[key] = digest


def read_artifact(src: Path, verify: bool = True) -> Any:
    """Load the artifact directory written by `write_artifact`, its files first checked against the record
    (`verify_artifact`; `verify=False` skips it). Errors name the file and the fix."""
    record_path = src / RECORD_FILE
    if not record_path.is_file():
        raise FileNotFoundError(
            f"no artifact at {src} (missing {RECORD_FILE}); materialize the upstream asset for this partition first"
        )
    try:
        record = json.loads(record_path.read_text())
        kind = record["kind"]
    except (ValueError, KeyError, TypeError) as err:
        raise ArtifactCorruptError(
            errno.EIO,
            f"artifact record {record_path} is unreadable ({type(err).__name__}: {err}); {_rematerialize(src)}",
        ) from err
    if verify:
        verify_artifact(src, record)
    try:
        return _decode(src, record, kind)
    except (ArtifactTypeError, ArtifactCorruptError):
        raise
    except Exception as err:  # noqa: BLE001  pyarrow, safetensors and json name no file
        raise ArtifactCorruptError(
            errno.EIO,
            f"artifact {src} ({kind}) cannot be decoded ({type(err).__name__}: {err}); {_rematerialize(src)}",
        ) from err


def _decode(src: Path, record: dict, kind: str) -> Any:
    if kind == "dataframe":
        return pd.read_parquet(src / "data.parquet")
    if kind == "pydantic":
        return _load_class(record["class"]).model_validate_json((src / "artifact.json").read_text())
    if kind == "tensors":
        from safetensors.torch import load_file

        return load_file(str(src / "tensors.safetensors"))
    if kind == "directory":
        return src / "dir"
    if kind == "json":
        return json.loads((src / "value.json").read_text())
    raise ArtifactTypeError(f"unknown artifact kind {kind!r} in {src / RECORD_FILE}")


class PartitionBusyError(RuntimeError):
    """Another run is materializing the same dataset version in the same store."""


def _lock_partition(root: Path, partition: str, run_id: str) -> int:
    """An exclusive POSIX record lock (`lockf`) on `<root>/.locks/<partition>.lock` for the run's lifetime,
    naming the run in the file; PartitionBusyError naming the holder. The kernel drops it when the process
    dies, however it dies; unlike a `flock` it is not shared with forked children (DataLoader workers), which
    would hold it after a killed run until they noticed. Runs in one process do not exclude each other."""
    import datetime as dt
    import fcntl
    import hashlib

    folder = root / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    safe = (
        re.sub(r"[^A-Za-z0-9_.-]", "_", partition) + "-" + hashlib.sha256(partition.encode()).hexdigest()[:8]
    )
    path = folder / f"{safe}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EAGAIN):  # no locks on this file system (ENOLCK): unlocked
            os.close(fd)
            return -1
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another run"
        os.close(fd)
        raise PartitionBusyError(
            f"{holder} is materializing dataset version {partition!r} in {root}; two runs of one version would "
            "read each other's half-made artifacts (a bundle built from another run's classifier). Wait for it to "
            "end, then run again (a killed run's lock goes with its process)"
        ) from None
    os.ftruncate(fd, 0)
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    os.pwrite(fd, f"run {run_id} (pid {os.getpid()}, since {when})".encode(), 0)
    return fd


class ArtifactIOManager(dg.ConfigurableIOManager):
    """Stores every asset output as a typed artifact under `root` (see module docstring). A run of a dataset
    version holds that version's lock in `root` from its start to its end: a second run of the same version
    (the CLI beside a sensor's retrain, two UI launches) fails at its start, naming the first."""

    root: str
    _lock_fd: int | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        run = context.dagster_run
        partition = run.tags.get("dagster/partition") if run is not None else None
        if partition:
            self._lock_fd = _lock_partition(Path(self.root), partition, run.run_id)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._lock_fd is not None:
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
            self._lock_fd = None

    def _path(self, asset_key: dg.AssetKey, partition: str | None) -> Path:
        return Path(self.root).joinpath(*asset_key.path, partition or "__all__")

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        partition = context.asset_partition_key if context.has_asset_partitions else None
        dest = self._path(context.asset_key, partition)
        record = write_artifact(dest, obj)
        context.add_output_metadata(
            {
                "path": dg.MetadataValue.path(str(dest)),
                "artifact_kind": record["kind"],
                "bytes": sum(f["bytes"] for f in record["files"].values()),
                "sha256": record_digest(record),
            }
        )

    def load_input(self, context: dg.InputContext) -> Any:
        partition = context.asset_partition_key if context.has_asset_partitions else None
        return read_artifact(self._path(context.asset_key, partition))


def record_digest(record: dict) -> str:
    """The `sha256` a materialization records for an artifact: its one file's sha256, or a digest of every
    file's name and sha256."""
    files = record["files"]
    return files[next(iter(files))]["sha256"] if len(files) == 1 else _combined_digest(record)


def artifact_digest(src: Path) -> str | None:
    """`record_digest` of the artifact now at `src` (from its record alone), None without a readable one:
    compared with a materialization's `sha256`, it tells whether the folder still holds what that
    materialization wrote (another run of the same partition replaces it)."""
    try:
        return record_digest(json.loads((Path(src) / RECORD_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return None


def _combined_digest(record: dict) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, meta in sorted(record["files"].items()):
        h.update(f"{name}:{meta['sha256']}\n".encode())
    return h.hexdigest()
