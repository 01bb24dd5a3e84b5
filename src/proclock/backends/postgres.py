"""PostgreSQL session advisory locks: the lock dies with its holder's session, no TTL to guess.

A primitive under proclock's core (`backends._protocol.Backend`): re-entry, retries, contention
errors, logging and on_lost live in the core; this module takes and gives back one lock on one
server session.

What this module guarantees:

- Each acquisition uses a connection (a server session) of its own, opened by proclock, never
  one the application uses: the server is the arbiter between every pair of owners, so two
  threads or tasks of one process exclude each other exactly as two processes do, and an
  application's `ROLLBACK` or reconnect cannot drop a lock it does not know it holds. The
  server queues the waiters (`pg_advisory_lock` blocks in the server; nothing polls) and
  enforces the deadline (`lock_timeout`, set for the one statement).
- An idle connection holds no advisory lock. Only `pool_size` of them are kept for reuse; any
  number can be in use. Whatever goes wrong once the lock statement was sent (Ctrl-C, a
  cancelled task, an error after the grant), the connection is closed, and the server frees
  everything its session held or awaited: nothing is left held with no owner.
- The fencing token is bumped, and committed durably, in the very statement that takes the lock.
- A session lost while held (`pg_terminate_backend`, a server restart, the network) or a changed
  `pg_backend_pid()` (a transaction-mode pooler) is seen by the heartbeat thread and reported
  to the core (`_core.report_lost`); an unlock is only ever run on the session that took the
  lock.
- A forked child forgets its parent's connections without ending their sessions (which would
  free the parent's locks); it never sends a byte on them.

Connections are kept in a hand-kept list rather than a `psycopg_pool.ConnectionPool`:

- a server that is down must raise `BackendUnavailableError` at once with libpq's reason; a pool
  reconnects in the background and reports `PoolTimeout` after its own timeout;
- a pool's `max_size` would make a lock wait for a *connection* (held ones are never returned
  while their lock is held), a deadlock waiting to happen with nested locks;
- after os.fork() a child must forget its parent's connections without closing them (libpq's
  close sends Terminate, which would end the parent's session and free its locks), and a pool's
  worker threads and connections are not ours to neuter.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import math
import os
import sys
import threading
import time
import weakref

import psycopg
from psycopg import conninfo as _conninfo
from psycopg import errors as _pgerr
from psycopg.pq import TransactionStatus

from .. import _core, _holder
from .._errors import BackendUnavailableError, ProcLockError
from ._base import FENCING, FREED_ON_EXIT, LOSS, SHARED, WAIT_ANY, Handle

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from collections.abc import Mapping
    from typing import Any

    from .._holder import Holder
    from .._spec import LockSpec

__all__ = ["PostgresBackend", "advisory_key"]

_APP_NAME_MAX = 63  # NAMEDATALEN - 1: the server truncates application_name there
_CANCEL_GIVE_UP = 10.0  # seconds an abandoned async wait keeps cancelling its query
_PLACES_MAX = 1024  # names whose key and location are remembered, per backend
_clock = time.monotonic

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS proclock_fencing (
    namespace text NOT NULL,
    name text NOT NULL,
    token bigint NOT NULL,
    holder_pid integer,
    acquired_at timestamptz,
    PRIMARY KEY (namespace, name)
)"""

# The fencing counter is bumped in the very statement that takes the lock (one round trip):
# the INSERT reads the lock's CTE `l`, so it runs only once the lock is granted, and ON
# CONFLICT DO UPDATE bumps the latest committed row even though the statement's snapshot
# predates the wait. clock_timestamp(), not now(): now() is when the statement (the wait) began.
_BUMP = """
INSERT INTO proclock_fencing AS f (namespace, name, token, holder_pid, acquired_at)
SELECT %(ns)s, %(name)s, 1, pg_backend_pid(), clock_timestamp() FROM l {where}
ON CONFLICT (namespace, name) DO UPDATE
    SET token = f.token + 1, holder_pid = excluded.holder_pid, acquired_at = excluded.acquired_at
RETURNING f.token, pg_backend_pid()"""
# set_config(..., true) lasts for this statement's transaction only: nothing to RESET after,
# and it overrides what the server or role may have set. synchronous_commit=on: a token must
# survive a server crash, or a new holder could be handed a token already used.
_TRY_LOCK = (
    "WITH l AS (SELECT {function}(%(key)s) AS ok, set_config('synchronous_commit', 'on', true))"
)
_WAIT_LOCK = (
    "WITH t AS (SELECT set_config('lock_timeout', %(ms)s, true),"
    " set_config('statement_timeout', '0', true),"
    " set_config('synchronous_commit', 'on', true)),"
    " l AS (SELECT {function}(%(key)s) FROM t)"
)
# Indexed by shared (False, True).
_TRY = (
    _TRY_LOCK.format(function="pg_try_advisory_lock") + _BUMP.format(where="WHERE l.ok"),
    _TRY_LOCK.format(function="pg_try_advisory_lock_shared") + _BUMP.format(where="WHERE l.ok"),
)
_WAIT = (
    _WAIT_LOCK.format(function="pg_advisory_lock") + _BUMP.format(where=""),
    _WAIT_LOCK.format(function="pg_advisory_lock_shared") + _BUMP.format(where=""),
)
# Unlock only on the session that took the lock: behind a transaction-mode pooler the next
# statement may run on another client's session, whose lock of the same key we must not drop.
_UNLOCK = (
    "SELECT CASE WHEN pg_backend_pid() = %s THEN pg_advisory_unlock(%s) END",
    "SELECT CASE WHEN pg_backend_pid() = %s THEN pg_advisory_unlock_shared(%s) END",
)
# A semaphore's limit, recorded once (the CTE's INSERT and the SELECT see one snapshot, so
# the row another session inserted first is read by the UNION's second branch).
_RECORD_LIMIT = """
WITH ins AS (
    INSERT INTO proclock_fencing (namespace, name, token) VALUES (%(ns)s, %(name)s, %(limit)s)
    ON CONFLICT (namespace, name) DO NOTHING RETURNING token
)
SELECT token FROM ins
UNION ALL
SELECT token FROM proclock_fencing WHERE namespace = %(ns)s AND name = %(name)s
LIMIT 1"""
_HOLDERS = """
SELECT a.application_name, host(a.client_addr), l.pid, l.mode,
       extract(epoch FROM f.acquired_at)::float8
FROM pg_locks l
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
LEFT JOIN proclock_fencing f
    ON f.namespace = %(ns)s AND f.name = %(name)s AND f.holder_pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = %(classid)s::bigint::oid AND l.objid = %(objid)s::bigint::oid
ORDER BY l.mode DESC, l.pid"""


def advisory_key(namespace: str, name: str) -> int:
    """The signed 64-bit advisory lock key of `name` in `namespace`.

    blake2b, never hash(): the key must be the same in every process (hash() of a str is
    salted per process) and collide only by chance (tooz keys on 2 bytes of MD5: 65,536 locks).
    """
    data = f"{namespace}\0{name}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big", signed=True)


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _program() -> str:
    """The program's short name, for application_name (the holder's `argv`)."""
    orig = getattr(sys, "orig_argv", None) or []
    if "-m" in orig[:-1]:
        return str(orig[orig.index("-m") + 1])
    arg0 = sys.argv[0] if sys.argv else ""
    if arg0 and arg0 != "-c":
        return os.path.basename(arg0)
    return os.path.basename(sys.executable) or "python"


def _ascii(text: str) -> str:
    # The server replaces non-ASCII application_name characters with '?': do it here, so that
    # the length we cut at is the length it keeps; ':' separates our fields.
    return "".join(c if " " <= c <= "~" and c != ":" else "?" for c in text)


def application_name() -> str:
    """`proclock:<host>:<pid>:<program>`, at most 63 bytes, the pid always whole."""
    pid = str(os.getpid())
    host = _ascii(os.uname().nodename)
    room = _APP_NAME_MAX - len(f"proclock::{pid}:")
    host = host[: max(room - 1, 0)]
    head = f"proclock:{host}:{pid}:"
    return head + _ascii(_program())[: _APP_NAME_MAX - len(head)]


def _parse_application_name(value: str | None) -> tuple[int | None, str | None, str | None]:
    if not value or not value.startswith("proclock:"):
        return None, None, None
    parts = value.split(":", 3)
    if len(parts) != 4 or not parts[2].isdigit():  # noqa: PLR2004
        return None, None, None
    return int(parts[2]), parts[1] or None, parts[3] or None


class _Link:
    """One connection of ours, with the server session pid it had when opened."""

    __slots__ = ("conn", "generation", "pid", "reused")

    def __init__(self, conn: psycopg.Connection[Any], pid: int) -> None:
        self.conn, self.pid = conn, pid
        self.reused = False
        self.generation = _core.generation  # another one in a forked child: the parent's


class _Hold:
    """The state of one hold in this backend (`Handle.private`): its session, what it took."""

    __slots__ = ("busy", "key", "link", "lost", "pid", "released", "shared")

    def __init__(self, link: _Link, key: int, pid: int, *, shared: bool) -> None:
        self.link, self.key, self.pid, self.shared = link, key, pid, shared
        self.released = False
        self.lost: str | None = None  # why the heartbeat found the session gone
        # Serialises the release with the heartbeat's query on this connection. Reentrant: a
        # signal handler that interrupts this release may finish it (it finds `released`).
        self.busy = threading.RLock()


class _Abandoned(Exception):  # noqa: N818  (internal signal, never escapes the module)
    """An async wait was cancelled before its query started."""


class _Wait:
    """An async wait run in a thread: what the event loop needs to cancel it."""

    __slots__ = ("abandoned", "done", "link", "mutex", "result")

    def __init__(self) -> None:
        self.mutex = threading.Lock()
        self.abandoned = self.done = False
        self.link: _Link | None = None
        self.result: object = None


# Guards every backend's connection lists and heartbeat set, in sections that make no call into
# the driver or user code. Reentrant: a signal handler may take a lock while this thread is in
# one of those sections.
_mutex = threading.RLock()
_instances: weakref.WeakSet[PostgresBackend] = weakref.WeakSet()


class PostgresBackend:
    """Session advisory locks on a PostgreSQL server (`proclock[postgres]`, psycopg 3).

    Args:
        url: a libpq URL or conninfo string, such as "postgresql://app@db:5432/app".
        namespace: mixed into every lock's key and fencing row: separate applications on one
            database use separate namespaces.
        pool_size: idle connections kept for reuse (each held or waiting lock uses its own).
        heartbeat: seconds between checks of each held lock's connection (a lost session is
            reported through `on_lost` and `LockLostError`); None turns the checks off.
        connect_timeout: seconds to wait for the server when connecting (unless the URL says).

    Nothing connects until the first acquisition.
    """

    # WAIT_ANY: a wait queues in the server, which wakes it (a holder's session ending
    # included), and cancelling acquire_async withdraws it: a semaphore's head waits for any
    # of its slots with one such wait per slot, no polling (proclock._semaphore).
    capabilities = frozenset((SHARED, FENCING, LOSS, FREED_ON_EXIT, WAIT_ANY))

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "proclock",
        pool_size: int = 4,
        heartbeat: float | None = 1.0,
        connect_timeout: float = 5.0,
    ) -> None:
        if not isinstance(url, str):
            msg = f"PostgresBackend needs a URL or conninfo string, not {url!r}"
            raise TypeError(msg)
        if not isinstance(namespace, str) or "\0" in namespace:
            msg = f"namespace must be a str without NUL bytes, not {namespace!r}"
            raise ValueError(msg)
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 0:
            msg = f"pool_size must be an int >= 0, not {pool_size!r}"
            raise ValueError(msg)
        if heartbeat is not None and (
            isinstance(heartbeat, bool)
            or not isinstance(heartbeat, (int, float))
            or not heartbeat > 0
            or math.isinf(heartbeat)
        ):
            msg = f"heartbeat must be a positive number of seconds or None, not {heartbeat!r}"
            raise ValueError(msg)
        if (
            isinstance(connect_timeout, bool)
            or not isinstance(connect_timeout, (int, float))
            or not connect_timeout > 0
        ):
            msg = f"connect_timeout must be a positive number of seconds, not {connect_timeout!r}"
            raise ValueError(msg)
        try:
            params = _conninfo.conninfo_to_dict(url)
        except psycopg.Error as exc:
            msg = f"not a PostgreSQL URL or conninfo string: {_reason(exc)}"
            raise ValueError(msg) from None
        self._url = url
        self._namespace = namespace
        self._pool_size = pool_size
        self._heartbeat = float(heartbeat) if heartbeat is not None else None
        self._display = _display(params)
        extra: dict[str, Any] = {}
        if "connect_timeout" not in params:
            extra["connect_timeout"] = str(max(1, math.ceil(connect_timeout)))
        # A lock held over TCP must notice a dead peer: keepalives, and a bound on how long
        # sent data may stay unacknowledged (the heartbeat's query) before the socket fails.
        defaults = {
            "keepalives": "1",
            "keepalives_idle": "5",
            "keepalives_interval": "2",
            "keepalives_count": "3",
            "tcp_user_timeout": "10000",
        }
        extra.update({k: v for k, v in defaults.items() if k not in params})
        self._extra = extra
        self._idle: list[_Link] = []  # under _mutex
        self._links: set[_Link] = set()  # every open connection, for the fork handler
        self._mine: set[Handle] = set()  # held on this backend, for the heartbeat
        self._heart: threading.Thread | None = None
        self._table_ready = False
        self._places: dict[str, tuple[int, str]] = {}  # name -> (key, location)
        _instances.add(self)

    def __repr__(self) -> str:
        return f"PostgresBackend({self._display!r}, namespace={self._namespace!r})"

    # -- keys and places ---------------------------------------------------------------------

    def _place(self, name: str | None) -> tuple[int, str]:
        """(advisory key, location) of the lock `name`, remembered."""
        place = self._places.get(name)  # type: ignore[arg-type]
        if place is None:
            if name is None:
                msg = "a PostgreSQL lock has a name, not a lock file (path=)"
                raise ValueError(msg)
            key = advisory_key(self._namespace, name)
            place = (key, f"{self._display} advisory lock {key}")
            if len(self._places) >= _PLACES_MAX:
                self._places.clear()
            self._places[name] = place
        return place

    def key(self, name: str) -> int:
        """The advisory lock key of the lock `name` (see `advisory_key`)."""
        return self._place(name)[0]

    def location(self, spec: LockSpec) -> str:
        """'postgresql://user@host:port/db advisory lock <key>' (no password); no I/O."""
        return self._place(spec.name)[1]

    # -- connections -------------------------------------------------------------------------

    def _connect(self) -> _Link:
        try:
            conn = psycopg.connect(
                self._url, autocommit=True, application_name=application_name(), **self._extra
            )
        except psycopg.Error as exc:
            raise BackendUnavailableError(self._display, _reason(exc)) from exc
        try:
            if conn.info.server_version >= 140000:  # noqa: PLR2004
                # idle_session_timeout would end a session that idly holds a lock; the check
                # interval lets the server drop a waiter whose client died mid-wait.
                sql = (
                    "SELECT pg_backend_pid(), set_config('idle_session_timeout', '0', false),"
                    " set_config('client_connection_check_interval', '1000', false)"
                )
            else:
                sql = "SELECT pg_backend_pid()"
            row = conn.execute(sql).fetchone()
        except BaseException as exc:
            conn.close()
            if isinstance(exc, psycopg.Error):
                raise BackendUnavailableError(self._display, _reason(exc)) from exc
            raise
        assert row is not None  # noqa: S101
        link = _Link(conn, int(row[0]))
        with _mutex:
            self._links.add(link)
        return link

    def _borrow(self) -> _Link:
        """An idle connection of ours (most recently used first), else a new one."""
        dead = []
        with _mutex:
            found = None
            while self._idle:
                link = self._idle.pop()
                if not link.conn.closed and not link.conn.broken:
                    link.reused = True
                    found = link
                    break
                self._links.discard(link)
                dead.append(link)
        for link in dead:
            link.conn.close()
        return found if found is not None else self._connect()

    def _recycle(self, link: _Link) -> None:
        """Keep an idle connection (holding no advisory lock) for reuse, or close it."""
        conn = link.conn
        with _mutex:
            if link.generation != _core.generation:
                return  # the parent's: never touched here (the fork handler neutered it)
            keep = (
                len(self._idle) < self._pool_size
                and not conn.closed
                and not conn.broken
                and conn.info.transaction_status == TransactionStatus.IDLE
            )
            if keep:
                self._idle.append(link)
                return
            self._links.discard(link)
        conn.close()

    def _discard(self, link: _Link) -> None:
        """Close a connection: the server then frees every lock its session held or awaited."""
        with _mutex:
            if link.generation != _core.generation:
                return
            self._links.discard(link)
        conn = link.conn
        if not conn.closed and conn.info.transaction_status == TransactionStatus.ACTIVE:
            # A query still runs (an abandoned wait): cancel it so that the server leaves the
            # queue now rather than when it next writes to the closed socket.
            with contextlib.suppress(Exception):  # best effort: the close below frees all
                conn.cancel_safe(timeout=2.0)
        conn.close()

    def close(self) -> None:
        """Close the idle connections kept for reuse (held locks keep theirs)."""
        with _mutex:
            idle, self._idle = self._idle, []
            for link in idle:
                self._links.discard(link)
        for link in idle:
            link.conn.close()

    def _ensure_table(self, link: _Link) -> None:
        """Create the fencing table on first use, where it does not exist yet."""
        if self._table_ready:
            return
        # Look first: CREATE ... IF NOT EXISTS needs the CREATE privilege on the schema even
        # when the table exists, and since PostgreSQL 15 ordinary roles lack it on `public`.
        row = link.conn.execute("SELECT to_regclass('proclock_fencing') IS NOT NULL").fetchone()
        if not (row and row[0]):
            try:
                link.conn.execute(_CREATE_TABLE)
            except (_pgerr.UniqueViolation, _pgerr.DuplicateTable):
                pass  # created by another process at the same moment (IF NOT EXISTS races)
            except _pgerr.InsufficientPrivilege as exc:
                msg = (
                    f"proclock keeps its fencing tokens in a table proclock_fencing, which this "
                    f"role may not create ({_reason(exc)}); create it once as its owner:"
                    f"{_CREATE_TABLE}; and GRANT SELECT, INSERT, UPDATE ON proclock_fencing to "
                    "the role that takes the locks"
                )
                raise ProcLockError(msg) from exc
        self._table_ready = True

    def _failed(self, spec: LockSpec, exc: psycopg.Error) -> ProcLockError:
        """The error to raise for a driver error while taking the lock of `spec`."""
        if isinstance(exc, psycopg.OperationalError):
            return BackendUnavailableError(self._display, _reason(exc))
        return ProcLockError(
            f"{spec.label!r} ({self.location(spec)}): the server refused the lock "
            f"statement: {_reason(exc)}"
        )

    # -- acquisition -------------------------------------------------------------------------

    def try_acquire(self, spec: LockSpec) -> Handle | None:
        """One pg_try_advisory_lock with the fencing bump (one round trip); None if busy."""
        return self._take(spec, None, wait=False)

    def acquire(self, spec: LockSpec, deadline: float | None) -> Handle | None:
        """Wait in the server's queue until `deadline` (monotonic; None: forever).

        The server enforces the deadline (`lock_timeout`); None once it passed. Ctrl-C
        cancels the server's wait (psycopg does) and closes the session.
        """
        return self._take(spec, deadline, wait=True)

    async def acquire_async(self, spec: LockSpec, deadline: float | None) -> Handle | None:
        """`acquire` in a thread of its own; cancelling the task cancels the server's wait.

        A lock granted to a wait nobody awaits any more (the task was cancelled, its event
        loop closed) is given back at once: its session is closed.
        """
        import asyncio  # noqa: PLC0415

        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()
        state = _Wait()

        def work() -> None:
            result: object
            try:
                result = self._take(spec, deadline, wait=True, state=state)
            except BaseException as exc:  # noqa: BLE001  (handed to the task, which raises it)
                result = exc
            with state.mutex:
                state.result, state.done = result, True
                abandoned = state.abandoned
            if abandoned:
                self._drop(result)
                return
            try:
                loop.call_soon_threadsafe(_settle, future, result)
            except RuntimeError:  # the loop is closed: nobody will ever release this hold
                self._drop(result)

        thread = threading.Thread(target=work, name="proclock-postgres-wait", daemon=True)
        thread.start()
        try:
            result = await future
        except BaseException:  # cancelled (or interrupted): leave nothing held or queued
            with state.mutex:
                state.abandoned = True
                done, result = state.done, state.result
            if done:
                self._drop(result)  # finished just as we were cancelled: give it back
            else:
                await self._cancel_wait(loop, state, thread)
            raise
        if isinstance(result, BaseException):
            raise result
        return result  # type: ignore[return-value]

    async def _cancel_wait(
        self, loop: asyncio.AbstractEventLoop, state: _Wait, thread: threading.Thread
    ) -> None:
        """Cancel the abandoned wait's query until its thread has given everything back."""
        import asyncio  # noqa: PLC0415

        finished: asyncio.Future[None] = loop.create_future()

        def cancel() -> None:
            give_up = _clock() + _CANCEL_GIVE_UP
            while thread.is_alive() and _clock() < give_up:
                # Under state.mutex: the wait pools its connection only after clearing
                # state.link under it, so a cancel never reaches another owner's statement.
                with state.mutex:
                    link = state.link
                    if link is not None and not link.conn.closed:
                        with contextlib.suppress(Exception):  # the wait's own close frees all
                            link.conn.cancel_safe(timeout=2.0)
                thread.join(0.05)
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits
                loop.call_soon_threadsafe(_settle, finished, None)

        threading.Thread(target=cancel, name="proclock-postgres-cancel", daemon=True).start()
        await asyncio.wait((finished,), timeout=_CANCEL_GIVE_UP + 1)

    def _take(
        self, spec: LockSpec, deadline: float | None, *, wait: bool, state: _Wait | None = None
    ) -> Handle | None:
        """The try or wait statement on a connection of its own: a handle, or None."""
        key, location = self._place(spec.name)
        for attempt in range(2):
            link = self._borrow()
            if state is not None:
                with state.mutex:
                    if state.abandoned:
                        self._recycle(link)
                        raise _Abandoned
                    state.link = link
            try:
                return self._run(link, spec, key, location, deadline, wait=wait, state=state)
            except psycopg.Error as exc:  # the session is closed already
                if state is not None and state.abandoned:
                    raise
                if isinstance(exc, _pgerr.UndefinedTable) and attempt == 0:
                    self._table_ready = False  # dropped since we created it
                    continue
                if isinstance(exc, psycopg.OperationalError) and link.reused and attempt == 0:
                    continue  # an idle connection the server closed meanwhile: a fresh one
                raise self._failed(spec, exc) from exc
        raise AssertionError  # pragma: no cover  (the loop returns or raises)

    def _run(
        self,
        link: _Link,
        spec: LockSpec,
        key: int,
        location: str,
        deadline: float | None,
        *,
        wait: bool,
        state: _Wait | None,
    ) -> Handle | None:
        """One lock statement on `link`: a handle, or None; on any error the session is closed."""
        shared = spec.shared
        params: dict[str, Any] = {"key": key, "ns": self._namespace, "name": spec.name}
        handle = None
        try:
            self._ensure_table(link)
            sql = _TRY[shared]
            if wait:
                remaining = None if deadline is None else deadline - _clock()
                if remaining is None:
                    params["ms"] = "0"  # no lock_timeout: wait forever
                    sql = _WAIT[shared]
                elif remaining > 0:
                    params["ms"] = str(max(1, math.ceil(remaining * 1000)))
                    sql = _WAIT[shared]
            row = link.conn.execute(sql, params).fetchone()
            if row is None:  # pg_try_advisory_lock said no: this session holds nothing
                self._give_back(link, state)
                return None
            handle = self._granted(link, spec, key, location, row)
        except _pgerr.LockNotAvailable:
            # lock_timeout: the advisory wait (or, in theory, the counter row's) ran out.
            # The connection holds one lock at most, so unlock_all cannot touch another.
            try:
                link.conn.execute("SELECT pg_advisory_unlock_all()")
            except BaseException:
                self._discard(link)
                raise
            self._give_back(link, state)
            return None
        except BaseException:
            # Whatever happened (Ctrl-C, a cancel, an error after the lock was granted),
            # closing the session frees anything it holds: nothing is left behind.
            if handle is not None:
                self._drop(handle)
            else:
                self._discard(link)
            raise
        return handle

    def _give_back(self, link: _Link, state: _Wait | None) -> None:
        """Pool a connection that holds nothing, unless an abandoned async wait used it."""
        if state is not None:
            with state.mutex:
                state.link = None
                abandoned = state.abandoned
            if abandoned:  # its canceller may still send a cancel request on this connection
                self._discard(link)
                return
        self._recycle(link)

    def _granted(self, link: _Link, spec: LockSpec, key: int, location: str, row: Any) -> Handle:
        """The handle of the lock the statement returned `row` for, watched by the heartbeat."""
        token, pid = int(row[0]), int(row[1])
        if pid != link.pid:
            # The statement ran on another server session than the one we connected to: a
            # transaction-mode pooler, which hands sessions (and their locks) to other clients.
            msg = (
                f"{spec.label!r} ({location}): the server session changed from pid {link.pid} "
                f"to {pid} between two statements: a transaction-mode pooler (PgBouncer "
                "pool_mode=transaction) is in the way, and session advisory locks cannot work "
                "through it; connect to PostgreSQL directly or in session mode. The lock may "
                f"stay held by server pid {pid} until that session ends"
            )
            raise ProcLockError(msg)
        hold = _Hold(link, key, pid, shared=spec.shared)
        handle = Handle(location, fencing_token=token, shared=spec.shared, private=hold)
        self._watch(handle)
        return handle

    # -- release -----------------------------------------------------------------------------

    def release(self, handle: Handle) -> None:
        """Unlock on the hold's own session and pool the connection. Idempotent.

        Nothing is touched in a forked child (the session is the parent's). A hold found lost
        here (its session gone or changed, the lock no longer held) is reported to the core,
        which raises LockLostError; the connection is then closed.
        """
        hold: _Hold = handle.private
        if hold.link.generation != _core.generation:
            return
        with _mutex:
            self._mine.discard(handle)
        with hold.busy:  # waits for a heartbeat query in flight on this connection
            if hold.released:
                return
            hold.released = True
            lost = hold.lost
            if lost is None:
                lost = self._unlock(hold)
            else:
                self._discard(hold.link)
        if lost is not None:
            _core.report_lost(handle, lost)  # outside hold.busy: on_lost may release again

    def _unlock(self, hold: _Hold) -> str | None:  # under hold.busy
        """Unlock on the hold's session; the reason the hold was lost, else None."""
        link = hold.link
        try:
            row = link.conn.execute(_UNLOCK[hold.shared], (hold.pid, hold.key)).fetchone()
        except BaseException as exc:
            self._discard(link)  # the server frees whatever the session held
            if not isinstance(exc, psycopg.Error):
                raise
            return (
                f"the connection failed before the release ({_reason(exc)}); the server frees "
                "a session's locks when the session ends, maybe before this release"
            )
        ok = row[0] if row is not None else None
        if ok is None:
            self._discard(link)
            return _pooler_reason(hold.pid, None)
        if not ok:
            self._discard(link)
            return (
                f"pg_advisory_unlock returned false: session {hold.pid} did not hold this lock "
                "any more (someone ran pg_advisory_unlock_all() or pg_advisory_unlock() on "
                "proclock's connection?)"
            )
        self._recycle(link)
        return None

    def _drop(self, result: object) -> None:
        """Give back a hold nobody will use (its wait was abandoned): close its session."""
        if not isinstance(result, Handle):
            return
        hold: _Hold = result.private
        with _mutex:
            self._mine.discard(result)
        with hold.busy:
            hold.released = True
            self._discard(hold.link)

    # -- loss detection ----------------------------------------------------------------------

    def _watch(self, handle: Handle) -> None:
        """Have the heartbeat check this hold's session, starting it if it is not running."""
        if self._heartbeat is None:
            return
        with _mutex:
            self._mine.add(handle)
            if self._heart is None:
                thread = threading.Thread(
                    target=self._beat, name="proclock-postgres-heartbeat", daemon=True
                )
                self._heart = thread
                thread.start()

    def _beat(self) -> None:
        """Check every held lock's connection each `heartbeat` seconds; stop when none is held."""
        pause = self._heartbeat
        assert pause is not None  # noqa: S101
        sleeper = threading.Event()
        while True:
            sleeper.wait(pause)
            with _mutex:
                if self._heart is not threading.current_thread():
                    return  # a fork replaced us
                if not self._mine:
                    self._heart = None
                    return
                handles = list(self._mine)
            for handle in handles:
                self._check(handle)

    def _check(self, handle: Handle) -> None:
        hold: _Hold = handle.private
        if not hold.busy.acquire(blocking=False):
            return  # its owner is releasing it right now
        try:
            if hold.released or hold.lost is not None:
                return
            link = hold.link
            try:
                row = link.conn.execute("SELECT pg_backend_pid()").fetchone()
            except psycopg.Error as exc:
                reason = (
                    f"its connection failed ({_reason(exc)}): the session ended, so the server "
                    "freed the lock (pg_terminate_backend, a server restart, the network)"
                )
            else:
                pid = int(row[0]) if row is not None else None
                if pid == hold.pid:
                    return
                reason = _pooler_reason(hold.pid, pid)
            hold.lost = reason
            self._discard(link)
        finally:
            hold.busy.release()
        with _mutex:
            self._mine.discard(handle)
        # Outside hold.busy: an on_lost that releases the lock must not wait for us.
        _core.report_lost(handle, reason)

    # -- who holds it ------------------------------------------------------------------------

    def _holder_on(self, link: _Link, spec: LockSpec) -> Holder | None:
        """Who holds the lock of `spec`, asked on `link`."""
        key = self._place(spec.name)[0]
        params = {
            "ns": self._namespace,
            "name": spec.name,
            "classid": (key >> 32) & 0xFFFFFFFF,
            "objid": key & 0xFFFFFFFF,
        }
        try:
            rows = link.conn.execute(_HOLDERS, params).fetchall()
        except _pgerr.UndefinedTable:
            self._table_ready = False
            return None
        if not rows:
            return None
        # For a lock held shared by several sessions: another process than the caller's,
        # where there is one.
        me = os.getpid()
        parsed = [(_parse_application_name(row[0]), row) for row in rows]
        chosen = next((p for p in parsed if p[0][0] != me), parsed[0])
        (pid, host, program), (_app, addr, _server_pid, mode, at) = chosen
        return _holder.reported(
            pid,
            host if host is not None else addr,
            _parse_application_name(application_name())[1] or "",
            argv=(program,) if program is not None else None,
            acquired_at=float(at) if at is not None else None,
            shared=mode == "ShareLock",
            name=spec.name,
        )

    def holder(self, spec: LockSpec) -> Holder | None:
        """Who holds the lock now, from pg_locks and pg_stat_activity; None if it is free."""
        for attempt in range(2):
            link = self._borrow()
            try:
                self._ensure_table(link)
                found = self._holder_on(link, spec)
            except BaseException as exc:
                self._discard(link)
                if not isinstance(exc, psycopg.Error):
                    raise
                if isinstance(exc, psycopg.OperationalError) and link.reused and attempt == 0:
                    continue
                raise self._failed(spec, exc) from exc
            self._recycle(link)
            return found
        raise AssertionError  # pragma: no cover

    # -- semaphores --------------------------------------------------------------------------

    def record_limit(self, name: str, limit: int) -> int:
        """Record semaphore `name`'s limit unless one is recorded (atomically); the one that is.

        A row of the fencing table, named after the semaphore, whose token is the limit:
        inserted once, never bumped, seen by every user.
        """
        params = {"ns": self._namespace, "name": f"{name}\x1flimit", "limit": limit}
        for attempt in range(3):
            link = self._borrow()
            try:
                self._ensure_table(link)
                row = link.conn.execute(_RECORD_LIMIT, params).fetchone()
            except BaseException as exc:
                self._discard(link)
                if not isinstance(exc, psycopg.Error):
                    raise
                if isinstance(exc, psycopg.OperationalError) and link.reused and attempt == 0:
                    continue
                if isinstance(exc, psycopg.OperationalError):
                    raise BackendUnavailableError(self._display, _reason(exc)) from exc
                msg = f"semaphore {name!r}: the server refused to record its limit: {_reason(exc)}"
                raise ProcLockError(msg) from exc
            self._recycle(link)
            if row is not None:
                return int(row[0])
            # Inserted by a transaction that committed while our statement waited on its
            # row: our snapshot predates it; the next statement sees it.
        msg = f"semaphore {name!r}: its limit record could not be read back"  # pragma: no cover
        raise ProcLockError(msg)  # pragma: no cover

    # -- fork --------------------------------------------------------------------------------

    def _forget(self) -> None:
        """In a forked child: drop the parent's connections without ending their sessions."""
        links, self._links = self._links, set()
        self._idle, self._mine, self._heart = [], set(), None
        for link in links:
            _neuter(link.conn)


def _pooler_reason(expected: int, found: int | None) -> str:
    now = f"pid {found}" if found is not None else "another session"
    return (
        f"the server session changed from pid {expected} to {now}: a transaction-mode pooler "
        "(PgBouncer pool_mode=transaction) hands sessions to other clients, and session "
        "advisory locks cannot work through it; connect to PostgreSQL directly or in session mode"
    )


def _settle(future: asyncio.Future[Any], result: object) -> None:
    if not future.done():
        future.set_result(result)


def _display(params: Mapping[str, Any]) -> str:
    """The server as a URL without its password, for messages."""
    user = params.get("user")
    host = str(params.get("host") or params.get("hostaddr") or "localhost")
    port = params.get("port")
    dbname = params.get("dbname") or user or ""
    where = f"[{host}]" if ":" in host and not host.startswith("/") else host
    return f"postgresql://{f'{user}@' if user else ''}{where}{f':{port}' if port else ''}/{dbname}"


def _neuter(conn: psycopg.Connection[Any]) -> None:
    """Close our copy of an inherited connection so that the parent's session lives on.

    libpq's close sends Terminate on the socket, which would end the parent's session (and free
    its locks): point our descriptor at /dev/null first, then close, which frees the memory
    and writes the goodbye nowhere.
    """
    try:
        fd = conn.pgconn.socket
    except psycopg.Error:
        fd = -1
    if fd >= 0:
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.dup2(null, fd, inheritable=False)
        finally:
            os.close(null)
    with contextlib.suppress(Exception):  # the parent's connection, in any state
        conn.close()


def _after_fork_in_child() -> None:
    # Resource cleanup only: which holds a child has is the core's business (none of these).
    global _mutex  # noqa: PLW0603
    _mutex = threading.RLock()  # the parent's may have been held by a thread that is gone
    for backend in list(_instances):
        backend._forget()


def _close_idle_at_exit() -> None:
    # A polite goodbye, so that the server does not log "unexpected EOF" for each one.
    for backend in list(_instances):
        backend.close()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_idle_at_exit)
