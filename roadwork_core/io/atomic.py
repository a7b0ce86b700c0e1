"""Atomic writes: write to a temporary sibling, fsync, then `os.replace` onto the final name.

A reader sees either the previous complete file or the new complete file, never a partial one.
Temporary names start with `.tmp-` so that listings can ignore them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Leftovers of writers killed mid-write (SIGKILL, the OOM killer): `.tmp-<name>.*` beside the file or folder they
# were writing, never read as valid but never removed either (a GB-sized checkpoint each). Every writer holds an
# exclusive flock on its temporary for as long as it writes; the kernel drops it when the writer dies, however it
# dies. The first write into a folder in a process removes the temporaries there whose lock it can take.
_SWEPT_DIRS: set[Path] = set()


def _locked_temporary(make: Callable[[], Path], beside: Path) -> tuple[Path, int]:
    """A new temporary from `make()` with this process's flock on it (fd returned; -1 where the file system
    has no flock, ENOLCK on some network mounts: then nothing is locked and nothing is swept). A sweep by
    another process can remove a temporary in the moment between its creation and its lock; the lock is then
    on a removed inode, which the inode check finds, and a new temporary is made."""
    import fcntl

    for _ in range(20):
        tmp = make()
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except FileNotFoundError:
            continue  # swept before it could be locked
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            return tmp, -1
        try:
            same = os.stat(tmp).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return tmp, fd
        os.close(fd)
    raise OSError(
        errno.EAGAIN, f"could not keep a temporary beside {beside}: removed 20 times before it was locked"
    )


def _unlock(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


def sweep_dead_temporaries(directory: Path) -> list[Path]:
    """Remove the `.tmp-*` files and folders in `directory` whose writer is gone (their flock can be taken);
    a live writer's are kept. Returns what was removed."""
    import fcntl

    removed = []
    try:
        entries = [e for e in os.scandir(directory) if e.name.startswith(".tmp-")]
    except OSError:
        return removed
    for entry in entries:
        try:
            fd = os.open(entry.path, os.O_RDONLY)
        except OSError:
            continue  # gone meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # held: its writer is alive
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
        finally:
            os.close(fd)
    return removed


def _sweep_once(directory: Path) -> None:
    if directory not in _SWEPT_DIRS:
        _SWEPT_DIRS.add(directory)
        sweep_dead_temporaries(directory)


@contextlib.contextmanager
def _tmp_sibling(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)

    def make() -> Path:
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
        os.close(fd)
        return Path(tmp)

    tmp_path, lock = _locked_temporary(make, path)
    try:
        yield tmp_path
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    finally:
        _unlock(lock)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`).

    Returns False where the platform or filesystem cannot (then the caller falls back to two renames).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # libc without renameat2 (glibc < 2.28, musl < 1.2.?)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, f"could not swap {a} into place of {b}: {os.strerror(err)}")


def _process_umask() -> int:
    mask = os.umask(0o022)  # read it the only way POSIX allows, once, at import (single-threaded then)
    os.umask(mask)
    return mask


# mkstemp / mkdtemp create 0600 / 0700 for privacy while writing; the finished artifact gets the modes a
# plain open() / mkdir() would (0644 / 0755 under umask 022), so a server running as another user can read it.
_UMASK = _process_umask()
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically. Raises OSError (disk full, permissions) with the path named."""
    path = Path(path)
    with _tmp_sibling(path) as tmp:
        os.chmod(tmp, FILE_MODE)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise OSError(exc.errno, f"could not write {path}: {exc.strerror}; nothing was replaced") from exc
        os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name, then swap it in place of `path`.

    Usage: `with atomic_dir(dest) as tmp: (tmp / "a.json").write_text(...)`. If the block raises, the
    temporary directory is removed and `dest` (if it existed) is untouched. On Linux the new and the
    old directory are exchanged in one atomic step, so `dest` is always the old or the new directory;
    elsewhere the old one is renamed aside first (a brief moment where `dest` is absent, never partial).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    # locked on the folder's inode: the lock moves with the folder, and the swapped-out old one is unlocked
    tmp, lock = _locked_temporary(
        lambda: Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}.", dir=path.parent)), path
    )
    try:
        os.chmod(tmp, DIR_MODE)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _unlock(lock)
        raise
    try:
        _swap_in(tmp, path)
    finally:
        _unlock(lock)


def _swap_in(tmp: Path, path: Path) -> None:
    if path.exists() and _exchange(tmp, path):
        _fsync_dir(path.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous directory
        return
    old = None
    if path.exists():
        old = path.parent / f".tmp-old-{path.name}.{os.getpid()}"
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def linked_copy(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """`dest` becomes a copy of the directory `src` whose files are hard links where `src` is on the same file
    system (no extra disk), copies where not; built under a temporary name and renamed into place. The store
    never rewrites a file in place (every writer here replaces files), so the linked files stay as they are
    when `src` is replaced."""

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:  # another file system (EXDEV), or links not allowed here
            shutil.copy2(a, b)

    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        shutil.copytree(src, tmp / "x", symlinks=False, copy_function=link_or_copy)
        for entry in (tmp / "x").iterdir():
            os.replace(entry, tmp / entry.name)
        (tmp / "x").rmdir()
    return dest
