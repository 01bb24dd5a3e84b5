"""The lock core: holds, re-entry, waiting and retries, contention errors, loss, logging, fork.

Everything proclock promises about holds is written here once, for every backend and for every
caller (ProcessLock and the decorators take the same path). A backend is a primitive that takes
and gives back a lock for one owner (`backends._protocol.Backend`); it never sees a ProcessLock.

What this module guarantees:

- An owner is a thread, an asyncio task, or (for a decorated generator) the thread or task that
  started it. Each owner takes a lock through a handle of its own, so the kernel or the server
  excludes owners of one process from each other exactly as it excludes processes. What stays
  here is one `Hold` per owner and lock: a count of re-entries.
- Re-entry by the owner that holds the lock counts on its hold (`reentrant=False` refuses it);
  an owner holding the lock shared that asks for it exclusively is refused (flock(2) cannot
  upgrade without releasing first); a wait that only this very thread could end is refused
  rather than left to hang: a sync wait inside an event loop whose other task holds the lock,
  or a task awaiting a lock its own thread holds outside the loop.
- A hold is registered (PENDING) before the backend's first syscall, and any exception between
  the kernel's grant and the end of the bookkeeping (Ctrl-C included) gives back what was
  granted: nothing is ever held with no owner. Releasing is idempotent and is redone if an
  exception interrupts it.
- The registry's lock is reentrant and its sections run no user code, encode nothing and touch
  no file: a signal handler or a finalizer that takes or releases a lock cannot deadlock. A
  handler that takes a lock its own thread is in the middle of acquiring is refused
  (ProcLockError); one that takes a lock its own thread is in the middle of releasing finishes
  that release first.
- A hold lost while held (backends with the "loss" capability report it) is logged and handed
  to every `on_lost` callback at once, re-entry then raises LockLostError, and every release
  of it raises LockLostError.
- A forked child holds nothing its parent held (its releases of those holds do nothing), except
  a hold handed over with `transfer_on_fork()`, and only if the fork succeeded.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from ._errors import LockHeldError, LockLostError, LockTimeoutError, ProcLockError
from ._logging import log as _log
from .backends._base import LOCAL, LOSS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

    from ._spec import LockSpec
    from .backends._base import Handle
    from .backends._protocol import Backend

    OnLost = Callable[[LockLostError], object]

if not getattr(sys, "_is_gil_enabled", lambda: True)():  # pragma: no cover - free-threaded
    msg = (
        "proclock keeps its in-process bookkeeping consistent with the GIL, which this "
        "free-threaded Python runs without; run it with the GIL (PYTHON_GIL=1, or -X gil=1)"
    )
    raise ImportError(msg)

generation = 0  # bumped in every forked child: holds of another generation are the parent's
_DEBUG = 10  # logging.DEBUG
_clock = time.monotonic
# Retry pauses go through these (tests inject recorders instead of sleeping).
sleep = time.sleep
sleep_async: Any = None  # asyncio.sleep, once asyncio is loaded

# Hold states.
PENDING = 0  # registered, the backend's attempt in flight
HELD = 1  # the owner holds it
RELEASING = 2  # the last release is giving it back to the backend
RELEASED = 3  # given back
GONE = 4  # handed to a forked child with transfer_on_fork(): the parent holds nothing
STATE_NAMES = ("PENDING", "HELD", "RELEASING", "RELEASED", "GONE")


class Hold:
    """One owner's hold of one lock in this process."""

    __slots__ = ("backend", "count", "gen", "handle", "key", "on_lost", "since", "spec", "state")

    # Made at every acquisition: plain stores only. `transfer` is a state of its own (below).
    def __init__(self, spec: LockSpec, backend: Backend, key: tuple[str, object]) -> None:
        self.spec, self.backend, self.key = spec, backend, key
        self.state = PENDING
        self.count = 1
        self.gen = generation
        self.handle: Handle | None = None
        self.on_lost: list[OnLost] | None = None
        self.since = 0.0  # monotonic time of the acquisition, when debug logging is on

    @property
    def owner(self) -> object:
        return self.key[1]

    @property
    def location(self) -> str:
        return self.key[0]

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def shared(self) -> bool:
        return self.spec.shared

    def watch(self, on_lost: OnLost | None) -> None:
        """Add an on_lost callback (a re-entry through another ProcessLock may bring one)."""
        if on_lost is None:
            return
        if self.on_lost is None:
            self.on_lost = [on_lost]
        elif on_lost not in self.on_lost:
            self.on_lost.append(on_lost)

    def __repr__(self) -> str:
        return f"<Hold {self.label!r} {STATE_NAMES[self.state]} x{self.count} by {self.owner!r}>"


_transfers: set[Hold] = set()  # holds to hand to the child of the next fork()
# _guard: there is none. The registry and the holds change in sections marked "atomic" that make
# no call (no method, no allocation of a tracked object): CPython switches threads, and runs
# signal handlers and finalizers, only at calls and backward jumps, so nothing can run inside
# them, and an owner's own steps never interleave with another thread's. That is why a signal
# handler or finalizer that takes or releases a lock cannot deadlock on proclock: there is no
# internal lock to hold. Where the GIL is disabled this does not hold, and proclock refuses to
# import (below).
_holds: dict[tuple[str, object], Hold] = {}
_debug = _log.debug_enabled


def current_owner() -> object:
    """The asyncio task running in this thread if any, else the thread."""
    loop = _running_loop()
    if loop is not None:
        task = _current_task(loop)
        if task is not None:
            return task
    return _get_ident()


def _running_loop() -> Any:
    """The running loop of this thread (asyncio's), or None; asyncio is never imported here."""
    global _running_loop, _current_task  # noqa: PLW0603
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return None
    # From now on, asyncio's own functions (C), without looking them up again.
    _running_loop = asyncio.events._get_running_loop  # noqa: SLF001
    _current_task = asyncio.current_task
    return _running_loop()


_current_task: Any = None
_get_ident = threading.get_ident
_modules = sys.modules


# -- taking -----------------------------------------------------------------------------------


def take(
    spec: LockSpec,
    backend: Backend,
    owner: object,
    on_lost: OnLost | None,
    describe: bool = True,  # noqa: FBT002  (positional: called at every acquisition)
) -> Hold:
    """Take the lock for `owner`, waiting and retrying as `spec` says; the hold, or raise.

    With `describe=False` (a decorator that skips busy calls), a LockHeldError looks up who
    holds the lock only if its `holder` is read; else it is looked up at once, while the
    contention is fresh.

    Raises:
        LockHeldError: busy, with blocking=False, timeout=0, or the retries spent.
        LockTimeoutError: busy until a positive timeout expired.
        LockLostError: re-entry into a hold that was lost.
        ProcLockError: refused re-entry, upgrade or self-deadlock.
        OSError: the primitive failed (an unusable lock file, a server that is down).
    """
    location = backend.location(spec)
    key = (location, owner)
    hold = _holds.get(key)
    if hold is not None and _reenter(hold, spec, on_lost):
        return hold
    hold = Hold(spec, backend, key)
    _holds[key] = hold  # PENDING: a nested take by this owner now knows it is in flight
    handle = None
    try:
        if on_lost is not None:
            hold.on_lost = [on_lost]
        # The check _debug() makes, inlined: nothing at all while logging is not imported, else
        # the logger's own cache of its answer.
        logger = _log._logger  # noqa: SLF001
        debug: Any
        if logger is None:
            debug = "logging" in _modules and _debug()
        else:
            debug = None if logger.disabled else logger._cache.get(_DEBUG)  # noqa: SLF001
            if debug is None:
                debug = _debug()
        if spec.blocking and spec.timeout is None and not debug:
            # An unbounded wait: straight to the backend's blocking wait (one syscall when free).
            if _running_loop() is not None:
                _refuse_self_deadlock(location, owner, sync=True, backend=backend)
            handle = backend.acquire(spec, None)
            if handle is None:  # pragma: no cover - a backend breaking its contract
                msg = f"{backend!r} gave up an unbounded wait for {spec.label!r}"
                raise ProcLockError(msg)  # noqa: TRY301
        else:
            handle = backend.try_acquire(spec)
            if handle is None:
                handle = _contended(spec, backend, location, owner, hold)
        if debug or LOSS in backend.capabilities:
            _held(hold, handle, debug=debug)
        else:  # _held(), inlined for the common case
            hold.handle = handle
            hold.state = HELD
    except BaseException as exc:
        _drop(hold, handle)
        if describe and isinstance(exc, LockHeldError):
            _ = exc.holder  # who held it at the moment we gave up
        raise
    return hold


async def take_async(
    spec: LockSpec,
    backend: Backend,
    owner: object,
    on_lost: OnLost | None,
    describe: bool = True,  # noqa: FBT002  (positional: called at every acquisition)
) -> Hold:
    """`take` for coroutines: waits without blocking the event loop; cancellable at any await."""
    location = backend.location(spec)
    key = (location, owner)
    hold = _holds.get(key)
    if hold is not None and _reenter(hold, spec, on_lost):
        return hold
    hold = Hold(spec, backend, key)
    _holds[key] = hold
    handle = None
    try:
        if on_lost is not None:
            hold.on_lost = [on_lost]
        handle = await _try_async(spec, backend)
        if handle is None:
            handle = await _contended_async(spec, backend, location, owner, hold)
        _held(hold, handle, debug=_debug())
    except BaseException as exc:
        _drop(hold, handle)
        if describe and isinstance(exc, LockHeldError):
            _ = exc.holder  # who held it at the moment we gave up
        raise
    return hold


def _reenter(hold: Hold, spec: LockSpec, on_lost: OnLost | None) -> bool:
    """Count a re-entry into `hold` by its owner; False if it is not held any more."""
    state = hold.state
    if state == PENDING:
        msg = (
            f"{spec.label!r} ({hold.location}) is being acquired by this same thread or task, "
            "which a signal handler or finalizer interrupted to take it again: waiting here "
            "could never end; take it outside the handler, or use another lock"
        )
        raise ProcLockError(msg)
    if state == RELEASING:
        _finish_release(hold)  # a handler interrupted our own release: finish it, then take anew
        return False
    if state != HELD or hold.gen != generation:
        return False
    kind = "thread" if isinstance(hold.owner, int) else "task"
    if not spec.reentrant:
        msg = (
            f"{spec.label!r} ({hold.location}) is already held by this {kind} and "
            "reentrant=False forbids taking it again; release it first, or pass reentrant=True"
        )
        raise ProcLockError(msg)
    if hold.shared and not spec.shared:
        msg = (
            f"{spec.label!r} ({hold.location}) is held shared by this {kind}, which now asks for "
            "it exclusively: flock(2) cannot upgrade atomically (it would release first); "
            "release the shared lock, then take the exclusive one"
        )
        raise ProcLockError(msg)
    handle = hold.handle
    if handle is not None and handle._lost is not None:  # noqa: SLF001
        raise _lost_error(hold, handle)
    # atomic (see the comment above _holds)
    if hold.state != HELD:
        return False  # released by another thread just now (a generator's finalizer)
    hold.count += 1
    hold.watch(on_lost)
    return True


def _held(hold: Hold, handle: Handle, *, debug: bool) -> None:
    """The backend granted `handle` to `hold`: link them, then count it held."""
    lost_already = False
    if LOSS in hold.backend.capabilities:
        # atomic, as report_lost's: a loss reported now is announced exactly once
        handle._core = hold  # noqa: SLF001
        lost_already = handle._lost is not None  # noqa: SLF001
    hold.handle = handle
    hold.state = HELD
    if debug:
        now = _clock()
        waited = f"after {now - hold.since:.6f}s" if hold.since else "at once"
        hold.since = now
        _log.debug("acquired %r (%s) %s", hold.spec.label, hold.key[0], waited)
    if lost_already:  # lost before we could link it: report_lost could not announce it
        _announce(hold, handle)


def _drop(hold: Hold, handle: Handle | None) -> None:
    """Undo a take that failed or was interrupted: unregister, give back what was granted."""
    # atomic
    key = hold.key
    if key in _holds and _holds[key] is hold:
        del _holds[key]
    hold.state = RELEASED
    if handle is not None:
        hold.backend.release(handle)


def _refuse_self_deadlock(
    location: str, owner: object, *, sync: bool, backend: Backend | None = None
) -> None:
    """Refuse a wait that only this very thread could end: it would hang forever.

    A lock that several may hold at once (a semaphore: the backend's `max_holders`) is such a
    wait only when this thread's blockers hold every one of its places.
    """
    me = threading.get_ident()
    asyncio = sys.modules.get("asyncio")
    loop = asyncio.events._get_running_loop() if asyncio is not None else None  # noqa: SLF001
    if loop is None and owner == me:
        return  # a thread outside any event loop: its own holds were counted as re-entry
    blocker = None
    blockers = 0
    for (where, other), hold in list(_holds.items()):
        if where != location or other is owner or hold.state != HELD:
            continue
        if other == me:
            blocker = "the thread running this event loop, outside it"
            blockers += 1
        elif (
            sync and loop is not None and not isinstance(other, int) and other.get_loop() is loop  # type: ignore[attr-defined]
        ):
            blocker = "another task of this event loop (await the lock instead)"
            blockers += 1
    if blocker is not None and blockers >= getattr(backend, "max_holders", 1):
        msg = (
            f"the lock at {location} is held by {blocker}: waiting here would never end; "
            "release it first"
        )
        raise ProcLockError(msg)


class _Plan:
    """What a contended acquisition does next, for the sync and the async driver alike.

    After the first try failed: wait (if the spec allows) until the attempt's deadline, then,
    while retries are left, pause and try again; when they are spent, raise the busy error.
    """

    __slots__ = ("attempts", "backend", "debug", "location", "pauses", "spec", "start", "wait")

    def __init__(  # noqa: PLR0917  (internal: made in two places)
        self,
        spec: LockSpec,
        backend: Backend,
        location: str,
        owner: object,
        hold: Hold,
        sync: bool,
    ) -> None:
        self.spec, self.backend, self.location = spec, backend, location
        self.start = _clock()
        self.wait = spec.blocking and spec.timeout != 0
        self.attempts = 1
        self.pauses: Iterator[float] | None = None
        self.debug = _debug()
        if self.wait:
            _refuse_self_deadlock(location, owner, sync=sync, backend=backend)
        if self.debug:
            hold.since = self.start
            if self.wait:
                _log.debug("waiting for %r (%s)", spec.label, location)

    def deadline(self) -> float | None:
        """When this attempt's wait ends (None: never)."""
        timeout = self.spec.timeout
        return None if timeout is None else _clock() + timeout

    def pause(self) -> float:
        """The pause before the next attempt; raises the busy error when none is left."""
        if self.pauses is None:
            self.pauses = self.spec.retry.pauses()
        pause = next(self.pauses, None)
        spec = self.spec
        if pause is None:
            backend = self.backend
            busy = getattr(backend, "busy_error", None)
            if busy is not None:  # a backend whose busy errors say more (a semaphore's)
                raise busy(spec, self.location, self.wait, _clock() - self.start, self.attempts)
            cls = LockTimeoutError if self.wait else LockHeldError
            raise cls(
                self.location,
                spec.label,
                None,
                _clock() - self.start,
                self.attempts,
                lookup=lambda: backend.holder(spec),
            )
        if self.debug:
            _log.debug("retrying %r in %.3fs (attempt %d)", spec.label, pause, self.attempts + 1)
        self.attempts += 1
        return pause


def _contended(
    spec: LockSpec, backend: Backend, location: str, owner: object, hold: Hold
) -> Handle:
    """The first try failed: wait and retry as the spec says (_Plan), or raise."""
    plan = _Plan(spec, backend, location, owner, hold, True)  # noqa: FBT003
    while True:
        if plan.wait:
            handle = backend.acquire(spec, plan.deadline())
            if handle is not None:
                return handle
        sleep(plan.pause())
        handle = backend.try_acquire(spec)
        if handle is not None:
            return handle


async def _contended_async(
    spec: LockSpec, backend: Backend, location: str, owner: object, hold: Hold
) -> Handle:
    """`_contended` for coroutines: the same _Plan, waits that never block the event loop."""
    plan = _Plan(spec, backend, location, owner, hold, False)  # noqa: FBT003
    while True:
        if plan.wait:
            handle = await backend.acquire_async(spec, plan.deadline())
            if handle is not None:
                return handle
        await _async_sleep(plan.pause())
        handle = await _try_async(spec, backend)
        if handle is not None:
            return handle


async def _try_async(spec: LockSpec, backend: Backend) -> Handle | None:
    """One attempt that does not wait, without blocking the event loop on a network."""
    if LOCAL in backend.capabilities:
        return backend.try_acquire(spec)
    # A past deadline: the backend's async wait makes its one attempt in its own way (a
    # worker thread, an async client) and gives up at once.
    return await backend.acquire_async(spec, _clock())


async def _async_sleep(seconds: float) -> None:
    fn = sleep_async
    if fn is None:
        import asyncio  # noqa: PLC0415

        fn = asyncio.sleep
    await fn(seconds)


# -- giving back ------------------------------------------------------------------------------


def give(hold: Hold) -> None:
    """Give back one hold; the last one releases the backend's handle.

    Does nothing for a hold already released, handed to a forked child, or taken by the parent
    of this forked process.

    Raises:
        LockLostError: the hold was lost while held (raised by every release of it).
    """
    handle = None
    try:
        # atomic (see the comment above _holds)
        if hold.state != HELD or hold.gen != generation:
            return
        if hold.count > 1:
            hold.count -= 1
        else:
            hold.count = 0
            hold.state = RELEASING
            handle = hold.handle
        if handle is not None:
            if hold.since or _transfers:
                _finish_release(hold)
            else:  # _finish_release(), inlined for the common case
                hold.backend.release(handle)
                # atomic
                if hold.state == RELEASING:
                    hold.state = RELEASED
                    key = hold.key
                    if key in _holds and _holds[key] is hold:
                        del _holds[key]
    except BaseException:
        if handle is not None:
            _finish_release(hold)  # interrupted (Ctrl-C): the release is redone, never lost
        raise
    lost = hold.handle
    if lost is not None and lost._lost is not None:  # noqa: SLF001
        raise _lost_error(hold, lost)


def give_again(hold: Hold, count: int) -> None:
    """After `give(hold)` raised: give it back after all if give() never began.

    A KeyboardInterrupt can land on give()'s very first instruction, before anything of it
    ran; only its caller can tell (the count it read before the call is unchanged) and redo it.
    Callers: `count = hold.count; try: give(hold) except BaseException: give_again(hold, count)`.
    """
    if hold.count == count and hold.state == HELD:
        give(hold)


def _finish_release(hold: Hold) -> None:
    """RELEASING -> RELEASED: give the handle back (idempotent), then unregister."""
    handle = hold.handle
    assert handle is not None  # noqa: S101
    hold.backend.release(handle)
    # atomic
    if hold.state != RELEASING:
        return
    hold.state = RELEASED
    key = hold.key
    if key in _holds and _holds[key] is hold:
        del _holds[key]
    if _transfers:
        _transfers.discard(hold)
    if hold.since and _debug():
        _log.debug(
            "released %r (%s) after holding %.6fs",
            hold.spec.label,
            hold.key[0],
            _clock() - hold.since,
        )


# -- loss -------------------------------------------------------------------------------------


def report_lost(handle: Handle, reason: str) -> None:
    """Called by a backend the moment it knows `handle` is lost: log, then call on_lost.

    Safe from any thread; the first report wins.
    """
    # atomic, as _held's
    if handle._lost is not None:  # noqa: SLF001
        return
    handle._lost = reason  # noqa: SLF001
    hold = handle._core  # noqa: SLF001
    if hold is not None:
        _announce(hold, handle)


def _lost_error(hold: Hold, handle: Handle) -> LockLostError:
    return LockLostError(handle.location, hold.label, handle._lost or "", handle.fencing_token)  # noqa: SLF001


def _announce(hold: Hold, handle: Handle) -> None:
    error = _lost_error(hold, handle)
    _log.error("%s", error)
    for callback in list(hold.on_lost or ()):
        try:
            callback(error)
        except Exception:  # noqa: BLE001  (a failing callback must not kill the watcher)
            _log.error("on_lost callback of %r raised", hold.label)


# -- fork -------------------------------------------------------------------------------------


def transfer_on_fork(hold: Hold) -> None:
    """Hand `hold` to the child of the next os.fork() (for daemonizing)."""
    from .backends._base import FD  # noqa: PLC0415

    if FD not in hold.backend.capabilities:
        msg = (
            f"transfer_on_fork() of {hold.label!r}: the {hold.backend!r} backend's locks live in "
            "a server session or lease that a child process cannot take over; only flock "
            "locks (a descriptor the child inherits) can be handed over"
        )
        raise ProcLockError(msg)
    _transfers.add(hold)


_handshake: tuple[int, int] | None = None  # (read, write): the child says it exists


def _flock_backend() -> Any:
    return sys.modules.get("proclock.backends.flock")


def _before_fork() -> None:
    global _handshake  # noqa: PLW0603
    flock = _flock_backend()
    if flock is not None:
        for lock in flock.FlockBackend.fork_locks():
            lock.acquire()
    _handshake = None
    if any(h.state == HELD and h.gen == generation for h in _transfers):
        try:
            _handshake = os.pipe()
        except OSError:  # no descriptors left: the transfer cannot be confirmed, so it waits
            _handshake = None


def _release_fork_locks() -> None:
    flock = _flock_backend()
    if flock is not None:
        for lock in reversed(flock.FlockBackend.fork_locks()):
            lock.release()


def _after_fork_in_parent() -> None:
    global _handshake
    try:
        pipe, _handshake = _handshake, None
        if pipe is None:
            return
        read, write = pipe
        os.close(write)
        try:
            # The child writes at once from its own at-fork handler; if fork() failed there is
            # no child and no other writer: EOF, and the parent keeps its locks.
            born = os.read(read, 1) == b"x"
        finally:
            os.close(read)
        if not born:
            return
        flock = _flock_backend()
        for hold in list(_transfers):
            _transfers.discard(hold)
            if hold.state == HELD and hold.gen == generation:
                hold.state = GONE
                if _holds.get(hold.key) is hold:
                    del _holds[hold.key]
                if flock is not None and hold.handle is not None:
                    flock.FlockBackend.handed_over(hold.handle)
    finally:
        _release_fork_locks()


def _after_fork_in_child() -> None:
    global generation, _handshake  # noqa: PLW0603
    generation += 1
    parent = os.getppid()
    me = threading.get_ident()
    kept = [h for h in _transfers if h.state == HELD and h.gen == generation - 1]
    _transfers.clear()
    _holds.clear()
    for hold in kept:
        hold.gen = generation
        hold.key = (hold.key[0], me)  # the forking thread owns it here
        _holds[hold.key] = hold
    flock = _flock_backend()
    if flock is not None:
        flock.FlockBackend.after_fork_in_child([h.handle for h in kept if h.handle is not None])
        for hold in kept:
            if hold.handle is not None:
                try:
                    flock.FlockBackend.rewrite_record(hold.handle, hold.label, parent)
                except OSError as exc:
                    _log.error("could not rewrite the record of %r: %s", hold.label, exc)
    pipe, _handshake = _handshake, None
    if pipe is not None:
        read, write = pipe
        try:
            os.write(write, b"x")
        finally:
            os.close(write)
            os.close(read)


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


# -- introspection ----------------------------------------------------------------------------


def holds() -> list[Hold]:
    """The holds of this process now (PENDING ones included), for tests and the CLI."""
    return [h for h in list(_holds.values()) if h.gen == generation]


def snapshot() -> dict[str, dict[str, int]]:
    """Location -> {"owners": owners holding it, "holds": with re-entries, "waiters": attempts}.

    For tests and the CLI: what this process holds and is acquiring (waiting for) now.
    """
    out: dict[str, dict[str, int]] = {}
    for hold in holds():
        row = out.setdefault(hold.location, {"owners": 0, "holds": 0, "waiters": 0})
        if hold.state == HELD:
            row["owners"] += 1
            row["holds"] += hold.count
        elif hold.state == PENDING:
            row["waiters"] += 1
    return out
