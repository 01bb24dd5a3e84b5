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
ALL = frozenset((SHARED, FENCING, FD, LOSS, FREED_ON_EXIT))


class Handle:
    """Proof of one acquisition by a backend: where, the fencing token, the descriptor.

    Immutable to everyone but its backend (`private`, the backend's own state of the hold)
    and the core (which links it to the hold it belongs to). Compared by identity: two
    acquisitions are two handles.

    Attributes:
        location: where the lock lives, as `ProcessLock.path` shows it.
        fencing_token: strictly increasing per lock name, or None (see `ProcessLock`).
        fd: the locked file's descriptor (flock), or None.
        shared: whether this is a reader hold.
    """

    __slots__ = ("_core", "_lost", "fd", "fencing_token", "location", "private", "shared")
    location: str
    fencing_token: int | None
    fd: int | None
    shared: bool
    private: Any

    def __init__(
        self,
        location: str,
        *,
        fencing_token: int | None = None,
        fd: int | None = None,
        shared: bool = False,
        private: Any = None,
    ) -> None:
        setter = object.__setattr__
        setter(self, "location", location)
        setter(self, "fencing_token", fencing_token)
        setter(self, "fd", fd)
        setter(self, "shared", shared)
        setter(self, "private", private)
        setter(self, "_core", None)  # the core's Hold, for backends that can lose a hold
        setter(self, "_lost", None)  # the reason, once a backend reported the hold lost

    def __setattr__(self, field: str, value: object) -> None:
        msg = f"Handle is immutable: cannot assign to {field!r}"
        raise AttributeError(msg)

    def __repr__(self) -> str:
        token = "" if self.fencing_token is None else f" fencing_token={self.fencing_token}"
        fd = "" if self.fd is None else f" fd={self.fd}"
        return f"<Handle {self.location!r}{' shared' if self.shared else ''}{token}{fd}>"
