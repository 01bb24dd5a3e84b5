"""PostgreSQL session advisory locks: the lock dies with its holder's session, no TTL to guess.

Each held or waiting lock has a connection of its own, opened by proclock (never one the
application uses): a session advisory lock belongs to a session, so two locks sharing one would
re-enter each other, and an application's `ROLLBACK` or reconnect would drop a lock it does not
know it holds. The server queues the waiters (`pg_advisory_lock` blocks in the server; nothing
polls), and enforces the timeout (`lock_timeout`, set for the one statement).

Connections are kept in a hand-kept list rather than a `psycopg_pool.ConnectionPool`:

- a server that is down must raise `BackendUnavailableError` at once with libpq's reason; a pool
  reconnects in the background and reports `PoolTimeout` after its own timeout;
- a pool's `max_size` would make a lock wait for a *connection* (held ones are never returned
  while their lock is held), a deadlock waiting to happen with nested locks;
- after os.fork() a child must forget its parent's connections without closing them (libpq's
  close sends Terminate, which would end the parent's session and free its locks), and a pool's
  worker threads and connections are not ours to neuter.

Only `pool_size` idle connections are kept for reuse; any number can be in use.
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

from .. import _owners
from .._errors import (
    BackendUnavailableError,
    LockHeldError,
    LockLostError,
    LockTimeoutError,
    ProcLockError,
)
from .._holder import Holder
from .._logging import log as _log

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from collections.abc import Mapping
    from typing import Any

    from .._lock import ProcessLock

__all__ = ["PostgresBackend", "advisory_key"]

_DEBUG = 10  # logging.DEBUG
_EX, _SH = _owners.EX, _owners.SH
_APP_NAME_MAX = 63  # NAMEDATALEN - 1: the server truncates application_name there
_CANCEL_GIVE_UP = 10.0  # seconds an abandoned async wait keeps cancelling its query
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
_TRY = {
    _EX: _TRY_LOCK.format(function="pg_try_advisory_lock") + _BUMP.format(where="WHERE l.ok"),
    _SH: _TRY_LOCK.format(function="pg_try_advisory_lock_shared")
    + _BUMP.format(where="WHERE l.ok"),
}
_WAIT = {
    _EX: _WAIT_LOCK.format(function="pg_advisory_lock") + _BUMP.format(where=""),
    _SH: _WAIT_LOCK.format(function="pg_advisory_lock_shared") + _BUMP.format(where=""),
}
# Unlock only on the session that took the lock: behind a transaction-mode pooler the next
# statement may run on another client's session, whose lock of the same key we must not drop.
_UNLOCK = {
    _EX: "SELECT CASE WHEN pg_backend_pid() = %s THEN pg_advisory_unlock(%s) END",
    _SH: "SELECT CASE WHEN pg_backend_pid() = %s THEN pg_advisory_unlock_shared(%s) END",
}
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
        self.generation = _owners.fork_generation


class _Hold:
    """A token: one owner's hold of one lock, on its own connection."""

    __slots__ = (
        "backend",
        "busy",
        "count",
        "fencing",
        "generation",
        "key",
        "label",
        "link",
        "locks",
        "lost",
        "op",
        "owner",
        "path",
        "pid",
        "registry_key",
        "released",
    )

    fd = None  # no file descriptor to hand to a command (ProcessLock._held_fd)

    def __init__(
        self,
        backend: PostgresBackend,
        lock: ProcessLock,
        owner: object,
        *,
        link: _Link,
        key: int,
        fencing: int,
    ) -> None:
        self.backend, self.owner, self.link, self.key, self.fencing = (
            backend,
            owner,
            link,
            key,
            fencing,
        )
        self.label, self.op = lock._label, lock._op
        self.registry_key = (backend._identity, lock._label)
        self.path = backend._where_key(key)
        self.pid = link.pid
        self.count = 1
        self.locks: list[ProcessLock] = [lock]  # whose on_lost to call
        self.lost: LockLostError | None = None
        self.released = False
        self.generation = _owners.fork_generation
        # Serialises the owner's release with the heartbeat's query on this connection.
        self.busy = threading.Lock()


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


# One registry for every backend object: (url, namespace) and name -> owner -> hold, so that
# re-entry through a second PostgresBackend of the same URL counts instead of waiting for itself.
_mutex = threading.Lock()
_held: dict[tuple[tuple[str, str], str], dict[object, _Hold]] = {}
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
        self._identity = (url, namespace)
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
        self._mine: set[_Hold] = set()  # holds on this backend, for the heartbeat
        self._heart: threading.Thread | None = None
        self._table_ready = False
        self._keys: dict[str, int] = {}
        _instances.add(self)

    def __repr__(self) -> str:
        return f"PostgresBackend({self._display!r}, namespace={self._namespace!r})"

    # -- keys and places ---------------------------------------------------------------------

    def key(self, name: str) -> int:
        """The advisory lock key of the lock `name` (see `advisory_key`)."""
        key = self._keys.get(name)
        if key is None:
            if len(self._keys) > 1024:  # noqa: PLR2004
                self._keys.clear()
            key = self._keys[name] = advisory_key(self._namespace, name)
        return key

    def _where_key(self, key: int) -> str:
        return f"{self._display} advisory lock {key}"

    def where(self, lock: ProcessLock, token: object | None) -> str:
        """'postgresql://user@host:port/db advisory lock <key>' (no password)."""
        if token is not None:
            return token.path  # type: ignore[attr-defined, no-any-return]
        return self._where_key(self.key(lock._label))

    def fencing_token(self, token: object) -> int | None:
        """The counter bumped under the lock at this acquisition: strictly increasing per name."""
        return token.fencing  # type: ignore[attr-defined, no-any-return]

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
            if link.generation != _owners.fork_generation:
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
            if link.generation != _owners.fork_generation:
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

    def _failed(self, lock: ProcessLock, exc: psycopg.Error) -> ProcLockError:
        """The error to raise for a driver error while taking `lock`."""
        if isinstance(exc, psycopg.OperationalError):
            return BackendUnavailableError(self._display, _reason(exc))
        return ProcLockError(
            f"{lock._label!r} ({self.where(lock, None)}): the server refused the lock "
            f"statement: {_reason(exc)}"
        )

    # -- acquisition -------------------------------------------------------------------------

    def _run_lock(
        self,
        lock: ProcessLock,
        op: int,
        deadline: float | None,
        *,
        wait: bool,
        state: _Wait | None,
    ) -> tuple[_Link, Any]:
        """Run the try or wait statement on a connection: (link, row, or None if not taken)."""
        key = self.key(lock._label)
        for attempt in range(2):
            link = self._borrow()
            if state is not None:
                with state.mutex:
                    if state.abandoned:
                        self._recycle(link)
                        raise _Abandoned
                    state.link = link
            params: dict[str, Any] = {"key": key, "ns": self._namespace, "name": lock._label}
            try:
                self._ensure_table(link)
                sql = _TRY[op]
                if wait:
                    remaining = None if deadline is None else deadline - _clock()
                    if remaining is None:
                        params["ms"] = "0"
                        sql = _WAIT[op]
                    elif remaining > 0:
                        params["ms"] = str(max(1, math.ceil(remaining * 1000)))
                        sql = _WAIT[op]
                row = link.conn.execute(sql, params).fetchone()
            except _pgerr.LockNotAvailable:
                # lock_timeout: the advisory wait (or, in theory, the counter row's) ran out.
                # The connection holds one lock at most, so unlock_all cannot touch another.
                try:
                    link.conn.execute("SELECT pg_advisory_unlock_all()")
                except BaseException:
                    self._discard(link)
                    raise
                return link, None
            except BaseException as exc:
                # Whatever happened (Ctrl-C, a cancel, an error after the lock was granted),
                # closing the session frees anything it holds: nothing is left behind.
                self._discard(link)
                if (state is not None and state.abandoned) or not isinstance(exc, psycopg.Error):
                    raise
                if isinstance(exc, _pgerr.UndefinedTable) and attempt == 0:
                    self._table_ready = False  # dropped since we created it
                    continue
                if isinstance(exc, psycopg.OperationalError) and link.reused and attempt == 0:
                    continue  # an idle connection the server closed meanwhile: a fresh one
                raise self._failed(lock, exc) from exc
            return link, row
        raise AssertionError  # pragma: no cover  (the loop returns or raises)

    def _attempt(
        self,
        lock: ProcessLock,
        owner: object,
        *,
        blocking: bool,
        timeout: float | None,
        state: _Wait | None = None,
    ) -> _Hold | LockHeldError:
        start = _clock()
        wait = blocking and timeout != 0
        deadline = None if timeout is None else start + timeout
        op = lock._op
        if wait and _log.isEnabledFor(_DEBUG):
            _log.debug("waiting for %r (%s)", lock._label, self.where(lock, None))
        link, row = self._run_lock(lock, op, deadline, wait=wait, state=state)
        if row is None:
            try:
                holder = self._holder_on(link, lock)
            except psycopg.Error:
                self._discard(link)
                holder = None  # the contention is the news; who it is, best effort
            else:
                self._recycle(link)
            cls = LockTimeoutError if wait else LockHeldError
            return cls(self.where(lock, None), lock._label, holder, _clock() - start)
        hold = self._register(lock, owner, link, int(row[0]), int(row[1]))
        if _log.isEnabledFor(_DEBUG):
            _log.debug(
                "acquired %r (%s) after %.6fs, fencing token %d",
                lock._label,
                hold.path,
                _clock() - start,
                hold.fencing,
            )
        return hold

    def _register(
        self, lock: ProcessLock, owner: object, link: _Link, fencing: int, pid: int
    ) -> _Hold:
        if pid != link.pid:
            # The statement ran on another server session than the one we connected to: a
            # transaction-mode pooler, which hands sessions (and their locks) to other clients.
            self._discard(link)
            msg = (
                f"{lock._label!r} ({self.where(lock, None)}): the server session changed from "
                f"pid {link.pid} to {pid} between two statements: a transaction-mode pooler "
                "(PgBouncer pool_mode=transaction) is in the way, and session advisory locks "
                "cannot work through it; connect to PostgreSQL directly or in session mode. "
                f"The lock may stay held by server pid {pid} until that session ends"
            )
            raise ProcLockError(msg)
        hold = _Hold(self, lock, owner, link=link, key=self.key(lock._label), fencing=fencing)
        with _mutex:
            _held.setdefault(hold.registry_key, {})[owner] = hold
            self._mine.add(hold)
            if self._heartbeat is not None and self._heart is None:
                thread = threading.Thread(
                    target=self._beat, name="proclock-postgres-heartbeat", daemon=True
                )
                self._heart = thread
                thread.start()
        return hold

    def _reenter(self, lock: ProcessLock, owner: object) -> _Hold | None:
        """Count a re-entry by an owner that already holds the lock; None if it does not."""
        with _mutex:
            owners = _held.get((self._identity, lock._label))
            hold = owners.get(owner) if owners else None
            if hold is None:
                return None
            kind = "thread" if isinstance(owner, int) else "task"
            if not lock._reentrant:
                msg = (
                    f"{lock._label!r} ({hold.path}) is already held by this {kind} and "
                    "reentrant=False forbids taking it again; release it first, or pass "
                    "reentrant=True"
                )
                raise ProcLockError(msg)
            if hold.op == _SH and lock._op == _EX:
                msg = (
                    f"{lock._label!r} ({hold.path}) is held shared by this {kind}, which now "
                    "asks for it exclusively: an advisory lock cannot be upgraded atomically; "
                    "release the shared lock, then take the exclusive one"
                )
                raise ProcLockError(msg)
            lost = hold.lost
            if lost is None:
                hold.count += 1
                if not any(known is lock for known in hold.locks):
                    hold.locks.append(lock)
                return hold
        raise LockLostError(lost.location, lost.name, lost.reason, lost.fencing_token)

    def _refuse_self_deadlock(self, lock: ProcessLock, owner: object, *, sync: bool) -> None:
        """Refuse a wait that only this very thread could end (as flock's registry does)."""
        with _mutex:
            owners = dict(_held.get((self._identity, lock._label), {}))
        if owners:
            _owners.refuse_self_deadlock(
                owners, owner, sync=sync, name=lock._label, where=self.where(lock, None)
            )

    def try_now(self, lock: ProcessLock, owner: object) -> _Hold | None:
        """Re-entry, or one pg_try_advisory_lock (one round trip with the fencing bump)."""
        hold = self._reenter(lock, owner)
        if hold is not None:
            return hold
        link, row = self._run_lock(lock, lock._op, None, wait=False, state=None)
        if row is None:
            self._recycle(link)
            return None
        return self._register(lock, owner, link, int(row[0]), int(row[1]))

    def attempt(
        self, lock: ProcessLock, owner: object, *, blocking: bool, timeout: float | None
    ) -> _Hold | LockHeldError:
        """One attempt, the server queueing us as allowed (see the Backend contract)."""
        hold = self._reenter(lock, owner)
        if hold is not None:
            return hold
        if blocking and timeout != 0:
            self._refuse_self_deadlock(lock, owner, sync=True)
        return self._attempt(lock, owner, blocking=blocking, timeout=timeout)

    async def attempt_async(
        self, lock: ProcessLock, owner: object, *, blocking: bool, timeout: float | None
    ) -> _Hold | LockHeldError:
        """`attempt` in a thread of its own; cancelling the task cancels the server's wait."""
        import asyncio  # noqa: PLC0415

        hold = self._reenter(lock, owner)
        if hold is not None:
            return hold
        if blocking and timeout != 0:
            self._refuse_self_deadlock(lock, owner, sync=False)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()
        state = _Wait()

        def work() -> None:
            result: object
            try:
                result = self._attempt(lock, owner, blocking=blocking, timeout=timeout, state=state)
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
        except asyncio.CancelledError:
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
                link = state.link
                if link is not None and not link.conn.closed:
                    with contextlib.suppress(Exception):  # the wait's own close frees all
                        link.conn.cancel_safe(timeout=2.0)
                thread.join(0.05)
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits
                loop.call_soon_threadsafe(_settle, finished, None)

        threading.Thread(target=cancel, name="proclock-postgres-cancel", daemon=True).start()
        await asyncio.wait((finished,), timeout=_CANCEL_GIVE_UP + 1)

    def _drop(self, result: object) -> None:
        """Give back a hold nobody will use (its wait was abandoned): close its session."""
        if not isinstance(result, _Hold):
            return
        with _mutex:
            owners = _held.get(result.registry_key)
            if owners is not None and owners.get(result.owner) is result:
                del owners[result.owner]
                if not owners:
                    del _held[result.registry_key]
            self._mine.discard(result)
        with result.busy:
            result.released = True
            self._discard(result.link)

    # -- release -----------------------------------------------------------------------------

    def release(self, lock: ProcessLock, token: object, owner: object) -> None:  # noqa: ARG002
        """Give back one hold; the last one unlocks (raising LockLostError if it was lost)."""
        hold: _Hold = token  # type: ignore[assignment]
        if hold.generation != _owners.fork_generation:
            return  # a forked child holds nothing of its parent's
        with _mutex:
            if hold.released:
                return
            if hold.count > 1:
                hold.count -= 1
                lost = hold.lost
                if lost is not None:
                    raise _copy(lost)
                return
            owners = _held.get(hold.registry_key)
            if owners is not None and owners.get(hold.owner) is hold:
                del owners[hold.owner]
                if not owners:
                    del _held[hold.registry_key]
            self._mine.discard(hold)
        with hold.busy:  # waits for a heartbeat query in flight on this connection
            hold.released = True
            lost = hold.lost
            fresh = lost is None and self._unlock(hold)
            lost = hold.lost
        if lost is not None:
            if fresh:
                _tell(hold, lost)
            raise _copy(lost)
        if _log.isEnabledFor(_DEBUG):
            _log.debug("released %r (%s)", hold.label, hold.path)

    def _unlock(self, hold: _Hold) -> bool:  # under hold.busy
        """Unlock on the hold's session; True if that found the lock lost (see hold.lost)."""
        link = hold.link
        try:
            row = link.conn.execute(_UNLOCK[hold.op], (hold.pid, hold.key)).fetchone()
        except BaseException as exc:
            self._discard(link)  # the server frees whatever the session held
            if not isinstance(exc, psycopg.Error):
                raise
            _lose(
                hold,
                f"the connection failed before the release ({_reason(exc)}); the server frees "
                "a session's locks when the session ends, maybe before this release",
            )
            return True
        ok = row[0] if row is not None else None
        if ok is None:
            self._discard(link)
            _lose(hold, _pooler_reason(hold.pid, None))
            return True
        if not ok:
            self._discard(link)
            msg = (
                f"{hold.label!r} ({hold.path}): pg_advisory_unlock returned false: session "
                f"{hold.pid} did not hold this lock any more (someone ran "
                "pg_advisory_unlock_all() or pg_advisory_unlock() on proclock's connection?)"
            )
            raise ProcLockError(msg)
        self._recycle(link)
        return False

    # -- loss detection ----------------------------------------------------------------------

    def _beat(self) -> None:
        """Check every held lock's connection each `heartbeat` seconds; stop when none is held."""
        pause = self._heartbeat
        assert pause is not None  # noqa: S101
        sleeper = threading.Event()
        while True:
            sleeper.wait(pause)
            with _mutex:
                if self._heart is not threading.current_thread():
                    return  # a fork replaced us, or another heartbeat took over
                holds = [h for h in self._mine if h.lost is None]
                if not self._mine:
                    self._heart = None
                    return
            for hold in holds:
                self._check(hold)

    def _check(self, hold: _Hold) -> None:
        if not hold.busy.acquire(blocking=False):
            return  # its owner is releasing it right now
        error = None
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
            self._discard(link)
            error = _lose(hold, reason)
        finally:
            hold.busy.release()
        if error is not None:
            # Outside hold.busy: an on_lost that releases the lock must not wait for us.
            _tell(hold, error)

    # -- who holds it ------------------------------------------------------------------------

    def _holder_on(self, link: _Link, lock: ProcessLock) -> Holder | None:
        """Who holds `lock`, asked on `link`."""
        key = self.key(lock._label)
        params = {
            "ns": self._namespace,
            "name": lock._label,
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
        app, addr, _server_pid, mode, at = rows[0]
        pid, host, program = _parse_application_name(app)
        return Holder(
            pid=pid,
            hostname=host if host is not None else addr,
            argv=(program,) if program is not None else None,
            acquired_at=float(at) if at is not None else None,
            shared=mode == "ShareLock",
            name=lock._label,
        )

    def holder(self, lock: ProcessLock, token: object | None) -> Holder | None:  # noqa: ARG002
        """Who holds the lock now, from pg_locks and pg_stat_activity; None if it is free."""
        for attempt in range(2):
            link = self._borrow()
            try:
                self._ensure_table(link)
                found = self._holder_on(link, lock)
            except BaseException as exc:
                self._discard(link)
                if not isinstance(exc, psycopg.Error):
                    raise
                if isinstance(exc, psycopg.OperationalError) and link.reused and attempt == 0:
                    continue
                raise self._failed(lock, exc) from exc
            self._recycle(link)
            return found
        raise AssertionError  # pragma: no cover

    # -- fork --------------------------------------------------------------------------------

    def _forget(self) -> None:
        """In a forked child: drop the parent's connections without ending their sessions."""
        links, self._links = self._links, set()
        self._idle, self._mine, self._heart = [], set(), None
        for link in links:
            _neuter(link.conn)


def _lose(hold: _Hold, reason: str) -> LockLostError:
    """Record the loss of `hold` (under hold.busy); release() will raise it."""
    error = LockLostError(hold.path, hold.label, reason, hold.fencing)
    hold.lost = error
    return error


def _tell(hold: _Hold, error: LockLostError) -> None:
    """Tell the hold's locks at once: each logs the error and calls its on_lost."""
    for lock in list(hold.locks):
        lock._lost(error)


def _pooler_reason(expected: int, found: int | None) -> str:
    now = f"pid {found}" if found is not None else "another session"
    return (
        f"the server session changed from pid {expected} to {now}: a transaction-mode pooler "
        "(PgBouncer pool_mode=transaction) hands sessions to other clients, and session "
        "advisory locks cannot work through it; connect to PostgreSQL directly or in session mode"
    )


def _copy(error: LockLostError) -> LockLostError:
    """A fresh LockLostError: raising one object twice would chain its tracebacks."""
    return LockLostError(error.location, error.name, error.reason, error.fencing_token)


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
    global _mutex  # noqa: PLW0603
    _mutex = threading.Lock()  # the parent's may have been held by a thread that is gone
    _held.clear()
    for backend in list(_instances):
        backend._forget()


def _close_idle_at_exit() -> None:
    # A polite goodbye, so that the server does not log "unexpected EOF" for each one.
    for backend in list(_instances):
        backend.close()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_idle_at_exit)
