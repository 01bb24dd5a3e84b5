"""Cross-process locks on flock(2): `@process_locked`, `@singleton_process`, `ProcessLock`."""

from ._decorators import process_locked, singleton_process
from ._errors import (
    AlreadyRunningError,
    BackendUnavailableError,
    LockHeldError,
    LockLostError,
    LockNameError,
    LockTimeoutError,
    ProcLockError,
    UnsafeLockPathError,
)
from ._holder import Holder
from ._lock import Acquired, ProcessLock, lock_path
from ._policy import Retry

__all__ = [
    "Acquired",
    "AlreadyRunningError",
    "BackendUnavailableError",
    "Holder",
    "LockHeldError",
    "LockLostError",
    "LockNameError",
    "LockTimeoutError",
    "ProcLockError",
    "ProcessLock",
    "Retry",
    "UnsafeLockPathError",
    "lock_path",
    "process_locked",
    "singleton_process",
]
