"""The default backend: flock(2) on a lock file, one open file description per owner.

What this module guarantees:

- The kernel is the arbiter between every pair of owners. Each attempt, hold and wait uses an
  open file description of its own, and two descriptions conflict in flock(2) even within one
  process: threads and tasks exclude each other exactly as processes do, with no in-process
  queue of waiters that could strand one.
- A description is used (locked, unlocked, written, truncated, closed) only by the process that
  opened it, and only after checking that its number still refers to it (`_flock` explains how).
  A number that may have been reused is forgotten, never touched.
- A description has one user at a time (an attempt, a hold or a parked wait), its `owner`
  token; every step checks the token, so an attempt interrupted after it handed a description
  back can never unlock it under its next user. Each attempt records what it sets in motion
  (the description it claimed or opened, the parked wait it started or adopted) in an
  `_Attempt` as it happens, inside the section that makes it: an exception at any point
  (Ctrl-C, cancellation) is undone from that record, and nothing stays locked for nobody.
- An idle description holds nothing. Idle ones are pooled per file for reuse by any owner of this
  process: at most `IDLE_PER_FILE` per file and `IDLE_MAX` in all (the least recently used file's
  are closed first). A forked child closes every description it inherited, without unlocking
  (the parent's locks live on), except one handed to it with `transfer_on_fork()`.
- After every acquisition the file is checked to still be the one at the path (a cleaner or
  `proclock gc` may have unlinked or replaced it while we waited: a lock on an orphaned inode
  excludes nobody). `fstat` of the locked description gives `st_nlink` and `st_ctime_ns`;
  unlink, rename and link all change the inode's ctime, so the path is looked up again
  (`lstat`) only when the ctime moved since the last lookup that matched.
- The holder record is written only into a file that is empty or holds a proclock record (a
  file proclock creates starts empty); a file with other content is never written, truncated or
  chmod-ed. It is rewritten only when the file does not hold this description's last record, or
  that record is `RECORD_REFRESH` seconds old: `acquired_at` has that resolution.
- A wait that needs a deadline, or must not block an event loop, is done by a helper thread
  blocked in flock(2) on a description of its own (a "parked wait"). A waiter that gives up leaves
  its parked wait for the next waiter of the same file and mode to adopt; a parked wait that is
  granted the lock when nobody wants it unlocks at once. At most `PARKED_MAX` helpers are blocked
  in the kernel per process; past that, a timed or async wait polls with a bounded back-off
  (`POLL_FIRST` doubling to `POLL_MAX`) instead of leaving one more thread in the kernel.
"""

from __future__ import annotations

import errno
import os
import threading
import time

from .. import _core, _dirs, _flock, _holder, _names
from .._errors import ProcLockError, UnsafeLockPathError
from ._base import FD, FREED_ON_EXIT, LOCAL, SHARED, WAIT_ANY, Handle

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable, Iterator
    from typing import Any, TypeVar

    from .._holder import Holder
    from .._spec import LockSpec

    Located = tuple[str, str | None, str]
    _T = TypeVar("_T")

IDLE_PER_FILE = 4  # idle descriptions kept per lock file
IDLE_MAX = 256  # idle descriptions kept in all (and at most 1/8 of RLIMIT_NOFILE's soft limit)
PARKED_MAX = 64  # helper threads blocked in flock(2) at once, per process
HELPERS_IDLE = 4  # helper threads kept for reuse when none is needed
RECORD_REFRESH = 1.0  # seconds: the resolution of a record's acquired_at
POLL_FIRST = 0.001  # seconds: the first pause of the back-off poll (past PARKED_MAX)
POLL_MAX = 0.05  # seconds: its longest pause
_REPLACED_MAX = 64  # times in a row the file may be replaced under us before we give up

_fstat = os.fstat
_flock_call = _flock.flock
_lseek = _flock.lseek
_SEEK_CUR = _flock.SEEK_CUR
_NB = _flock.NB
_UN = _flock.UN
_EX, _SH = _flock.EX, _flock.SH
_time = time.time
_clock = time.monotonic

# Description states.
IDLE = 0  # open, holds nothing, free for any owner to claim
BUSY = 1  # claimed: `owner` is the token of its one user
CLOSED = 2  # closed, or forgotten because its number stopped being ours
_STATE_NAMES = ("IDLE", "BUSY", "CLOSED")


class _Desc:
    """One open file description of a lock file, opened by this process."""

    __slots__ = (
        "ctime",
        "dev",
        "fd",
        "file",
        "gen",
        "ino",
        "magic",
        "owner",
        "rec",
        "rec_at",
        "rec_mtime",
        "state",
    )

    def __init__(
        self, fd: int, st: os.stat_result, magic: int | None, file: _File, owner: object
    ) -> None:
        self.fd, self.magic, self.file, self.owner = fd, magic, file, owner
        self.dev, self.ino = st.st_dev, st.st_ino
        self.gen = _core.generation
        self.state = BUSY
        self.ctime = -1  # st_ctime_ns when the path last matched this inode
        self.rec = b""  # the record this description last wrote
        self.rec_at = 0.0  # when it wrote it
        self.rec_mtime = -1  # st_mtime_ns once the file is known to hold `rec`

    def ours(self) -> bool:
        """True if the number still refers to this description, in the process that opened it."""
        if self.gen != _core.generation or self.state == CLOSED:
            return False
        if self.magic is not None:
            try:
                return _lseek(self.fd, 0, _SEEK_CUR) == self.magic
            except OSError:
                return False
        return _flock.same_description(self.fd, None, self.dev, self.ino)

    def __repr__(self) -> str:
        return f"<_Desc fd={self.fd} {_STATE_NAMES[self.state]} {self.file.path!r}>"


class _File:
    """Every description of one lock file that this process has open."""

    __slots__ = ("descs", "idle", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        self.descs: list[_Desc] = []
        self.idle = 0  # how many of them are IDLE


class _Attempt:
    """What a parked wait's waiter has set in motion, recorded as it happens.

    Like a Handle (the record of an attempt that does not park), it is the owner token of the
    description it claimed or opened (`private`) until a parked wait takes that over.
    """

    __slots__ = ("parked", "private")

    def __init__(self) -> None:
        self.private: _Desc | None = None
        self.parked: _Parked | None = None


Owner = Handle | _Attempt  # what records a claimed or opened description in `private`


# Opening and closing descriptions, and the file table, change under _open_lock, which the fork
# handler holds across fork() so that a child never inherits a descriptor we do not know of. It
# is reentrant: a signal handler or finalizer may open a lock file while this thread opens one.
#
# Claiming a description and giving it back are state changes in sections marked "atomic": they
# make no call (no method, no allocation of a tracked object), and CPython switches threads and
# runs signal handlers and finalizers only at calls and backward jumps, so nothing can run
# inside them (proclock refuses to import where the GIL is disabled: see _core). A lock there
# would cost a fifth of an uncontended acquisition and guard nothing the GIL does not.
_open_lock = threading.RLock()
_files: dict[str, _File] = {}
_idle_total = 0
_idle_limit: int | None = None  # IDLE_MAX bounded by RLIMIT_NOFILE, read once when first needed


def _claim(path: str, attempt: Owner) -> _Desc | None:
    """An idle description of `path`, now BUSY for `attempt` (recorded in it); None if none."""
    global _idle_total  # noqa: PLW0603
    file = _files.get(path)
    if file is None or not file.idle:
        return None
    for desc in file.descs:
        if desc.state == IDLE:  # atomic: from this test to the return
            desc.state = BUSY
            desc.owner = attempt
            attempt.private = desc
            file.idle -= 1
            _idle_total -= 1
            return desc
    return None


def _open(
    path: str,
    mode: int,
    located: Located | None,
    owner: Owner | _Parked,
    spec: LockSpec | None = None,
) -> _Desc:
    """A new description of `path`, BUSY for `owner` (and recorded in it); vetted first."""
    if located is not None:
        _, directory, kind = located
        try:
            if directory is None:
                _dirs.vet_parent(path)
            else:
                _dirs.vet(directory, kind)
        except OSError as exc:
            raise _explained(exc, spec, located) from None
    with _open_lock:
        try:
            try:
                fd, st, _created = _flock.open_lock_file(path, mode)
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                _evict(0)  # out of descriptors: our idle ones go first, then try once more
                fd, st, _created = _flock.open_lock_file(path, mode)
        except OSError as exc:
            raise _explained(exc, spec, located) from None
        try:
            magic = _flock.mark(fd)
            file = _files.get(path)
            if file is None:
                file = _files[path] = _File(path)
            desc = _Desc(fd, st, magic, file, owner)
            file.descs.append(desc)
        except BaseException:
            os.close(fd)
            raise
        owner.private = desc
    return desc


def vetted_path(spec: LockSpec) -> str:
    """The lock file of `spec`, its directory vetted (the default one created), no file opened.

    Raises:
        UnsafeLockPathError: the directory cannot be used safely.
        OSError: it cannot be used at all (the message names the lock, the directory, where
            the directory came from and what to do).
    """
    located = FLOCK.locate(spec)
    path, directory, kind = located
    if directory is not None:
        try:
            _dirs.vet(directory, kind)
        except OSError as exc:
            raise _explained(exc, spec, located) from None
    return path


def _explained(exc: OSError, spec: LockSpec | None, located: Located | None) -> OSError:
    """The same OSError (type, errno, file), saying which lock, which directory and its source.

    A bare "[Errno 13] Permission denied" names neither the lock nor what to change.
    UnsafeLockPathError says all that already; without a spec (a parked wait reopening a
    replaced file) the error is passed on as it is.
    """
    if spec is None or isinstance(exc, UnsafeLockPathError) or exc.errno is None:
        return exc
    if spec.path is not None or located is None or located[1] is None:
        where = f"the directory of its lock file (path={spec.path!r})"
        remedy = "choose another path= or make that directory writable"
    else:
        directory = located[1]
        if spec.lock_dir is not None:
            source = "lock_dir="
        elif located[2] == _dirs.NAMED:
            source = "$PROCLOCK_DIR"
        else:
            source = "the default"
        where = f"its lock directory {directory} (from {source})"
        remedy = (
            "choose another with lock_dir= or $PROCLOCK_DIR (proclock --dir), "
            "or make that directory writable"
        )
    message = f"{exc.strerror}: lock {spec.label!r} cannot use {where}; {remedy}"
    return type(exc)(exc.errno, message, exc.filename)


def _close(desc: _Desc, owner: object) -> None:
    """Close a description `owner` uses (closing releases its lock, if any; no LOCK_UN first).

    A number that is no longer ours is forgotten, not closed.
    """
    with _open_lock:
        if desc.state != BUSY or desc.owner is not owner:
            return
        mine = desc.ours()
        desc.state = CLOSED
        desc.owner = None
        file = desc.file
        if desc in file.descs:
            file.descs.remove(desc)
        if not file.descs and _files.get(file.path) is file:
            del _files[file.path]
        if mine:
            os.close(desc.fd)


def _put_back(desc: _Desc, owner: object) -> None:
    """Pool a description `owner` uses that holds nothing, or close it past the bounds.

    The caller has just used the number (so it knows it is still this description's).
    """
    global _idle_total  # noqa: PLW0603
    file = desc.file
    if file.idle >= IDLE_PER_FILE or _files.get(file.path) is not file:
        _close(desc, owner)
        return
    # atomic
    if desc.state != BUSY or desc.owner is not owner:
        return
    desc.owner = None
    desc.state = IDLE
    file.idle += 1
    _idle_total += 1
    limit = _idle_limit if _idle_limit is not None else _idle_cap()
    if _idle_total > limit:
        _evict(limit)


def _evict(keep: int | None = None) -> None:
    """Close idle descriptions, the longest-known files' first, until `keep` are left.

    `keep` defaults to the bound: IDLE_MAX, and never more than an eighth of the soft
    RLIMIT_NOFILE (a process allowed 256 descriptors keeps at most 32 idle ones).
    """
    global _idle_total  # noqa: PLW0603
    if keep is None:
        keep = _idle_limit if _idle_limit is not None else _idle_cap()
    for file in list(_files.values()):
        if _idle_total <= keep:
            return
        for desc in list(file.descs):
            token = _Attempt()
            # atomic
            if desc.state != IDLE:
                continue
            desc.state = BUSY
            desc.owner = token
            file.idle -= 1
            _idle_total -= 1
            _close(desc, token)


def _idle_cap() -> int:
    """IDLE_MAX, but never more than an eighth of the soft RLIMIT_NOFILE (read once)."""
    global _idle_limit  # noqa: PLW0603
    import resource  # noqa: PLC0415  (a C module: cheap; read once)

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = IDLE_MAX if soft == resource.RLIM_INFINITY else max(1, min(IDLE_MAX, soft // 8))
    _idle_limit = cap
    return cap


def _discard(desc: _Desc | None, owner: object) -> None:
    """Give back a description `owner` uses that may hold the lock: unlock, then pool it.

    Does nothing if `owner` no longer uses it (it was given back already).
    """
    if desc is None or desc.state != BUSY or desc.owner is not owner:
        return
    if not desc.ours():
        _close(desc, owner)  # forgotten: whatever it held went with its number
        return
    try:
        if desc.owner is owner:  # checked again just before the syscall (no call between)
            _flock_call(desc.fd, _flock.UN)
    except OSError:
        _close(desc, owner)  # closing releases whatever this description held
        return
    _put_back(desc, owner)


def _verify(desc: _Desc, path: str, st: os.stat_result | None = None) -> os.stat_result | None:
    """After the lock was granted: fstat of the description if the file is still at `path`.

    The caller checked, just before flock(2), that the number is this description's; `st` is
    the fstat it made since, if any (not made twice).
    """
    if st is None:
        st = _fstat(desc.fd)
    if st.st_nlink and st.st_ctime_ns == desc.ctime and st.st_ino == desc.ino:
        return st  # nothing changed the inode's links or names since the path last matched
    if _flock.still_at_path(desc.dev, desc.ino, path) is None:
        return None
    desc.ctime = st.st_ctime_ns
    return st


def _is_record(head: bytes) -> bool:
    """The start of a proclock holder record (any version this module writes or wrote)."""
    return head.startswith((b'{"v":', b'{"via":'))


def _write_record(desc: _Desc, st: os.stat_result, label: str, via: int | None) -> None:
    """Write this process's holder record into the exclusively locked file, if allowed."""
    fd = desc.fd
    rec = desc.rec
    now = _time()
    if st.st_mtime_ns == desc.rec_mtime and st.st_size == len(rec):
        if now - desc.rec_at < RECORD_REFRESH:
            return  # the file holds our record, fresh enough
    elif st.st_size:
        # Written since our last look: by us (read it back once), by another holder, or by a
        # program that is not proclock (then it is never written: the kernel names the holder).
        head = os.pread(fd, max(len(rec), 16), 0)
        if rec and head == rec:
            desc.rec_mtime = st.st_mtime_ns
            if now - desc.rec_at < RECORD_REFRESH:
                return
        elif not _is_record(head):
            return
    prefix, suffix = _holder.metadata_parts(label, via)
    record = prefix + b"%.6f" % now + suffix
    try:
        if os.pwrite(fd, record, 0) != len(record):
            raise OSError(errno.ENOSPC, "No space left on device (short write)")  # noqa: TRY301
        if st.st_size > len(record):
            os.ftruncate(fd, len(record))  # another holder's longer record: cut to ours
    except OSError as exc:  # ENOSPC, EIO, EFBIG: surface it (the caller gives the lock back)
        raise _flock.with_path(exc, desc.file.path) from None
    desc.rec, desc.rec_at, desc.rec_mtime = record, now, -1


def _granted(
    desc: _Desc,
    owner: Handle | _Parked,
    spec: LockSpec,
    path: str,
    st: os.stat_result | None = None,
) -> Handle | None:
    """After the kernel granted `desc` to `owner`: verify, write the record, the handle.

    `owner` is the attempt's own Handle, or the parked wait that got the grant (the handle is
    then made here and becomes the description's owner as the very last step). None if the
    file was replaced meanwhile (the description is then dropped). `st` is the fstat a
    parked wait's helper took when it verified the grant itself.
    """
    if st is None:
        st = _verify(desc, path)
    if st is None:
        _unlock_and_close(desc, owner)
        return None
    if not spec.shared:
        _write_record(desc, st, spec.label, None)
    if isinstance(owner, Handle):
        owner._fd = desc.fd
        return owner
    handle = Handle(path, fd=desc.fd, shared=spec.shared, private=desc)
    desc.owner = handle
    return handle


def _unlock_and_close(desc: _Desc, owner: object) -> None:
    if desc.owner is owner and desc.ours():
        _flock_call(desc.fd, _flock.UN)
    _close(desc, owner)


def _own_grant_passing(desc: _Desc, op: int, path: str) -> bool:
    """LOCK_NB failed while a parked wait of ours is in the kernel on the same file.

    When the holder releases, an abandoned parked wait may be granted the lock for nobody and
    hold it for the few microseconds it takes to unlock it: a LOCK_NB try of this process must
    not report the lock busy because of that. Let the helper run (it needs the GIL) and try
    again, as long as one of our parked waits on the file has been granted; if they are all
    still blocked behind a real holder, the lock is busy indeed.
    """
    for pause in _OWN_GRANT_PAUSES:
        time.sleep(pause)
        try:
            _flock_call(desc.fd, op)
        except BlockingIOError:
            if not any(p.granted or _holds_in_kernel(p) for p in _in_kernel_on.get(path, ())):
                return False
            continue
        return True
    return False


# Growing pauses (26 ms in all): on a loaded machine the helper granted the lock may wait
# milliseconds for a CPU before it can give the lock back.
_OWN_GRANT_PAUSES = (0.0, 0.0, 0.0001, 0.001, 0.005, 0.02)


def _holds_in_kernel(parked: _Parked) -> bool:
    """The kernel granted `parked` its lock, though its helper has not run since to say so.

    flock(2) returned in the helper thread, which then waits for the GIL before it sets
    `granted`: /proc/self/fdinfo lists the locks a description holds (granted ones only, not
    a blocked request). Without /proc (macOS), False: the caller falls back to `granted`.
    A number reused meanwhile can only make this True for a moment: the caller retries.
    """
    desc = parked.private
    if desc is None:
        return False
    try:
        with open(f"/proc/self/fdinfo/{desc.fd}", "rb") as info:
            return b"\nlock:" in info.read()
    except OSError:
        return False


def _replaced_too_often(spec: LockSpec, path: str) -> ProcLockError:
    return ProcLockError(
        f"{spec.label!r} ({path}): the lock file keeps being replaced while it is locked; "
        "is something deleting files in the lock directory?"
    )


def _location(spec: LockSpec) -> str:
    """The lock file of `spec` now (the environment is read each time)."""
    path = spec.path
    if path is not None:
        return path
    where = spec._where
    if where is not None:
        if spec.lock_dir is not None:
            return where[1][0]  # type: ignore[no-any-return]
        env = _ENV
        if env is not None and where[0] == (env.get(b"PROCLOCK_DIR"), env.get(b"XDG_RUNTIME_DIR")):
            return where[1][0]  # type: ignore[no-any-return]
    return FlockBackend.locate(spec)[0]


_ENV = _dirs.ENV_DATA
_NO_WAIT: Any = object()  # _attempt's deadline for one LOCK_NB try


def _attempt(spec: LockSpec, deadline: float | None = _NO_WAIT) -> Handle | None:  # noqa: PLR0915  (inlined on purpose: a call costs ~0.1 µs)
    """try_acquire(spec) and acquire(spec, deadline), in one function: the hot path.

    One LOCK_NB try (no deadline given), a blocking flock(2) in this thread (deadline None),
    or a parked wait (a deadline). The Handle is made first: it is the attempt's record
    (`private`: the description it claimed or opened) and the description's owner token, so
    an interruption anywhere gives back exactly what this attempt holds. The common case (an
    idle description of ours, the file unchanged, our record fresh) is written out inline:
    lseek, flock(2), fstat, and no other call but the Handle's.
    """
    global _idle_total  # noqa: PLW0603
    if deadline is not _NO_WAIT and deadline is not None:
        return _wait_parked(spec, FLOCK.locate(spec), deadline)
    # The location, as _location() gives it (inlined: this runs at every acquisition).
    path = spec.path
    if path is None:
        where = spec._where
        env = _ENV
        if where is not None and (
            spec.lock_dir is not None
            or (
                env is not None
                and where[0] == (env.get(b"PROCLOCK_DIR"), env.get(b"XDG_RUNTIME_DIR"))
            )
        ):
            path = where[1][0]
        else:
            path = FlockBackend.locate(spec)[0]
    shared = spec.shared
    op = _SH if shared else _EX
    if deadline is _NO_WAIT:
        op |= _NB
    handle = Handle(path, None, None, shared)
    try:
        for _ in range(_REPLACED_MAX):
            # An idle description of ours (as _claim() does, inlined), else a new one.
            desc = None
            file = _files.get(path)
            if file is not None and file.idle:
                for idle in file.descs:
                    if idle.state == IDLE:  # atomic: from this test to the break
                        idle.state = BUSY
                        idle.owner = handle
                        handle.private = desc = idle
                        file.idle -= 1
                        _idle_total -= 1
                        break
            if desc is None:
                desc = _open(path, spec.mode, FLOCK.locate(spec), handle, spec)
            try:  # the number must still be this description's (see _flock)
                magic = desc.magic
                mine = desc.gen == _core.generation and (
                    _lseek(desc.fd, 0, _SEEK_CUR) == magic if magic is not None else desc.ours()
                )
            except OSError:
                mine = False
            if not mine:
                _close(desc, handle)  # forgotten: its number is someone else's now
                continue
            try:
                if desc.owner is handle:
                    _flock_call(desc.fd, op)
            except BlockingIOError:
                if path in _in_kernel_on and _own_grant_passing(desc, op, path):
                    pass  # our own parked wait held it for an instant, for nobody: ours now
                else:
                    _put_back(desc, handle)
                    return None
            except OSError as exc:
                raise _flock.with_path(exc, path) from None
            st: os.stat_result | None = _fstat(desc.fd)
            if not (
                st is not None
                and st.st_nlink
                and st.st_ctime_ns == desc.ctime
                and st.st_ino == desc.ino
            ):
                st = _verify(desc, path, st)  # something changed the inode: look up the path
            if st is None:
                _unlock_and_close(desc, handle)
                continue
            if not shared and not (
                st.st_mtime_ns == desc.rec_mtime
                and st.st_size == len(desc.rec)
                and _time() - desc.rec_at < RECORD_REFRESH
            ):
                _write_record(desc, st, spec.label, None)
            handle._fd = desc.fd
            return handle
    except BaseException:
        _discard(handle.private, handle)
        raise
    raise _replaced_too_often(spec, path)


class FlockBackend:
    """flock(2) on `lock_path(name)` (or `path=`): the default backend."""

    __slots__ = ()
    capabilities = frozenset((SHARED, FD, FREED_ON_EXIT, LOCAL, WAIT_ANY))  # WAIT_ANY: _any.py

    def __repr__(self) -> str:
        return "flock"

    # -- where -----------------------------------------------------------------------------

    @staticmethod
    def locate(spec: LockSpec) -> Located:
        """(file path, directory to vet or None for path=, directory kind), resolved now.

        The path's directory is the real one (symlinks resolved), so that two spellings of one
        directory give one location: re-entry is counted instead of waiting for itself.
        """
        if spec.path is not None:
            return spec.path, None, _dirs.NAMED
        key = None if spec.lock_dir is not None else _dirs.environment_key()
        where = spec._where
        if where is not None and where[0] == key:
            return where[1]  # type: ignore[no-any-return]
        name = spec.name
        assert name is not None  # noqa: S101
        directory, kind = _dirs.resolve(spec.lock_dir)
        real = os.path.join(os.path.realpath(directory), _names.file_name(name))
        located = (real, directory, kind)
        object.__setattr__(spec, "_where", (key, located))
        return located

    location = staticmethod(_location)

    def holder(self, spec: LockSpec) -> Holder | None:
        """Who holds the lock file now, from the kernel and the file's record."""
        return _holder.holder_of(self.locate(spec)[0])

    # -- acquire ---------------------------------------------------------------------------

    # One LOCK_NB attempt on a description of our own: a handle, or None if busy.
    try_acquire = staticmethod(_attempt)

    # Wait for the lock until `deadline` (monotonic; None: forever); None if it passed.
    # Without a deadline the calling thread blocks in flock(2) itself: the kernel hands the
    # lock straight to it at release, and Ctrl-C interrupts it in the main thread. With one, a
    # parked helper waits in the kernel while this thread waits for its word.
    acquire = staticmethod(_attempt)

    async def acquire_async(self, spec: LockSpec, deadline: float | None) -> Handle | None:
        """`acquire` for coroutines: a parked helper waits, the event loop never blocks."""
        return await _wait_parked_async(spec, self.locate(spec), deadline)

    # -- release ---------------------------------------------------------------------------

    @staticmethod
    def release(handle: Handle) -> None:
        """Unlock and pool the handle's description. Idempotent: a second call does nothing.

        Nothing is touched in a forked child (which holds nothing of its parent's), nor when
        the number is no longer this description's.
        """
        global _idle_total  # noqa: PLW0603
        desc: _Desc = handle.private
        if desc.owner is not handle or desc.state != BUSY:
            return
        try:  # the number must still be this description's (see _flock)
            magic = desc.magic
            mine = desc.gen == _core.generation and (
                _lseek(desc.fd, 0, _SEEK_CUR) == magic if magic is not None else desc.ours()
            )
        except OSError:
            mine = False
        if not mine:
            _close(desc, handle)  # forgotten: whatever it held went with its number
            return
        try:
            if desc.owner is handle:  # checked again just before the syscall
                _flock_call(desc.fd, _UN)
        except OSError:
            _close(desc, handle)
            raise
        # Back to the pool (as _put_back() does, inlined: this runs at every release).
        file = desc.file
        if file.idle >= IDLE_PER_FILE or _files.get(file.path) is not file:
            _close(desc, handle)
            return
        # atomic
        if desc.owner is handle:
            desc.owner = None
            desc.state = IDLE
            file.idle += 1
            _idle_total += 1
        if _idle_total > (_idle_limit if _idle_limit is not None else _idle_cap()):
            _evict()

    # -- fork (called by the core's fork handler) -------------------------------------------

    @staticmethod
    def fork_locks() -> tuple[threading.RLock, threading.RLock]:
        """The locks to hold across fork(): the file table's and the parked waits'."""
        return _open_lock, _park_lock

    @staticmethod
    def after_fork_in_child(kept: list[Handle]) -> None:
        """Close every inherited description but those of `kept` (transferred holds)."""
        global _open_lock, _idle_total  # noqa: PLW0603
        _open_lock = threading.RLock()
        _parking_after_fork()
        keep = {id(h.private) for h in kept}
        files = list(_files.values())
        _files.clear()
        _idle_total = 0
        for file in files:
            for desc in file.descs:
                if id(desc) in keep:
                    desc.gen = _core.generation  # now this process's own
                    new = _files.get(file.path)
                    if new is None:
                        new = _files[file.path] = _File(file.path)
                    desc.file = new
                    new.descs.append(desc)
                    continue
                state, desc.state = desc.state, CLOSED
                # Close, never unlock: the description is shared with the parent, and LOCK_UN
                # here would release the parent's lock. Closing means that a parent killed with
                # SIGKILL does not leave its lock alive in this child.
                if state != CLOSED and _flock.same_description(
                    desc.fd, desc.magic, desc.dev, desc.ino
                ):
                    os.close(desc.fd)

    @staticmethod
    def handed_over(handle: Handle) -> None:
        """In the parent, after a fork took this hold: close our copy without unlocking."""
        _close(handle.private, handle)  # the child's copy keeps the lock alive

    @staticmethod
    def rewrite_record(handle: Handle, label: str, via: int) -> None:
        """In a child that was handed the hold: name this process in the record."""
        desc: _Desc = handle.private
        if handle.shared or not desc.ours():
            return
        desc.rec_mtime = -2  # never equal: the file holds the parent's record
        _write_record(desc, _fstat(desc.fd), label, via)


FLOCK = FlockBackend()


# -- parked waits -------------------------------------------------------------------------------
#
# A parked wait is a helper thread blocked in flock(2) on a description of its own, on behalf of
# one waiter at a time. Its states, changed under its own mutex in sections that make no call:
#
#   WAITING    a waiter wants the grant (it is woken through `notify`)
#   ABANDONED  its waiter gave up; the next waiter of the same file and mode may adopt it
#   CANCELLED  its waiter gave up before a helper picked it up: the waiter gave its
#              description back, and the helper that picks it up does nothing
#   GRANTED    the kernel granted it and the waiter was told; not yet taken
#   TAKEN      the waiter took the description: it is the waiter's now
#   FAILED     the wait failed (`error`): the waiter raises it
#   DONE       granted with nobody to give it to: unlocked and given back at once
#
# `picked` is set, under the mutex, by the helper that picks the wait up: until then the waiter
# may cancel it and give its description back itself.

WAITING, ABANDONED, CANCELLED, GRANTED, TAKEN, FAILED, DONE = range(7)


class _Parked:
    __slots__ = (
        "error",
        "granted",
        "key",
        "loop",
        "mode",
        "mutex",
        "notify",
        "picked",
        "private",
        "st",
        "state",
        "taken",
    )

    def __init__(
        self, key: tuple[str, int], mode: int, notify: Callable[[], None], loop: Any
    ) -> None:
        self.key, self.mode, self.loop = key, mode, loop  # loop: an async waiter's, else None
        self.private: _Desc | None = None  # its description (as a Handle's `private`)
        self.mutex = threading.Lock()
        self.state = WAITING
        self.notify = notify
        self.error: BaseException | None = None
        self.picked = False
        self.granted = False  # flock(2) returned: the kernel granted it (verified or not)
        self.st: os.stat_result | None = None  # fstat of the verified grant
        # An async waiter's grant: released when the task takes it (see _watch_grant).
        self.taken: threading.Lock | None = None


_park_lock = threading.RLock()
_parked: dict[tuple[str, int], list[_Parked]] = {}  # abandoned waits, for adoption
_in_kernel = 0  # picked-up parked waits, helpers blocked in flock(2)
_in_kernel_on: dict[str, list[_Parked]] = {}  # the same, per lock file
_jobs: Any = None  # a queue.SimpleQueue, made at the first parked wait (import time)
_helpers_idle = 0  # helper threads blocked on _jobs with no job promised to them


def parked_waits() -> int:
    """How many helper threads are blocked in flock(2) now (for tests and the bench)."""
    return _in_kernel


def _adopt(key: tuple[str, int], notify: Callable[[], None], attempt: _Attempt, loop: Any) -> bool:
    """Adopt an abandoned parked wait of the same file and mode (recorded in `attempt`)."""
    with _park_lock:
        waits = _parked.get(key)
        while waits:
            parked = waits.pop()
            if not waits:
                _parked.pop(key, None)
            with parked.mutex:
                if parked.state == ABANDONED:
                    parked.state = WAITING
                    parked.notify = notify
                    parked.loop = loop
                    attempt.parked = parked
                    return True
    return False


def _park(parked: _Parked) -> None:
    """Leave an abandoned wait where the next waiter of its file and mode finds it."""
    with _park_lock:
        _parked.setdefault(parked.key, []).append(parked)


def _unpark(parked: _Parked) -> None:
    """The parked wait left the kernel (and, if it was granted for nobody, unlocked)."""
    global _in_kernel  # noqa: PLW0603
    path = parked.key[0]
    with _park_lock:
        _in_kernel -= 1
        on = _in_kernel_on.get(path)
        if on is not None and parked in on:
            on.remove(parked)
            if not on:
                _in_kernel_on.pop(path, None)
        waits = _parked.get(parked.key)
        if waits is not None and parked in waits:
            waits.remove(parked)
            if not waits:
                _parked.pop(parked.key, None)


def _dispatch(parked: _Parked) -> None:
    """Give the parked wait to an idle helper thread, or to a new one."""
    global _helpers_idle, _jobs  # noqa: PLW0603
    if _jobs is None:
        from _queue import SimpleQueue  # noqa: PLC0415  (queue.SimpleQueue, without queue.py)

        # Made once, under the lock: two threads parking their first waits at once would each
        # make a queue (the import lets go of the GIL), and a job put into the one overwritten
        # would never reach a helper: its waiter would sleep to its deadline, or forever.
        with _park_lock:
            if _jobs is None:
                _jobs = SimpleQueue()
    with _park_lock:
        spare = _helpers_idle > 0
        if spare:
            _helpers_idle -= 1  # promised to this job
    _jobs.put(parked)
    if not spare:
        threading.Thread(target=_helper, name="proclock-helper", daemon=True).start()


def _helper() -> None:
    """A helper thread: serve parked waits one after another; idle, hold no descriptor."""
    global _helpers_idle  # noqa: PLW0603
    while True:
        wake = _serve(_jobs.get())
        with _park_lock:
            stay = _helpers_idle < HELPERS_IDLE
            if stay:
                _helpers_idle += 1
        if wake is not None:
            # The waiter is woken last, right before this thread blocks again (in _jobs.get()
            # or by ending) and so lets go of the GIL: woken earlier, it would wait for the GIL
            # after its own wake-up, two thread switches in a row on the handoff's path.
            wake()
        if not stay:
            return


def _serve(parked: _Parked) -> Callable[[], None] | None:
    """Block in flock(2) until granted, then hand the description over or unlock it.

    Returns the waking of a waiting thread, for the caller to do last (see _helper).
    """
    global _in_kernel  # noqa: PLW0603
    with parked.mutex:
        if parked.state == CANCELLED:
            return None  # its waiter gave up before we got here, and gave the description back
        parked.picked = True
    with _park_lock:
        _in_kernel += 1
        _in_kernel_on.setdefault(parked.key[0], []).append(parked)
    try:
        _wait_in_kernel(parked)
    except BaseException as exc:  # noqa: BLE001  (handed to the waiter, who raises it)
        with parked.mutex:
            previous, parked.state, parked.error = parked.state, FAILED, exc
            notify = parked.notify
        try:
            _discard(parked.private, parked)
        finally:
            _unpark(parked)
        if previous == WAITING:
            if parked.loop is None:
                return notify
            try:  # noqa: SIM105  (contextlib costs import time)
                notify()
            except RuntimeError:  # a closed event loop: nobody waits there
                pass
        return None
    return _hand_over(parked)


def _wait_in_kernel(parked: _Parked) -> None:
    """flock(2) on the parked wait's description until granted on the file at the path."""
    path, op = parked.key
    for _ in range(_REPLACED_MAX):
        desc = parked.private
        if desc is not None and desc.ours():
            try:
                if desc.owner is parked:
                    _flock_call(desc.fd, op)
            except OSError as exc:
                raise _flock.with_path(exc, path) from None
            parked.granted = True
            if desc.ours():
                parked.st = _verify(desc, path)
                if parked.st is not None:
                    return
            parked.granted = False
            _unlock_and_close(desc, parked)  # replaced while we waited: wait for the new one
        elif desc is not None:
            _close(desc, parked)  # its number was closed under us
        _open(path, parked.mode, None, parked)
    msg = f"{path}: the lock file keeps being replaced while it is locked"
    raise ProcLockError(msg)


def _hand_over(parked: _Parked) -> Callable[[], None] | None:
    """Granted: tell the waiter (a thread: returned, for _helper to do last), or unlock."""
    loop = parked.loop
    taken = threading.Lock() if loop is not None else None
    if taken is not None:
        taken.acquire()
    with parked.mutex:
        wanted = parked.state == WAITING
        parked.state = GRANTED if wanted else DONE
        parked.taken = taken
        notify = parked.notify
    if not wanted:
        try:
            _discard(parked.private, parked)  # a grant nobody wants: unlock at once
        finally:
            _unpark(parked)
        return None
    _unpark(parked)  # the waiter holds it now, as any holder does
    if taken is None:
        return notify  # a thread: it cannot be gone, it wakes and takes the grant
    try:
        notify()
    except RuntimeError:  # the waiter's event loop is closed: nobody will take it
        with parked.mutex:
            if parked.state == GRANTED:
                parked.state = DONE
                wanted = False
    if wanted:
        _watch_grant(parked, taken, loop)
    else:
        _discard(parked.private, parked)
    return None


def _watch_grant(parked: _Parked, taken: threading.Lock, loop: Any) -> None:
    """Until the task takes its grant: if its event loop is closed first, give it back.

    A grant is announced to a task by a callback queued on its loop; a loop closed before it
    runs the callback drops it, and the task (which may well be alive, referenced by whoever
    created it) never resumes. Normally the task takes the grant within microseconds and this
    returns at once; only a loop that does not run looks at is_closed(), at growing intervals.
    """
    pause = 0.01
    while not taken.acquire(timeout=pause):
        with parked.mutex:
            if parked.state != GRANTED:
                return
            closed = loop.is_closed()
            if closed:
                parked.state = DONE
        if closed:
            _discard(parked.private, parked)
            return
        pause = min(pause * 2, 1.0)


def _took(parked: _Parked) -> None:
    """The waiter took (or gave up) its grant: the helper watching it may go."""
    taken = parked.taken
    if taken is not None:
        taken.release()


def _start_parked(
    spec: LockSpec,
    located: Located,
    notify: Callable[[], None],
    attempt: _Attempt,
    loop: Any = None,
) -> bool:
    """Adopt an abandoned parked wait, or start one, for `attempt`; False past PARKED_MAX."""
    path = located[0]
    op = _SH if spec.shared else _EX
    key = (path, op)
    if _adopt(key, notify, attempt, loop):
        return True
    if _in_kernel >= PARKED_MAX:
        return False
    while True:
        desc = _claim(path, attempt) or _open(path, spec.mode, located, attempt, spec)
        if desc.ours():
            break
        _close(desc, attempt)
    parked = _Parked(key, spec.mode, notify, loop)
    # atomic the description passes from the attempt to its parked wait
    if desc.owner is attempt:
        desc.owner = parked
        parked.private = desc
        attempt.parked = parked
    if attempt.parked is not parked:  # pragma: no cover - the description was taken from us
        msg = f"{path}: a description of this lock changed hands unexpectedly"
        raise ProcLockError(msg)
    _dispatch(parked)
    return True


def _give_up(attempt: _Attempt) -> None:
    """Undo what an interrupted (or finished) wait set in motion: nothing stays locked."""
    parked = attempt.parked
    if parked is None:
        _discard(attempt.private, attempt)
        return
    with parked.mutex:
        state = parked.state
        if state == WAITING:
            parked.state = ABANDONED if parked.picked else CANCELLED
        elif state == GRANTED:
            parked.state = TAKEN
    if state == WAITING:
        if parked.picked:
            _park(parked)  # the next waiter of this file and mode adopts it
        else:
            _discard(parked.private, parked)  # no helper has it: give the description back
    elif state in (GRANTED, TAKEN):
        if state == GRANTED:
            _took(parked)
        _discard(parked.private, parked)  # granted to us, unwanted now (a TAKEN one not yet ours)
    _discard(attempt.private, attempt)


def _settle(attempt: _Attempt, spec: LockSpec, path: str) -> Handle | None:
    """After the wait, woken or out of time: the handle if granted, else None (or raise)."""
    parked = attempt.parked
    assert parked is not None  # noqa: S101
    with parked.mutex:
        state = parked.state
        if state == GRANTED:
            parked.state = TAKEN
        elif state == WAITING:
            parked.state = ABANDONED if parked.picked else CANCELLED
    if state == FAILED:
        error = parked.error
        assert error is not None  # noqa: S101
        raise error
    if state == WAITING:
        if parked.picked:
            _park(parked)
        else:
            _discard(parked.private, parked)
        return None
    if state != GRANTED:
        return None
    _took(parked)
    desc = parked.private
    assert desc is not None  # noqa: S101
    return _granted(desc, parked, spec, path, parked.st)


class _ThreadWaiter:
    """A waiting thread, woken once by its parked wait."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def wake(self) -> None:
        self._lock.release()

    def wait(self, timeout: float) -> None:
        # A blocking lock acquire: woken by the helper, interruptible by Ctrl-C, and retried by
        # CPython across other signals (PEP 475) with the remaining timeout.
        self._lock.acquire(timeout=timeout)


def _wait_parked(spec: LockSpec, located: Located, deadline: float) -> Handle | None:
    path = located[0]
    while True:
        waiter = _ThreadWaiter()
        attempt = _Attempt()
        try:
            if not _start_parked(spec, located, waiter.wake, attempt):
                return poll(lambda: FLOCK.try_acquire(spec), deadline)
            remaining = deadline - _clock()
            if remaining > 0:
                waiter.wait(remaining)
            handle = _settle(attempt, spec, path)
        except BaseException:
            _give_up(attempt)
            raise
        if handle is not None or _clock() >= deadline:
            return handle


async def _wait_parked_async(
    spec: LockSpec, located: Located, deadline: float | None
) -> Handle | None:
    import asyncio  # noqa: PLC0415
    import weakref  # noqa: PLC0415  (asyncio has imported it already)

    path = located[0]
    loop = asyncio.get_running_loop()
    while True:
        future: asyncio.Future[None] = loop.create_future()

        # The parked wait holds the future weakly: a task whose event loop was closed before it
        # could take a grant must be garbage, so that closing its coroutine (GeneratorExit,
        # handled below) gives the grant back; a strong reference would keep it forever.
        ref = weakref.ref(future)

        def notify(ref: weakref.ref[asyncio.Future[None]] = ref) -> None:
            # From the helper thread; RuntimeError (nobody will take it) if the loop is closed
            # or the task is gone.
            waiting = ref()
            if waiting is None:
                msg = "the waiting task is gone"
                raise RuntimeError(msg)
            loop.call_soon_threadsafe(_resolve, waiting)

        attempt = _Attempt()
        try:
            if not _start_parked(spec, located, notify, attempt, loop):
                return await poll_async(lambda: FLOCK.try_acquire(spec), deadline, asyncio)
            remaining = None if deadline is None else deadline - _clock()
            if remaining is None or remaining > 0:
                # asyncio.wait neither raises on timeout nor cancels the future it watches.
                await asyncio.wait((future,), timeout=remaining)
            handle = _settle(attempt, spec, path)
        except BaseException:
            _give_up(attempt)  # cancellation included: a grant that arrived is given back
            raise
        if handle is not None or (deadline is not None and _clock() >= deadline):
            return handle


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def poll_pauses(deadline: float | None) -> Iterator[float]:
    """The pauses of the back-off poll past PARKED_MAX, each cut at `deadline` (None: none).

    POLL_FIRST doubling to POLL_MAX; it ends once the deadline has passed.
    """
    pause = POLL_FIRST
    while True:
        remaining = None if deadline is None else deadline - _clock()
        if remaining is not None and remaining <= 0:
            return
        yield pause if remaining is None else min(pause, remaining)
        pause = min(pause * 2, POLL_MAX)


def poll(attempt: Callable[[], _T | None], deadline: float | None) -> _T | None:
    """Past PARKED_MAX: `attempt()` (LOCK_NB tries), paused by `poll_pauses`, until it wins.

    None once the deadline has passed. The one poll of every wait: a lock's (`_wait_parked`)
    and a wait for any of several (`_any`).
    """
    pauses = poll_pauses(deadline)
    while True:
        got = attempt()
        if got is not None:
            return got
        pause = next(pauses, None)
        if pause is None:
            return None
        time.sleep(pause)


async def poll_async(
    attempt: Callable[[], _T | None], deadline: float | None, asyncio: Any
) -> _T | None:
    """`poll` for coroutines (`asyncio` passed in: this module does not import it)."""
    pauses = poll_pauses(deadline)
    while True:
        got = attempt()
        if got is not None:
            return got
        pause = next(pauses, None)
        if pause is None:
            return None
        await asyncio.sleep(pause)


def _parking_after_fork() -> None:
    global _park_lock, _in_kernel, _jobs, _helpers_idle  # noqa: PLW0603
    _park_lock = threading.RLock()
    _parked.clear()
    _in_kernel_on.clear()
    _in_kernel = 0
    _jobs = None  # the helper threads do not exist here
    _helpers_idle = 0
