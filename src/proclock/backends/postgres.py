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
- Deadlines everywhere: every round trip (connecting, the lock statement, the heartbeat, the
  unlock) has a client-side deadline, counted on the monotonic clock and enforced by polling the
  socket ourselves (libpq through `psycopg.pq`), so a server that accepts but never answers, or
  a connection blackholed by the network, costs at most that deadline; the connection is then
  closed, and the server frees whatever its session held.
- The holder learns first. Each session asks the server for short TCP keepalives
  (`tcp_keepalives_idle/interval/count`, `tcp_user_timeout`): a partitioned session is ended,
  and its lock freed, `SERVER_BOUND` seconds after the server last heard from it, never sooner.
  A hold is valid on the holder's monotonic clock until `LEASE` seconds (`SERVER_BOUND` minus a
  margin) after the last round trip that reached the server was *sent*; the heartbeat renews
  that, and declares the hold lost (`_core.report_lost`) once it runs out: before the server can
  give the lock to anyone else. Between beats it watches the held connections' sockets, so a
  server shutdown, restart or pg_terminate_backend (which say goodbye on each session) is
  reported at once, before the server takes anyone's connection again. A server machine that
  dies says nothing: the lease applies, and fencing tokens are what protect a store then.
- Poolers are refused, never shared. Each connection marks its server session at connect
  (`proclock.session`, a random value set with `set_config(..., false)`; a session that
  carries another connection's mark is refused there), and the lock statement, the heartbeat
  and the unlock compare the mark in the same statement: under a transaction- or
  statement-mode pooler (PgBouncer) a statement that lands on another client's session takes
  nothing and is refused with `ProcLockError`. A hold whose own session can no longer be
  reached is ended at its release with `pg_terminate_backend` (pid and start time checked),
  so a pooler never strands it.
- Fencing tokens come from a sequence (`proclock_fencing_seq`), drawn in the very statement
  that takes the lock, after the grant: strictly increasing for every lock name, across
  processes, hosts and server restarts (a sequence logs ahead of the values it hands out, and
  each such log record is flushed before its statement's answer: `synchronous_commit=on`).
- An idle connection holds no advisory lock. Only `pool_size` of them are kept for reuse; any
  number can be in use. Whatever goes wrong once the lock statement was sent (Ctrl-C, a
  cancelled task, an error after the grant, a deadline), the connection is closed, and the
  server frees everything its session held or awaited: nothing is left held with no owner.
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
import secrets
import select
import sys
import threading
import time
import weakref

import psycopg
from psycopg import conninfo as _conninfo
from psycopg import errors as _pgerr
from psycopg import pq
from psycopg.pq import TransactionStatus

from .. import _core, _holder
from .._errors import BackendUnavailableError, ProcLockError
from ._base import FENCING, FREED_ON_EXIT, LOSS, SHARED, WAIT_ANY, Handle

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from collections.abc import Mapping, Sequence
    from typing import Any

    from .._holder import Holder
    from .._spec import LockSpec

__all__ = ["LEASE", "SERVER_BOUND", "PostgresBackend", "advisory_key"]

_APP_NAME_MAX = 63  # NAMEDATALEN - 1: the server truncates application_name there
_TIME_ROOM = 15  # ":" and the acquisition time, "1796313474.12", appended when a lock is taken
_CANCEL_GIVE_UP = 10.0  # seconds an abandoned async wait keeps cancelling its query
_PLACES_MAX = 1024  # names whose key and location are remembered, per backend
_clock = time.monotonic

# The server's keepalives on each of our sessions: after KEEPALIVE_IDLE seconds without a byte
# from us it probes every KEEPALIVE_INTERVAL seconds, and tcp_user_timeout ends the connection
# SERVER_BOUND seconds after the last byte it received (probes unanswered, or data unacked).
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 2, 1, 3
SERVER_BOUND = float(KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT)  # 5 s
# How long a hold stays valid on the holder's clock after its last round trip that reached the
# server was sent: the margin absorbs the heartbeat thread's scheduling and timer slack.
LEASE = SERVER_BOUND - 1.5  # 3.5 s
HEARTBEAT_MAX = LEASE / 2  # at least two heartbeats per lease
_IDLE_EXIT = 30.0  # seconds the heartbeat thread lingers with nothing held
_EPOLL = hasattr(select, "epoll")  # Linux: sockets join the heartbeat's set without waking it
_READABLE = select.POLLIN | select.POLLERR | select.POLLHUP  # the same bits as EPOLLIN|ERR|HUP
# A wait that the server ends (lock_timeout) answers at once: the answer is awaited this long
# past the deadline before the connection is taken for dead.
GRACE = 0.5
# A timed wait connects by its own deadline, but never in less than this.
CONNECT_FLOOR = 0.5

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS proclock_fencing (
    namespace text NOT NULL,
    name text NOT NULL,
    token bigint NOT NULL,
    holder_pid integer,
    acquired_at timestamptz,
    PRIMARY KEY (namespace, name)
)"""
# Started above every token the fencing table recorded: proclock before 0.2 bumped a row per
# lock name there, and a store fenced with those tokens must never see a smaller one.
_CREATE_SEQUENCE = "CREATE SEQUENCE IF NOT EXISTS proclock_fencing_seq START WITH {start:d}"
_NEXT_START = "SELECT coalesce(max(token), 0) + 1 FROM proclock_fencing"

# Sent once per connection: mark the session as ours unless another connection marked it (a
# pooler handed us its session), ask for short keepalives, note the session's start time
# (what pg_terminate_backend checks, so that a reused pid is never hit).
_HELLO = (
    "SELECT pg_backend_pid(),"  # noqa: S608  (constants only; the mark is a parameter)
    " set_config('proclock.session', CASE WHEN coalesce("
    "current_setting('proclock.session', true), '') = '' THEN $1"
    " ELSE current_setting('proclock.session', true) END, false),"
    " (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid())::text,"
    f" set_config('tcp_keepalives_idle', '{KEEPALIVE_IDLE}', false),"
    f" set_config('tcp_keepalives_interval', '{KEEPALIVE_INTERVAL}', false),"
    f" set_config('tcp_keepalives_count', '{KEEPALIVE_COUNT}', false),"
    f" set_config('tcp_user_timeout', '{int(SERVER_BOUND * 1000)}', false)"
)
# PostgreSQL 14+: idle_session_timeout would end a session that idly holds a lock; the check
# interval lets the server drop a waiter whose client went away mid-wait.
_HELLO_14 = (
    _HELLO + ", set_config('idle_session_timeout', '0', false),"
    " set_config('client_connection_check_interval', '1000', false)"
)

# The lock statements: one CASE whose branches run in order, each only if the previous ones
# passed. NULL: the statement ran on another connection's session (a pooler); 0: busy (try);
# else the fencing token, drawn after the grant. set_config(..., true) lasts for this
# statement's transaction only. synchronous_commit=on: the sequence's log-ahead record is
# flushed before the answer, so a token survives a server crash.
_MINE = "current_setting('proclock.session', true) IS DISTINCT FROM $1 THEN NULL"
_STAMP = (
    "set_config('application_name', $3 || ':' ||"
    " round(extract(epoch FROM clock_timestamp())::numeric, 2)::text, false) IS NULL THEN NULL"
)
_SYNC = "set_config('synchronous_commit', 'on', true) IS NULL THEN NULL"
_TOKEN = "nextval('proclock_fencing_seq')"  # noqa: S105  (a fencing token, no secret)
_TRY = tuple(
    f"SELECT CASE WHEN {_MINE} WHEN NOT {function}($2) THEN 0 WHEN {_SYNC} WHEN {_STAMP}"
    f" ELSE {_TOKEN} END"
    for function in ("pg_try_advisory_lock", "pg_try_advisory_lock_shared")
)
_WAIT = tuple(
    f"SELECT CASE WHEN {_MINE}"
    " WHEN set_config('lock_timeout', $4, true) IS NULL THEN NULL"
    " WHEN set_config('statement_timeout', '0', true) IS NULL THEN NULL"
    f" WHEN {function}($2)::text IS NULL THEN NULL WHEN {_SYNC} WHEN {_STAMP}"
    f" ELSE {_TOKEN} END"
    for function in ("pg_advisory_lock", "pg_advisory_lock_shared")
)
# Unlock only on the session that took the lock: behind a pooler the statement may run on
# another client's session, whose lock of the same key we must not drop (NULL then).
_UNLOCK = tuple(
    f"SELECT CASE WHEN {_MINE} ELSE {function}($2) END"
    for function in ("pg_advisory_unlock", "pg_advisory_unlock_shared")
)
_BEAT = "SELECT current_setting('proclock.session', true) IS NOT DISTINCT FROM $1"
# A hold's session that a pooler put out of our reach: ended, so that its lock is freed. The
# start time makes sure the pid still names that session.
_TERMINATE = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
    " WHERE pid = $1::int AND backend_start::text = $2"
)
# A semaphore's limit, recorded once (the CTE's INSERT and the SELECT see one snapshot, so
# the row another session inserted first is read by the UNION's second branch).
_RECORD_LIMIT = """
WITH ins AS (
    INSERT INTO proclock_fencing (namespace, name, token) VALUES ($1, $2, $3::bigint)
    ON CONFLICT (namespace, name) DO NOTHING RETURNING token
)
SELECT token FROM ins
UNION ALL
SELECT token FROM proclock_fencing WHERE namespace = $1 AND name = $2
LIMIT 1"""
_HOLDERS = """
SELECT a.application_name, host(a.client_addr), l.pid, l.mode
FROM pg_locks l
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = $1::bigint::oid AND l.objid = $2::bigint::oid
ORDER BY l.mode DESC, l.pid"""


class _NoAnswer(psycopg.OperationalError):
    """The server did not answer before the deadline (the connection is then closed)."""


def _wait_socket(fd: int, events: int, deadline: float | None, what: str) -> None:
    """Wait until `fd` is ready for `events` (select.POLLIN/POLLOUT), or raise _NoAnswer."""
    poller = select.poll()
    poller.register(fd, events | select.POLLERR | select.POLLHUP)
    while True:
        if deadline is None:
            ready = poller.poll()
        else:
            left = deadline - _clock()
            if left <= 0:
                msg = f"no answer from the server {what}"
                raise _NoAnswer(msg)
            ready = poller.poll(max(1, math.ceil(left * 1000)))
        if ready:
            return


def _query(
    conn: psycopg.Connection[Any],
    sql: str,
    params: Sequence[str | None],
    deadline: float | None,
    what: str = "in time",
) -> list[tuple[bytes | None, ...]]:
    """Run one statement (unnamed, text parameters) and return its rows, by `deadline`.

    libpq through psycopg.pq, polling the socket ourselves: psycopg's `execute` has no
    client-side deadline, and this is also the hot path's leanest way. Raises the psycopg
    error the server sent, or _NoAnswer (an OperationalError) past the deadline.
    """
    pgconn = conn.pgconn
    pgconn.send_query_params(sql.encode(), [p.encode() if p is not None else None for p in params])
    fd = pgconn.socket
    while pgconn.flush():
        _wait_socket(fd, select.POLLOUT, deadline, what)
    first_error = None
    rows: list[tuple[bytes | None, ...]] = []
    while True:
        while pgconn.is_busy():
            _wait_socket(fd, select.POLLIN, deadline, what)
            pgconn.consume_input()
        res = pgconn.get_result()
        if res is None:
            break
        if res.status == pq.ExecStatus.FATAL_ERROR:
            if first_error is None:
                first_error = _pgerr.error_from_result(res, encoding="utf-8")
        elif res.status == pq.ExecStatus.TUPLES_OK:
            rows = [
                tuple(res.get_value(r, c) for c in range(res.nfields)) for r in range(res.ntuples)
            ]
    if first_error is not None:
        raise first_error
    return rows


def _int(value: bytes | None) -> int | None:
    return int(value) if value is not None else None


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
    """`proclock:<host>:<pid>:<program>`, with room left for `:<acquisition time>`.

    At most 63 bytes with the time, the pid always whole; the lock statement appends the time
    at which the server granted the lock (what `holder()` reports as `acquired_at`).
    """
    pid = str(os.getpid())
    host = _ascii(os.uname().nodename)
    limit = _APP_NAME_MAX - _TIME_ROOM
    room = limit - len(f"proclock::{pid}:")
    host = host[: max(room - 1, 0)]
    head = f"proclock:{host}:{pid}:"
    return head + _ascii(_program())[: max(limit - len(head), 0)]


def _parse_application_name(
    value: str | None,
) -> tuple[int | None, str | None, str | None, float | None]:
    """(pid, host, program, acquired_at) from `proclock:<host>:<pid>:<program>[:<time>]`."""
    if not value or not value.startswith("proclock:"):
        return None, None, None, None
    parts = value.split(":")
    if len(parts) not in {4, 5} or not parts[2].isdigit():
        return None, None, None, None
    at = None
    if len(parts) == 5:  # noqa: PLR2004
        with contextlib.suppress(ValueError):
            at = float(parts[4])
    return int(parts[2]), parts[1] or None, parts[3] or None, at


class _Link:
    """One connection of ours: its server session's pid, start time and our mark on it."""

    __slots__ = ("app", "conn", "generation", "mark", "pid", "reused", "started")

    def __init__(
        self, conn: psycopg.Connection[Any], pid: int, mark: str, started: str, app: str
    ) -> None:
        self.conn, self.pid, self.mark, self.started, self.app = conn, pid, mark, started, app
        self.reused = False
        self.generation = _core.generation  # another one in a forked child: the parent's


class _Hold:
    """The state of one hold in this backend (`Handle.private`): its session, what it took."""

    __slots__ = (
        "busy", "key", "link", "lost", "pid", "released", "shared", "stranded", "valid_until",
    )  # fmt: skip

    def __init__(self, link: _Link, key: int, *, shared: bool, valid_until: float) -> None:
        self.link, self.key, self.pid, self.shared = link, key, link.pid, shared
        self.released = False
        self.lost: str | None = None  # why the heartbeat found the session gone
        # A pooler put the hold's own session out of reach: ended at release (pid, start).
        self.stranded = False
        # Monotonic time until which the server cannot have freed the lock (see LEASE).
        self.valid_until = valid_until
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
            reported through `on_lost` and `LockLostError`), at most `HEARTBEAT_MAX` (1.75 s:
            two per `LEASE`); None turns the checks off, and with them the holder's knowing
            first that a partition cost it the lock.
        connect_timeout: the deadline of each round trip that does not wait for a lock:
            connecting, a non-blocking attempt, the heartbeat's (within its lease), an unlock.
            A timed acquisition's connecting also ends by its own deadline (at least 0.5 s).

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
        connect_timeout: float = 2.0,
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
            or not 0 < heartbeat <= HEARTBEAT_MAX
        ):
            msg = (
                f"heartbeat must be a number of seconds in (0, {HEARTBEAT_MAX}] (two per lease "
                f"of {LEASE} s, so that a holder cut off knows before the server frees its "
                f"lock) or None, not {heartbeat!r}"
            )
            raise ValueError(msg)
        if (
            isinstance(connect_timeout, bool)
            or not isinstance(connect_timeout, (int, float))
            or not connect_timeout > 0
            or math.isinf(connect_timeout)
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
        self._connect_timeout = float(connect_timeout)
        if "connect_timeout" in params:  # the URL's says: our deadline follows it
            with contextlib.suppress(ValueError):
                value = float(str(params["connect_timeout"]))
                if value > 0:
                    self._connect_timeout = value
        extra: dict[str, Any] = {}
        # A lock held over TCP must notice a dead peer: keepalives, and a bound on how long
        # sent data may stay unacknowledged before the socket fails (a wait with no timeout
        # has no other deadline).
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
        # Where the heartbeat waits for a byte on a held connection: an epoll set that each
        # hold's socket joins (and leaves) by itself, waking nobody (Linux); elsewhere a pipe
        # that wakes the heartbeat when a hold is added, so that its socket is watched.
        self._epoll: Any = None
        self._wake: tuple[int, int] | None = None
        self._watched: frozenset[int] = frozenset()  # the sockets the heartbeat watches now
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

    def _open(self, deadline: float, app: str) -> psycopg.Connection[Any]:
        """Connect by `deadline` (libpq's own connect_timeout is whole seconds, at least 2)."""
        info = _conninfo.make_conninfo(self._url, application_name=app, **self._extra)
        pgconn = pq.PGconn.connect_start(info.encode())
        try:
            status: int = pq.PollingStatus.WRITING  # libpq: as if connect_poll said WRITING
            if pgconn.status == pq.ConnStatus.BAD:
                status = pq.PollingStatus.FAILED
            while status != pq.PollingStatus.OK:
                if status == pq.PollingStatus.FAILED:
                    raise psycopg.OperationalError(pgconn.get_error_message())  # noqa: TRY301
                events = select.POLLIN if status == pq.PollingStatus.READING else select.POLLOUT
                _wait_socket(pgconn.socket, events, deadline, "while connecting")
                status = pgconn.connect_poll()
            pgconn.nonblocking = 1
        except BaseException:
            pgconn.finish()
            raise
        conn: psycopg.Connection[Any] = psycopg.Connection(pgconn)
        conn.autocommit = True
        conn.prepare_threshold = None  # no named statements: a pooler would mix them up
        return conn

    def _connect(self, deadline: float | None = None) -> _Link:
        """A new connection, its session marked as ours, by `deadline` (or connect_timeout)."""
        limit = _clock() + self._connect_timeout
        deadline = limit if deadline is None else min(limit, deadline)
        mark, app = secrets.token_hex(8), application_name()
        try:
            conn = self._open(deadline, app)
        except psycopg.Error as exc:
            raise BackendUnavailableError(self._display, _reason(exc)) from exc
        try:
            sql = _HELLO_14 if conn.info.server_version >= 140000 else _HELLO  # noqa: PLR2004
            ((pid, got, started, *_),) = _query(conn, sql, (mark,), deadline, "while connecting")
        except BaseException as exc:
            conn.close()
            if isinstance(exc, psycopg.Error):
                raise BackendUnavailableError(self._display, _reason(exc)) from exc
            raise
        if got is None or got.decode() != mark or pid is None:
            conn.close()
            msg = (
                f"{self._display}: the server session proclock was handed is already another "
                "proclock connection's: a pooler in transaction or statement mode (PgBouncer "
                "pool_mode=transaction) shares server sessions between clients, and session "
                "advisory locks cannot work through it; connect to PostgreSQL directly or "
                "through a session-mode pooler"
            )
            raise ProcLockError(msg)
        link = _Link(conn, int(pid), mark, (started or b"").decode(), app)
        with _mutex:
            self._links.add(link)
        return link

    def _borrow(self, deadline: float | None = None) -> _Link:
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
        return found if found is not None else self._connect(deadline)

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

    def _discard(self, link: _Link, *, cancel: bool = True) -> None:
        """Close a connection: the server then frees every lock its session held or awaited.

        `cancel=False` for a connection that stopped answering: a cancel request (a new
        connection) would only wait for the same silent network.
        """
        with _mutex:
            if link.generation != _core.generation:
                return
            self._links.discard(link)
        conn = link.conn
        if cancel and not conn.closed and conn.info.transaction_status == TransactionStatus.ACTIVE:
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

    def _ensure_table(self, link: _Link, deadline: float | None = None) -> None:
        """Create the fencing sequence and table on first use, where they do not exist yet."""
        if self._table_ready:
            return
        if deadline is None:
            deadline = _clock() + self._connect_timeout
        # Look first: CREATE ... IF NOT EXISTS needs the CREATE privilege on the schema even
        # when they exist, and since PostgreSQL 15 ordinary roles lack it on `public`.
        ((seq, table),) = _query(
            link.conn,
            "SELECT to_regclass('proclock_fencing_seq') IS NOT NULL,"
            " to_regclass('proclock_fencing') IS NOT NULL",
            (),
            deadline,
        )
        for exists, create in ((table, _CREATE_TABLE), (seq, _CREATE_SEQUENCE)):
            if exists == b"t":
                continue
            try:
                if create is _CREATE_SEQUENCE:
                    ((top,),) = _query(link.conn, _NEXT_START, (), deadline)
                    create = _CREATE_SEQUENCE.format(start=int(top or b"1"))  # noqa: PLW2901
                _query(link.conn, create, (), deadline)
            except (_pgerr.UniqueViolation, _pgerr.DuplicateTable, _pgerr.DuplicateObject):
                pass  # created by another process at the same moment (IF NOT EXISTS races)
            except _pgerr.InsufficientPrivilege as exc:
                msg = (
                    "proclock draws its fencing tokens from a sequence proclock_fencing_seq and "
                    "records semaphore limits in a table proclock_fencing, which this role may "
                    f"not create ({_reason(exc)}); create them once as their owner: "
                    f"{_CREATE_TABLE}; {_CREATE_SEQUENCE.format(start=1)}; and GRANT USAGE ON "
                    "SEQUENCE proclock_fencing_seq, GRANT SELECT, INSERT, UPDATE ON "
                    "proclock_fencing to the role that takes the locks"
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
        """One pg_try_advisory_lock and the fencing token (one round trip); None if busy.

        The core's first attempt of a timed acquisition too: then the connecting and the
        answer end by the timeout (the connecting given at least CONNECT_FLOOR s), else by
        connect_timeout.
        """
        bound = None
        if spec.blocking and spec.timeout:  # timeout=0 is blocking=False: connect_timeout
            bound = _clock() + spec.timeout
        return self._take(spec, bound, wait=False)

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
        # A timed wait connects by its own deadline (given at least CONNECT_FLOOR s, so that a
        # short timeout does not fail a healthy server's connect), else by connect_timeout.
        connect_by = None
        if deadline is not None:
            connect_by = max(deadline, _clock() + CONNECT_FLOOR)
        for attempt in range(2):
            link = self._borrow(connect_by)
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
                retry = isinstance(exc, psycopg.OperationalError) and not isinstance(exc, _NoAnswer)
                if retry and link.reused and attempt == 0:
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
        params = [link.mark, str(key), link.app]
        handle = None
        try:
            self._ensure_table(link)
            sent = _clock()
            remaining = None if deadline is None else deadline - sent
            answer_by: float | None
            if not wait or (remaining is not None and remaining <= 0):
                sql, answer_by, waited = _TRY[shared], sent + self._connect_timeout, False
                if deadline is not None:  # a timed acquisition's first try
                    answer_by = min(answer_by, max(deadline, sent + CONNECT_FLOOR) + GRACE)
            else:
                # lock_timeout 0: wait forever (the keepalives still end a dead connection).
                params.append(
                    "0" if remaining is None else str(max(1, math.ceil(remaining * 1000)))
                )
                sql, waited = _WAIT[shared], True
                answer_by = None if deadline is None else deadline + GRACE
            ((got,),) = _query(link.conn, sql, params, answer_by, "to the lock statement")
            if got is not None and int(got) > 0:
                # The server last heard from us when the statement arrived, or, after a wait,
                # at most KEEPALIVE_IDLE s before it answered (its keepalive probes were
                # answered meanwhile).
                heard = max(sent, _clock() - KEEPALIVE_IDLE) if waited else sent
                hold = _Hold(link, key, shared=shared, valid_until=heard + LEASE)
                handle = Handle(location, fencing_token=int(got), shared=shared, private=hold)
                self._watch(handle)
        except _pgerr.LockNotAvailable:
            # lock_timeout: the wait ran out; the statement took nothing.
            self._give_back(link, state)
            return None
        except BaseException as exc:
            # Whatever happened (Ctrl-C, a cancel, a deadline, even between the grant and the
            # handle), closing the session frees anything it holds or awaits.
            if handle is not None:
                self._drop(handle)
            else:
                self._discard(link, cancel=not isinstance(exc, _NoAnswer))
            raise
        if got is None:
            self._discard(link)
            msg = (
                f"{spec.label!r} ({location}): the lock statement ran on another connection's "
                "server session: a pooler in transaction or statement mode (PgBouncer "
                "pool_mode=transaction) shares server sessions between clients, and session "
                "advisory locks cannot work through it (nothing was taken); connect to "
                "PostgreSQL directly or through a session-mode pooler"
            )
            raise ProcLockError(msg)
        if handle is None:  # pg_try_advisory_lock said no (0): this session holds nothing
            self._give_back(link, state)
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

    # -- release -----------------------------------------------------------------------------

    def release(self, handle: Handle) -> None:
        """Unlock on the hold's own session and pool the connection. Idempotent.

        Bounded: the unlock has `connect_timeout` to be answered (after a heartbeat query in
        flight on that connection, itself bounded by the hold's lease); unconfirmed, the hold
        is reported lost to the core, which raises LockLostError, and the connection is
        closed. Nothing is touched in a forked child (the session is the parent's).
        """
        hold: _Hold = handle.private
        if hold.link.generation != _core.generation:
            return
        with _mutex:
            self._unwatch(handle)
        with hold.busy:  # waits for a heartbeat query in flight on this connection
            if hold.released:
                return
            hold.released = True
            lost = hold.lost
            if lost is None:
                lost = self._unlock(hold)
            elif hold.stranded:
                self._end_stranded(hold)
        if lost is not None:
            _core.report_lost(handle, lost)  # outside hold.busy: on_lost may release again

    def _unlock(self, hold: _Hold) -> str | None:  # under hold.busy
        """Unlock on the hold's session; the reason the hold was lost, else None."""
        link = hold.link
        try:
            rows = _query(
                link.conn,
                _UNLOCK[hold.shared],
                (link.mark, str(hold.key)),
                _clock() + self._connect_timeout,
                "to the unlock",
            )
        except BaseException as exc:
            self._discard(link, cancel=False)  # the server frees whatever the session held
            if not isinstance(exc, psycopg.Error):
                raise
            return (
                f"the server did not confirm the release ({_reason(exc)}); the server frees "
                "a session's locks when the session ends, maybe before this release"
            )
        ok = rows[0][0] if rows else None
        if ok is None:  # another client's session: a pooler
            self._end_stranded(hold)
            return _pooler_reason()
        if ok != b"t":
            self._discard(link)
            return (
                f"pg_advisory_unlock returned false: session {hold.pid} did not hold this lock "
                "any more (someone ran pg_advisory_unlock_all() or pg_advisory_unlock() on "
                "proclock's connection?)"
            )
        self._recycle(link)
        return None

    def _end_stranded(self, hold: _Hold) -> None:  # under hold.busy
        """End the hold's own session, which a pooler put out of our reach, then close ours.

        Through whichever session the pooler gives us: pg_terminate_backend on the pid and
        start time noted at connect, so that the lock is freed now rather than when the
        pooler retires that session (never another session that reuses the pid).
        """
        link = hold.link
        with contextlib.suppress(psycopg.Error):  # best effort: reported lost either way
            _query(
                link.conn,
                _TERMINATE,
                (str(hold.pid), link.started),
                _clock() + self._connect_timeout,
            )
        self._discard(link, cancel=False)

    def _drop(self, result: object) -> None:
        """Give back a hold nobody will use (its wait was abandoned): close its session."""
        if not isinstance(result, Handle):
            return
        hold: _Hold = result.private
        with _mutex:
            self._unwatch(result)
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
            fd = _socket(handle.private)
            if _EPOLL:
                if self._epoll is None:
                    self._epoll = select.epoll()
                if fd >= 0:
                    with contextlib.suppress(OSError):  # already there (a redo)
                        self._epoll.register(fd, _READABLE)
            elif self._wake is None:
                read, write = os.pipe()
                os.set_blocking(read, False)
                os.set_blocking(write, False)
                self._wake = (read, write)
            if self._heart is None:
                thread = threading.Thread(
                    target=self._beat, name="proclock-postgres-heartbeat", daemon=True
                )
                self._heart = thread
                thread.start()
                return
            # Under _mutex, as the heartbeat takes its snapshot: either it saw this hold, or it
            # watches the socket already (a pooled connection's), or it is woken. With epoll
            # (no pipe), the socket joined its set above.
            wake = self._wake
            if wake is None or fd in self._watched:
                return
        with contextlib.suppress(BlockingIOError):  # full: it will wake anyway
            os.write(wake[1], b"!")

    def _unwatch(self, handle: Handle) -> None:
        """No more heartbeat for this hold (under _mutex): released, or given up."""
        self._mine.discard(handle)
        fd = _socket(handle.private)
        if self._epoll is not None and fd >= 0:
            with contextlib.suppress(OSError):  # not there (closed, or a second call)
                self._epoll.unregister(fd)

    def _beat(self) -> None:
        """Check every held lock's connection each `heartbeat` seconds; end after _IDLE_EXIT idle.

        Between the checks it watches their sockets: a held connection has no query in flight,
        so a byte from the server there means that it is ending the session (a shutdown or
        restart, pg_terminate_backend, a crash of another backend) or sends a notice. It is
        checked at once, and a shutdown is reported before the server takes connections again.
        """
        pause = self._heartbeat
        assert pause is not None  # noqa: S101
        sleeper = threading.Event()
        next_beat = _clock() + pause
        idle_since = None
        while True:
            left = next_beat - _clock()
            with _mutex:
                if self._heart is not threading.current_thread():
                    return  # a fork replaced us
                if self._mine:
                    idle_since = None
                elif left <= 0:
                    # Nothing held: it lingers _IDLE_EXIT (a thread started per hold would
                    # cost each acquisition a thread's start), then ends.
                    idle_since = _clock() if idle_since is None else idle_since
                    if _clock() - idle_since >= _IDLE_EXIT:
                        self._heart = None
                        self._watched = frozenset()
                        return
                handles = list(self._mine)
                epoll = self._epoll
                if epoll is None:  # the pipe's way: the sockets it watches, for `_watch`
                    watched = {_socket(h.private) for h in handles} - {-1}  # -1: closed
                    self._watched = frozenset(watched)
            if left <= 0:
                for handle in handles:
                    self._check(handle)
                next_beat = _clock() + pause
                continue
            if epoll is not None:
                ready = [fd for fd, _events in epoll.poll(left)]
            else:
                wake = self._wake
                if wake is None:  # pragma: no cover  (made before the thread starts)
                    sleeper.wait(left)
                    continue
                poller = select.poll()
                poller.register(wake[0], select.POLLIN)
                for fd in watched:
                    poller.register(fd, _READABLE)
                ready = [fd for fd, _events in poller.poll(max(1, math.ceil(left * 1000)))]
                if wake[0] in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake[0], 4096)
                    ready.remove(wake[0])
            for fd in ready:
                # The hold on that socket now (a pooled connection outlives its holds). Its
                # check reads what the server sent; a hold being released is skipped (its
                # release reads it), and gone from the next snapshot.
                with _mutex:
                    now = [h for h in self._mine if _socket(h.private) == fd]
                for handle in now:
                    self._check(handle)

    def _check(self, handle: Handle) -> None:
        """Renew the hold's lease with one round trip, or declare it lost before it ends."""
        hold: _Hold = handle.private
        if not hold.busy.acquire(blocking=False):
            return  # its owner is releasing it right now
        try:
            if hold.released or hold.lost is not None:
                return
            link = hold.link
            sent = _clock()
            if sent >= hold.valid_until:
                rows = None
                reason = _silence_reason()
            else:
                try:
                    rows = _query(link.conn, _BEAT, (link.mark,), hold.valid_until)
                except psycopg.Error as exc:
                    rows = None
                    if isinstance(exc, _NoAnswer):
                        reason = _silence_reason()
                    else:
                        reason = (
                            f"its connection failed ({_reason(exc)}): the server frees the "
                            "lock when it sees the session end (pg_terminate_backend, a "
                            "server restart, the network)"
                        )
                else:
                    if rows and rows[0][0] == b"t":
                        hold.valid_until = sent + LEASE
                        return
            if rows is not None:  # answered from another client's session: a pooler
                hold.stranded = True  # its session is ended at release, not under its body
                reason = _pooler_reason()
            else:
                self._discard(link, cancel=False)
            hold.lost = reason
        finally:
            hold.busy.release()
        with _mutex:
            self._unwatch(handle)
        # Outside hold.busy: an on_lost that releases the lock must not wait for us.
        _core.report_lost(handle, reason)

    # -- who holds it ------------------------------------------------------------------------

    def _holder_on(self, link: _Link, spec: LockSpec) -> Holder | None:
        """Who holds the lock of `spec`, asked on `link`."""
        key = self._place(spec.name)[0]
        params = (str((key >> 32) & 0xFFFFFFFF), str(key & 0xFFFFFFFF))
        rows = _query(link.conn, _HOLDERS, params, _clock() + self._connect_timeout)
        if not rows:
            return None
        # For a lock held shared by several sessions: another process than the caller's,
        # where there is one.
        me = os.getpid()
        parsed = [
            (_parse_application_name(app.decode() if app else None), addr, mode)
            for app, addr, _server_pid, mode in rows
        ]
        chosen = next((p for p in parsed if p[0][0] != me), parsed[0])
        (pid, host, program, at), addr_b, mode_b = chosen
        addr = addr_b.decode() if addr_b else None
        mode = mode_b.decode() if mode_b else None
        return _holder.reported(
            pid,
            host if host is not None else addr,
            _parse_application_name(application_name())[1] or "",
            argv=(program,) if program is not None else None,
            acquired_at=at,
            shared=mode == "ShareLock",
            name=spec.name,
        )

    def holder(self, spec: LockSpec) -> Holder | None:
        """Who holds the lock now, from pg_locks and pg_stat_activity; None if it is free."""
        for attempt in range(2):
            link = self._borrow()
            try:
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
        params = (self._namespace, f"{name}\x1flimit", str(limit))
        for attempt in range(3):
            link = self._borrow()
            try:
                self._ensure_table(link)
                rows = _query(link.conn, _RECORD_LIMIT, params, _clock() + self._connect_timeout)
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
            if rows and rows[0][0] is not None:
                return int(rows[0][0])
            # Inserted by a transaction that committed while our statement waited on its
            # row: our snapshot predates it; the next statement sees it.
        msg = f"semaphore {name!r}: its limit record could not be read back"  # pragma: no cover
        raise ProcLockError(msg)  # pragma: no cover

    # -- fork --------------------------------------------------------------------------------

    def _forget(self) -> None:
        """In a forked child: drop the parent's connections without ending their sessions."""
        links, self._links = self._links, set()
        self._idle, self._mine, self._heart = [], set(), None
        epoll, self._epoll = self._epoll, None
        if epoll is not None:
            epoll.close()  # our copy: the set is the parent's, never changed here
        wake, self._wake = self._wake, None
        for fd in wake or ():
            os.close(fd)  # our copies; the parent's stay open
        for link in links:
            _neuter(link.conn)


def _socket(hold: _Hold) -> int:
    """The descriptor of the hold's connection, or -1 once it is closed."""
    try:
        return hold.link.conn.pgconn.socket
    except psycopg.Error:
        return -1


def _pooler_reason() -> str:
    return (
        "a statement ran on another connection's server session: a pooler in transaction or "
        "statement mode (PgBouncer pool_mode=transaction) shares server sessions between "
        "clients, and session advisory locks cannot work through it (the hold's own session "
        "was ended); connect to PostgreSQL directly or through a session-mode pooler"
    )


def _silence_reason() -> str:
    return (
        f"no round trip reached the server for {LEASE:g} s (the network, or a server that "
        f"stopped answering): the server ends a session it has not heard from for "
        f"{SERVER_BOUND:g} s and frees its lock, so the hold is declared lost before that"
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
