"""The default backend: flock(2) on a lock file, one open file description per owner.

What this module guarantees:

- The kernel is the arbiter between every pair of owners. Each attempt, hold and wait uses an
  open file description of its own, and two descriptions conflict in flock(2) even within one
  process: threads and tasks exclude each other exactly as processes do, with no in-process
  queue of waiters that could strand one.
- A description is used (locked, unlocked, written, truncated, closed) only by the process that
  opened it, and only after checking that its number still refers to it (`_flock` explains how).
  A number that may have been reused is forgotten, never touched.
- A description has one user at a time (an attempt, a hold or a parked wait), identified by a
  token; every step checks the token, so an attempt interrupted after it handed a description
  back can never unlock it under its next user.
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

import os
import sys
import threading
import time

from .. import _core, _dirs, _flock, _holder, _names
from .._errors import ProcLockError
from ._base import FD, FREED_ON_EXIT, SHARED, Handle

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable
    from typing import Any

    from .._holder import Holder
    from .._spec import LockSpec

    Located = tuple[str, str | None, str]

IDLE_PER_FILE = 4  # idle descriptions kept per lock file
IDLE_MAX = 256  # idle descriptions kept in all
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


# Opening and closing descriptions, and the file table, change under _open_lock, which the fork
# handler holds across fork() so that a child never inherits a descriptor we do not know of. It
# is reentrant: a signal handler or finalizer may open a lock file while this thread opens one.
# Claiming and giving back a description are state changes under _claim_lock, in sections that
# make no call, so that nothing (not even a signal handler) can run inside them.
_open_lock = threading.RLock()
_claim_lock = threading.Lock()
_files: dict[str, _File] = {}
_lru: dict[str, None] = {}  # files with idle descriptions, least recently used first
_idle_total = 0


def _claim(path: str, owner: object) -> _Desc | None:
    """An idle description of `path`, now BUSY for `owner`; None if there is none."""
    global _idle_total  # noqa: PLW0603
    file = _files.get(path)
    if file is None or not file.idle:
        return None
    for desc in file.descs:
        if desc.state == IDLE:
            with _claim_lock:
                if desc.state == IDLE:
                    desc.state = BUSY
                    desc.owner = owner
                    file.idle -= 1
                    _idle_total -= 1
                    return desc
    return None


def _open(path: str, mode: int, located: Located | None, owner: object) -> _Desc:
    """A new description of `path`, BUSY for `owner`; the directory vetted first."""
    if located is not None:
        _, directory, kind = located
        if directory is None:
            _dirs.vet_parent(path)
        else:
            _dirs.vet(directory, kind)
    with _open_lock:
        fd, st, _created = _flock.open_lock_file(path, mode)
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
    return desc


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
            _lru.pop(file.path, None)
        if mine:
            os.close(desc.fd)


def _put_back(desc: _Desc, owner: object) -> None:
    """Pool a description `owner` uses that holds nothing, or close it past the bounds."""
    global _idle_total  # noqa: PLW0603
    file = desc.file
    if file.idle >= IDLE_PER_FILE or _files.get(file.path) is not file or not desc.ours():
        _close(desc, owner)
        return
    with _claim_lock:
        if desc.state != BUSY or desc.owner is not owner:
            return
        desc.owner = None
        desc.state = IDLE
        file.idle += 1
        _idle_total += 1
    path = file.path
    _lru.pop(path, None)
    _lru[path] = None
    if _idle_total > IDLE_MAX:
        _evict()


def _evict() -> None:
    """Close idle descriptions of the least recently used files until within IDLE_MAX."""
    global _idle_total  # noqa: PLW0603
    while _idle_total > IDLE_MAX:
        try:
            path = next(iter(_lru))
        except (StopIteration, RuntimeError):  # empty, or changed meanwhile: next time
            return
        _lru.pop(path, None)
        file = _files.get(path)
        if file is None:
            continue
        for desc in list(file.descs):
            token = object()
            with _claim_lock:
                if desc.state != IDLE:
                    continue
                desc.state = BUSY
                desc.owner = token
                file.idle -= 1
                _idle_total -= 1
            _close(desc, token)


def _discard(desc: _Desc, owner: object) -> None:
    """Give back a description `owner` uses that may hold the lock: unlock, then pool it.

    Does nothing if `owner` no longer uses it (it was given back already).
    """
    if desc.state != BUSY or desc.owner is not owner:
        return
    if desc.ours():
        try:
            _flock.unlock(desc.fd)
        except OSError:
            _close(desc, owner)  # closing releases whatever this description held
            return
    _put_back(desc, owner)


def _verify(desc: _Desc, path: str) -> os.stat_result | None:
    """After the lock was granted: fstat of the description if the file is still at `path`."""
    st = _fstat(desc.fd)
    if st.st_nlink and st.st_ctime_ns == desc.ctime:
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
    if os.pwrite(fd, record, 0) != len(record):
        raise OSError(28, "No space left on device (short write)", desc.file.path)
    if st.st_size > len(record):
        os.ftruncate(fd, len(record))  # another holder's longer record: cut to ours
    desc.rec, desc.rec_at, desc.rec_mtime = record, now, -1


def _granted(desc: _Desc, owner: object, spec: LockSpec, path: str) -> Handle | None:
    """After the kernel granted `desc`: verify, write the record, make the handle.

    None if the file was replaced meanwhile (the description is then dropped). The handle
    becomes the description's owner as the last step.
    """
    if not desc.ours():
        _close(desc, owner)  # forgotten: its number was closed under us
        return None
    st = _verify(desc, path)
    if st is None:
        _unlock_and_close(desc, owner)
        return None
    if not spec.shared:
        _write_record(desc, st, spec.label, None)
    handle = Handle(path, fd=desc.fd, shared=spec.shared, private=desc)
    desc.owner = handle
    return handle


def _unlock_and_close(desc: _Desc, owner: object) -> None:
    if desc.owner is owner and desc.ours():
        _flock.unlock(desc.fd)
    _close(desc, owner)


def _replaced_too_often(spec: LockSpec, path: str) -> ProcLockError:
    return ProcLockError(
        f"{spec.label!r} ({path}): the lock file keeps being replaced while it is locked; "
        "is something deleting files in the lock directory?"
    )


class FlockBackend:
    """flock(2) on `lock_path(name)` (or `path=`): the default backend."""

    __slots__ = ()
    capabilities = frozenset((SHARED, FD, FREED_ON_EXIT))

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
        where = spec._where  # noqa: SLF001  (this backend's memo on the spec)
        if where is not None and where[0] == key:
            return where[1]  # type: ignore[no-any-return]
        name = spec.name
        assert name is not None  # noqa: S101
        directory, kind = _dirs.resolve(spec.lock_dir)
        real = os.path.join(os.path.realpath(directory), _names.file_name(name))
        located = (real, directory, kind)
        object.__setattr__(spec, "_where", (key, located))
        return located

    def location(self, spec: LockSpec) -> str:
        """The lock file, where it would be taken now (the environment is read each time)."""
        return self.locate(spec)[0]

    def holder(self, spec: LockSpec) -> Holder | None:
        """Who holds the lock file now, from the kernel and the file's record."""
        return _holder.holder_of(self.locate(spec)[0])

    # -- acquire ---------------------------------------------------------------------------

    def try_acquire(self, spec: LockSpec) -> Handle | None:
        """One LOCK_NB attempt on a description of our own: a handle, or None if busy."""
        located = self.locate(spec)
        return _attempt(spec, located, wait=False)

    def acquire(self, spec: LockSpec, deadline: float | None) -> Handle | None:
        """Wait for the lock until `deadline` (monotonic; None: forever); None if it passed.

        Without a deadline the calling thread blocks in flock(2) itself: the kernel hands the
        lock straight to it at release, and Ctrl-C interrupts it in the main thread. With one,
        a parked helper waits in the kernel while this thread waits for its word.
        """
        located = self.locate(spec)
        if deadline is None:
            return _attempt(spec, located, wait=True)
        return _wait_parked(spec, located, deadline)

    async def acquire_async(self, spec: LockSpec, deadline: float | None) -> Handle | None:
        """`acquire` for coroutines: a parked helper waits, the event loop never blocks."""
        return await _wait_parked_async(spec, self.locate(spec), deadline)

    # -- release ---------------------------------------------------------------------------

    def release(self, handle: Handle) -> None:
        """Unlock and pool the handle's description. Idempotent: a second call does nothing.

        Nothing is touched in a forked child (which holds nothing of its parent's), nor when
        the number is no longer this description's.
        """
        desc: _Desc = handle.private
        if desc.owner is not handle or desc.state != BUSY:
            return
        if desc.ours():
            try:
                _flock.unlock(desc.fd)
            except OSError:
                _close(desc, handle)
                raise
        _put_back(desc, handle)

    # -- fork (called by the core's fork handler) -------------------------------------------

    @staticmethod
    def fork_locks() -> tuple[threading.RLock, threading.RLock]:
        """The locks to hold across fork(): the file table's and the parked waits'."""
        return _open_lock, _park_lock

    @staticmethod
    def after_fork_in_child(kept: list[Handle]) -> None:
        """Close every inherited description but those of `kept` (transferred holds)."""
        global _open_lock, _claim_lock, _idle_total  # noqa: PLW0603
        _open_lock = threading.RLock()
        _claim_lock = threading.Lock()
        _parking_after_fork()
        keep = {id(h.private): h for h in kept}
        files = list(_files.values())
        _files.clear()
        _lru.clear()
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
                if state != CLOSED and desc.magic is not None:
                    try:
                        same = _lseek(desc.fd, 0, _SEEK_CUR) == desc.magic
                    except OSError:
                        same = False
                    if same:
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


def _attempt(spec: LockSpec, located: Located, *, wait: bool) -> Handle | None:
    """LOCK_NB, or (wait=True) a blocking flock(2) in this thread, on a description of ours."""
    path = located[0]
    op = _SH if spec.shared else _EX
    if not wait:
        op |= _NB
    token = object()
    for _ in range(_REPLACED_MAX):
        desc = _claim(path, token) or _open(path, spec.mode, located, token)
        try:
            if not desc.ours():
                _close(desc, token)  # forgotten: its number is someone else's now
                continue
            try:
                _flock_call(desc.fd, op)
            except BlockingIOError:
                _put_back(desc, token)
                return None
            except OSError as exc:
                raise _flock.with_path(exc, path) from None
            handle = _granted(desc, token, spec, path)
        except BaseException:
            _discard(desc, token)
            raise
        if handle is not None:
            return handle
    raise _replaced_too_often(spec, path)


FLOCK = FlockBackend()


# -- parked waits -------------------------------------------------------------------------------
#
# A parked wait is a helper thread blocked in flock(2) on a description of its own, on behalf of
# one waiter at a time. Its states, changed under its own mutex in sections that make no call:
#
#   WAITING    a waiter wants the grant (it is woken through `notify`)
#   ABANDONED  its waiter gave up; the next waiter of the same file and mode may adopt it
#   GRANTED    the kernel granted it and the waiter was told; not yet taken
#   TAKEN      the waiter took the description: it is the waiter's now
#   FAILED     the wait failed (`error`): the waiter raises it
#   DONE       granted with nobody to give it to: unlocked and given back at once

WAITING, ABANDONED, GRANTED, TAKEN, FAILED, DONE = range(6)


class _Parked:
    __slots__ = ("desc", "error", "key", "mode", "mutex", "notify", "state")

    def __init__(
        self, desc: _Desc, key: tuple[str, int], mode: int, notify: Callable[[], None]
    ) -> None:
        self.desc, self.key, self.mode = desc, key, mode
        self.mutex = threading.Lock()
        self.state = WAITING
        self.notify = notify
        self.error: BaseException | None = None


_park_lock = threading.RLock()
_parked: dict[tuple[str, int], list[_Parked]] = {}  # abandoned waits, for adoption
_in_kernel = 0  # helpers blocked in flock(2) now
_helpers: list[_Helper] = []  # idle helper threads


def parked_waits() -> int:
    """How many helper threads are blocked in flock(2) now (for tests and the bench)."""
    return _in_kernel


def _adopt(key: tuple[str, int], notify: Callable[[], None]) -> _Parked | None:
    """An abandoned parked wait of the same file and mode, now waiting for the caller."""
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
                    return parked
    return None


def _park(parked: _Parked) -> None:
    """Leave an abandoned wait where the next waiter of its file and mode finds it."""
    with _park_lock:
        _parked.setdefault(parked.key, []).append(parked)


def _unpark(parked: _Parked) -> None:
    global _in_kernel  # noqa: PLW0603
    with _park_lock:
        _in_kernel -= 1
        waits = _parked.get(parked.key)
        if waits is not None and parked in waits:
            waits.remove(parked)
            if not waits:
                _parked.pop(parked.key, None)


def _start(parked: _Parked) -> None:
    global _in_kernel  # noqa: PLW0603
    with _park_lock:
        _in_kernel += 1
        helper = _helpers.pop() if _helpers else None
    try:
        if helper is None:
            helper = _Helper()
            helper.job = parked
            threading.Thread(target=helper.run, name="proclock-helper", daemon=True).start()
        else:
            helper.job = parked
            helper.wakeup.release()
    except BaseException:
        with _park_lock:
            _in_kernel -= 1
        raise


class _Helper:
    """A thread that serves parked waits, one after another."""

    __slots__ = ("job", "wakeup")

    def __init__(self) -> None:
        self.job: _Parked | None = None
        self.wakeup = threading.Lock()
        self.wakeup.acquire()

    def run(self) -> None:
        while True:
            job, self.job = self.job, None
            if job is not None:
                _serve(job)
            with _park_lock:
                if len(_helpers) >= HELPERS_IDLE:
                    return
                _helpers.append(self)
            self.wakeup.acquire()  # idle: holds no descriptor, waits for the next job


def _serve(parked: _Parked) -> None:
    """Block in flock(2) until granted, then hand the description over or unlock it."""
    path, op = parked.key
    try:
        for _ in range(_REPLACED_MAX):
            desc = parked.desc
            if desc.ours():
                try:
                    _flock_call(desc.fd, op)
                except OSError as exc:
                    raise _flock.with_path(exc, path) from None
                if desc.ours() and _verify(desc, path) is not None:
                    break
                _unlock_and_close(desc, parked)  # replaced while we waited: wait for the new one
            else:
                _close(desc, parked)  # its number was closed under us
            parked.desc = _open(path, parked.mode, None, parked)
        else:
            msg = f"{path}: the lock file keeps being replaced while it is locked"
            raise ProcLockError(msg)  # noqa: TRY301
    except BaseException as exc:  # noqa: BLE001  (handed to the waiter, who raises it)
        with parked.mutex:
            previous, parked.state, parked.error = parked.state, FAILED, exc
            notify = parked.notify
        _unpark(parked)
        _discard(parked.desc, parked)
        if previous == WAITING:
            try:  # noqa: SIM105  (contextlib costs import time)
                notify()
            except RuntimeError:  # a closed event loop: nobody waits there
                pass
        return
    with parked.mutex:
        wanted = parked.state == WAITING
        parked.state = GRANTED if wanted else DONE
        notify = parked.notify
    _unpark(parked)
    if wanted:
        try:
            notify()
        except RuntimeError:  # the waiter's event loop is closed: nobody will take it
            with parked.mutex:
                if parked.state == GRANTED:
                    parked.state = DONE
                    wanted = False
        if wanted:
            return
    _discard(parked.desc, parked)  # a grant nobody wants: unlock at once


def _take_grant(parked: _Parked) -> tuple[int, _Desc]:
    """The waiter's side, once woken or out of time: (state, description).

    GRANTED becomes TAKEN (the description is now the waiter's: its owner token stays the
    parked wait until the handle replaces it); WAITING becomes ABANDONED and is left for
    adoption. The state before the change is returned.
    """
    with parked.mutex:
        state = parked.state
        if state == GRANTED:
            parked.state = TAKEN
        elif state == WAITING:
            parked.state = ABANDONED
    if state == WAITING:
        _park(parked)
    return state, parked.desc


def _settle(parked: _Parked, spec: LockSpec, path: str, *, failing: bool) -> Handle | None:
    """After the wait: the handle if granted (None if not, or if the file was replaced).

    With `failing` (the wait raised: Ctrl-C, cancellation), a grant is given back instead.
    """
    state, desc = _take_grant(parked)
    if state == FAILED and not failing:
        error = parked.error
        assert error is not None  # noqa: S101
        raise error
    if state != GRANTED:
        return None
    if failing:
        _discard(desc, parked)
        return None
    try:
        return _granted(desc, parked, spec, path)
    except BaseException:
        _discard(desc, parked)
        raise


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


def _parked_wait(
    spec: LockSpec, located: Located, notify: Callable[[], None]
) -> tuple[_Parked | None, int]:
    """Adopt an abandoned parked wait, or start one; (None, 0) past PARKED_MAX."""
    path = located[0]
    op = _SH if spec.shared else _EX
    key = (path, op)
    parked = _adopt(key, notify)
    if parked is not None:
        return parked, op
    if _in_kernel >= PARKED_MAX:
        return None, 0
    while True:
        token = object()
        desc = _claim(path, token) or _open(path, spec.mode, located, token)
        if desc.ours():
            break
        _close(desc, token)
    parked = _Parked(desc, key, spec.mode, notify)
    with _claim_lock:
        desc.owner = parked  # the parked wait uses it from now on
    try:
        _start(parked)
    except BaseException:
        _discard(desc, parked)
        raise
    return parked, op


def _wait_parked(spec: LockSpec, located: Located, deadline: float) -> Handle | None:
    path = located[0]
    while True:
        waiter = _ThreadWaiter()
        parked, _ = _parked_wait(spec, located, waiter.wake)
        if parked is None:
            return _poll(spec, deadline)
        try:
            remaining = deadline - _clock()
            if remaining > 0:
                waiter.wait(remaining)
        except BaseException:
            _settle(parked, spec, path, failing=True)
            raise
        handle = _settle(parked, spec, path, failing=False)
        if handle is not None or _clock() >= deadline:
            return handle


async def _wait_parked_async(
    spec: LockSpec, located: Located, deadline: float | None
) -> Handle | None:
    import asyncio  # noqa: PLC0415

    path = located[0]
    loop = asyncio.get_running_loop()
    while True:
        future: asyncio.Future[None] = loop.create_future()

        def notify(future: asyncio.Future[None] = future) -> None:
            # From the helper thread; raises RuntimeError if the loop is closed.
            loop.call_soon_threadsafe(_resolve, future)

        parked, _ = _parked_wait(spec, located, notify)
        if parked is None:
            return await _poll_async(spec, deadline, asyncio)
        try:
            remaining = None if deadline is None else deadline - _clock()
            if remaining is None or remaining > 0:
                # asyncio.wait neither raises on timeout nor cancels the future it watches.
                await asyncio.wait((future,), timeout=remaining)
        except BaseException:
            _settle(parked, spec, path, failing=True)
            raise
        handle = _settle(parked, spec, path, failing=False)
        if handle is not None or (deadline is not None and _clock() >= deadline):
            return handle


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _poll(spec: LockSpec, deadline: float) -> Handle | None:
    """Past PARKED_MAX: LOCK_NB tries with a bounded back-off until the deadline."""
    pause = POLL_FIRST
    while True:
        handle = FLOCK.try_acquire(spec)
        if handle is not None:
            return handle
        remaining = deadline - _clock()
        if remaining <= 0:
            return None
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, POLL_MAX)


async def _poll_async(spec: LockSpec, deadline: float | None, asyncio: Any) -> Handle | None:
    pause = POLL_FIRST
    while True:
        handle = FLOCK.try_acquire(spec)
        if handle is not None:
            return handle
        remaining = None if deadline is None else deadline - _clock()
        if remaining is not None and remaining <= 0:
            return None
        await asyncio.sleep(pause if remaining is None else min(pause, remaining))
        pause = min(pause * 2, POLL_MAX)


def _parking_after_fork() -> None:
    global _park_lock, _in_kernel  # noqa: PLW0603
    _park_lock = threading.RLock()
    _parked.clear()
    _helpers.clear()  # their threads do not exist here
    _in_kernel = 0


def _unused() -> None:  # pragma: no cover - keeps sys imported for type checkers
    _ = sys
