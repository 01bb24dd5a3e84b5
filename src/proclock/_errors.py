"""The error tree: each class is also the builtin a caller would already catch."""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs ~3 ms of import time; mypy reads this as typing's
if TYPE_CHECKING:
    from typing import Any

    from ._holder import Holder


def _describe(holder: Holder | None) -> str:
    if holder is None or holder.pid is None:
        return "another process"
    command = " ".join(holder.argv) if holder.argv else "unknown command"
    return f"pid {holder.pid} ({command})"


class ProcLockError(Exception):
    """Base class of every error proclock raises on purpose."""


class LockHeldError(ProcLockError):
    """The lock is busy and proclock gave up (non-blocking, zero timeout, or retries spent)."""

    def __init__(
        self,
        path: str,
        name: str | None = None,
        holder: Holder | None = None,
        waited: float = 0.0,
    ) -> None:
        self.path, self.name, self.holder, self.waited = path, name, holder, waited
        super().__init__(self._message())

    def _message(self) -> str:
        label = repr(self.name) if self.name is not None else "lock"
        return f"{label} ({self.path}) is held by {_describe(self.holder)}"

    def __reduce__(self) -> tuple[Any, ...]:  # errors cross process boundaries: they must pickle
        return type(self), (self.path, self.name, self.holder, self.waited)

    def __str__(self) -> str:
        return self._message()


class LockTimeoutError(LockHeldError, TimeoutError):
    """A positive timeout expired before the lock could be taken."""

    # TimeoutError is an OSError, which reads two positional arguments as (errno, strerror):
    # the message is passed as the only one, and __str__ is ours.
    def _message(self) -> str:
        return f"{super()._message()} (gave up after {self.waited:.3f}s)"


class AlreadyRunningError(LockHeldError):
    """`singleton_process` refused to start a second instance of the program."""

    def _message(self) -> str:
        label = repr(self.name) if self.name is not None else repr(self.path)
        return (
            f"another instance of {label} is already running: {_describe(self.holder)} "
            f"holds {self.path}"
        )


class LockLostError(ProcLockError):
    """A held lock was lost before its holder released it (connection killed, lease expired).

    Raised from the decorated call or `with` block when it ends; `on_lost` callbacks get it at
    once. `fencing_token` is the token of the hold that was lost, where the backend has one.
    """

    def __init__(
        self,
        location: str,
        name: str | None = None,
        reason: str = "",
        fencing_token: int | None = None,
    ) -> None:
        self.location, self.name, self.reason = location, name, reason
        self.fencing_token = fencing_token
        label = repr(name) if name is not None else "lock"
        super().__init__(
            f"{label} ({location}) was lost while held: {reason or 'no reason given'}; the "
            "protected work may have overlapped with another holder"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.location, self.name, self.reason, self.fencing_token)


class BackendUnavailableError(ProcLockError, OSError):
    """The lock server cannot be reached or refused us: never reported as a timeout."""

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
