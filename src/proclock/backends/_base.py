"""The contract between ProcessLock (options, retries, holds) and a lock primitive."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    from .._errors import LockHeldError
    from .._holder import Holder
    from .._lock import ProcessLock

    class Backend(Protocol):
        """What a lock primitive provides; ProcessLock does the rest (retry, holds, fork).

        A *token* is whatever the backend needs to release a hold later. `owner` is the thread
        or asyncio task (or a generator's recorded owner) that holds: backends exclude owners
        of one process from each other exactly as they exclude processes.
        """

        def try_now(self, lock: ProcessLock, owner: object) -> object | None:
            """Take the lock at once if that needs no waiting (re-entry included), else None."""
            ...

        def attempt(
            self, lock: ProcessLock, owner: object, *, blocking: bool, timeout: float | None
        ) -> object:
            """One attempt, waiting as allowed: a token, or the LockHeldError saying why not.

            Errors of the primitive itself (OSError, a server down) are raised, not returned:
            they are never retried as contention.
            """
            ...

        async def attempt_async(
            self, lock: ProcessLock, owner: object, *, blocking: bool, timeout: float | None
        ) -> object | LockHeldError:
            """`attempt` without blocking the event loop; cancellation leaves nothing held."""
            ...

        def release(self, lock: ProcessLock, token: object, owner: object) -> None:
            """Give back one hold of `owner`."""
            ...

        def holder(self, lock: ProcessLock, token: object | None) -> Holder | None:
            """Who holds the lock now; None if it is free."""
            ...

        def where(self, lock: ProcessLock, token: object | None) -> str:
            """The lock's location (a file path, a key) for messages and `lock.path`."""
            ...

        def fencing_token(self, token: object) -> int | None:
            """The hold's fencing token (strictly increasing per name), or None."""
            ...

    # A hold that is lost while held: the backend calls `lock._lost(LockLostError(...))` at
    # once (which logs and calls on_lost), and raises that LockLostError from `release()`.

else:
    Backend = object
