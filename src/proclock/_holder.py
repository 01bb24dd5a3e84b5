"""Who holds a lock: the kernel's answer (/proc/locks), enriched with the metadata in the file."""

from __future__ import annotations

import os
import stat
import time

from ._record import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_META_BLOCK = 256  # metadata is padded to a multiple of this: same size, one pwrite per acquisition
_READ_MAX = 65536
_SELF_CACHE_MAX = 1024
_PROC_LOCKS_FIELDS = 6


class Holder(Frozen):
    """The process holding a lock; fields are None where they cannot be known.

    `acquired_at` is a Unix time; `start_time` is the process start time in clock ticks since
    boot (from /proc), which tells a reused pid apart; `shared` is True for a reader lock.
    """

    __slots__ = ("pid", "hostname", "argv", "acquired_at", "shared", "name", "start_time")  # noqa: RUF023
    pid: int | None
    hostname: str | None
    argv: tuple[str, ...] | None
    acquired_at: float | None
    shared: bool
    name: str | None
    start_time: int | None

    def __init__(  # noqa: PLR0917  (as the dataclass it replaces: positional in field order)
        self,
        pid: int | None,
        hostname: str | None = None,
        argv: tuple[str, ...] | None = None,
        acquired_at: float | None = None,
        shared: bool = False,  # noqa: FBT002
        name: str | None = None,
        start_time: int | None = None,
    ) -> None:
        self._init(
            pid=pid,
            hostname=hostname,
            argv=argv,
            acquired_at=acquired_at,
            shared=shared,
            name=name,
            start_time=start_time,
        )

    @property
    def command(self) -> str | None:
        """The holder's command line as one string, for messages."""
        return " ".join(self.argv) if self.argv else None


_self_cache: dict[str, Any] = {}


def _proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: start time in clock ticks, which tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command field may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _proc_cmdline(pid: int) -> tuple[str, ...] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            data = f.read()
    except OSError:
        return None
    parts = data.split(b"\0")
    if parts and not parts[-1]:
        parts.pop()
    return tuple(os.fsdecode(p) for p in parts) or None


def _json_str(value: str) -> str:
    import json  # noqa: PLC0415  (lazy: keeps `import proclock` cheap)

    return json.dumps(value)


def metadata_prefix(name: str, via: int | None = None) -> bytes:
    """Everything this process writes into a lock file except the acquisition time.

    `via` is the pid the kernel shows as the holder when that is not us: the parent that
    took the lock and handed it over with transfer_on_fork().
    """
    pid = os.getpid()
    cached = _self_cache.get(name)
    if via is None and cached is not None and cached[0] == pid:
        return cached[1]  # type: ignore[no-any-return]
    import json  # noqa: PLC0415
    import sys  # noqa: PLC0415

    start = _proc_start_time(pid)
    extra = {} if via is None else {"via": via}
    head = json.dumps(
        {
            **extra,
            "v": 1,
            "pid": pid,
            "host": os.uname().nodename,
            "start": start,
            # orig_argv (3.10+) has the interpreter too: "python backup.py", as ps shows it.
            "argv": list(getattr(sys, "orig_argv", sys.argv)),
            "name": name,
        },
        separators=(",", ":"),
    )
    prefix = (head[:-1] + ',"at":').encode("utf-8", "surrogatepass")
    if via is None:
        if len(_self_cache) > _SELF_CACHE_MAX:
            _self_cache.clear()
        _self_cache[name] = (pid, prefix)
    return prefix


def metadata_parts(name: str, via: int | None = None) -> tuple[bytes, bytes]:
    """(prefix, suffix) of this process's record: the acquisition time goes between them.

    The record is padded to a multiple of 256 bytes, always the same size for one name and
    process, so that rewriting it after each acquisition is one pwrite.
    """
    prefix = metadata_prefix(name, via)
    size = -(-(len(prefix) + 32) // _META_BLOCK) * _META_BLOCK
    # "%.6f" of an epoch time is 17 characters until the year 2286: the size stays fixed.
    return prefix, b"}" + b" " * (size - len(prefix) - 19) + b"\n"


def metadata(name: str) -> bytes:
    """The record written after each exclusive acquisition."""
    prefix, suffix = metadata_parts(name)
    return prefix + b"%.6f" % time.time() + suffix


def _parse(data: bytes) -> dict[str, Any] | None:
    import json  # noqa: PLC0415

    try:
        meta = json.loads(data.decode("utf-8", "surrogatepass").strip())
    except (ValueError, UnicodeDecodeError):
        return None  # empty, garbage, or a non-proclock program's content: tolerated
    return meta if isinstance(meta, dict) else None


def read_metadata(path: str) -> dict[str, Any] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return _parse(os.pread(fd, _READ_MAX, 0))
    finally:
        os.close(fd)


class KernelLock(Frozen):
    """One flock(2) lock or waiter on a file, as /proc/locks lists it."""

    __slots__ = ("pid", "shared", "waiting")
    pid: int
    shared: bool
    waiting: bool

    def __init__(self, pid: int, shared: bool, waiting: bool) -> None:
        self._init(pid=pid, shared=shared, waiting=waiting)


def kernel_locks(st: os.stat_result) -> list[KernelLock] | None:
    """flock(2) locks on the file `st` describes, from /proc/locks; None where there is none."""
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}".encode()
    try:
        with open("/proc/locks", "rb") as f:
            data = f.read()
    except OSError:
        return None
    found = []
    for line in data.splitlines():
        parts = line.split()
        waiting = len(parts) > 1 and parts[1] == b"->"
        if waiting:
            del parts[1]
        # Fields: id, class (FLOCK), ADVISORY, READ|WRITE, pid, maj:min:inode, start, end.
        if len(parts) < _PROC_LOCKS_FIELDS or parts[1] != b"FLOCK" or parts[5] != key:
            continue
        try:
            pid = int(parts[4])
        except ValueError:
            continue
        found.append(KernelLock(pid=pid, shared=parts[3] == b"READ", waiting=waiting))
    return found


def _probe_free(path: str) -> bool:
    """Without /proc/locks (macOS): the lock is free if a fresh open file description gets it."""
    from . import _flock  # noqa: PLC0415

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        if _flock.try_lock(fd, _flock.EX, path):
            _flock.unlock(fd)
            return True
        return False
    finally:
        os.close(fd)


def _from_meta(meta: dict[str, Any] | None, pid: int | None) -> Holder | None:
    if meta is None:
        return None
    mpid = meta.get("pid")
    if not isinstance(mpid, int) or isinstance(mpid, bool):
        return None
    start = meta.get("start")
    if pid is not None and mpid != pid:
        # The kernel names the process that called flock(2); a lock handed to a forked
        # child with transfer_on_fork() is held by the child, whose record says "via".
        if meta.get("via") != pid or not isinstance(start, int):
            return None
        if _proc_start_time(mpid) != start:
            return None  # that child is gone (or its pid was reused)
    elif isinstance(start, int) and _proc_start_time(mpid) not in (None, start):
        return None  # the pid was reused by another process since the record was written
    argv = meta.get("argv")
    at = meta.get("at")
    host = meta.get("host")
    name = meta.get("name")
    return Holder(
        pid=mpid,
        hostname=host if isinstance(host, str) else None,
        argv=tuple(str(a) for a in argv) if isinstance(argv, list) else None,
        acquired_at=float(at) if isinstance(at, (int, float)) else None,
        name=name if isinstance(name, str) else None,
        start_time=start if isinstance(start, int) else None,
    )


def lock_state(path: str) -> tuple[Holder | None, int]:
    """(holder or None if free, number of waiters) for the lock file at `path`."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, 0
    if not stat.S_ISREG(st.st_mode):
        return None, 0
    locks = kernel_locks(st)
    if locks is None:
        if _probe_free(path):
            return None, 0
        meta = read_metadata(path)
        return _from_meta(meta, None) or Holder(pid=None), 0
    holders = [lk for lk in locks if not lk.waiting]
    waiters = len(locks) - len(holders)
    if not holders:
        # Whatever the file says, nobody holds it: a killed holder's record is history.
        return None, waiters
    first = holders[0]
    if not first.shared:
        found = _from_meta(read_metadata(path), first.pid)
        if found is not None:
            return found, waiters
    return (
        Holder(
            pid=first.pid,
            hostname=os.uname().nodename,
            argv=_proc_cmdline(first.pid),
            shared=first.shared,
            start_time=_proc_start_time(first.pid),
        ),
        waiters,
    )


def holder_of(path: str) -> Holder | None:
    return lock_state(path)[0]
