"""The Backend protocol: what a lock primitive provides to proclock's core.

A real `typing.Protocol` (runtime-checkable), in a module of its own so that `import proclock`
never pays for `typing`: `proclock.backends.Backend` imports it on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .._holder import Holder
    from .._spec import LockSpec
    from ._base import Handle


@runtime_checkable
class Backend(Protocol):
    """A lock primitive: take and give back a lock for one owner, say who holds it.

    The core (`proclock._core`) does everything else, once for every backend: re-entry and its
    refusals, waiting and retries, the contention errors, logging, loss fan-out and fork. A
    backend gets the frozen `LockSpec` and returns a `Handle`; it never sees a ProcessLock.

    Each call takes the lock for a new owner: two calls in one process must exclude each other
    exactly as two processes do (a description, session or token of their own).

    A backend whose holds can be lost while held (capability "loss") calls
    `proclock._core.report_lost(handle, reason)` the moment it knows; its `release` of a lost
    handle gives back what it can and returns normally (the core raises LockLostError).
    """

    #: What it can do, from `proclock.backends._base`: "shared", "fencing", "fd", "loss",
    #: "freed-on-exit", "local", "wait-any" (semaphores). The core refuses shared=True
    #: without "shared"; the contract test suite skips, by name, what a backend does not
    #: declare.
    capabilities: frozenset[str]

    def location(self, spec: LockSpec) -> str:
        """Where the lock lives, resolved now: a file path, a server and key.

        Also the lock's identity within this process (re-entry is counted per location and
        owner), so it must be cheap: it is asked at every acquisition.
        """
        ...

    def try_acquire(self, spec: LockSpec) -> Handle | None:
        """One attempt that does not wait: a handle, or None if another owner holds it.

        Errors of the primitive itself (an unusable file, a server that is down) are raised:
        they are never retried as contention.
        """
        ...

    def acquire(self, spec: LockSpec, deadline: float | None) -> Handle | None:
        """Wait until `deadline` (time.monotonic(); None: forever): a handle, or None.

        It makes at least one attempt, even if the deadline has passed already.
        """
        ...

    async def acquire_async(self, spec: LockSpec, deadline: float | None) -> Handle | None:
        """`acquire` without blocking the event loop; cancellation leaves nothing held.

        For a backend without the "local" capability, the core's one attempt that does not
        wait is this with a past deadline: `try_acquire` would block the loop on a network.
        """
        ...

    def release(self, handle: Handle) -> None:
        """Give back what `handle` holds. Idempotent: a second call does nothing."""
        ...

    def holder(self, spec: LockSpec) -> Holder | None:
        """Who holds the lock now; None if it is free."""
        ...
