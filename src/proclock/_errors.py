"""The error tree: each class is also the builtin a caller would already catch."""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs ~3 ms of import time; mypy reads this as typing's
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from ._holder import Holder


def _describe(holder: Holder | None) -> str:
    if holder is None:
        return "another process"
    return holder.describe()


class ProcLockError(Exception):
    """Base class of every error proclock raises on purpose."""


class LockHeldError(ProcLockError):
    """The lock is busy and proclock gave up (non-blocking, zero timeout, or retries spent).

    Attributes:
        path: where the lock lives (a file path; a server and key for network backends).
        name: the lock's name (its file for a lock made with path=).
        holder: who held it when proclock gave up, where that can be found out (looked up
            when first read, so that a caller that skips busy calls pays nothing for it).
        waited: seconds spent waiting, over all attempts.
        attempts: how many attempts were made (more than one with retry=).
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        holder: Holder | None = None,
        waited: float = 0.0,
        attempts: int = 1,
        *,
        lookup: Callable[[], Holder | None] | None = None,
    ) -> None:
        self.path, self.name, self._holder, self.waited = path, name, holder, waited
        self.attempts = attempts
        self._lookup = lookup
        # One positional argument: TimeoutError (a subclass's base) is an OSError, which reads
        # two as (errno, strerror). The message is built when first shown (__str__).
        super().__init__(path)

    @property
    def holder(self) -> Holder | None:
        lookup = self._lookup
        if lookup is not None:
            self._lookup = None
            try:
                self._holder = lookup()
            except Exception:  # noqa: BLE001  (who holds it is a courtesy; contention is the news)
                self._holder = None
        return self._holder

    def _label(self) -> str:
        return repr(self.name) if self.name is not None else "lock"

    def _tries(self) -> str:
        return f" ({self.attempts} attempts)" if self.attempts > 1 else ""

    def _message(self) -> str:
        return f"{self._label()} ({self.path}) is held by {_describe(self.holder)}{self._tries()}"

    def __reduce__(self) -> tuple[Any, ...]:  # errors cross process boundaries: they must pickle
        return type(self), (self.path, self.name, self.holder, self.waited, self.attempts)

    def __str__(self) -> str:
        return self._message()


class LockTimeoutError(LockHeldError, TimeoutError):
    """A positive timeout expired before the lock could be taken."""

    def _message(self) -> str:
        tries = f", {self.attempts} attempts" if self.attempts > 1 else ""
        return (
            f"{self._label()} ({self.path}) is held by {_describe(self.holder)} "
            f"(gave up after {self.waited:.3f}s{tries})"
        )


class AlreadyRunningError(LockHeldError):
    """`singleton_process` refused to start a second instance of the program."""

    def _message(self) -> str:
        label = repr(self.name) if self.name is not None else repr(self.path)
        return (
            f"another instance of {label} is already running: {_describe(self.holder)} "
            f"holds {self.path}{self._tries()}"
        )


class LockLostError(ProcLockError):
    """A held lock was lost before its holder released it (connection killed, lease expired).

    Raised from the decorated call or `with` block when it ends; `on_lost` callbacks get it at
    once. `path` is where the lock lived (as `ProcessLock.path` and `LockHeldError.path` name
    it); `fencing_token` is the token of the hold that was lost, where the backend has one.
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        reason: str = "",
        fencing_token: int | None = None,
    ) -> None:
        self.path, self.name, self.reason = path, name, reason
        self.fencing_token = fencing_token
        label = repr(name) if name is not None else "lock"
        super().__init__(
            f"{label} ({path}) was lost while held: {reason or 'no reason given'}; the "
            "protected work may have overlapped with another holder"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.path, self.name, self.reason, self.fencing_token)


class BackendUnavailableError(ProcLockError, OSError):
    """The lock server cannot be reached or refused us: never reported as a timeout.

    `location` names the server (a URL without its password), not a lock.
    """

    def __init__(self, location: str, reason: str) -> None:
        self.location, self.reason = location, reason
        # One positional argument: OSError reads two as (errno, strerror).
        super().__init__(f"lock backend {location} is unavailable: {reason}")

    def __str__(self) -> str:
        return f"lock backend {self.location} is unavailable: {self.reason}"

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.location, self.reason)


class LockNameError(ProcLockError, ValueError):
    """A lock name that cannot be used: empty, NUL byte, unfillable template, bare lambda."""

    def __init__(self, name: object, reason: str) -> None:
        self.name, self.reason = name, reason
        super().__init__(f"lock name {name!r}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.name, self.reason)


class UnsafeLockPathError(ProcLockError, PermissionError):
    """proclock refused a lock directory or lock file that another user could subvert."""

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason
        # One positional argument: PermissionError is an OSError (see LockTimeoutError).
        super().__init__(f"refusing lock path {path!r}: {reason}")
        self.filename = path

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.path, self.reason)

    def __str__(self) -> str:
        return f"refusing lock path {self.path!r}: {self.reason}"
