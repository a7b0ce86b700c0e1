"""Content fingerprints of data drops: has a dataset version's set of files changed since it was trained?

A drop's fingerprint is the sha256 over its files' relative paths and content sha256, sorted (the
`_READY` marker and the OS litter every reader skips excluded); a version's is the sha256 over (drop name, drop fingerprint) of every drop
it contains. Renaming or copying a drop keeps its fingerprint (mtimes are not used); changing,
adding or removing any file changes it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from roadwork_core.data.drops import READY, is_junk, version_key
from roadwork_core.io import sha256_file

__all__ = ["drop_fingerprint", "drop_signature", "version_fingerprint"]


def _junk(path: Path, drop_dir: Path) -> bool:
    """OS litter (Thumbs.db, __MACOSX/, dot files) that every drop reader skips: it changes no version."""
    parts = path.relative_to(drop_dir).parts
    return any(is_junk(name, is_dir=i < len(parts) - 1) for i, name in enumerate(parts))


def drop_fingerprint(drop_dir: Path) -> str:
    drop_dir = Path(drop_dir)
    h = hashlib.sha256()
    for path in sorted(
        p for p in drop_dir.rglob("*") if p.is_file() and p.name != READY and not _junk(p, drop_dir)
    ):
        h.update(f"{path.relative_to(drop_dir).as_posix()}\0{_content(path)}\n".encode())
    return h.hexdigest()


def _content(path: Path) -> str:
    """The file's sha256; for a file this process may not read (permissions), its size and mtime instead,
    so the fingerprint is still taken and the image table names the file among its rejects."""
    try:
        return sha256_file(path)
    except OSError as exc:
        info = path.stat()
        return f"unreadable:{exc.errno}:{info.st_size}:{info.st_mtime_ns}"


def drop_signature(drop_dir: Path) -> str:
    """A cheap change detector of a drop: sha256 over its files' relative paths, sizes and modification
    times (no content read; `_READY` and OS litter excluded, as in `drop_fingerprint`). The new-drop sensor
    stores it for each drop it launched and launches again when it changes: a drop whose `_READY` was
    copied before its other files, or whose files were replaced, is read again.

    One `stat` per file, from an `os.scandir` walk (a sensor tick takes it for every ready drop): the same
    files, order and digest as hashing `Path.rglob('*')`, which stats each file twice through pathlib."""
    h = hashlib.sha256()
    for parts, info in sorted(_stat_files(str(drop_dir), ())):
        h.update(f"{'/'.join(parts)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _stat_files(folder: str, prefix: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], os.stat_result]]:
    """(relative path parts, stat) of the files below `folder` (symlinks to files followed, symlinked folders not,
    as `Path.rglob` in Python 3.11); `_READY` and OS litter (hidden names, Thumbs.db, __MACOSX/, ...) skipped."""
    try:
        entries = list(os.scandir(folder))
    except OSError:  # vanished or unreadable: the next tick sees the change
        return
    for entry in entries:
        try:
            is_dir = entry.is_dir(follow_symlinks=False)  # symlinked folders are not walked (as rglob)
            if not is_dir and not entry.is_file():
                continue
            if is_junk(entry.name, is_dir=is_dir) or (not is_dir and entry.name == READY):
                continue
            if is_dir:
                yield from _stat_files(entry.path, (*prefix, entry.name))
            else:
                yield (*prefix, entry.name), entry.stat()
        except OSError:  # vanished between the listing and the stat: the next tick sees the change
            continue


def version_fingerprint(drop_dirs: Sequence[Path]) -> str:
    """The fingerprint of a dataset version made of `drop_dirs` (as `drops_up_to` lists them)."""
    h = hashlib.sha256()
    for drop in sorted((Path(d) for d in drop_dirs), key=lambda d: version_key(d.name)):
        h.update(f"{drop.name}\0{drop_fingerprint(drop)}\n".encode())
    return h.hexdigest()
