"""Cross-process locks on flock(2): `@process_locked`, `@singleton_process`, `ProcessLock`."""

from ._decorators import lock_of, process_locked, singleton_process
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
from ._semaphore import (
    ProcessSemaphore,
    SemaphoreFullError,
    SemaphoreTimeoutError,
    Slot,
    SlotHolder,
    current_slot,
    process_limited,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    __version__: str


def __getattr__(name: str) -> object:
    """`proclock.__version__`, read from the installed metadata when first asked for.

    importlib.metadata costs ~20 ms of import time: `import proclock` does not pay it.
    """
    if name != "__version__":
        msg = f"module 'proclock' has no attribute {name!r}"
        raise AttributeError(msg)
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        value = version("proclock")
    except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
        value = "0+unknown"
    globals()["__version__"] = value
    return value


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
    "ProcessSemaphore",
    "Retry",
    "SemaphoreFullError",
    "SemaphoreTimeoutError",
    "Slot",
    "SlotHolder",
    "UnsafeLockPathError",
    "current_slot",
    "lock_of",
    "lock_path",
    "process_limited",
    "process_locked",
    "singleton_process",
]
