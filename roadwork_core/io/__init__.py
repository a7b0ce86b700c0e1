"""Atomic, checksummed file writes shared by every writer in the project."""

from roadwork_core.io.atomic import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_text,
    linked_copy,
    sha256_file,
)

__all__ = ["atomic_dir", "atomic_write_bytes", "atomic_write_text", "linked_copy", "sha256_file"]
