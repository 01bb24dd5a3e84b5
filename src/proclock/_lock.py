"""ProcessLock: a named lock file, held with flock(2), shared safely by threads and tasks."""

from __future__ import annotations

import os
import time

from . import _dirs, _names, _owners, _policy
from ._errors import LockHeldError, ProcLockError
from ._logging import log as _log
from .backends.flock import FLOCK

TYPE_CHECKING = False  # typing costs ~3 ms of import time; mypy reads this as typing's
if TYPE_CHECKING:
    import pathlib
    from collections.abc import Callable
    from types import TracebackType
    from typing import Any

    from typing_extensions import Self

    from ._dirs import StrPath
    from ._errors import LockLostError
    from ._holder import Holder
    from ._policy import Retry
    from .backends import Backend

# A module attribute so that tests can inject a sleep (retry timing is tested without wall
# time).
_sleep = time.sleep


class _Unset:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<default>"


UNSET: Any = _Unset()


class ProcessLock:
    """An exclusive (or shared) lock on a named file, across processes, threads and tasks.

    Args:
        name: the lock's name; its file is `lock_path(name)`.
        path: an explicit lock file instead of a name (for interop with other programs).
        blocking: wait for the lock (True) or make one attempt (False).
        timeout: seconds to wait; None waits forever; 0 is one attempt.
        retry: a `Retry`, or an int of attempts in all.
        shared: take a reader lock (LOCK_SH) instead of an exclusive one.
        lock_dir: the directory for the lock file (else $PROCLOCK_DIR, then the defaults).
        mode: permissions of a lock file proclock creates.
        reentrant: count re-entry by the same thread or task (else it raises ProcLockError).
    """

    __slots__ = (
        "__weakref__",
        "_backend",
        "_blocking",
        "_fresh",
        "_holds",
        "_label",
        "_lock_dir",
        "_mode",
        "_name",
        "_on_lost",
        "_op",
        "_path",
        "_reentrant",
        "_retry",
        "_shared",
        "_stale",
        "_timeout",
        "_where",
    )

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
        if name is None and path is None:
            msg = "ProcessLock needs a name, or path= for an explicit lock file"
            raise TypeError(msg)
        if name is not None and path is not None:
            msg = f"give ProcessLock a name or a path, not both (name={name!r}, path={path!r})"
            raise ValueError(msg)
        if path is not None and lock_dir is not None:
            msg = f"path={path!r} already names the file: lock_dir= cannot apply to it"
            raise ValueError(msg)
        self._name = _names.check_name(name) if name is not None else None
        self._path = _real_parent(os.fspath(path)) if path is not None else None
        self._timeout = _policy.check_timeout(timeout)
        self._retry = _policy.check_retry(retry)
        _policy.check_wait(blocking=blocking, timeout=self._timeout, retry=self._retry)
        if not isinstance(shared, bool) or not isinstance(reentrant, bool):
            msg = "shared= and reentrant= must be True or False"
            raise TypeError(msg)
        self._blocking = blocking
        self._backend: Backend = FLOCK if backend is None else _backends_resolve(backend)
        if self._backend is not FLOCK and (path is not None or lock_dir is not None):
            msg = (
                f"path= and lock_dir= name lock files; the {self._backend!r} backend has none "
                "(drop them, or drop backend= to lock a file)"
            )
            raise ValueError(msg)
        if on_lost is not None and not callable(on_lost):
            msg = f"on_lost must be a callable taking the LockLostError, not {on_lost!r}"
            raise TypeError(msg)
        self._on_lost = on_lost
        self._shared = shared
        self._op = _owners.SH if shared else _owners.EX
        # An explicit lock_dir is made absolute now, against the current directory, as path=
        # is; the environment ($PROCLOCK_DIR, $XDG_RUNTIME_DIR) is read at each acquisition.
        self._lock_dir = os.path.abspath(os.fspath(lock_dir)) if lock_dir is not None else None
        self._label = self._name if self._name is not None else str(self._path)
        validate = getattr(self._backend, "validate", None)
        if validate is not None:  # a backend refuses options it cannot honour (shared=True)
            validate(self)
        # (environment key, located file): re-read when the environment changes.
        self._where: tuple[object, tuple[str, str | None, str]] | None = None
        self._mode = _policy.check_mode(mode)
        self._reentrant = reentrant
        # (owner, entry, fork generation) per hold, most recent last.
        self._holds: list[tuple[object, _owners.Entry, int]] = []
        self._stale = 0  # holds dropped by a fork: their release() is a silent no-op
        # (owner, number of holds) right after acquire(): the `with` statement that follows
        # (`with lock.acquire(timeout=1):`) enters that hold instead of taking another.
        self._fresh: tuple[object, int] | None = None

    # -- where -------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The lock's name (the path for a lock made with path=)."""
        return self._label

    @property
    def path(self) -> str:
        """The lock file: the one held, else where it would be taken now (vetting the dir)."""
        holds = self._live_holds()
        if holds or self._backend is not FLOCK:
            return self._backend.where(self, holds[-1][1] if holds else None)
        path, directory, kind = FLOCK.locate(self)
        if directory is not None:
            _dirs.vet(directory, kind)
        return path

    # -- state -------------------------------------------------------------------------------

    def _live_holds(self) -> list[tuple[object, _owners.Entry, int]]:
        holds = self._holds
        if holds and holds[-1][2] != _owners.fork_generation:
            # A forked child holds nothing its parent held (unless transferred).
            live = [h for h in holds if h[2] == _owners.fork_generation]
            self._stale += len(holds) - len(live)
            holds = self._holds = live
        return holds

    @property
    def locked(self) -> bool:
        """True while this object holds the lock in this process."""
        return bool(self._live_holds())

    @property
    def fencing_token(self) -> int | None:
        """The fencing token of the innermost hold: strictly increasing per lock name.

        Pass it to the storage you protect so that a holder that lost the lock (a paused
        process whose lease expired) is refused there. None where the backend has no tokens
        (flock: a lock on one machine cannot be lost while its holder lives).
        """
        holds = self._live_holds()
        return self._backend.fencing_token(holds[-1][1]) if holds else None

    def _lost(self, error: LockLostError) -> None:
        """Called by a backend the moment it sees a hold lost: log it, call on_lost."""
        _log.error("%s", error)
        if self._on_lost is not None:
            try:
                self._on_lost(error)
            except Exception:  # noqa: BLE001  (a failing callback must not kill the watcher)
                _log.error("on_lost callback of %r raised", self._label)

    def _held_fd(self) -> int | None:
        """The descriptor of the innermost live hold, for the CLI to pass to a command."""
        holds = self._live_holds()
        return holds[-1][1].fd if holds else None

    def holder(self) -> Holder | None:
        """Who holds the lock now, as the kernel reports it; None if it is free."""
        holds = self._live_holds()
        return self._backend.holder(self, holds[-1][1] if holds else None)

    def __repr__(self) -> str:
        state = "locked" if self.locked else "unlocked"
        return f"<ProcessLock {self.name!r} {state}{' shared' if self._shared else ''}>"

    # -- acquire / release -------------------------------------------------------------------

    def _plan(self, blocking: Any, timeout: Any) -> tuple[bool, float | None]:
        if blocking is UNSET and timeout is UNSET:
            return self._blocking, self._timeout
        if timeout is UNSET:
            timeout = self._timeout if blocking else None
        else:
            timeout = _policy.check_timeout(timeout)
            if blocking is UNSET:
                blocking = True if timeout is not None else self._blocking
        _policy.check_wait(blocking=blocking, timeout=timeout, retry=_policy.ONE_ATTEMPT)
        return blocking, timeout

    def acquire(self, blocking: bool = UNSET, timeout: float | None = UNSET) -> Self:
        """Take the lock, or raise; returns the lock, so `with lock.acquire(timeout=1):` works.

        The arguments default to the constructor's; an explicit `timeout=None` waits forever.

        Raises:
            LockHeldError: busy, with `blocking=False`, `timeout=0`, or the retries spent.
            LockTimeoutError: busy until a positive timeout expired.
            ProcLockError: re-entry with `reentrant=False`, or a shared holder asking for
                the exclusive lock.
            OSError: the lock file cannot be opened or locked (EACCES, EROFS, ENOLCK...).
        """
        lock = self if blocking is UNSET and timeout is UNSET else self._with(blocking, timeout)
        owner = _owners.current_owner()
        entry: Any = lock._backend.try_now(lock, owner) or lock._take_waiting(owner)  # noqa: SLF001
        holds = self._holds
        holds.append((owner, entry, _owners.fork_generation))
        self._fresh = (owner, len(holds))
        return self

    async def acquire_async(self, blocking: bool = UNSET, timeout: float | None = UNSET) -> Self:
        """`acquire` for coroutines: waits without blocking the event loop; cancellable."""
        lock = self._with(blocking, timeout)
        owner = _owners.current_owner()
        entry = await lock._take_async(owner)  # noqa: SLF001
        self._holds.append((owner, entry, _owners.fork_generation))
        self._fresh = (owner, len(self._holds))
        return self

    def _with(self, blocking: Any, timeout: Any) -> ProcessLock:
        """Return this lock, or a copy with the per-call blocking/timeout of acquire()."""
        blocking, timeout = self._plan(blocking, timeout)
        if (blocking, timeout) == (self._blocking, self._timeout):
            return self
        lock = self._copy()
        lock._blocking, lock._timeout = blocking, timeout  # noqa: SLF001
        return lock

    def _copy(self) -> ProcessLock:
        clone = object.__new__(ProcessLock)
        for slot in ProcessLock.__slots__:
            if slot != "__weakref__":
                setattr(clone, slot, getattr(self, slot))
        clone._holds, clone._stale, clone._fresh = [], 0, None
        return clone

    # The decorators hold through these, without touching `_holds`: one decorated function
    # (one ProcessLock) is called by many threads and tasks at once.

    def _take(self, owner: object) -> Any:
        token = self._backend.try_now(self, owner)
        if token is not None:
            return token
        return self._take_waiting(owner)

    def _take_waiting(self, owner: object) -> Any:
        pauses = self._retry.pauses()
        while True:
            result = self._backend.attempt(
                self, owner, blocking=self._blocking, timeout=self._timeout
            )
            if not isinstance(result, LockHeldError):
                return result
            pause = next(pauses, None)
            if pause is None:
                raise result
            _log.debug("retrying %r in %.3fs: %s", self._label, pause, result)
            _sleep(pause)

    async def _take_async(self, owner: object) -> Any:
        import asyncio  # noqa: PLC0415

        pauses = self._retry.pauses()
        while True:
            result = await self._backend.attempt_async(
                self, owner, blocking=self._blocking, timeout=self._timeout
            )
            if not isinstance(result, LockHeldError):
                return result
            pause = next(pauses, None)
            if pause is None:
                raise result
            _log.debug("retrying %r in %.3fs: %s", self._label, pause, result)
            await asyncio.sleep(pause)

    def _give(self, token: Any, owner: object) -> None:
        self._backend.release(self, token, owner)

    def _renamed(self, name: str) -> ProcessLock:
        """A lock with the same (already validated) options under another name."""
        clone = self._copy()
        clone._name = clone._label = _names.check_name(name)  # noqa: SLF001
        clone._where = None  # noqa: SLF001  (the base's cached file is another name's)
        return clone

    def release(self) -> None:
        """Release one hold taken by the current thread or task.

        In a forked child (which holds nothing of its parent's) this is a silent no-op.

        Raises:
            ProcLockError: this thread or task does not hold the lock through this object.
        """
        self._fresh = None
        holds = self._holds
        if holds:
            last = holds[-1]
            if last[2] == _owners.fork_generation and last[0] == _owners.current_owner():
                holds.pop()  # the common case: the innermost hold, by its owner
                self._backend.release(self, last[1], last[0])
                return
        holds = self._live_holds()
        if not holds:
            if self._stale:
                self._stale -= 1
                return
            msg = f"release of {self.name!r}, which this ProcessLock does not hold"
            raise ProcLockError(msg)
        owner = _owners.current_owner()
        for i in range(len(holds) - 1, -1, -1):
            if holds[i][0] == owner:
                break
        else:
            if len(holds) != 1:
                msg = (
                    f"release of {self.name!r} by a thread or task that does not hold it "
                    "through this ProcessLock"
                )
                raise ProcLockError(msg)
            i = 0  # the only hold: released on behalf of its owner, as threading.Lock allows
        owner, entry, _ = holds.pop(i)
        self._give(entry, owner)

    def transfer_on_fork(self) -> Self:
        """Hand this held lock to the child at the next os.fork() (for daemonizing).

        After the fork the child holds it (in the forking thread) and the parent does not: the
        parent's descriptor is closed without unlocking, so the parent can exit and the
        daemon keeps the lock.

        Raises:
            ProcLockError: the lock is not held by this object.
        """
        holds = self._live_holds()
        if not holds:
            msg = f"transfer_on_fork() of {self.name!r}, which this ProcessLock does not hold"
            raise ProcLockError(msg)
        entry = holds[-1][1]

        def hook(in_child: bool) -> None:
            if in_child:
                gen = _owners.fork_generation
                import threading  # noqa: PLC0415

                self._holds = [(threading.get_ident(), entry, gen)]
            else:
                self._holds = [h for h in self._holds if h[1] is not entry]

        with _owners._mutex:  # noqa: SLF001
            entry.transfer.append(hook)
        return self

    # -- context managers --------------------------------------------------------------------

    def _enter_fresh(self) -> bool:
        fresh, self._fresh = self._fresh, None
        return fresh is not None and fresh == (_owners.current_owner(), len(self._live_holds()))

    def __enter__(self) -> Self:
        if not self._enter_fresh():
            self.acquire()
            self._fresh = None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> Self:
        if not self._enter_fresh():
            await self.acquire_async()
            self._fresh = None
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _backends_resolve(backend: object) -> Backend:
    from .backends import resolve  # noqa: PLC0415

    return resolve(backend)


def _real_parent(path: str) -> str:
    """`path` with its directory resolved (symlinks, `..`), the last component kept as is."""
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(head), tail)


def lock_path(name: str, *, lock_dir: StrPath | None = None) -> pathlib.Path:
    """The lock file for `name`, as a pathlib.Path (for flock(1) and other programs).

    Vets (and for the default directory, creates) the directory, never the file.

    Raises:
        UnsafeLockPathError: the directory cannot be used safely.
    """
    import pathlib  # noqa: PLC0415  (lazy: ~2 ms of import time nobody else needs)

    _names.check_name(name)
    directory, kind = _dirs.resolve(lock_dir)
    _dirs.vet(directory, kind)
    return pathlib.Path(directory, _names.file_name(name))
