"""The only module that touches flock(2): open the lock file safely, try, wait, verify, release."""

from __future__ import annotations

import errno
import os
import stat

try:
    import fcntl
except ImportError as exc:  # pragma: no cover - exercised on Windows only
    msg = (
        "proclock requires flock(2), which this platform does not provide (Windows has no "
        "fcntl module); use it on Linux or macOS, or under WSL"
    )
    raise ImportError(msg) from exc

from ._errors import UnsafeLockPathError

_OPEN_FLAGS = (
    os.O_RDWR
    | os.O_NOFOLLOW  # a planted symlink fails with ELOOP instead of redirecting us
    | os.O_CLOEXEC  # children spawned with exec never inherit the lock
    | os.O_NONBLOCK  # a FIFO swapped in after our lstat cannot make open() hang
)
EX = fcntl.LOCK_EX
SH = fcntl.LOCK_SH
NB = fcntl.LOCK_NB
_UN = fcntl.LOCK_UN
flock = fcntl.flock  # for the registry's inlined fast path

_KINDS = (
    (stat.S_ISLNK, "a symlink"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _refuse(path: str, mode: int) -> UnsafeLockPathError:
    kind = next((label for test, label in _KINDS if test(mode)), "not a regular file")
    return UnsafeLockPathError(
        path,
        f"the lock file is {kind}; proclock only locks regular files and never follows or "
        "touches such an entry: remove it, or choose another name or lock_dir",
    )


def open_lock_file(path: str, mode: int) -> tuple[int, os.stat_result]:
    """Open (creating with `mode` if needed) the regular file at `path`; return (fd, fstat).

    Never follows a symlink, never opens a FIFO, device, socket or directory, and never creates,
    truncates or chmods anything but a file it created itself.
    """
    for _ in range(64):  # each loop is a lost create/delete race with someone else; bounded
        try:
            fd = os.open(path, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            pass
        else:
            try:
                os.fchmod(fd, mode)  # the umask must not shrink the mode the user asked for
                return fd, os.fstat(fd)
            except BaseException:
                os.close(fd)
                raise
        try:
            before = os.lstat(path)
        except FileNotFoundError:
            continue  # deleted between our two calls: create it again
        if not stat.S_ISREG(before.st_mode):
            raise _refuse(path, before.st_mode)
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EMLINK):
                raise _refuse(path, os.lstat(path).st_mode) from exc
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped between lstat and open
            os.close(fd)
            raise _refuse(path, st.st_mode)
        return fd, st
    msg = f"{path!r}: the lock file keeps disappearing while being opened"
    raise OSError(errno.EAGAIN, msg, path)


def with_path(exc: OSError, path: str) -> OSError:
    if exc.filename is None:
        exc.filename = path
    return exc


def try_lock(fd: int, op: int, path: str) -> bool:
    """One non-blocking attempt; False if another open file description holds it."""
    try:
        fcntl.flock(fd, op | NB)
    except BlockingIOError:
        return False
    except OSError as exc:  # ENOLCK, EBADF, EINVAL...: never a silent run without the lock
        raise with_path(exc, path) from None
    return True


def wait_lock(fd: int, op: int, path: str) -> None:
    """Block in the kernel until the lock is ours: woken at release, no polling."""
    try:
        fcntl.flock(fd, op)
    except OSError as exc:
        raise with_path(exc, path) from None


def unlock(fd: int) -> None:
    fcntl.flock(fd, _UN)


def still_at_path(dev: int, ino: int, path: str) -> os.stat_result | None:
    """lstat(path) if the file there is still the one we opened (`dev`, `ino`), else None.

    Checked after every acquisition: a tmp cleaner or `proclock gc` may have unlinked the file
    while we waited, and a lock on an orphaned inode excludes nobody (the filelock unlink race).
    `dev` and `ino` are fstat(fd)'s, taken at open: they never change for a descriptor, so
    comparing them with lstat(path) is the fstat/lstat check at one syscall; a match also
    proves st_nlink >= 1 (the inode is linked at `path`).
    """
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return None
    if now.st_ino != ino or now.st_dev != dev or not stat.S_ISREG(now.st_mode):
        return None
    return now
