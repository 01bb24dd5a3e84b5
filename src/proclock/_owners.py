"""The in-process registry, keyed by lock file path: owners, re-entry, waiters, helpers, fork.

flock(2) excludes open file descriptions, not threads: two threads of one process sharing a
descriptor would both "hold" it. So each path has one entry here, holding the process's one
descriptor for that file, the owners (threads or asyncio tasks) that hold it, and the waiters.
Only one actor at a time touches the kernel lock of a path: an owner taking it with LOCK_NB,
or the path's helper thread blocked in flock(2) on behalf of the waiters.
"""

from __future__ import annotations

import os
import stat
import sys
import threading
import time

from . import _dirs, _flock, _holder
from ._errors import ProcLockError

TYPE_CHECKING = False  # typing costs ~3 ms of import time; mypy reads this as typing's
if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable, Collection
    from typing import Any

EX, SH = _flock.EX, _flock.SH
_S_ISREG = stat.S_ISREG
_time = time.time
_lstat = os.lstat

_mutex = threading.Lock()
_entries: dict[str, Entry] = {}
_KEEP_IDLE = 256  # kept descriptors of idle paths; past this, idle ones are closed
_IDLE_HELPERS = 4  # idle helper threads kept for reuse, across all paths
_idle_helpers: list[_Helper] = []
fork_generation = 0  # bumped in a forked child: lock objects compare it to know they hold nothing


class _Busy(Exception):  # noqa: N818  (internal signal, never escapes the package)
    """The lock is held by someone else and the caller gave up (or may not wait)."""


def current_owner() -> object:
    """The asyncio task running in this thread if any, else the thread."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None and asyncio.events._get_running_loop() is not None:  # noqa: SLF001
        task = asyncio.current_task()
        if task is not None:
            return task
    return threading.get_ident()


class _ThreadWaiter:
    """A waiting thread: woken (any number of times) by a release, a grant or an error."""

    __slots__ = ("_lock", "_signaled", "error", "op")

    def __init__(self, op: int) -> None:
        self.op = op
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._lock.acquire()
        self._signaled = False

    def wake(self) -> None:  # under _mutex
        if not self._signaled:
            self._signaled = True
            self._lock.release()

    def rearm(self) -> None:  # under _mutex
        if self._signaled:
            self._lock.acquire()
            self._signaled = False

    def wait(self, timeout: float | None) -> None:
        # A blocking lock acquire: woken by the kernel-side release, interruptible by Ctrl-C,
        # and retried by CPython across signals (PEP 475) with the remaining timeout.
        if self._lock.acquire(timeout=-1 if timeout is None else timeout):
            self._lock.release()


class _TaskWaiter:
    """A waiting asyncio task: woken through its loop, from any thread."""

    __slots__ = ("error", "future", "loop", "op")

    def __init__(self, op: int, loop: asyncio.AbstractEventLoop) -> None:
        self.op = op
        self.loop = loop
        self.error: BaseException | None = None
        self.future: asyncio.Future[None] = loop.create_future()

    def _set(self, future: asyncio.Future[None]) -> None:
        if not future.done():
            future.set_result(None)

    def wake(self) -> None:  # under _mutex, from any thread
        if not self.future.done():
            try:  # noqa: SIM105  (contextlib costs import time)
                self.loop.call_soon_threadsafe(self._set, self.future)
            except RuntimeError:  # a closed loop: nobody waits there any more
                pass

    def rearm(self) -> None:  # under _mutex, in the loop's thread
        if self.future.done():
            self.future = self.loop.create_future()


Waiter = _ThreadWaiter | _TaskWaiter


class Entry:
    """One lock file as seen by this process."""

    __slots__ = (
        "dev",
        "directory",
        "fd",
        "granted",
        "helper",
        "ino",
        "kind",
        "meta",
        "mode",
        "name",
        "op",
        "owners",
        "path",
        "since",
        "size",
        "transfer",
        "via",
        "waiters",
    )

    def __init__(self, path: str, directory: str | None, kind: str, name: str, mode: int) -> None:
        self.path, self.directory, self.kind, self.name, self.mode = (
            path,
            directory,
            kind,
            name,
            mode,
        )
        self.fd: int | None = None
        self.dev = self.ino = -1
        self.size = -1
        self.since: float | None = None  # monotonic time of the acquisition, when logging
        self.meta: tuple[bytes, bytes] | None = None  # this process's record, but for the time
        self.op = 0  # what this process holds in the kernel for its owners: 0, SH or EX
        self.granted = 0  # what the helper obtained and no waiter has taken yet
        self.owners: dict[object, int] = {}
        self.waiters: list[Waiter] = []
        self.helper = False
        # Set by ProcessLock.transfer_on_fork(): called at the next fork, in parent and child.
        self.transfer: list[Callable[[bool], None]] = []
        self.via: int | None = None  # the pid flock(2) recorded, when a parent handed it to us

    def wake_all(self) -> None:
        for waiter in self.waiters:
            waiter.wake()

    # Everything below runs under _mutex.

    def _open(self) -> int:
        if self.directory is None:
            _dirs.vet_parent(self.path)
        else:
            _dirs.vet(self.directory, self.kind)
        fd, st = _flock.open_lock_file(self.path, self.mode)
        self.fd, self.size, self.dev, self.ino = fd, st.st_size, st.st_dev, st.st_ino
        return fd

    def _discard_fd(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def _locked_and_verified(self, fd: int) -> bool:
        """After flock succeeded on `fd`: True if it is still the file at the path.

        Else the file was deleted or replaced while we took it: drop the orphan and report
        False so that the caller locks the file now at the path.
        """
        st = _flock.still_at_path(self.dev, self.ino, self.path)
        if st is None:
            _flock.unlock(fd)
            self._discard_fd()
            return False
        self.size = st.st_size
        return True

    def _write_metadata(self, fd: int) -> None:
        meta = self.meta
        if meta is None:
            meta = self.meta = _holder.metadata_parts(self.name, self.via)
        record = meta[0] + b"%.6f" % _time() + meta[1]
        try:
            os.pwrite(fd, record, 0)  # fixed size per name and process: one syscall
            if self.size != len(record):  # someone else's record, or garbage: cut to ours
                os.ftruncate(fd, len(record))
        except OSError as exc:  # ENOSPC, EIO: surface it, holding nothing
            _flock.unlock(fd)
            self._discard_fd()
            if exc.filename is None:
                exc.filename = self.path
            raise
        self.size = len(record)

    def try_take(self, op: int, owner: object) -> bool:
        """Take the lock for `owner` now if that needs no waiting."""
        fd = self.fd
        if fd is not None and not (self.granted or self.op or self.helper):
            # The uncontended fast path, inlined: LOCK_NB, lstat, and for EX one pwrite.
            try:
                _flock.flock(fd, op | _flock.NB)
            except BlockingIOError:
                return False
            except OSError as exc:
                raise _flock.with_path(exc, self.path) from None
            try:
                st: os.stat_result | None = _lstat(self.path)
            except FileNotFoundError:
                st = None
            if (
                st is not None
                and st.st_ino == self.ino
                and st.st_dev == self.dev
                and _S_ISREG(st.st_mode)
            ):
                self.size = st.st_size
                if op == EX:
                    self._write_metadata(fd)
                self.op = op
                self.owners[owner] = 1
                return True
            _flock.unlock(fd)  # deleted or replaced: lock the file now at the path
            self._discard_fd()
        if self.granted:
            if self.granted != op:
                return False
            self.granted = 0
            fd = self.fd
            assert fd is not None  # noqa: S101
            if op == EX:
                self._write_metadata(fd)
            self.op = op
            self.owners[owner] = 1
            return True
        if self.op:
            # Shared holders share, unless an exclusive waiter is queued (no writer starvation).
            if self.op == SH and op == SH and not any(w.op == EX for w in self.waiters):
                self.owners[owner] = 1
                return True
            return False
        if self.helper:
            return False
        for _ in range(64):
            fd = self.fd if self.fd is not None else self._open()
            if not _flock.try_lock(fd, op, self.path):
                return False
            if self._locked_and_verified(fd):
                if op == EX:
                    self._write_metadata(fd)
                self.op = op
                self.owners[owner] = 1
                return True
        msg = f"{self.name!r} ({self.path}): the lock file keeps being replaced while locked"
        raise ProcLockError(msg)

    def start_helper(self) -> None:
        if self.helper or self.op or self.granted or self.fd is None:
            return
        self.helper = True
        if _idle_helpers:
            _idle_helpers.pop().give(self)
        else:
            helper = _Helper()
            helper.entry = self
            thread = threading.Thread(target=helper.run, name="proclock-helper", daemon=True)
            thread.start()

    def drop_grant_if_unwanted(self) -> None:
        if self.granted and not any(w.op == self.granted for w in self.waiters):
            self.granted = 0
            if self.fd is not None:
                _flock.unlock(self.fd)
            self.wake_all()

    def busy(self) -> bool:
        """Held by an owner here, granted, or someone is already in the kernel for it."""
        return bool(self.op or self.granted or self.helper)

    def idle(self) -> bool:
        return not (self.owners or self.waiters or self.helper or self.granted)


class _Helper:
    """A thread that blocks in flock(2) for the waiters of one path at a time."""

    __slots__ = ("_wakeup", "entry")

    def __init__(self) -> None:
        self.entry: Entry | None = None
        self._wakeup = threading.Lock()
        self._wakeup.acquire()

    def give(self, entry: Entry) -> None:  # under _mutex
        self.entry = entry
        self._wakeup.release()

    def run(self) -> None:
        while True:
            entry = self.entry
            if entry is not None:
                _serve(entry)
            with _mutex:
                self.entry = None
                if len(_idle_helpers) >= _IDLE_HELPERS:
                    return
                _idle_helpers.append(self)
            self._wakeup.acquire()  # idle: holds no descriptor, waits for the next path


def _serve(entry: Entry) -> None:
    """Block in the kernel until the lock is ours, then grant it to a waiter of that mode.

    A grant nobody wants any more (the waiters timed out, were cancelled or interrupted) is
    released at once. This leaves a short window in which another process that tries with
    LOCK_NB finds the lock busy although no one here will use it.
    """
    while True:
        with _mutex:
            if entry.op or entry.granted or not entry.waiters or entry.fd is None:
                entry.helper = False
                entry.wake_all()
                return
            op = entry.waiters[0].op
            fd = entry.fd
        try:
            _flock.wait_lock(fd, op, entry.path)
            with _mutex:
                if not entry._locked_and_verified(fd):  # noqa: SLF001
                    entry._open()  # noqa: SLF001
                    continue
                if any(w.op == op for w in entry.waiters):
                    entry.granted = op
                    entry.helper = False
                    entry.wake_all()
                    return
                _flock.unlock(fd)
        except BaseException as exc:  # noqa: BLE001  (handed to the waiters, who raise it)
            with _mutex:
                entry.helper = False
                for waiter in entry.waiters:
                    waiter.error = exc
                entry.wake_all()
            return


def entry_for(path: str, directory: str | None, kind: str, name: str, mode: int) -> Entry:
    """The entry for `path`, created if needed. Under _mutex."""
    entry = _entries.get(path)
    if entry is None:
        entry = _entries[path] = Entry(path, directory, kind, name, mode)
    elif entry.name is not name:
        entry.name, entry.mode, entry.directory, entry.kind = name, mode, directory, kind
        entry.meta = None
    return entry


def reenter(entry: Entry, op: int, owner: object, *, reentrant: bool) -> bool:
    """Count a re-entry by an owner that already holds `entry`. Under _mutex."""
    count = entry.owners.get(owner)
    if count is None:
        return False
    if not reentrant:
        msg = (
            f"{entry.name!r} ({entry.path}) is already held by this {_owner_kind(owner)} and "
            "reentrant=False forbids taking it again; release it first, or pass reentrant=True"
        )
        raise ProcLockError(msg)
    if entry.op == SH and op == EX:
        msg = (
            f"{entry.name!r} ({entry.path}) is held shared by this {_owner_kind(owner)}, which "
            "now asks for it exclusively: flock(2) cannot upgrade atomically (it would release "
            "first); release the shared lock, then take the exclusive one"
        )
        raise ProcLockError(msg)
    entry.owners[owner] = count + 1
    return True


def _owner_kind(owner: object) -> str:
    return "thread" if isinstance(owner, int) else "task"


def release(entry: Entry, owner: object) -> None:
    """Give back one hold of `owner`; the last one unlocks the kernel lock."""
    with _mutex:
        count = entry.owners.get(owner)
        if count is None:
            return
        if count > 1:
            entry.owners[owner] = count - 1
            return
        del entry.owners[owner]
        if entry.owners:
            return
        entry.op = 0
        entry.since = None
        if entry.transfer:
            entry.transfer = []
        if entry.via is not None:  # our next acquisition is in our own name
            entry.via = entry.meta = None
        fd = entry.fd
        try:
            if fd is not None:
                _flock.unlock(fd)
        finally:
            if entry.waiters:
                entry.wake_all()
            elif len(_entries) > _KEEP_IDLE:
                _close_idle()


def _close_idle() -> None:
    for path, entry in list(_entries.items()):
        if entry.idle():
            entry._discard_fd()  # noqa: SLF001
            del _entries[path]


def refuse_self_deadlock(
    owners: Collection[object], owner: object, *, sync: bool, name: str, where: str
) -> None:
    """Refuse a wait that only this very thread could end: it would hang forever.

    A task waiting for a lock that its own thread holds outside the event loop, or a thread
    blocking synchronously (inside a task) for a lock another task of the same loop holds.
    `owners` are the lock's holders in this process, whatever the backend.
    """
    me = threading.get_ident()
    blocker = None
    if owner != me and me in owners:
        blocker = "the thread running this event loop, outside it"
    elif sync and not isinstance(owner, int):
        loop = owner.get_loop()  # type: ignore[attr-defined]
        for other in owners:
            if not isinstance(other, int) and other.get_loop() is loop:  # type: ignore[attr-defined]
                blocker = "another task of this event loop (await the lock instead)"
    if blocker is not None:
        msg = (
            f"{name!r} ({where}) is held by {blocker}: waiting here would never end; "
            "release it first"
        )
        raise ProcLockError(msg)


def acquire(
    entry: Entry,
    op: int,
    owner: object,
    *,
    blocking: bool,
    deadline: float | None,
    clock: Callable[[], float],
) -> None:
    """Take `entry` for `owner` in this thread, waiting in the kernel if allowed.

    A wait without a deadline blocks in flock(2) in this very thread (one hop fewer: the
    kernel hands the lock straight to us; Ctrl-C interrupts it in the main thread, as PEP 475
    lets a raising signal handler do). A wait with a deadline waits on an event while the
    path's helper thread blocks in flock(2) on our behalf.

    Raises:
        _Busy: held elsewhere, and not blocking or the deadline passed.
    """
    with _mutex:
        if entry.try_take(op, owner):
            return
        if not blocking:
            raise _Busy
        refuse_self_deadlock(entry.owners, owner, sync=True, name=entry.name, where=entry.path)
        waiter = _ThreadWaiter(op)
        entry.waiters.append(waiter)
    try:
        while True:
            # The LOCK_NB try has just failed (above, or at the end of the last round): decide
            # who waits in the kernel, wait, then try again.
            with _mutex:
                fd = entry.fd
                direct = deadline is None and fd is not None and not entry.busy()
                if direct:
                    entry.helper = True  # we are the one in the kernel for this path
                else:
                    entry.start_helper()
            if direct:
                assert fd is not None  # noqa: S101
                if _wait_in_kernel(entry, fd, op, owner):
                    return
            else:
                remaining = None if deadline is None else deadline - clock()
                if remaining is not None and remaining <= 0:
                    raise _Busy
                waiter.wait(remaining)
            with _mutex:
                waiter.rearm()
                if waiter.error is not None:
                    error, waiter.error = waiter.error, None
                    raise error
                if entry.try_take(op, owner):
                    return
    finally:
        with _mutex:
            entry.waiters.remove(waiter)
            entry.drop_grant_if_unwanted()


def _wait_in_kernel(entry: Entry, fd: int, op: int, owner: object) -> bool:
    """Block in flock(2) in this thread; True once the lock is taken for `owner`."""
    got = False
    try:
        _flock.wait_lock(fd, op, entry.path)
        got = True
    finally:
        with _mutex:
            entry.helper = False
            taken = False
            if got:
                if entry._locked_and_verified(fd):  # noqa: SLF001
                    if op == EX:
                        entry._write_metadata(fd)  # noqa: SLF001
                    entry.op = op
                    entry.owners[owner] = 1
                    taken = True
                else:
                    entry._open()  # noqa: SLF001  (replaced while we waited: the new file)
            if not taken:
                entry.wake_all()  # someone else may now wait in the kernel instead
    return taken


def start_waiting(entry: Entry, waiter: Waiter) -> None:
    """Register `waiter` and make sure someone waits in the kernel. Under _mutex."""
    entry.waiters.append(waiter)
    entry.start_helper()


async def acquire_async(
    entry: Entry,
    op: int,
    owner: object,
    *,
    blocking: bool,
    deadline: float | None,
    clock: Callable[[], float],
) -> None:
    """As `acquire`, without ever blocking the event loop."""
    import asyncio  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    with _mutex:
        if entry.try_take(op, owner):
            return
        if not blocking:
            raise _Busy
        refuse_self_deadlock(entry.owners, owner, sync=False, name=entry.name, where=entry.path)
        waiter = _TaskWaiter(op, loop)
        start_waiting(entry, waiter)
    try:
        while True:
            remaining = None if deadline is None else deadline - clock()
            if remaining is not None and remaining <= 0:
                raise _Busy
            # asyncio.wait neither raises on timeout nor cancels the future it watches.
            await asyncio.wait((waiter.future,), timeout=remaining)
            with _mutex:
                waiter.rearm()
                if waiter.error is not None:
                    error, waiter.error = waiter.error, None
                    raise error
                if entry.try_take(op, owner):
                    return
                entry.start_helper()
                if entry.helper or entry.op or entry.granted:
                    continue
                waiter.wake()
    finally:
        with _mutex:
            entry.waiters.remove(waiter)
            entry.drop_grant_if_unwanted()


# --- fork ------------------------------------------------------------------------------------


def _before_fork() -> None:
    _mutex.acquire()


def _after_fork_in_parent() -> None:
    try:
        for path, entry in list(_entries.items()):
            if entry.transfer and entry.owners:
                # The child now owns it: close our descriptor without unlocking (the open file
                # description, and so the lock, lives on in the child).
                for hook in entry.transfer:
                    hook(False)  # noqa: FBT003
                entry._discard_fd()  # noqa: SLF001
                del _entries[path]
    finally:
        _mutex.release()


def _after_fork_in_child() -> None:
    global _mutex, fork_generation  # noqa: PLW0603
    _mutex = threading.Lock()  # the parent's may have been held by a thread that is gone
    fork_generation += 1
    _idle_helpers.clear()  # their threads do not exist here
    me = threading.get_ident()
    for path, entry in list(_entries.items()):
        if entry.transfer and entry.owners and entry.fd is not None:
            entry.owners = {me: 1}
            entry.waiters = []
            entry.helper = False
            entry.meta = None  # a new pid
            if entry.via is None:
                entry.via = os.getppid()  # the process that called flock(2): the kernel's holder
            if entry.op == EX:
                try:
                    entry._write_metadata(entry.fd)  # noqa: SLF001  (holder() names us now)
                except OSError:
                    entry.fd = None  # it closed the descriptor: nothing is held any more
                    entry.owners = {}
                    del _entries[path]
                    continue
            hooks, entry.transfer = entry.transfer, []
            for hook in hooks:
                hook(True)  # noqa: FBT003
            continue
        # Close, never unlock: the description is shared with the parent, and LOCK_UN here
        # would release the parent's lock. Closing means a parent killed with SIGKILL does not
        # leave its lock alive in this child.
        fd = entry.fd
        if fd is not None:
            try:
                st = os.fstat(fd)
            except OSError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) == (entry.dev, entry.ino):
                os.close(fd)
        del _entries[path]


def _register_fork_handlers() -> None:
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


_register_fork_handlers()


def snapshot() -> dict[str, Any]:
    """Registry state, for tests and the CLI: path -> (op, owners, waiters, fd)."""
    with _mutex:
        return {
            path: {"op": e.op, "owners": len(e.owners), "waiters": len(e.waiters), "fd": e.fd}
            for path, e in _entries.items()
        }
