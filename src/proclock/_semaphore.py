"""At most N at once: `ProcessSemaphore`, `@process_limited`, `current_slot`.

A semaphore of limit N on a name is N slot locks plus a turnstile lock, each a lock file in the
lock directory (`<name>_slot-<i>-<hash>.lock`, `<name>_turnstile-<hash>.lock`). Holding slot i
is holding the flock(2) lock of slot file i, so the kernel frees a slot the moment its holder
dies, and the slot's index tells holders apart (job k uses GPU k).

How a slot is taken, and why nobody polls or starves:

- Every acquisition passes the turnstile (an exclusive lock): waiters queue on it in the
  kernel. The one holding it is the head of the queue: it tries each slot (LOCK_NB), and if all
  are taken it waits for *any* of them at once (one parked helper thread blocked in flock(2) per
  slot, `backends._any`), takes the first one the kernel grants, then lets the next waiter
  through the turnstile. A process that releases a slot and wants another queues behind those
  already waiting: it cannot take the slot back ahead of them.
- The limit is recorded in the turnstile file (`{"semaphore": NAME, "limit": N}`), written
  and read under its exclusive lock, so every user of the name sees it; a user that asks with
  another limit gets a ValueError naming both. proclock never writes a holder record into a
  file with other content, so the record stays; `proclock gc` removes a semaphore's files only
  when nobody holds its turnstile or any slot.
- On PostgreSQL and Redis (`backend=`), the slots and the turnstile are that backend's locks
  (advisory locks; leases), the head waits on every slot at once (one server-side wait, or one
  place in the slot's waiter queue, whose release wakes one waiter, each; the first grant is
  kept, the others cancelled), and the limit is recorded once in the server (a row of the
  fencing table; a key set with NX).
- The semaphore is a backend over a lock backend (`SemaphoreBackend`): the core
  (`_core.take`/`give`) does what it does for every lock, once: re-entry (counted on the slot
  the owner holds), `reentrant=False`, waiting and retries, the contention errors, Ctrl-C and
  cancellation safety, logging and fork. Threads and tasks take slots of their own exactly as
  processes do.
- A non-blocking attempt (blocking=False, timeout=0) that finds the turnstile busy (a head
  waiting, or another process in the middle of taking a slot) still tries every slot, once this
  process has seen the limit recorded: it takes a free slot rather than report a full
  semaphore. An attempt that may wait never passes the queue that way.
"""

from __future__ import annotations

import os
import time

from . import _core, _names
from ._decorators import _check_outcome, _decorate, _Namer, _Spec, check_decoratable
from ._errors import LockHeldError, LockTimeoutError, ProcLockError
from ._holder import Holder
from ._lock import UNSET, Acquired, ProcessLock, _backends_resolve
from ._spec import make_spec
from .backends import _any
from .backends._base import SHARED, WAIT_ANY
from .backends.flock import FLOCK, PARKED_MAX, FlockBackend, _is_record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Literal, TypeVar, overload

    from typing_extensions import ParamSpec, Self, Unpack

    from ._core import Hold
    from ._dirs import StrPath
    from ._errors import LockLostError
    from ._policy import Retry
    from ._spec import LockSpec
    from ._typing import Keeps, LimitedOptions, OrElse, OrNone
    from .backends._base import Handle
    from .backends._protocol import Backend

    P = ParamSpec("P")
    R = TypeVar("R")
    T = TypeVar("T")
    OnContention = Literal["raise", "skip", "exit"] | Callable[[LockHeldError], Any]
else:
    from ._decorators import overload  # the run-time stand-in: the implementation wins


LIMIT_MAX = PARKED_MAX  # a head waits with one parked helper per slot: never more than that
_SEP = "\x00"  # in the slot and turnstile lock names: no lock name a user gives contains it
_PARTS_MAX = 1024
_RECORD_READ = 512
_clock = time.monotonic


# -- errors -----------------------------------------------------------------------------------


class SlotHolder(Holder):
    """A `Holder` of one slot of a semaphore: which slot (`slot`, 0 .. limit-1) and who."""

    __slots__ = ("slot",)
    slot: int

    def __init__(self, holder: Holder, slot: int) -> None:
        values = dict(zip(Holder._fields, holder._values(), strict=True))  # noqa: SLF001
        self._init(**values, slot=slot)

    def describe(self) -> str:
        """`slot 0: pid 1234 (train.py)`."""
        return f"slot {self.slot}: {super().describe()}"


SlotHolder._fields = (*Holder._fields, "slot")


def _describe_holders(holders: list[SlotHolder]) -> str:
    if not holders:
        return "other holders (they let go just now)"
    return ", ".join(h.describe() for h in holders)


class SemaphoreFullError(LockHeldError):
    """Every slot of the semaphore is taken and proclock gave up (as LockHeldError).

    Attributes (besides LockHeldError's): `limit`, and `holders`: who held each slot when
    proclock gave up (looked up when first read). `holder` is the first of them.
    """

    def __init__(  # noqa: PLR0917  (pickled and made positionally)
        self,
        path: str,
        name: str | None = None,
        limit: int = 0,
        holders: list[SlotHolder] | None = None,
        waited: float = 0.0,
        attempts: int = 1,
        *,
        lookup: Callable[[], list[SlotHolder]] | None = None,
    ) -> None:
        super().__init__(path, name, None, waited, attempts)
        self.limit = limit
        self._holders = holders
        self._holders_lookup = lookup

    @property
    def holders(self) -> list[SlotHolder]:
        """Who held each taken slot when proclock gave up (empty if that cannot be known)."""
        lookup = self._holders_lookup
        if lookup is not None:
            self._holders_lookup = None
            try:
                self._holders = lookup()
            except Exception:  # noqa: BLE001  (who holds it is a courtesy; contention is the news)
                self._holders = []
        return list(self._holders or ())

    @property
    def holder(self) -> Holder | None:
        holders = self.holders
        return holders[0] if holders else None

    def _message(self) -> str:
        return (
            f"semaphore {self._label()} (limit {self.limit}, {self.path}) is full: "
            f"{_describe_holders(self.holders)}{self._tries()}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (
            self.path,
            self.name,
            self.limit,
            self.holders,
            self.waited,
            self.attempts,
        )


class SemaphoreTimeoutError(SemaphoreFullError, LockTimeoutError):
    """Every slot stayed taken until a positive timeout expired (a LockTimeoutError too)."""

    def _message(self) -> str:
        tries = f", {self.attempts} attempts" if self.attempts > 1 else ""
        return (
            f"semaphore {self._label()} (limit {self.limit}, {self.path}) is full: "
            f"{_describe_holders(self.holders)} (gave up after {self.waited:.3f}s{tries})"
        )


# -- the backend: a semaphore over a lock backend ------------------------------------------------


class _Parts:
    """The locks a semaphore spec is made of: its turnstile and its slots."""

    __slots__ = ("record", "slots", "spec", "turnstile")

    def __init__(self, spec: LockSpec, limit: int, sep: str) -> None:
        name = spec.name
        assert name is not None  # noqa: S101
        self.spec = spec
        self.turnstile = spec.replace(name=f"{name}{sep}turnstile")
        self.slots = tuple(spec.replace(name=f"{name}{sep}slot-{i}") for i in range(limit))
        self.record = limit_record(name, limit)


def limit_record(name: str, limit: int) -> bytes:
    """What a semaphore's turnstile file holds: its name and limit, one JSON line."""
    import json  # noqa: PLC0415  (lazy, as everywhere: `import proclock` does not pay for it)

    return json.dumps({"semaphore": name, "limit": limit}, ensure_ascii=False).encode() + b"\n"


def parse_limit_record(data: bytes) -> tuple[str, int] | None:
    """(name, limit) from a turnstile file's content, or None if it holds no such record."""
    if not data.startswith(b'{"semaphore":'):
        return None
    import json  # noqa: PLC0415

    try:
        value = json.loads(data)
    except ValueError:
        return None
    name, limit = value.get("semaphore"), value.get("limit")
    if isinstance(name, str) and isinstance(limit, int) and not isinstance(limit, bool):
        return name, limit
    return None


def split_part_name(name: str) -> tuple[str, str] | None:
    """("gpu", "slot-0") or ("gpu", "turnstile") from a semaphore part's lock name."""
    base, sep, part = name.rpartition(_SEP)
    if not sep or not base:
        return None
    return base, part


def turnstile_file_name(name: str) -> str:
    """The file name of semaphore `name`'s turnstile, which records its limit."""
    return _names.file_name(f"{name}{_SEP}turnstile")


def part_file_names(name: str, limit: int) -> tuple[str, list[str]]:
    """The turnstile's and the slots' file names of semaphore `name` (for gc and status)."""
    return turnstile_file_name(name), [
        _names.file_name(f"{name}{_SEP}slot-{i}") for i in range(limit)
    ]


# Limits this process has seen recorded, per turnstile file: a second limit for the same name
# in this process is refused before it could be counted as re-entry.
_limits: dict[str, int] = {}


def _mismatch(name: str, path: str, recorded: int, asked: int) -> ValueError:
    remedy = (
        "remove its files with `proclock gc`"
        if os.path.isabs(path)
        else "delete its limit record in the server (PostgreSQL: its row of the table "
        "proclock_fencing; Redis: the key NAMESPACE:limit:NAME)"
    )
    return ValueError(
        f"semaphore {name!r} ({path}) has limit={recorded}, recorded by its first user, but "
        f"limit={asked} was asked for: every user of one semaphore must give the same limit "
        f"(to change it, stop every user, then {remedy})"
    )


class SemaphoreBackend:
    """A semaphore of `limit` slots as one lock for the core: a backend over a lock backend.

    Its "lock" is any one slot; the handle is the slot's own handle from the inner backend, so
    everything that backend does for a handle (fork, transfer_on_fork, the descriptor for
    `proclock run`, loss and fencing for a network backend) applies to a slot as to a lock.
    The inner backend must declare "wait-any": flock(2) (the head parks one helper thread per
    slot, `backends._any`), PostgreSQL and Redis (one wait per slot, woken by the server; the
    limit is recorded with their `record_limit`).
    """

    __slots__ = ("_parts", "capabilities", "inner", "limit", "local", "sep")

    def __init__(self, limit: int, inner: Backend = FLOCK) -> None:
        local = isinstance(inner, FlockBackend)
        if WAIT_ANY not in inner.capabilities or not (local or hasattr(inner, "record_limit")):
            msg = (
                f"the {inner!r} backend cannot hold a semaphore: it cannot wait for any one "
                f"of N slots without polling (it lacks the {WAIT_ANY!r} capability), and "
                "proclock does not poll; use flock(2) (no backend=), PostgreSQL or Redis"
            )
            raise ValueError(msg)
        self.limit, self.inner, self.local = limit, inner, local
        # The separator in the parts' lock names: NUL, which no lock name a user gives
        # contains, for lock files; PostgreSQL text cannot hold NUL: the unit separator there.
        self.sep = _SEP if local else "\x1f"
        self.capabilities = inner.capabilities - {SHARED, WAIT_ANY}
        self._parts: dict[int, _Parts] = {}

    def __repr__(self) -> str:
        return f"semaphore(limit={self.limit}) on {self.inner!r}"

    @property
    def max_holders(self) -> int:
        """How many owners may hold it at once (the core's self-deadlock refusal reads it)."""
        return self.limit

    def parts(self, spec: LockSpec) -> _Parts:
        """The turnstile and slot specs of `spec` (made once per spec)."""
        parts = self._parts.get(id(spec))
        if parts is None or parts.spec is not spec:
            if len(self._parts) >= _PARTS_MAX:
                self._parts.clear()
            parts = self._parts[id(spec)] = _Parts(spec, self.limit, self.sep)
        return parts

    def location(self, spec: LockSpec) -> str:
        """The turnstile's: the semaphore's identity (and, for flock, where its limit is)."""
        path = self.inner.location(self.parts(spec).turnstile)
        known = _limits.get(path)
        if known is not None and known != self.limit:
            raise _mismatch(spec.label, path, known, self.limit)
        return path

    def index(self, spec: LockSpec, handle: Handle) -> int:
        """Which slot `handle` holds."""
        where = handle.location
        for i, slot in enumerate(self.parts(spec).slots):
            if self.inner.location(slot) == where:
                return i
        msg = f"{where} is no slot of semaphore {spec.label!r}"  # pragma: no cover
        raise ProcLockError(msg)  # pragma: no cover

    def _check_limit(self, parts: _Parts, turnstile: Handle) -> None:
        """Under the turnstile: the recorded limit must be ours; none recorded: record ours."""
        path = turnstile.location
        if not self.local:
            if _limits.get(path) != self.limit:  # asked once per process: it never changes
                recorded = self.inner.record_limit(parts.spec.label, self.limit)  # type: ignore[attr-defined]
                if recorded != self.limit:
                    raise _mismatch(parts.spec.label, path, recorded, self.limit)
                _limits[path] = self.limit
            return
        fd = turnstile.fd
        assert fd is not None  # noqa: S101
        data = os.pread(fd, _RECORD_READ, 0)
        if data != parts.record:
            found = parse_limit_record(data)
            if found is not None:
                if found[1] != self.limit:
                    raise _mismatch(parts.spec.label, path, found[1], self.limit)
            elif data and not _is_record(data):
                msg = (
                    f"{path} is the turnstile of semaphore {parts.spec.label!r} but holds "
                    "something else; remove the file (nobody else should write there)"
                )
                raise ProcLockError(msg)
            else:  # new (empty, or the holder record the flock backend just wrote): ours
                record = parts.record
                os.pwrite(fd, record, 0)
                os.ftruncate(fd, len(record))
        _limits[path] = self.limit

    def _try_slots(self, parts: _Parts) -> tuple[int, Handle] | None:
        if self.local:
            return _any.try_any(parts.slots)
        for i, slot in enumerate(parts.slots):
            handle = self.inner.try_acquire(slot)
            if handle is not None:
                return i, handle
        return None

    def try_acquire(self, spec: LockSpec) -> Handle | None:
        """One attempt that does not wait: a free slot, held; None if all are taken."""
        parts = self.parts(spec)
        inner = self.inner
        turnstile = inner.try_acquire(parts.turnstile)
        if turnstile is None:
            # Someone waits at the head, or is taking a slot right now. The first try of a
            # wait queues behind them (the core waits next: no starvation); a call that will
            # not wait takes a free slot if there is one, once this process knows the limit
            # is the one recorded.
            if spec.blocking and spec.timeout != 0:
                return None
            if _limits.get(inner.location(parts.turnstile)) != self.limit:
                return None
            got = self._try_slots(parts)
            return None if got is None else got[1]
        return self._through(parts, turnstile, None, wait=False)

    def acquire(self, spec: LockSpec, deadline: float | None) -> Handle | None:
        """Queue on the turnstile, then wait for any slot, until `deadline` (None: forever)."""
        parts = self.parts(spec)
        inner = self.inner
        turnstile = inner.acquire(parts.turnstile, deadline)
        if turnstile is None:
            return None
        return self._through(parts, turnstile, deadline, wait=True)

    def _through(
        self, parts: _Parts, turnstile: Handle, deadline: float | None, *, wait: bool
    ) -> Handle | None:
        """Past the turnstile (held): a free slot, or (`wait`) the first one freed by `deadline`.

        The turnstile is given back whatever happens, and a slot taken is given back if an
        error or an interrupt (Ctrl-C) comes after it was taken.
        """
        inner = self.inner
        got = None
        try:
            try:
                self._check_limit(parts, turnstile)
                got = self._try_slots(parts)
                if wait and got is None and (deadline is None or deadline > _clock()):
                    if deadline is None and len(parts.slots) == 1:
                        # One slot: wait in the backend's own blocking wait, as a lock does.
                        handle = inner.acquire(parts.slots[0], None)
                        got = None if handle is None else (0, handle)
                    elif self.local:
                        got = _any.wait_any(parts.slots, deadline)
                    else:
                        got = _any.wait_any_backend(inner, parts.slots, deadline)
            finally:
                inner.release(turnstile)
        except BaseException:
            if got is not None:
                inner.release(got[1])
            raise
        return None if got is None else got[1]

    async def acquire_async(self, spec: LockSpec, deadline: float | None) -> Handle | None:
        """`acquire` without blocking the event loop; cancellation leaves nothing held."""
        parts = self.parts(spec)
        inner = self.inner
        turnstile = await inner.acquire_async(parts.turnstile, deadline)
        if turnstile is None:
            return None
        got = None
        try:
            try:
                if self.local:
                    self._check_limit(parts, turnstile)
                    got = _any.try_any(parts.slots)
                    if got is None and (deadline is None or deadline > _clock()):
                        got = await _any.wait_any_async(parts.slots, deadline)
                else:
                    await _any.in_thread(self._check_limit, parts, turnstile)
                    got = await _any.try_any_async(inner, parts.slots)
                    if got is None and (deadline is None or deadline > _clock()):
                        got = await _any.wait_any_backend_async(inner, parts.slots, deadline)
            finally:
                inner.release(turnstile)
        except BaseException:
            if got is not None:
                inner.release(got[1])
            raise
        return None if got is None else got[1]

    def release(self, handle: Handle) -> None:
        """Give the slot back (idempotent)."""
        self.inner.release(handle)

    def holders(self, spec: LockSpec) -> list[SlotHolder]:
        """Who holds each taken slot now, by slot index."""
        parts = self.parts(spec)
        found = []
        for i, slot in enumerate(parts.slots):
            holder = self.inner.holder(slot)
            if holder is not None:
                found.append(SlotHolder(_renamed_holder(holder, spec.label), i))
        return found

    def holder(self, spec: LockSpec) -> Holder | None:
        """The holder of the lowest taken slot; None if every slot is free."""
        holders = self.holders(spec)
        return holders[0] if holders else None

    def busy_error(
        self, spec: LockSpec, location: str, timed_out: bool, waited: float, attempts: int
    ) -> SemaphoreFullError:
        """The core's contention error for this semaphore: its limit and holders."""
        cls = SemaphoreTimeoutError if timed_out else SemaphoreFullError
        return cls(
            location,
            spec.label,
            self.limit,
            None,
            waited,
            attempts,
            lookup=lambda: self.holders(spec),
        )


def _renamed_holder(holder: Holder, name: str) -> Holder:
    values = dict(zip(Holder._fields, holder._values(), strict=True))  # noqa: SLF001
    values["name"] = name
    return Holder(**values)


_BACKENDS: dict[tuple[int, int], SemaphoreBackend] = {}


def semaphore_backend(limit: object, backend: object = None) -> SemaphoreBackend:
    """The semaphore backend of `limit` slots over `backend` (validated; one per pair)."""
    if isinstance(limit, bool) or not isinstance(limit, int):
        msg = f"limit must be an int (how many may hold it at once), not {limit!r}"
        raise TypeError(msg)
    if not 1 <= limit <= LIMIT_MAX:
        msg = (
            f"limit={limit!r}: a semaphore has 1 to {LIMIT_MAX} slots (a waiter parks one "
            f"helper thread per slot, and a process parks at most {PARKED_MAX})"
        )
        raise ValueError(msg)
    inner: Backend = FLOCK if backend is None else _backends_resolve(backend)
    key = (limit, id(inner))
    found = _BACKENDS.get(key)
    if found is None or found.inner is not inner:
        found = _BACKENDS[key] = SemaphoreBackend(limit, inner)
    return found


# -- the public face ----------------------------------------------------------------------------


class Slot(Acquired):
    """One slot held through `ProcessSemaphore.acquire()` or `with`: `index` says which.

    `with` on it releases exactly that hold; entering it gives the slot itself.
    """

    __slots__ = ()

    @property
    def index(self) -> int:
        """Which slot: 0 .. limit-1, distinct among the semaphore's holders at any instant."""
        hold = self._hold
        handle = hold.handle
        assert handle is not None  # noqa: S101
        return hold.backend.index(hold.spec, handle)  # type: ignore[attr-defined,no-any-return]

    @property
    def semaphore(self) -> ProcessSemaphore:
        """The semaphore this slot belongs to."""
        return self.lock  # type: ignore[return-value]

    def __enter__(self) -> Self:  # type: ignore[override]
        return self

    async def __aenter__(self) -> Self:  # type: ignore[override]
        return self

    def __repr__(self) -> str:
        state = f"slot {self.index}" if self.held else "released"
        return f"<Slot {self.lock.name!r} {state}>"


class ProcessSemaphore(ProcessLock):
    """At most `limit` holders at once of a name, across processes, threads and tasks.

    Args:
        name: the semaphore's name; its files are in the lock directory.
        limit: how many may hold it at once (1 to 64). Every user of the name must agree.
        blocking: wait for a slot (True) or make one attempt (False).
        timeout: seconds to wait; None waits forever; 0 is one attempt.
        retry: a `Retry`, or an int of attempts in all.
        lock_dir: the directory of its files (else $PROCLOCK_DIR, then the defaults).
        mode: permissions of the files proclock creates (must include 0o600).
        reentrant: count re-entry by the owner of a slot (else it raises ProcLockError).
        backend: None for flock(2), a URL ("postgresql://...", "redis://...") or a backend.
        on_lost: called with the LockLostError the moment a held slot is lost (network
            backends). A semaphore is never shared, and has no single file for path=.

    Raises:
        TypeError, ValueError: an option that cannot be used, named in the message.

    `acquire()` and `with ... as slot` give a `Slot` whose `index` (0 .. limit-1) is distinct
    among the holders at any instant. Re-entry by the owner that holds a slot counts on that
    slot. A holder killed with SIGKILL frees its slot at once.
    """

    __slots__ = ()

    def __init__(
        self,
        name: str,
        *,
        limit: int,
        blocking: bool = True,
        timeout: float | None = None,
        retry: Retry | int | None = None,
        lock_dir: StrPath | None = None,
        mode: int = 0o600,
        reentrant: bool = True,
        backend: Backend | str | None = None,
        on_lost: Callable[[LockLostError], object] | None = None,
    ) -> None:
        if name is None:
            msg = "a semaphore needs a name (it is several lock files: path= cannot name it)"
            raise TypeError(msg)
        spec = make_spec(
            name,
            path=None,
            blocking=blocking,
            timeout=timeout,
            retry=retry,
            shared=False,
            lock_dir=lock_dir,
            mode=mode,
            reentrant=reentrant,
        )
        if on_lost is not None and not callable(on_lost):
            msg = f"on_lost must be a callable taking the LockLostError, not {on_lost!r}"
            raise TypeError(msg)
        self._spec, self._backend, self._on_lost = spec, semaphore_backend(limit, backend), on_lost
        self._entries: list[Hold] = []
        self._stale: list[object] = []

    @property
    def limit(self) -> int:
        """How many may hold it at once."""
        return self._backend.limit  # type: ignore[attr-defined,no-any-return]

    def holders(self) -> list[SlotHolder]:
        """Who holds each taken slot now (a `Holder` with its `slot`), lowest slot first."""
        return self._backend.holders(self._spec)  # type: ignore[attr-defined,no-any-return]

    _taken = Slot

    def acquire(self, blocking: bool = UNSET, timeout: float | None = UNSET) -> Slot:
        """Take a slot, or raise (SemaphoreFullError, SemaphoreTimeoutError). Never False.

        The arguments default to the constructor's; `with sem.acquire(timeout=1) as slot:`
        releases exactly that hold at the end of the block.
        """
        return super().acquire(blocking, timeout)  # type: ignore[return-value]  # a _taken

    async def acquire_async(self, blocking: bool = UNSET, timeout: float | None = UNSET) -> Slot:
        """`acquire` for coroutines: waits without blocking the event loop; cancellable."""
        return await super().acquire_async(blocking, timeout)  # type: ignore[return-value]

    def __enter__(self) -> Slot:  # type: ignore[override]
        return self.acquire()  # the target of `as` is the slot, not the semaphore

    async def __aenter__(self) -> Slot:  # type: ignore[override]
        return await self.acquire_async()

    def __repr__(self) -> str:
        state = "held here" if self.locked else "not held here"
        return f"<ProcessSemaphore {self.name!r} limit={self.limit} {state}>"


def current_slot(name: str) -> int:
    """The slot index (0 .. limit-1) the current thread or task holds of semaphore `name`.

    For code running under `@process_limited(name, ...)`, which injects nothing into the
    function: `CUDA_VISIBLE_DEVICES = str(proclock.current_slot("gpu"))`.

    Raises:
        ProcLockError: the current thread or task holds no slot of `name`.
    """
    owner = _core.current_owner()
    for hold in _core.holds():
        backend = hold.backend
        if (
            hold.state == _core.HELD
            and hold.key[1] == owner
            and hold.spec.name == name
            and isinstance(backend, SemaphoreBackend)
            and hold.handle is not None
        ):
            return backend.index(hold.spec, hold.handle)
    msg = (
        f"current_slot({name!r}): this thread or task holds no slot of semaphore {name!r}; "
        f"call it inside a @process_limited({name!r}, ...) function or a "
        "`with ProcessSemaphore(...)` block"
    )
    raise ProcLockError(msg)


@overload
def process_limited(
    name: str | Callable[..., str] | None = None,
    /,
    *,
    limit: int,
    on_contention: Literal["raise", "exit"] = "raise",
    **options: Unpack[LimitedOptions],
) -> Keeps: ...


@overload
def process_limited(  # noqa: F811
    name: str | Callable[..., str] | None = None,
    /,
    *,
    limit: int,
    on_contention: Literal["skip"],
    **options: Unpack[LimitedOptions],
) -> OrNone: ...


@overload
def process_limited(  # noqa: F811
    name: str | Callable[..., str] | None = None,
    /,
    *,
    limit: int,
    on_contention: Callable[[LockHeldError], T],
    **options: Unpack[LimitedOptions],
) -> OrElse[T]: ...


def process_limited(  # noqa: F811  (the implementation after the typed variants)
    name: str | Callable[..., str] | None = None,
    /,
    *,
    limit: int,
    blocking: bool = True,
    timeout: float | None = None,
    retry: Retry | int | None = None,
    on_contention: OnContention = "raise",
    exit_code: int = 1,
    lock_dir: StrPath | None = None,
    mode: int = 0o600,
    reentrant: bool = True,
    backend: Backend | str | None = None,
    on_lost: Callable[[LockLostError], object] | None = None,
) -> Any:
    """Let at most `limit` calls run at once, across processes, threads and tasks.

    `@process_limited("gpu", limit=2)`; the name may be a template filled from the call's
    arguments (`"export-{tenant}"`) or left out (derived from the function, as
    `process_locked` does). The options and outcomes are `process_locked`'s, validated here.
    The slot of the current call is `proclock.current_slot(name)`.
    """
    if name is not None and not callable(name) and not isinstance(name, str):
        msg = f"name must be a str, a template or a callable, not {type(name).__name__}"
        raise TypeError(msg)
    _check_outcome(on_contention, exit_code)
    options: dict[str, Any] = {
        "limit": limit,
        "blocking": blocking,
        "timeout": timeout,
        "retry": retry,
        "lock_dir": lock_dir,
        "mode": mode,
        "reentrant": reentrant,
        "backend": backend,
        "on_lost": on_lost,
    }
    ProcessSemaphore("validate", **options)  # misuse fails where it is written

    def decorator(func: Any) -> Any:
        check_decoratable(func, "within the limit")
        fixed = (
            _names.derived_name(func) if name is None else name if isinstance(name, str) else None
        )
        templated = fixed is None or bool(_Namer._fields_of(fixed))  # noqa: SLF001
        base = ProcessSemaphore("template" if templated else fixed, **options)  # type: ignore[arg-type]
        namer = _Namer(base, fixed if fixed is not None else name, func)
        return _decorate(func, _Spec(namer, name, on_contention, exit_code, singleton=False))

    return decorator
