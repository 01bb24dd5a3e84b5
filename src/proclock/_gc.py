"""Garbage collection of lock files: delete the ones nobody holds, without the unlink race."""

from __future__ import annotations

import os
import stat
import time

from . import _flock, _names


def lock_files(directory: str) -> list[str]:
    """The regular `*.lock` files in `directory`, sorted (symlinks and the rest are skipped)."""
    with os.scandir(directory) as entries:
        return sorted(
            e.path for e in entries if e.name.endswith(".lock") and e.is_file(follow_symlinks=False)
        )


def collectable(directory: str) -> list[str]:
    """The lock files in `directory` that proclock named (`<prefix>-<32 hex digits>.lock`)."""
    return [p for p in lock_files(directory) if _names.is_lock_file_name(os.path.basename(p))]


def collect(path: str, *, older_than: float | None, dry_run: bool) -> bool:
    """Delete the lock file at `path` if nobody holds it now; True if it went (or would).

    The file is unlinked while we hold LOCK_EX on it: a process that opened it earlier gets
    the orphaned inode only after we close it, and proclock's inode check after every
    acquisition sends it to the file now at the path.
    """
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(before.st_mode):
        return False  # never open a FIFO, device or symlink
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False  # gone, replaced by a symlink, or not ours to open
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _flock.try_lock(fd, _flock.EX, path):
            return False  # held: never touched
        if older_than is not None and time.time() - st.st_mtime < older_than:
            return False
        if _flock.still_at_path(st.st_dev, st.st_ino, path) is None:
            return False  # replaced since we opened it: that file is someone else's business
        if not dry_run:
            os.unlink(path)
        return True
    finally:
        os.close(fd)  # releases our lock, after the unlink
