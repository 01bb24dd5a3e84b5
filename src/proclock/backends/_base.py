"""What backends return and declare: the frozen Handle and the capability names.

The contract itself (`Backend`, a `typing.Protocol`) is in `_protocol.py`, imported only when
asked for, so that `import proclock` does not pay for `typing`.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Capability names a backend may declare in its `capabilities` frozenset.
SHARED = "shared"  # reader locks (shared=True)
FENCING = "fencing"  # handles carry a fencing token, strictly increasing per lock name
FD = "fd"  # handles carry a descriptor a child process can inherit (proclock run)
LOSS = "loss"  # a hold can be lost while its holder lives; it reports that (see `lost`)
FREED_ON_EXIT = "freed-on-exit"  # a holder that dies frees the lock at once (no lease to run out)
LOCAL = "local"  # try_acquire and release never wait on a network: safe on an event loop
# A waiter can wait for any one of several locks at once, woken by the kernel or server (no
# polling): what a semaphore's head waiter needs (`proclock._semaphore`).
WAIT_ANY = "wait-any"
ALL = frozenset((SHARED, FENCING, FD, LOSS, FREED_ON_EXIT, LOCAL, WAIT_ANY))


class Handle:
    """Proof of one acquisition by a backend: where, the fencing token, the descriptor.

    Read-only to everyone but its backend (`private`, the backend's own state of the hold)
    and the core (which links it to the hold it belongs to). Compared by identity: two
    acquisitions are two handles.
    """

    # __weakref__: a backend may give back what a handle nobody holds any more proves (one
    # dropped by an interruption between the backend's return and the core's keeping it).
    __slots__ = (
        "__weakref__",
        "_core",
        "_fd",
        "_fencing_token",
        "_location",
        "_lost",
        "_shared",
        "private",
    )

    def __init__(
        self,
        location: str,
        fencing_token: int | None = None,
        fd: int | None = None,
        shared: bool = False,  # noqa: FBT002  (positional: made at every acquisition)
        private: Any = None,
    ) -> None:
        # Plain slots behind read-only properties, positional arguments: made at every
        # acquisition, so it must be cheap.
        self._location = location
        self._fencing_token = fencing_token
        self._fd = fd
        self._shared = shared
        self.private = private  # the backend's state of this hold
        self._core: Any = None  # the core's Hold
        self._lost: str | None = None  # why it was lost, once a backend reported it

    @property
    def location(self) -> str:
        """Where the lock lives, as `ProcessLock.path` shows it."""
        return self._location

    @property
    def fencing_token(self) -> int | None:
        """Strictly increasing per lock name (network backends), or None."""
        return self._fencing_token

    @property
    def fd(self) -> int | None:
        """The locked file's descriptor (flock), or None."""
        return self._fd

    @property
    def shared(self) -> bool:
        """Whether this is a reader hold."""
        return self._shared

    def __repr__(self) -> str:
        token = "" if self._fencing_token is None else f" fencing_token={self._fencing_token}"
        fd = "" if self._fd is None else f" fd={self._fd}"
        return f"<Handle {self._location!r}{' shared' if self._shared else ''}{token}{fd}>"
