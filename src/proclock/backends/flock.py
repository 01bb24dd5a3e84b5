"""The default backend: flock(2) on a lock file, through the in-process registry."""

from __future__ import annotations

import os
from time import monotonic as _clock

from .. import _dirs, _holder, _names, _owners
from .._errors import LockHeldError, LockTimeoutError
from .._logging import log as _logger

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .._holder import Holder
    from .._lock import ProcessLock

_DEBUG = 10  # logging.DEBUG


class FlockBackend:
    """flock(2) on `lock_path(name)` (or `path=`), one kept descriptor per file and process."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "flock"

    def fencing_token(self, token: object) -> int | None:  # noqa: ARG002
        """None: a flock(2) lock cannot be lost while its holder lives, so there is no token."""
        return None

    @staticmethod
    def locate(lock: ProcessLock) -> tuple[str, str | None, str]:
        """(file path, directory to vet or None for path=, directory kind), resolved now."""
        if lock._path is not None:
            return lock._path, None, _dirs.NAMED
        name = lock._name
        assert name is not None  # noqa: S101
        key = None if lock._lock_dir is not None else _dirs.environment_key()
        where = lock._where
        if where is not None and where[0] == key:
            return where[1]
        directory, kind = _dirs.resolve(lock._lock_dir)
        # The registry is keyed by the file's real path: two spellings of one directory
        # (a symlinked parent, `..`) must meet in one entry, or a thread would wait for itself.
        real = os.path.join(os.path.realpath(directory), _names.file_name(name))
        located = real, directory, kind
        lock._where = (key, located)
        return located

    def _entry(self, lock: ProcessLock) -> _owners.Entry:  # under _owners._mutex
        path, directory, kind = self.locate(lock)
        entry = _owners._entries.get(path)
        if entry is None or entry.name is not lock._label:
            entry = _owners.entry_for(path, directory, kind, lock._label, lock._mode)
        return entry

    def try_now(self, lock: ProcessLock, owner: object) -> _owners.Entry | None:
        """The uncontended fast path: one LOCK_NB, one lstat, one pwrite."""
        with _owners._mutex:
            entry = self._entry(lock)
            if entry.owners and _owners.reenter(entry, lock._op, owner, reentrant=lock._reentrant):
                return entry
            if entry.try_take(lock._op, owner):
                if _logger.isEnabledFor(_DEBUG):
                    entry.since = _clock()
                    _logger.debug("acquired %r (%s) at once", lock._label, entry.path)
                return entry
        return None

    @staticmethod
    def _give_up(
        lock: ProcessLock, entry: _owners.Entry, waited: float, *, timed_out: bool
    ) -> LockHeldError:
        holder = _holder.holder_of(entry.path)
        cls = LockTimeoutError if timed_out else LockHeldError
        return cls(entry.path, lock.name, holder, waited)

    def _prepare(
        self, lock: ProcessLock, owner: object, blocking: bool, timeout: float | None
    ) -> tuple[_owners.Entry, bool, bool, float, float | None]:
        """(entry, re-entered, may wait, start, deadline) of one attempt."""
        with _owners._mutex:
            entry = self._entry(lock)
            if _owners.reenter(entry, lock._op, owner, reentrant=lock._reentrant):
                return entry, True, False, 0.0, None
        start = _clock()
        wait = blocking and timeout != 0
        if wait and _logger.isEnabledFor(_DEBUG):
            _logger.debug("waiting for %r (%s)", lock.name, entry.path)
        return entry, False, wait, start, None if timeout is None else start + timeout

    @staticmethod
    def _acquired(lock: ProcessLock, entry: _owners.Entry, start: float) -> _owners.Entry:
        if _logger.isEnabledFor(_DEBUG):
            entry.since = now = _clock()
            _logger.debug("acquired %r (%s) after %.6fs", lock.name, entry.path, now - start)
        return entry

    def attempt(
        self, lock: ProcessLock, owner: object, *, blocking: bool, timeout: float | None
    ) -> _owners.Entry | LockHeldError:
        """One attempt, waiting in the kernel as allowed (see the Backend contract)."""
        entry, reentered, wait, start, deadline = self._prepare(lock, owner, blocking, timeout)
        if reentered:
            return entry
        try:
            _owners.acquire(entry, lock._op, owner, blocking=wait, deadline=deadline, clock=_clock)
        except _owners._Busy:
            return self._give_up(lock, entry, _clock() - start, timed_out=wait)
        return self._acquired(lock, entry, start)

    async def attempt_async(
        self, lock: ProcessLock, owner: object, *, blocking: bool, timeout: float | None
    ) -> _owners.Entry | LockHeldError:
        """`attempt` for coroutines: waits without blocking the event loop."""
        entry, reentered, wait, start, deadline = self._prepare(lock, owner, blocking, timeout)
        if reentered:
            return entry
        try:
            await _owners.acquire_async(
                entry, lock._op, owner, blocking=wait, deadline=deadline, clock=_clock
            )
        except _owners._Busy:
            return self._give_up(lock, entry, _clock() - start, timed_out=wait)
        return self._acquired(lock, entry, start)

    def release(self, lock: ProcessLock, token: object, owner: object) -> None:
        """Give back one hold of `owner`; the last one unlocks."""
        entry: _owners.Entry = token  # type: ignore[assignment]
        since = entry.since
        _owners.release(entry, owner)
        if _logger.isEnabledFor(_DEBUG):
            held = _clock() - since if since is not None else float("nan")
            _logger.debug("released %r (%s) after holding %.6fs", lock.name, entry.path, held)

    def holder(self, lock: ProcessLock, token: object | None) -> Holder | None:
        """Who holds the lock file now, from /proc/locks and its metadata."""
        return _holder.holder_of(self.where(lock, token))

    def where(self, lock: ProcessLock, token: object | None) -> str:
        """The lock file: the held one, else where it would be taken now."""
        if token is not None:
            return token.path  # type: ignore[attr-defined, no-any-return]
        return self.locate(lock)[0]


FLOCK = FlockBackend()
