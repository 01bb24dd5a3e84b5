"""Who holds a lock: the kernel's answer (/proc/locks), enriched with the metadata in the file."""

from __future__ import annotations

import os
import stat

from ._record import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_META_BLOCK = 256  # metadata is padded to a multiple of this: same size, one pwrite per acquisition
_READ_MAX = 65536
_SELF_CACHE_MAX = 1024
_PROC_LOCKS_FIELDS = 6
_COMMAND_WIDTH = 80


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

    def short_command(self, width: int = _COMMAND_WIDTH) -> str:
        """The command line on one line, the program by its base name, cut to `width`.

        `python backup.py --full`; control characters (a newline in an argument, an escape
        sequence) are shown escaped, so that a message stays one line.
        """
        return short_command(self.argv, width)

    def describe(self) -> str:
        """`pid 1234 (backup.sh --full)`: how every message and `proclock status` name it."""
        if self.pid is None:
            return "another process"
        return f"pid {self.pid} ({self.short_command()})"


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


def _escape(text: str) -> str:
    """Control characters (a newline in an argument, an escape sequence) as visible escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def short_command(argv: tuple[str, ...] | list[str] | None, width: int = _COMMAND_WIDTH) -> str:
    """See `Holder.short_command`."""
    if not argv:
        return "unknown command"
    words = list(argv)
    words[0] = os.path.basename(words[0]) or words[0]
    text = _escape(" ".join(words))
    if len(text) > width:
        text = text[: max(width - 3, 1)] + "..."
    return text


def _key(st: os.stat_result) -> str:
    return f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"


def _fd_locks(pid: int, key: str) -> bool | None:
    """Whether process `pid` has a descriptor whose flock(2) lock is on the inode `key`.

    From /proc/PID/fdinfo/*: the kernel lists there every lock of the open file description a
    descriptor refers to, so an inheritor of a lock shows it too. None if we may not look.
    """
    needle = f" {key} "
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except FileNotFoundError:
        return False  # no such process
    except OSError:
        return None  # another user's process
    for fd in fds:
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
                data = f.read().decode("ascii", "replace")
        except OSError:
            continue
        for line in data.splitlines():
            if line.startswith("lock:") and "FLOCK" in line and needle in line + " ":
                return True
    return False


def _live_holders(key: str) -> list[int]:
    """Every process with a descriptor on the locked description(s) of inode `key`."""
    found: list[int] = []
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    found.extend(pid for pid in sorted(pids) if _fd_locks(pid, key))
    return found


def _kernel_holder(pid: int, shared: bool, meta: dict[str, Any] | None) -> Holder:
    found = _from_meta(meta, pid) if not shared else None
    if found is not None:
        return found
    return Holder(
        pid=pid,
        hostname=os.uname().nodename,
        argv=_proc_cmdline(pid),
        shared=shared,
        start_time=_proc_start_time(pid),
    )


def lock_state(path: str) -> tuple[Holder | None, int]:
    """(holder or None if free, number of waiters) for the lock file at `path`.

    The holder is a live process that holds the lock: /proc/locks names the process that took
    it, which may have died since while a process that inherited the descriptor still holds
    it (`proclock run NAME -- cmd` killed with SIGKILL): then the live holders are found from
    /proc/PID/fdinfo. A dead process is never reported. For a shared lock held by several
    processes, one of them is reported, another process than the caller where there is one.
    """
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
    me = os.getpid()
    holders.sort(key=lambda lk: (lk.pid == me, lk.shared))  # others first, writers first
    key = _key(st)
    meta = read_metadata(path)
    for lk in holders:
        recorded = _from_meta(meta, lk.pid) if not lk.shared else None
        if (
            recorded is not None
            and recorded.pid is not None
            and recorded.start_time is not None
            and _proc_start_time(recorded.pid) == recorded.start_time
        ):
            return recorded, waiters  # the record names a live process the kernel agrees on
        if _fd_locks(lk.pid, key) is not False:
            return _kernel_holder(lk.pid, lk.shared, meta), waiters
    # Every process the kernel names is gone (or holds no descriptor on it any more): the
    # lock lives on in a process that inherited the descriptor.
    live = _live_holders(key)
    live.sort(key=lambda pid: pid == me)
    for pid in live:
        if meta is not None and meta.get("pid") == pid:
            found = _from_meta(meta, None)
            if found is not None and _proc_start_time(pid) == found.start_time:
                return found, waiters
    if live:
        return _kernel_holder(live[0], holders[0].shared, None), waiters
    return Holder(pid=None, shared=holders[0].shared), waiters


def holder_of(path: str) -> Holder | None:
    return lock_state(path)[0]
