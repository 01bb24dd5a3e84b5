"""Who holds a lock: the kernel's answer (/proc/locks), enriched with the metadata in the file.

Pid namespaces (containers). flock(2) excludes across pid namespaces (one kernel, one inode),
but a pid means something only in its namespace, so every record says where it was written:
the kernel's boot id and the pid namespace's inode (`/proc/self/ns/pid`). What /proc/locks
shows of a lock held by a process of another pid namespace, found by experiment (Linux 6.18,
unshare --pid --fork --mount-proc; /proc/locks translates fl_pid into the pid namespace of
the /proc mount that is read):

- seen from an ancestor namespace (the host looking into a container), the line names the
  holder by its pid in the reader's namespace: a real local process, whose /proc/PID/status
  `NSpid:` line ends with the pid the holder knows itself by (the one in its record);
- seen from a namespace where the holder has no pid (a container looking at the host or at
  a sibling container), the pid translates to 0 and the kernel leaves the line out
  altogether: the lock looks free in /proc/locks. So where a holder may be hidden from us
  (we are not in the initial pid namespace, or the file's record was written elsewhere), a
  lock that /proc/locks shows free is probed with a LOCK_NB attempt of our own, and a hidden
  holder is described from the record, never by a local pid.
"""

from __future__ import annotations

import errno
import os
import stat

from ._record import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Final, Literal

    Elsewhere = Literal["pid-namespace", "machine"]

_META_BLOCK = 256  # metadata is padded to a multiple of this: same size, one pwrite per acquisition
_READ_MAX = 65536
_SELF_CACHE_MAX = 1024
_PROC_LOCKS_FIELDS = 6
_COMMAND_WIDTH = 80
# PROC_PID_INIT_INO (include/linux/proc_ns.h): the inode of the initial pid namespace, where
# every process of this kernel has a pid and /proc/locks therefore hides no holder.
_INIT_PID_NS = 0xEFFFFFFC
PID_NAMESPACE: Final = "pid-namespace"  # Holder.elsewhere: another pid namespace, this kernel
MACHINE: Final = "machine"  # Holder.elsewhere: another kernel (another machine, over NFS)


class Holder(Frozen):
    """The process holding a lock; fields are None where they cannot be known.

    `pid` is always a pid of the caller's pid namespace, or None: a holder in another pid
    namespace (another container) or on another machine is never given a local pid that
    could name an unrelated local process. `elsewhere` says where such a holder runs
    (`"pid-namespace"`: another pid namespace of this kernel; `"machine"`: another machine,
    over NFS) and `own_pid` is its pid in its own namespace, as it recorded it (for a holder
    seen from outside its container, `pid` is its pid here and `own_pid` the one it sees).
    `acquired_at` is a Unix time; `start_time` is the process start time in clock ticks since
    boot (from /proc), which tells a reused pid apart; `shared` is True for a reader lock.
    """

    __slots__ = (  # noqa: RUF023  (field order is the positional order)
        "pid",
        "hostname",
        "argv",
        "acquired_at",
        "shared",
        "name",
        "start_time",
        "own_pid",
        "elsewhere",
    )
    pid: int | None
    hostname: str | None
    argv: tuple[str, ...] | None
    acquired_at: float | None
    shared: bool
    name: str | None
    start_time: int | None
    own_pid: int | None
    elsewhere: Elsewhere | None

    def __init__(  # noqa: PLR0917  (as the dataclass it replaces: positional in field order)
        self,
        pid: int | None,
        hostname: str | None = None,
        argv: tuple[str, ...] | None = None,
        acquired_at: float | None = None,
        shared: bool = False,  # noqa: FBT002
        name: str | None = None,
        start_time: int | None = None,
        own_pid: int | None = None,
        elsewhere: Elsewhere | None = None,
    ) -> None:
        self._init(
            pid=pid,
            hostname=hostname,
            argv=argv,
            acquired_at=acquired_at,
            shared=shared,
            name=name,
            start_time=start_time,
            own_pid=own_pid,
            elsewhere=elsewhere,
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
        """How every message and `proclock status` name the holder, on one line.

        `pid 1234 (backup.sh --full)`; a holder in a container seen from its host:
        `pid 5884 (backup.sh --full), pid 1 in its own pid namespace`; a holder we have no pid
        for: `pid 1 in another pid namespace, host web-1 (backup.sh --full)`.
        """
        if self.elsewhere is None:
            if self.pid is None:
                return "another process"
            return f"pid {self.pid} ({self.short_command()})"
        if self.pid is not None:
            if self.own_pid is None:
                return f"pid {self.pid} ({self.short_command()}), in another pid namespace"
            own = f"pid {self.own_pid} in its own pid namespace"
            return f"pid {self.pid} ({self.short_command()}), {own}"
        place = (
            "in another pid namespace" if self.elsewhere == PID_NAMESPACE else "on another machine"
        )
        if self.own_pid is None:
            return f"a process {place}"
        host = f", host {_escape(self.hostname)}" if self.hostname else ""
        return f"pid {self.own_pid} {place}{host} ({self.short_command()})"


_self_cache: dict[str, Any] = {}
_identity_cache: list[Any] = []  # [(pid, (boot id, pid namespace inode))]


def identity() -> tuple[str | None, int | None]:
    """(boot id, pid namespace inode) of this process: the places where its pids mean something.

    The boot id (/proc/sys/kernel/random/boot_id) is shared by every container of one kernel
    and differs across machines and reboots; inode numbers of namespaces are only unique
    within one kernel (the initial one is 0xEFFFFFFC everywhere). Cached per pid: a process
    never changes pid namespace (unshare(CLONE_NEWPID) and setns() move its children only),
    and a forked child has a pid of its own.
    """
    pid = os.getpid()
    if _identity_cache and _identity_cache[0][0] == pid:
        return _identity_cache[0][1]  # type: ignore[no-any-return]
    try:
        ns: int | None = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        ns = None  # no /proc (macOS), or no access to it
    boot: str | None = None
    try:
        fd = os.open("/proc/sys/kernel/random/boot_id", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        pass  # no /proc (macOS): records then say nothing of where they were written
    else:
        try:
            boot = os.read(fd, 64).decode("ascii", "replace").strip() or None
        finally:
            os.close(fd)
    found = (boot, ns)
    _identity_cache[:] = [(pid, found)]
    return found


def _where(meta: dict[str, Any]) -> str | None:
    """Where the record's writer runs, seen from us: "here", PID_NAMESPACE, MACHINE or None.

    None when it cannot be told: a record written before proclock recorded it, or an
    identity we cannot read.
    """
    boot, ns = meta.get("boot"), meta.get("pidns")
    my_boot, my_ns = identity()
    if not isinstance(boot, str) or my_boot is None:
        return None
    if boot != my_boot:
        return MACHINE
    if not isinstance(ns, int) or isinstance(ns, bool) or my_ns is None:
        return None
    return "here" if ns == my_ns else PID_NAMESPACE


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
    record: dict[str, Any] = {} if via is None else {"via": via}
    # A record starts with "v" (or "via"): that is how every version tells a proclock record
    # from another program's content (backends/flock.py, _is_record), so nothing goes first.
    record["v"] = 1
    boot, ns = identity()
    if boot is not None and ns is not None:
        # Where `pid` means something: readers in another pid namespace (another container)
        # or on another machine never take it for one of theirs.
        record.update(boot=boot, pidns=ns)
    head = json.dumps(
        {
            **record,
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
        data = os.pread(fd, _READ_MAX, 0)
    except OSError:
        # Over SMB (Linux 5.5+) flock(2) is a mandatory byte-range lock: "any IO on a locked
        # file will always fail with EACCES when done from a separate file descriptor"
        # (flock(2), CIFS details). The kernel's answer stands alone.
        return None
    else:
        return _parse(data)
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


def _probe(path: str) -> bool | None:
    """Ask the lock itself: None if free, else whether it is held shared.

    For holders /proc/locks cannot show (macOS has no /proc/locks; a holder in another pid
    namespace is left out of it). A fresh open file description tries LOCK_EX, then LOCK_SH,
    never waiting; each success is undone at once. A LOCK_NB attempt of someone else in that
    instant fails as if the lock were held: the price of knowing, paid only where the kernel's
    list may be incomplete.
    """
    from . import _flock  # noqa: PLC0415

    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        # Read-write where we may: over NFS, flock(2) is a whole-file POSIX lock and "in
        # order to place an exclusive lock, the file must be opened for writing" (flock(2),
        # NFS details). Nothing is ever written through this descriptor.
        fd = os.open(path, os.O_RDWR | flags)
    except PermissionError:
        try:
            fd = os.open(path, os.O_RDONLY | flags)
        except OSError:
            return None
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            if _flock.try_lock(fd, _flock.EX, path):
                _flock.unlock(fd)
                return None
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
            # Read-only over NFS: only LOCK_SH can ask, and it cannot tell readers from
            # nobody. Free it is, unless a writer refuses us.
            if _flock.try_lock(fd, _flock.SH, path):
                _flock.unlock(fd)
                return None
            return False
        if _flock.try_lock(fd, _flock.SH, path):
            _flock.unlock(fd)
            return True
        return False
    finally:
        os.close(fd)


def _ns_pids(pid: int) -> list[int] | None:
    """The `NSpid:` line of /proc/PID/status: the process's pid in each pid namespace.

    Ours first, then each namespace below ours down to its own (Linux 4.1+); one entry for a
    process of our own namespace.
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            data = f.read()
    except OSError:
        return None
    for line in data.splitlines():
        if line.startswith(b"NSpid:"):
            try:
                return [int(x) for x in line.split()[1:]]
            except ValueError:
                return None
    return None


def _fields(meta: dict[str, Any]) -> dict[str, Any]:
    argv = meta.get("argv")
    at = meta.get("at")
    host = meta.get("host")
    name = meta.get("name")
    return {
        "hostname": host if isinstance(host, str) else None,
        "argv": tuple(str(a) for a in argv) if isinstance(argv, list) else None,
        "acquired_at": float(at) if isinstance(at, (int, float)) else None,
        "name": name if isinstance(name, str) else None,
    }


def _record_pid(meta: dict[str, Any] | None) -> int | None:
    mpid = meta.get("pid") if meta is not None else None
    return mpid if isinstance(mpid, int) and not isinstance(mpid, bool) else None


def _nested(meta: dict[str, Any], pid: int) -> Holder | None:
    """The record's writer, if it is local process `pid` of a pid namespace below ours.

    The kernel names such a holder by its pid here; its record has the pid it sees itself.
    The last `NSpid` entry, its pid namespace and its start time must all agree.
    """
    mpid = _record_pid(meta)
    start = meta.get("start")
    nspids = _ns_pids(pid)
    if mpid is None or nspids is None or len(nspids) < 2 or nspids[-1] != mpid:  # noqa: PLR2004
        return None
    try:
        ns = os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        ns = None  # another user's process: NSpid and the start time have to do
    if ns is not None and ns != meta.get("pidns"):
        return None
    here = _proc_start_time(pid)
    if here is None or (isinstance(start, int) and start != here):
        return None
    return Holder(pid, start_time=here, own_pid=mpid, elsewhere=PID_NAMESPACE, **_fields(meta))


def _from_meta(meta: dict[str, Any] | None, pid: int | None) -> Holder | None:
    """The holder the record describes, if it is live process `pid` (None: any of ours)."""
    if meta is None:
        return None
    mpid = _record_pid(meta)
    if mpid is None:
        return None
    where = _where(meta)
    if where == PID_NAMESPACE:
        return _nested(meta, pid) if pid is not None else None
    if where == MACHINE:
        return None  # its pid is another kernel's: never one of ours
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
    return Holder(pid=mpid, start_time=start if isinstance(start, int) else None, **_fields(meta))


def _maybe_hidden(meta: dict[str, Any] | None) -> bool:
    """Whether /proc/locks may leave out a holder of this file: see the module docstring."""
    if identity()[1] not in (None, _INIT_PID_NS):
        return True  # a process of another pid namespace has no pid here: not listed
    # From the initial namespace every local holder is listed: only a record written
    # elsewhere (or by a version that did not say where) hints at a holder we cannot see.
    return meta is not None and _where(meta) != "here"


def _hidden_holder(meta: dict[str, Any] | None, shared: bool) -> Holder:
    """A holder the probe found and /proc/locks does not list: described from its record.

    The record was written by the last exclusive holder: it is the holder's unless that
    holder wrote none (flock(1)), so it is used only where it comes from elsewhere too. Its
    pid is the holder's own, never put in `pid`.
    """
    where = _where(meta) if meta is not None else None
    kind: Elsewhere
    if identity()[1] in (None, _INIT_PID_NS):
        # Every process of this kernel has a pid in the initial namespace: a holder hidden
        # from it is on another machine (NFS), or wrote its record there.
        kind, usable = MACHINE, where in (MACHINE, None)
    else:
        kind = MACHINE if where == MACHINE else PID_NAMESPACE
        usable = where != "here"  # a record of ours is stale: its writer would be listed
    mpid = _record_pid(meta)
    if shared or meta is None or mpid is None or not usable:
        return Holder(None, shared=shared, elsewhere=kind)
    start = meta.get("start")
    return Holder(
        None,
        start_time=start if isinstance(start, int) else None,
        own_pid=mpid,
        elsewhere=kind,
        **_fields(meta),
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
    nspids = _ns_pids(pid)
    if nspids is not None and len(nspids) > 1:
        # A process of a pid namespace below ours (a container): its hostname is its own
        # UTS namespace's, unknown here; its pid in its own namespace is the last NSpid.
        return Holder(
            pid=pid,
            argv=_proc_cmdline(pid),
            shared=shared,
            start_time=_proc_start_time(pid),
            own_pid=nspids[-1],
            elsewhere=PID_NAMESPACE,
        )
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
        shared = _probe(path)
        if shared is None:
            return None, 0
        meta = read_metadata(path)
        if meta is not None and _where(meta) in (PID_NAMESPACE, MACHINE):
            return _hidden_holder(meta, shared), 0
        return (None if shared else _from_meta(meta, None)) or Holder(None, shared=shared), 0
    holders = [lk for lk in locks if not lk.waiting]
    waiters = len(locks) - len(holders)
    if not holders:
        meta = read_metadata(path)
        if not _maybe_hidden(meta):
            # Whatever the file says, nobody holds it: a killed holder's record is history.
            return None, waiters
        # /proc/locks leaves out a holder that has no pid in our namespace (the kernel
        # translates its pid to 0 and skips the line): only the lock itself can tell.
        shared = _probe(path)
        if shared is None:
            return None, waiters
        # A holder that took it between our two looks is listed now: name it as any other.
        again = kernel_locks(st) or []
        holders = [lk for lk in again if not lk.waiting]
        if not holders:
            return _hidden_holder(meta, shared), waiters
        waiters = len(again) - len(holders)
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
        if meta is not None and meta.get("pid") == pid and _where(meta) in ("here", None):
            found = _from_meta(meta, None)
            if found is not None and _proc_start_time(pid) == found.start_time:
                return found, waiters
    if live:
        return _kernel_holder(live[0], holders[0].shared, None), waiters
    return Holder(pid=None, shared=holders[0].shared), waiters


def holder_of(path: str) -> Holder | None:
    return lock_state(path)[0]


def reported(pid: int | None, hostname: str | None, here: str, **fields: Any) -> Holder:
    """A holder as a lock server reports it: its pid names a process here only on this host.

    `here` is this machine's host name as the backend writes it. A holder on another host
    keeps its pid as `own_pid`, with `elsewhere="machine"`, as a record read over NFS does.
    """
    if pid is not None and hostname is not None and hostname != here:
        return Holder(None, hostname, own_pid=pid, elsewhere=MACHINE, **fields)
    return Holder(pid, hostname, **fields)
