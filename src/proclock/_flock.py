"""The only module that touches flock(2): open the lock file safely, lock, verify, unlock.

Descriptor identity. proclock keeps descriptors open between acquisitions, and user code may
close a descriptor behind its back (`os.closerange` when daemonizing, a careless `os.close`),
after which the number can be reused by an unrelated file. Locking, unlocking, writing or
closing such a number would act on someone else's file (LOCK_UN on a user's description
releases *their* lock). So every use is preceded by a check that the number still refers to
the open file description proclock opened: at open, the description's file offset is set to a
value unique to it (proclock never reads or writes through the offset: it uses pread/pwrite),
and `lseek(fd, 0, SEEK_CUR)` must return that value. This is stronger than comparing
fstat's (st_dev, st_ino), which cannot tell two descriptions of the same file apart, and
cheaper (one syscall returning an int, 0.5 us here against fstat's 1.2 us). On a file system
that refuses such an offset, the (st_dev, st_ino) comparison is used instead.
"""

from __future__ import annotations

import errno
import itertools
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
UN = fcntl.LOCK_UN
flock = fcntl.flock
lseek = os.lseek
SEEK_CUR = os.SEEK_CUR

# Odd offsets between 1 GiB and 2 GiB: every file system proclock may meet accepts them (FAT's
# limit is 4 GiB), and no program leaves a description at exactly such an offset by chance.
_MAGIC = itertools.count((1 << 30) + 1, 2)

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


def open_lock_file(path: str, mode: int) -> tuple[int, os.stat_result, bool]:
    """Open (creating with `mode` if needed) the regular file at `path`.

    Returns (fd, fstat, created). Never follows a symlink, never opens a FIFO, device, socket
    or directory, and never creates, truncates or chmods anything but a file it created.
    """
    for _ in range(64):  # each loop is a lost create/delete race with someone else; bounded
        try:
            fd = os.open(path, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            pass
        else:
            try:
                os.fchmod(fd, mode)  # the umask must not shrink the mode the user asked for
                return fd, os.fstat(fd), True
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
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if not stat.S_ISREG(st.st_mode):  # swapped between lstat and open
            os.close(fd)
            raise _refuse(path, st.st_mode)
        return fd, st, False
    msg = f"{path!r}: the lock file keeps disappearing while being opened"
    raise OSError(errno.EAGAIN, msg, path)


def mark(fd: int) -> int | None:
    """Set the description's offset to a value unique to it; None if the file refuses it."""
    magic = next(_MAGIC)
    try:
        if os.lseek(fd, magic, os.SEEK_SET) == magic:
            return magic
    except OSError:
        pass
    return None


def same_description(fd: int, magic: int | None, dev: int, ino: int) -> bool:
    """True if `fd` still refers to the description that `mark` gave `magic` (see above)."""
    try:
        if magic is not None:
            return lseek(fd, 0, SEEK_CUR) == magic
        st = os.fstat(fd)
    except OSError:
        return False  # closed (EBADF), or reused by a pipe or socket (ESPIPE)
    return st.st_ino == ino and st.st_dev == dev and stat.S_ISREG(st.st_mode)


def with_path(exc: OSError, path: str) -> OSError:
    if exc.filename is None:
        exc.filename = path
    return exc


def still_at_path(dev: int, ino: int, path: str) -> os.stat_result | None:
    """lstat(path) if the file there is still the one we opened (`dev`, `ino`), else None."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return None
    if now.st_ino != ino or now.st_dev != dev or not stat.S_ISREG(now.st_mode):
        return None
    return now


def try_lock(fd: int, op: int, path: str) -> bool:
    """One non-blocking attempt; False if another open file description holds it."""
    try:
        flock(fd, op | NB)
    except BlockingIOError:
        return False
    except OSError as exc:  # ENOLCK, EBADF, EINVAL...: never a silent run without the lock
        raise with_path(exc, path) from None
    return True


def unlock(fd: int) -> None:
    flock(fd, UN)
