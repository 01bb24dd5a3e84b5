"""ProcessLock: a named lock, across processes, threads and tasks; `lock_path`."""

from __future__ import annotations

from . import _core, _names, _policy
from ._errors import ProcLockError
from ._spec import make_spec
from .backends._base import SHARED
from .backends.flock import FLOCK, vetted_path

TYPE_CHECKING = False  # typing costs ~3 ms of import time; mypy reads this as typing's
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType
    from typing import Any

    from typing_extensions import Self

    from ._core import Hold
    from ._dirs import StrPath
    from ._errors import LockLostError
    from ._holder import Holder
    from ._policy import Retry
    from ._spec import LockSpec
    from .backends._base import Handle
    from .backends._protocol import Backend


class _Unset:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<default>"


UNSET: Any = _Unset()


class Acquired:
    """One hold taken by `ProcessLock.acquire()`: `with` on it releases exactly that hold.

    So `with lock.acquire(timeout=1):` holds the lock once, and `lock.acquire()` followed by
    `with lock:` holds it twice (the block's end releases only its own hold). Entering it
    gives the lock itself: `with lock.acquire(timeout=1) as same: assert same is lock`.
    """

    __slots__ = ("_done", "_hold", "lock")

    def __init__(self, lock: ProcessLock, hold: Hold) -> None:
        self.lock, self._hold, self._done = lock, hold, False

    @property
    def held(self) -> bool:
        """True until this hold is released (or the process forked: a child holds nothing)."""
        hold = self._hold
        return not self._done and hold.state == _core.HELD and hold.gen == _core.generation

    @property
    def handle(self) -> Handle | None:
        """The backend's handle of this hold (location, fencing token, descriptor)."""
        return self._hold.handle

    @property
    def fencing_token(self) -> int | None:
        """The fencing token of this hold (see `ProcessLock.fencing_token`)."""
        handle = self._hold.handle
        return handle.fencing_token if handle is not None else None

    def release(self) -> None:
        """Release this hold (once; a second call raises ProcLockError)."""
        hold = self._hold
        if self._done or hold not in self.lock._entries:  # noqa: SLF001
            if hold.gen != _core.generation or hold.state == _core.GONE:
                return  # a hold of the parent of this forked process, or handed to a child
            msg = f"this hold of {self.lock.name!r} was released already"
            raise ProcLockError(msg)
        self._done = True
        self.lock._give(hold)  # noqa: SLF001

    def __enter__(self) -> ProcessLock:
        return self.lock

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> ProcessLock:
        return self.lock

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<Acquired {self.lock.name!r} {'held' if self.held else 'released'}>"


class ProcessLock:
    """An exclusive (or shared) lock on a name, across processes, threads and tasks.

    Args:
        name: the lock's name; its file is `lock_path(name)`.
        path: an explicit lock file instead of a name (for interop with other programs).
        blocking: wait for the lock (True) or make one attempt (False).
        timeout: seconds to wait; None waits forever; 0 is one attempt.
        retry: a `Retry`, or an int of attempts in all.
        shared: take a reader lock (LOCK_SH) instead of an exclusive one.
        lock_dir: the directory for the lock file (else $PROCLOCK_DIR, then the defaults).
        mode: permissions of a lock file proclock creates (must include 0o600).
        reentrant: count re-entry by the same thread or task (else it raises ProcLockError).
        backend: None for flock(2), a URL ("postgresql://...", "redis://...") or a backend.
        on_lost: called with the LockLostError the moment a held lock is lost (network
            backends only: a flock(2) lock cannot be lost while its holder lives).

    Raises:
        TypeError, ValueError: an option that cannot be used, named in the message.

    Each thread and asyncio task that holds or waits does so through a descriptor (session,
    token) of its own, so they exclude each other as processes do; re-entry by the same one is
    counted. An exclusive holder writes a JSON record (pid, host, argv, acquired-at) into the
    lock file, but only into a file that is empty or already holds such a record: a file with
    other content given as `path=` is never written, truncated or chmod-ed.
    """

    __slots__ = ("__weakref__", "_backend", "_entries", "_on_lost", "_spec", "_stale")

    # What acquire() returns for a hold: a semaphore's is a Slot, which also says which slot.
    _taken: type[Acquired] = Acquired

    def __init__(
        self,
        name: str | None = None,
        *,
        path: StrPath | None = None,
        blocking: bool = True,
        timeout: float | None = None,
        retry: Retry | int | None = None,
        shared: bool = False,
        lock_dir: StrPath | None = None,
        mode: int = 0o600,
        reentrant: bool = True,
        backend: Backend | str | None = None,
        on_lost: Callable[[LockLostError], object] | None = None,
    ) -> None:
        if name is not None and path is None and _looks_like_a_path(name):
            _warn_path_like(name)
        spec = make_spec(
            name,
            path=path,
            blocking=blocking,
            timeout=timeout,
            retry=retry,
            shared=shared,
            lock_dir=lock_dir,
            mode=mode,
            reentrant=reentrant,
        )
        chosen: Backend = FLOCK if backend is None else _backends_resolve(backend)
        if chosen is not FLOCK and (path is not None or lock_dir is not None):
            msg = (
                f"path= and lock_dir= name lock files; the {chosen!r} backend has none "
                "(drop them, or drop backend= to lock a file)"
            )
            raise ValueError(msg)
        if shared and SHARED not in chosen.capabilities:
            msg = (
                f"lock {spec.label!r}: the {chosen!r} backend has no shared locks; drop "
                "shared=True, or use a backend that has them (flock, PostgreSQL)"
            )
            raise ValueError(msg)
        if on_lost is not None and not callable(on_lost):
            msg = f"on_lost must be a callable taking the LockLostError, not {on_lost!r}"
            raise TypeError(msg)
        self._spec, self._backend, self._on_lost = spec, chosen, on_lost
        # Holds taken through this object, oldest first (a re-entered hold once per entry).
        self._entries: list[Hold] = []
        # Owners of holds that ended without a release through this object (taken by the parent
        # of this forked process, or handed to a child): their release() does nothing.
        self._stale: list[object] = []

    @classmethod
    def _from_spec(
        cls, spec: LockSpec, backend: Backend, on_lost: Callable[[LockLostError], object] | None
    ) -> ProcessLock:
        lock = object.__new__(cls)
        lock._spec, lock._backend, lock._on_lost = spec, backend, on_lost
        lock._entries = []
        lock._stale = []
        return lock

    # -- what and where --------------------------------------------------------------------

    @property
    def spec(self) -> LockSpec:
        """The validated options, as backends receive them."""
        return self._spec

    @property
    def name(self) -> str:
        """The lock's name (the path for a lock made with path=)."""
        return self._spec.label

    @property
    def backend(self) -> Backend:
        """The backend that takes this lock (flock unless backend= was given)."""
        return self._backend

    @property
    def path(self) -> str:
        """Where the lock lives: the file held, else where it would be taken now.

        For flock(2), the lock directory is vetted (and the default one created) but no file.
        For a network backend, the server and the key.
        """
        live = self._live()
        if live:
            return live[-1].key[0]
        if self._backend is FLOCK:
            return vetted_path(self._spec)
        return self._backend.location(self._spec)

    # -- state -----------------------------------------------------------------------------

    def _live(self) -> list[Hold]:
        entries = self._entries
        generation = _core.generation
        if entries and not all(h.state == _core.HELD and h.gen == generation for h in entries):
            live = [h for h in entries if h.state == _core.HELD and h.gen == generation]
            self._stale.extend(
                h.key[1] for h in entries if h.state != _core.RELEASED and h not in live
            )
            self._entries = entries = live
        return entries

    @property
    def locked(self) -> bool:
        """True while this object holds the lock in this process (by any thread or task).

        Calls of a decorated function hold it through the decorator's lock, which is the
        object `lock_of(func)` returns: `lock_of(func).locked` is True while a call runs here.
        """
        if self._live():
            return True
        spec = self._spec
        return any(h.spec is spec and h.state == _core.HELD for h in _core.holds())

    @property
    def fencing_token(self) -> int | None:
        """The fencing token of the innermost hold: strictly increasing per lock name.

        Pass it to the storage you protect so that a holder that lost the lock (a paused
        process whose lease expired) is refused there. None where the backend has no tokens
        (flock: a lock on one machine cannot be lost while its holder lives).
        """
        live = self._live()
        handle = live[-1].handle if live else None
        return handle.fencing_token if handle is not None else None

    def holder(self) -> Holder | None:
        """Who holds the lock now, as the kernel (or server) reports it; None if it is free.

        For a shared lock held by several processes, one of them: another process than the
        caller where there is one.
        """
        return self._backend.holder(self._spec)

    def __repr__(self) -> str:
        state = "locked" if self.locked else "unlocked"
        return f"<ProcessLock {self.name!r} {state}{' shared' if self._spec.shared else ''}>"

    # -- acquire / release -----------------------------------------------------------------

    def _spec_for(self, blocking: Any, timeout: Any) -> LockSpec:
        """The spec of one acquire() call: the constructor's, or with its blocking/timeout."""
        spec = self._spec
        if blocking is UNSET and timeout is UNSET:
            return spec
        if isinstance(blocking, (int, float)) and not isinstance(blocking, bool):
            msg = (
                f"acquire({blocking!r}): blocking is True or False, and timeout is keyword-only: "
                f"acquire(timeout={blocking!r})"
            )
            raise TypeError(msg)
        if timeout is UNSET:
            timeout = spec.timeout if blocking else None
        else:
            timeout = _policy.check_timeout(timeout)
            if blocking is UNSET:
                blocking = True if timeout is not None else spec.blocking
        _policy.check_wait(blocking=blocking, timeout=timeout, retry=_policy.ONE_ATTEMPT)
        if (blocking, timeout) == (spec.blocking, spec.timeout):
            return spec
        return spec.replace(blocking=blocking, timeout=timeout)

    def acquire(self, blocking: bool = UNSET, timeout: float | None = UNSET) -> Acquired:
        """Take the lock, or raise. Never returns False.

        The arguments default to the constructor's; an explicit `timeout=None` waits forever.
        Returns an `Acquired`: `with lock.acquire(timeout=1):` releases exactly that hold at
        the end of the block.

        Raises:
            LockHeldError: busy, with `blocking=False`, `timeout=0`, or the retries spent.
            LockTimeoutError: busy until a positive timeout expired.
            ProcLockError: re-entry with `reentrant=False`, a shared holder asking for the
                exclusive lock, or a wait that could never end (self-deadlock).
            OSError: the lock file cannot be opened or locked (EACCES, EROFS, ENOLCK...), or
                the lock server is unavailable (BackendUnavailableError).
        """
        if blocking is UNSET and timeout is UNSET:
            spec = self._spec
        else:
            spec = self._spec_for(blocking, timeout)
        hold = _core.take(spec, self._backend, _core.current_owner(), self._on_lost)
        try:  # inline, not a call: Ctrl-C on a callee's first instruction would lose the hold
            self._entries.append(hold)
            return self._taken(self, hold)
        except BaseException:
            self._give(hold)  # interrupted (Ctrl-C) before it was returned: nothing is kept
            raise

    async def acquire_async(
        self, blocking: bool = UNSET, timeout: float | None = UNSET
    ) -> Acquired:
        """`acquire` for coroutines: waits without blocking the event loop.

        Same arguments, result and errors as `acquire`. A task cancelled while it waits
        (`asyncio.CancelledError`, `asyncio.timeout`) leaves nothing held or queued.
        """
        spec = self._spec_for(blocking, timeout)
        hold = await _core.take_async(spec, self._backend, _core.current_owner(), self._on_lost)
        try:  # inline, not a call: Ctrl-C on a callee's first instruction would lose the hold
            self._entries.append(hold)
            return self._taken(self, hold)
        except BaseException:
            self._give(hold)  # interrupted (Ctrl-C) before it was returned: nothing is kept
            raise

    def release(self) -> None:
        """Release one hold taken through this object by the current thread or task.

        The innermost one; if the current owner holds none but exactly one hold is taken
        through this object, that one (as threading.Lock allows). In a forked child, which
        holds nothing of its parent's, releasing a hold the parent took does nothing.

        Raises:
            ProcLockError: nothing to release.
            LockLostError: the hold was lost while held (network backends).
        """
        owner = _core.current_owner()
        entries = self._entries
        if entries:  # the common case: the innermost hold, by its owner
            hold = entries[-1]
            if hold.state == _core.HELD and hold.gen == _core.generation and hold.key[1] == owner:
                self._give(hold)
                return
        live = self._live()
        for hold in reversed(live):
            if hold.key[1] == owner:
                self._give(hold)
                return
        stale = self._stale
        if owner in stale:
            stale.remove(owner)  # its hold was the parent's (this process forked since)
            return
        if not live:
            if stale:
                stale.pop()  # a hold of the parent of this forked process, or handed over
                return
            msg = f"release of {self.name!r}, which this ProcessLock does not hold"
            raise ProcLockError(msg)
        if len(live) != 1:
            msg = (
                f"release of {self.name!r} by a thread or task that does not hold it "
                "through this ProcessLock"
            )
            raise ProcLockError(msg)
        self._give(live[0])  # the only hold: released on its owner's behalf (as threading.Lock)

    def _give(self, hold: Hold) -> None:
        """Give back one hold taken through this object, then forget that entry.

        Robust to Ctrl-C at any point: interrupted before give() began, it is redone.
        """
        count = hold.count
        try:
            _core.give(hold)
        except BaseException:
            _core.give_again(hold, count)  # interrupted before give() began: all the same
            raise
        finally:
            entries = self._entries
            if entries and entries[-1] is hold:
                entries.pop()
            elif hold in entries:
                entries.reverse()  # the innermost entry of this hold
                entries.remove(hold)
                entries.reverse()

    def transfer_on_fork(self) -> Self:
        """Hand this held lock to the child at the next os.fork() (for daemonizing).

        After a successful fork the child holds it (in the forking thread) and the parent does
        not: the parent's descriptor is closed without unlocking, so the parent can exit and
        the daemon keeps the lock. If fork() fails, the parent keeps it. Only this object's
        innermost hold by the current thread or task is handed over, never another thread's.

        Raises:
            ProcLockError: the lock is not held by this object, or its backend's locks cannot
                be handed to a child (only flock(2) locks can).
        """
        live = self._live()
        owner = _core.current_owner()
        mine = [h for h in live if h.key[1] == owner]
        if not mine:
            msg = f"transfer_on_fork() of {self.name!r}, which this ProcessLock does not hold"
            raise ProcLockError(msg)
        _core.transfer_on_fork(mine[-1])
        return self

    def _held_fd(self) -> int | None:
        """The descriptor of the innermost live hold, for the CLI to pass to a command."""
        live = self._live()
        handle = live[-1].handle if live else None
        return handle.fd if handle is not None else None

    # -- context managers ------------------------------------------------------------------

    def __enter__(self) -> Self:
        hold = _core.take(self._spec, self._backend, _core.current_owner(), self._on_lost)
        try:
            self._entries.append(hold)
        except BaseException:
            self._give(hold)  # interrupted (Ctrl-C) before it was recorded: nothing is kept
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> Self:
        await self.acquire_async()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def _renamed(self, name: str) -> ProcessLock:
        """A lock with the same (already validated) options under another name."""
        spec = self._spec.replace(name=_names.check_name(name), path=None)
        # type(self): a semaphore's template gives a semaphore.
        return type(self)._from_spec(spec, self._backend, self._on_lost)  # noqa: SLF001


_warned_names: set[str] = set()


def _looks_like_a_path(name: object) -> bool:
    """An absolute file path given as a name ("/tmp/app.lock"), as filelock users write it."""
    return (
        isinstance(name, str)
        and name.startswith("/")
        and (name.rfind("/") > 0 or name.endswith((".lock", ".pid")))
    )


def _warn_path_like(name: str) -> None:
    """Warn once per name that it names a lock in the lock directory, not that file."""
    if name in _warned_names:
        return
    _warned_names.add(name)
    import sys  # noqa: PLC0415
    import warnings  # noqa: PLC0415

    # Point at the user's line: the first frame outside proclock (a decorator or ProcessLock).
    level, frame = 1, sys._getframe(0)  # noqa: SLF001
    while frame is not None and frame.f_globals.get("__name__", "").startswith("proclock."):
        level, frame = level + 1, frame.f_back  # type: ignore[assignment]
    warnings.warn(
        f"the lock name {name!r} looks like a file path, but a name locks a file of its own "
        f"in the lock directory, not {name}; to lock that file, write path={name!r} "
        "(or drop the leading '/' from the name)",
        UserWarning,
        stacklevel=level,
    )


def _backends_resolve(backend: object) -> Backend:
    from .backends import resolve  # noqa: PLC0415

    return resolve(backend)


def lock_path(name: str, *, lock_dir: StrPath | None = None) -> str:
    """The lock file of `name`, for flock(1) and other programs: `ProcessLock(name).path`.

    A str, as `ProcessLock.path` and the errors' `.path` are; the directory in it is the real
    one (symlinks resolved). Vets (and for the default directory, creates) the directory,
    never the file.

    Raises:
        LockNameError: the name is empty or holds a NUL byte.
        UnsafeLockPathError: the directory cannot be used safely.
    """
    spec = make_spec(
        name,
        path=None,
        blocking=True,
        timeout=None,
        retry=None,
        shared=False,
        lock_dir=lock_dir,
        mode=0o600,
        reentrant=True,
    )
    return vetted_path(spec)
