"""Redis leases: SET NX PX with a random token, renewed by one thread, fenced, queued waiters.

A Redis lock is a *lease*, not a lock like flock(2): a holder that is paused (SIGSTOP, a long GC,
a VM migration) for longer than the ttl loses it without knowing, and another process takes it.
proclock detects the loss when the holder resumes (its renewal fails: `on_lost`, then
LockLostError at release), but the paused holder may already have written something: pass
`lock.fencing_token` to the storage you protect and have it refuse tokens older than the newest
it has seen (Kleppmann, "How to do distributed locking", 2016).

Keys, for a lock named N in namespace S (names are used verbatim: readable and injective):

- ``S:lock:N``  the lease: a JSON value (token, host, pid, argv, acquired_at, fence) with a PX
  expiry of `ttl`; only its holder's token extends or deletes it (compare-and-extend/-delete).
- ``S:fence:N`` the last fencing token issued. A new token is ``max(last + 1, TIME in µs)``,
  taken in the script that wins the lease: the server's clock in the high digits, a counter
  for acquisitions within one µs in the low ones. After a restart without persistence the
  counter is gone, and the clock still puts the next token above every earlier one, assuming
  the server's clock has not stepped back by more than the restart took (tokens run ahead of
  the clock only by acquisitions faster than one per µs, which one script per acquisition
  cannot be). Tokens stay below 2^53 (exact in Lua's doubles) until the year 2255.
- ``S:queue:N`` the waiters: a sorted set of their tokens, each scored with the server time
  (ms) past which it counts as gone (a waiter that died leaves by itself).
- ``S:wake:N``  the ticket: a release with live waiters does not free the lease but hands it
  over: the key gets a placeholder value under a new token and fencing token, and the ticket
  (that token and fence) is pushed here. A waiter's BLMOVE moves it to the waiter's own list
  ``S:got:<token>`` (Redis serves blocked clients first come, first served, and never one that
  has disconnected), and the claim script the waiter sent behind its BLMOVE, run by the server
  as soon as it returns, writes the waiter's value over the placeholder: the waiter holds the
  lease, its own, when its reply comes. A ticket nobody was blocked to take stays in the list:
  the next attempt withdraws it and takes the lock as if it were free, and the last waiter to
  leave the queue frees it. The placeholder lease lasts `_TICKET_TTL` (0.5 s) until claimed,
  and the list expires 1 ms before it, so a ticket never outlives it.

Every value ends with ``"acquired_at"`` (the server's clock: one clock for every holder) and
``"fence"``.

What this module guarantees (the core, `proclock._core`, does re-entry, errors, logging and
the fan-out of a loss; this is the primitive only):

- Each acquisition is a lease with a token of its own, so two owners of one process exclude
  each other exactly as two processes do.
- **Deadlines.** Every round trip has a client-side deadline (a socket timeout set for it):
  connect and command within `connect_timeout`; an acquisition with a timeout ends by its
  deadline, connecting included (its first attempt gets at least `_MIN_ATTEMPT`, so a tiny
  timeout on a healthy server is not an outage); `timeout=0` is one attempt within
  `connect_timeout`; a server that does not answer in time is BackendUnavailableError. A
  renewal never outlives the lease it renews; a release waits `connect_timeout` at most, and
  one Redis did not confirm is a loss (LockLostError).
- **The holder learns first.** A lease is proven held until ``sent + ttl - margin`` on this
  machine's monotonic clock, where `sent` is taken before the command that set or extended it
  left (the server started its PX no earlier), and ``margin = ttl/20 + 20 ms`` covers clock
  rate drift and the renewal thread's wake-up. One thread per backend and process extends
  every held lease each ttl/3, and declares a lease lost (`_core.report_lost`) at the end of
  its proof if no renewal came back: before the key can expire on the server, so before any
  other client can take it. (A server crash or restart frees every key at once: no holder can
  learn that first; fencing tokens still increase.)
- **No herd, no barging.** A release hands the lease to one waiter, in the order the waiters
  blocked; the lock is never free in between, so a newcomer cannot take it from under the
  woken waiter, and a handoff costs that waiter no attempt: one round trip per handoff (the
  release's). Each wait lasts at most ttl/3 (and what is left of the holder's lease), so a
  holder that died is noticed when its lease runs out, and a lease handed over, proven from
  the start of the wait, has most of its ttl left. A ticket served to a wait that gave up
  meanwhile is passed on: a timed-out wait's late reply is read by a thread of its own
  (`_exchange`'s `late`), a cancelled one is ended by CLIENT UNBLOCK (`_Abort`), not by
  closing its socket, and one interrupted by Ctrl-C gives back what its own token holds (the
  claim writes it). Only a waiter killed in that instant leaves the lock held by nobody until
  the ticket's lease ends (`_TICKET_TTL`).
- Release deletes the key only if it still holds our token. An interruption (Ctrl-C) between
  the server's grant and the return of the handle gives the lease back; one during release
  leaves it to be redone.
- A forked child forgets its parent's connections and leases without closing them (redis-py
  shuts a socket down only in the process that opened it): the parent's leases live on.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import secrets
import socket
import sys
import threading
import time
import weakref
from time import monotonic as _clock

# An absolute import: this module is proclock.backends.redis, and Python 3 has no implicit
# relative imports, so this is redis-py.
import redis
from redis._parsers import _RESP2Parser
from redis.backoff import NoBackoff
from redis.connection import PythonRespSerializer
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

from .. import _core, _holder
from .._errors import BackendUnavailableError
from .._holder import Holder
from ._base import FENCING, LOSS, WAIT_ANY, Handle

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

    from .._spec import LockSpec

__all__ = ["RedisBackend"]

_IDLE_EXIT = 30.0  # seconds the renewal thread lingers with nothing to renew
_IDLE_MAX = 16  # idle connections kept per backend
_SCHEMES = ("redis", "rediss", "unix")
_MIN_TTL = 0.01
_MIN_ATTEMPT = 0.05  # seconds the first attempt of a timed acquisition gets at least
_QUEUE_SLACK = 1.0  # seconds a waiter's queue entry outlives its wait
# Seconds (at most the ttl) that a lease being handed over waits for a waiter to claim it: a
# waiter that took the ticket and died (or lost its connection) before its claim ran strands
# the lock this long, not a ttl; unclaimed, the lock is simply free (nothing is unsafe).
_TICKET_TTL = 0.5


def _margin(ttl: float) -> float:
    """How long before the server could expire a lease its holder declares it lost."""
    return ttl / 20 + 0.02


# The end of a lease's value, after its token and its holder's part (host, pid, argv, name):
# when it was acquired, by the server's clock `t` (one clock for every holder's value), and its
# fence `fs`; the fence last, where a script finds it.
_STAMP = """',"acquired_at":' .. t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
  .. ',"fence":' .. fs .. '}'"""

# KEYS: lock, fence, queue, wake. ARGV: token prefix, the holder's part of the value, ttl in
# ms, token, queue entry ms (0: do not queue), queue key ms.
# Returns {fence, 0, 0} to the winner, {0, pttl of the holder, last fence issued} otherwise.
# Idempotent for one token (a retry after a dropped connection finds its own win); a token is
# issued only to a winner. A ticket still in the wake list was handed to nobody (no waiter was
# blocked: it died, or is between two waits): the lock is free, and the ticket is withdrawn.
_ACQUIRE = (
    """
local v = redis.call('GET', KEYS[1])
if v and string.find(v, '"handoff":true', 1, true) and redis.call('LLEN', KEYS[4]) > 0 then
  redis.call('DEL', KEYS[4])
  v = false
end
if v then
  if string.sub(v, 1, #ARGV[1]) == ARGV[1] then
    return {string.match(v, '(%d+)}$'), 0, 0}
  end
  if ARGV[5] ~= '0' then
    local t = redis.call('TIME')
    local ends = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[5])
    redis.call('ZADD', KEYS[3], ends, ARGV[4])
    if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[6]) then
      redis.call('PEXPIRE', KEYS[3], ARGV[6])
    end
  end
  return {0, redis.call('PTTL', KEYS[1]), redis.call('GET', KEYS[2]) or '0'}
end
local t = redis.call('TIME')
local f = math.max(tonumber(redis.call('GET', KEYS[2]) or '0') + 1, t[1] * 1000000 + t[2])
local fs = string.format('%.0f', f)
redis.call('SET', KEYS[2], fs)
redis.call('SET', KEYS[1], ARGV[1] .. ARGV[2] .. """
    + _STAMP
    + """, 'PX', ARGV[3])
if ARGV[5] ~= '0' then
  redis.call('ZREM', KEYS[3], ARGV[4])
end
return {fs, 0, 0}
"""
)

# Run by a waiter right behind its BLMOVE, which moved a ticket (if a release handed it one)
# from the wake list to the waiter's own list KEYS[3]: the waiter takes the ticket's lease over
# and leaves the queue. Its value replaces the releaser's placeholder, with a full ttl, under
# the waiter's own token: a waiter interrupted before it read this reply can still give back
# what its token holds.
# KEYS: lock, queue, the waiter's list. ARGV: the holder's part of the value, ttl in ms, token.
# Returns nil (no ticket), {ticket, 1} (held), or {ticket, 0} (the ticket's lease was gone).
_CLAIM = (
    """
local ticket = redis.call('LPOP', KEYS[3])
if not ticket then return false end
redis.call('ZREM', KEYS[2], ARGV[3])
local nonce, fs = string.match(ticket, '^(.-):(%d+)$')
local placeholder = '{"token":"' .. nonce .. '",'
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, #placeholder) ~= placeholder then return {ticket, 0} end
local t = redis.call('TIME')
redis.call('SET', KEYS[1], '{"token":"' .. ARGV[3] .. '",' .. ARGV[1] .. """
    + _STAMP
    + """, 'PX', ARGV[2])
return {ticket, 1}
"""
)

# KEYS: lock. ARGV: token prefix, ttl in ms. 1: extended; 0: key gone; -1: another's token.
_EXTEND = """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
if string.sub(v, 1, #ARGV[1]) ~= ARGV[1] then return -1 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# The queue (KEYS[2]) without the entries of waiters gone; `t` is the server's TIME.
_PRUNE = """
local t = redis.call('TIME')
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', t[1] * 1000 + math.floor(t[2] / 1000))
"""

# The end of a lease (KEYS[1]) whose holder is done with it: handed over to whichever live
# waiter pops the ticket first (Redis serves blocked clients first come, first served, and never
# a disconnected one), or freed if nobody waits. The ticket is a lease of its own, with a new
# token ARGV[1] and fence, that its waiter claims (_CLAIM): it never becomes free in between,
# so a newcomer does not barge in and the woken waiter's attempt is not wasted. The ticket list
# expires 1 ms before the lease: a ticket nobody popped never outlives it. The ticket's lease
# is short (_TICKET_TTL): the claim gives it a full ttl.
# KEYS: lock, queue, wake, fence. ARGV: the ticket's token, the ticket's lease in ms.
_HAND_OVER = (
    _PRUNE
    + """
if redis.call('ZCARD', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[1])
else
  local f = math.max(tonumber(redis.call('GET', KEYS[4]) or '0') + 1, t[1] * 1000000 + t[2])
  local fs = string.format('%.0f', f)
  redis.call('SET', KEYS[4], fs)
  redis.call('SET', KEYS[1], '{"token":"' .. ARGV[1] .. '","handoff":true,"fence":' .. fs .. '}',
    'PX', ARGV[2])
  redis.call('DEL', KEYS[3])
  redis.call('RPUSH', KEYS[3], ARGV[1] .. ':' .. fs)
  redis.call('PEXPIRE', KEYS[3], math.max(1, tonumber(ARGV[2]) - 1))
end
"""
)

# KEYS: lock, queue, wake, fence. ARGV: token prefix, the ticket's lease in ms (_TICKET_TTL), a
# ticket token. 1: released (handed over or freed); 0: gone; -1: another's.
_RELEASE = (
    """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
if string.sub(v, 1, #ARGV[1]) ~= ARGV[1] then return -1 end
local ARGV = {ARGV[3], ARGV[2]}
"""
    + _HAND_OVER
    + "return 1\n"
)

# KEYS: lock, queue, wake. ARGV: token. A waiter leaves the queue; a ticket left for nobody (no
# live waiter remains to pop it) frees the lock.
_LEAVE = (
    "redis.call('ZREM', KEYS[2], ARGV[1])"
    + _PRUNE
    + """
if redis.call('ZCARD', KEYS[2]) > 0 or redis.call('LLEN', KEYS[3]) == 0 then return 0 end
local v = redis.call('GET', KEYS[1])
if v and string.find(v, '"handoff":true', 1, true) then
  redis.call('DEL', KEYS[1])
end
redis.call('DEL', KEYS[3])
return 1
"""
)

_SOURCES = (_ACQUIRE, _EXTEND, _RELEASE, _LEAVE, _CLAIM)

_GONE = (
    "its key is gone: the lease expired before it could be renewed (the holder was paused or "
    "Redis unreachable for longer than the ttl), or Redis was restarted or flushed"
)
_TAKEN = (
    "its key now holds another holder's token: the lease expired (the holder was paused for "
    "longer than the ttl) and another process took the lock"
)

# Lease states, changed under the backend's mutex.
HELD = 0  # proven held until `expires`, renewed every ttl/3
LOST = 1  # found lost by the renewal (reported); release still runs its compare-and-delete
RELEASING = 2  # release is deleting the key; the renewal leaves it alone
RELEASED = 3  # given back (or forgotten by a forked child): a further release does nothing
_STATE_NAMES = ("HELD", "LOST", "RELEASING", "RELEASED")


class _Lease:
    """One acquisition's lease: the backend's private state of a Handle."""

    __slots__ = (
        "due",
        "expires",
        "handle",
        "key",
        "name",
        "pid",
        "prefix",
        "redo",
        "state",
    )

    def __init__(
        self, key: str, name: str, prefix: str, sent: float, ttl: float, *, pid: int
    ) -> None:
        self.key, self.name, self.prefix = key, name, prefix
        # Proven held until `expires` (monotonic): the server's PX ran from no earlier than
        # `sent`, and the margin keeps this end before the server's.
        self.expires = sent + ttl - _margin(ttl)
        self.due = sent + ttl / 3
        self.state = HELD
        self.redo = False  # a release was interrupted: a redo may find the key deleted already
        self.pid = pid
        # Its handle, weakly: a handle dropped without a release (an interruption between the
        # backend's return and the core's keeping it) gives the lease back (`_abandoned`).
        self.handle: weakref.ref[Handle] | None = None

    def __repr__(self) -> str:
        return f"<redis lease {self.key!r} {_STATE_NAMES[self.state]}>"


class _Timeout(Exception):  # noqa: N818
    """A round trip got no reply by its deadline (the connection is closed)."""


class _Aborted(Exception):  # noqa: N818
    """A wait was withdrawn (an async task cancelled)."""


class _Script:
    """A Lua script, sent by its SHA1 (EVALSHA): every connection loads it as it connects.

    A server that lost it anyway (SCRIPT FLUSH) answers NOSCRIPT: sent again in full (EVAL).
    """

    __slots__ = ("backend", "sha", "source")

    def __init__(self, backend: RedisBackend, source: str) -> None:
        import hashlib  # noqa: PLC0415

        self.backend, self.source = backend, source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    def __call__(
        self,
        keys: Sequence[str],
        args: Sequence[Any],
        *,
        bound: float | None = None,
        before: Sequence[tuple[Any, ...]] = (),
        wait_bound: float | None = None,
        abort: _Abort | None = None,
        late: Callable[[Any], None] | None = None,
    ) -> Any:
        """EVALSHA (behind the commands `before`, in one write); the script's reply.

        With `wait_bound`, the last of `before` blocks: its reply and the script's are read
        by `wait_bound`, the others' by `bound` (see `_round_trip`, as for `abort`, `late`).
        """
        command: tuple[Any, ...] = ("EVALSHA", self.sha, len(keys), *keys, *args)
        commands = [*before, command]
        wait_from = len(commands) - 2 if wait_bound is not None else None
        try:
            return self.backend._round_trip(
                commands, bound, wait_bound, abort, late, wait_from=wait_from
            )[-1]
        except NoScriptError:
            # Not sent again: `before` (a BLMOVE) ran, and left what it moved to this script.
            command = ("EVAL", self.source, len(keys), *keys, *args)
            return self.backend._round_trip([command], bound)[0]


class _Abort:
    """A handle on a wait in progress, so that another thread can withdraw it."""

    __slots__ = ("backend", "conn", "mutex", "set")

    def __init__(self, backend: RedisBackend) -> None:
        self.backend = backend
        self.mutex = threading.Lock()
        self.set = False
        self.conn: Any = None

    def fire(self) -> None:
        """Withdraw the wait (from any thread, without blocking it): see `_withdraw`."""
        with self.mutex:
            self.set = True
            conn = self.conn
        if conn is not None:
            threading.Thread(
                target=self._withdraw, args=(conn,), name="proclock-redis-unblock", daemon=True
            ).start()

    def _withdraw(self, conn: Any) -> None:
        """End the wait's BLMOVE with CLIENT UNBLOCK from another connection.

        The BLMOVE then returns nothing, or the ticket Redis served it just before (claimed by
        the script behind it), which its thread reads and gives back: a handoff is never lost
        to a cancellation. Only if Redis cannot unblock it within `connect_timeout`
        (unreachable, or the BLMOVE never arrives) is the socket shut down.
        """
        backend, client_id = self.backend, getattr(conn, "proclock_id", None)
        end = _clock() + backend._connect_timeout
        pause = 0.001
        while client_id is not None and self.conn is conn and _clock() < end:
            try:
                if backend._command("CLIENT", "UNBLOCK", client_id) == 1:
                    return
            except BackendUnavailableError:
                break
            time.sleep(pause)  # not blocked yet (its BLMOVE on the way), or already answered
            pause = min(pause * 2, 0.05)
        if self.conn is conn:
            sock = getattr(conn, "_sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


_INSTANCES: weakref.WeakSet[RedisBackend] = weakref.WeakSet()


# Tokens: unique, not secret (whoever can reach the server can delete any key): this process's
# random prefix and a counter, which is cheaper than a getrandom(2) per token. A forked child
# draws a prefix of its own.
_token_prefix = secrets.token_hex(8)
_token_count = itertools.count()


def _token() -> str:
    return f"{_token_prefix}{next(_token_count):016x}"


def _after_fork_in_child() -> None:
    global _token_prefix, _token_count  # a child draws tokens of its own
    _token_prefix, _token_count = secrets.token_hex(8), itertools.count()
    for backend in list(_INSTANCES):
        backend._forget()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    from urllib.parse import urlsplit, urlunsplit  # noqa: PLC0415

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _server(url: str) -> str:
    """The server and database, spelled one way: ``redis://host:port/db`` (no user, password).

    Part of every lock's location, which is its identity for re-entry: two spellings of one
    URL (a default port, ``?db=``) must give one location.
    """
    from urllib.parse import parse_qs, urlsplit  # noqa: PLC0415

    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    db = parse_qs(parts.query).get("db", ["0"])[0]
    if scheme == "unix":
        return f"unix://{parts.path}?db={db}"
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{parts.port or 6379}/{parts.path.strip('/') or db}"


class RedisBackend:
    """Exclusive locks as Redis leases, renewed while held, with fencing tokens.

    Args:
        url: ``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS) or
            ``unix:///path/to/socket?db=0``, as redis-py reads it.
        namespace: the prefix of every key this backend uses.
        ttl: the lease in seconds: a holder that dies frees the lock after at most this long;
            a holder paused for longer loses it. It is renewed every ttl/3, and declared lost
            by its holder ttl/20 + 20 ms before the server could let it expire.
        connect_timeout: the deadline of every round trip (connecting included) that no
            shorter deadline bounds: BackendUnavailableError past it.

    Nothing connects until the first acquisition. There are no shared locks (a lease has one
    holder): use PostgreSQL for shared=True. Waits need Redis 6.2 or later (BLMOVE).
    """

    # WAIT_ANY: a wait ends when a release hands it the lease (one waiter per release), or
    # when the holder's lease runs out (its PTTL: a timer, not a poll), and cancelling
    # acquire_async withdraws it: a semaphore's head waits for any of its slots with one such
    # wait per slot.
    capabilities = frozenset((FENCING, LOSS, WAIT_ANY))

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "proclock",
        ttl: float = 5.0,
        connect_timeout: float = 2.0,
    ) -> None:
        if not isinstance(url, str) or url.split("://", 1)[0].lower() not in _SCHEMES:
            msg = f"RedisBackend needs a redis://, rediss:// or unix:// URL, not {url!r}"
            raise ValueError(msg)
        if not isinstance(namespace, str) or not namespace or "\0" in namespace:
            msg = f"namespace must be a non-empty string, not {namespace!r}"
            raise ValueError(msg)
        for label, value in (("ttl", ttl), ("connect_timeout", connect_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                msg = f"{label} must be a number of seconds, not {value!r}"
                raise TypeError(msg)
            if not math.isfinite(value) or value < _MIN_TTL:
                msg = f"{label} must be at least {_MIN_TTL} seconds and finite, not {value!r}"
                raise ValueError(msg)
        self._url, self._namespace = url, namespace
        self._ttl, self._ttl_ms = float(ttl), max(1, round(ttl * 1000))
        self._ticket_ms = min(self._ttl_ms, round(_TICKET_TTL * 1000))
        self._connect_timeout = float(connect_timeout)
        self._display = _redact(url)
        try:
            self._server = _server(url)
        except ValueError as exc:  # a port that is not a number
            msg = f"RedisBackend cannot read the URL {self._display!r}: {exc}"
            raise ValueError(msg) from None
        self._forget()
        _INSTANCES.add(self)

    def _forget(self) -> None:
        """Start afresh: at construction, and in a forked child (which holds nothing).

        The parent's connections are dropped, not closed: redis-py shuts a socket down only in
        the process that opened it, so the parent's connections (and leases) are untouched.
        """
        # Reentrant: a signal handler or finalizer may take or release a lock while this
        # thread is inside one of the (short, call-free) sections it guards.
        self._mutex = threading.RLock()
        self._wake = threading.Condition(self._mutex)
        self._renewing: set[_Lease] = set()
        self._leases: dict[weakref.ref[Handle], _Lease] = {}  # held or being released
        self._thread: threading.Thread | None = None
        self._wake_at = 0.0  # when the renewal thread next wakes by itself (monotonic)
        self._idle: list[Any] = []
        self._factory: Callable[[], Any] | None = None
        self._scripts: Any = None
        self._static: str | None = None
        self._tls = threading.local()
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"RedisBackend({self._display!r}, namespace={self._namespace!r}, ttl={self._ttl})"

    # -- keys, where ---------------------------------------------------------------------------

    def key(self, name: str) -> str:
        """The Redis key of the lease for the lock `name`."""
        return f"{self._namespace}:lock:{name}"

    def fence_key(self, name: str) -> str:
        """The Redis key of the last fencing token issued for the lock `name`."""
        return f"{self._namespace}:fence:{name}"

    def queue_key(self, name: str) -> str:
        """The sorted set of the waiters for `name` (ZCARD: how many wait, roughly)."""
        return f"{self._namespace}:queue:{name}"

    def wake_key(self, name: str) -> str:
        """The list a release pushes the ticket onto that hands `name` to its next waiter."""
        return f"{self._namespace}:wake:{name}"

    def location(self, spec: LockSpec) -> str:
        """The server and key, e.g. "redis://127.0.0.1:6379/0 key 'proclock:lock:name'"."""
        return f"{self._server} key {self.key(_name(spec))!r}"

    def _unavailable(self, exc: BaseException | str) -> BackendUnavailableError:
        reason = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        return BackendUnavailableError(self._display, reason)

    # -- connections ---------------------------------------------------------------------------

    def _connect(self) -> Any:
        """The scripts (acquire, extend, release, leave), made at first use."""
        if self._pid != os.getpid():
            self._forget()  # forked without the at-fork hook (e.g. os.fork in C code)
        scripts = self._scripts
        if scripts is not None:
            return scripts
        # No retries inside redis-py (its default backs off for seconds): a closed port must
        # fail at once; each round trip's deadline is set on its socket (`_round_trip`).
        pool = redis.ConnectionPool.from_url(
            self._url,
            socket_connect_timeout=self._connect_timeout,
            socket_timeout=self._connect_timeout,
            retry=Retry(NoBackoff(), 0),
            client_name=f"proclock-{os.getpid()}",
            # The pure-Python parser, also where hiredis is installed: hiredis's packer
            # crashed the process (SIGSEGV) when Ctrl-C landed in it.
            parser_class=_RESP2Parser,
        )
        cls, kwargs = pool.connection_class, dict(pool.connection_kwargs)

        def make() -> Any:
            conn = cls(**kwargs)
            conn._command_packer = PythonRespSerializer(conn._buffer_cutoff, conn.encoder.encode)
            return conn

        made = tuple(_Script(self, s) for s in _SOURCES)
        with self._mutex:
            if self._scripts is None:  # else another thread won: ours are dropped unused
                self._factory = make
                self._scripts = made
            return self._scripts

    def _take(self) -> Any:
        with self._mutex:
            if self._idle:
                return self._idle.pop()
            factory = self._factory
        assert factory is not None  # noqa: S101  (made by _connect)
        return factory()

    def _give(self, conn: Any) -> None:
        with self._mutex:
            if len(self._idle) < _IDLE_MAX and conn.pid == self._pid:
                self._idle.append(conn)
                return
        conn.disconnect()

    def _round_trip(
        self,
        commands: Sequence[tuple[Any, ...]],
        bound: float | None,
        wait_bound: float | None = None,
        abort: _Abort | None = None,
        late: Callable[[Any], None] | None = None,
        *,
        wait_from: int | None = None,
    ) -> list[Any]:
        """Send `commands` in one write; their replies, each read by its deadline (`_connect`ed).

        The replies must come within `bound` (default `connect_timeout`) of the start,
        connecting included; those of ``commands[wait_from:]`` (a blocking command's and what
        follows it) within `wait_bound` instead. No reply in time: `_Timeout`, and the
        connection is closed (its late replies must reach nobody), except that with `late`, a
        wait's replies still to come are read by a thread of its own (within
        `connect_timeout`) and the last is given to `late` there (or the error that kept it
        from us): a ticket Redis served just as its waiter gave up is passed on, not lost. A
        pooled connection the server closed (a restart, CLIENT KILL) is retried once on a
        fresh one.
        """
        self._tls.retried = False
        try:
            return self._exchange(
                commands, bound, wait_bound, abort, late, wait_from=wait_from, fresh=False
            )
        except (redis.ConnectionError, ConnectionError) as exc:
            if isinstance(exc, _Retryable):
                self._tls.retried = True
                return self._exchange(
                    commands, bound, wait_bound, abort, late, wait_from=wait_from, fresh=True
                )
            raise

    def _exchange(  # noqa: PLR0915  (one exchange, each failure named where it happens)
        self,
        commands: Sequence[tuple[Any, ...]],
        bound: float | None,
        wait_bound: float | None,
        abort: _Abort | None,
        late: Callable[[Any], None] | None,
        *,
        wait_from: int | None,
        fresh: bool,
    ) -> list[Any]:
        start = _clock()
        end = start + (self._connect_timeout if bound is None else max(bound, 0.001))
        wait_end = end if wait_bound is None else start + wait_bound
        waits = len(commands) if wait_from is None else wait_from  # the first one that blocks
        conn = self._factory() if fresh and self._factory is not None else self._take()
        reused = conn._sock is not None
        replies: list[Any] = []
        error: Exception | None = None
        skip, reading = 0, -1  # the setup replies to skip; the reply being read
        try:
            if abort is not None:
                with abort.mutex:
                    if abort.set:
                        raise _Aborted  # noqa: TRY301  (before anything was sent)
                    abort.conn = conn
            if reused and _stale(conn):  # closed by the server meanwhile (EOF)
                conn.disconnect()
                reused = False
            if conn._sock is None:
                # Clamped: past the deadline already (a slow thread), connect fails at once.
                conn.socket_connect_timeout = conn.socket_timeout = max(end - _clock(), 0.0001)
                conn.connect()
                # Its client id (for CLIENT UNBLOCK, see _Abort) and the scripts.
                loads = [("CLIENT", "ID"), *(("SCRIPT", "LOAD", source) for source in _SOURCES)]
                commands, skip = [*loads, *commands], len(loads)
            waits += skip
            sock = conn._sock
            try:
                sock.settimeout(max(end - _clock(), 0.0001))
                conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            except (redis.ConnectionError, OSError) as exc:
                if reused and not (abort is not None and abort.set):
                    raise _Retryable(str(exc)) from exc
                raise
            # With `late`, kept open past a timeout of any reply (redis-py would close it, and
            # a ticket Redis served just then would reach nobody): closed below if need be.
            keep = late is not None
            for i in range(len(commands)):
                reading, mine = i, i >= skip
                sock.settimeout(max((wait_end if i >= waits else end) - _clock(), 0.0001))
                try:
                    reply = conn.read_response(disconnect_on_error=not keep)
                except redis.ResponseError as exc:  # read whole: the connection is clean
                    reply = None
                    error = error or exc
                if mine:
                    replies.append(reply)
                elif i == 0:
                    conn.proclock_id = reply
        except (redis.TimeoutError, TimeoutError) as exc:
            aborted = abort is not None and abort.set
            # Sent (`reading` >= 0): a wait behind the reply that timed out (even the PING's,
            # or a setup reply's) may yet be served a ticket and claim it: read on.
            if late is not None and not aborted and reading >= 0:
                threading.Thread(
                    target=self._drain,
                    args=(conn, late, reading, len(commands), skip > 0),
                    name="proclock-redis-drain",
                    daemon=True,
                ).start()
            else:
                conn.disconnect()
            if aborted:
                raise _Aborted from exc
            raise _Timeout(len(replies), replies) from exc
        except (RedisError, OSError) as exc:
            conn.disconnect()
            if abort is not None and abort.set:
                raise _Aborted(replies) from exc
            raise
        except BaseException:
            conn.disconnect()  # interrupted mid-exchange: its replies must reach nobody
            raise
        finally:
            if abort is not None:
                with abort.mutex:
                    abort.conn = None
        self._give(conn)
        if error is not None:
            raise error
        return replies

    def _drain(
        self, conn: Any, late: Callable[[Any], None], start: int, stop: int, fresh: bool
    ) -> None:
        """Read replies `start` to `stop` that came too late for their caller.

        The last (or the error that kept it from us) goes to `late`. On a `fresh` connection,
        reply 0 is its CLIENT ID.
        """
        reply = None
        try:
            conn._sock.settimeout(self._connect_timeout)
            for i in range(start, stop):
                reply = conn.read_response()
                if i == 0 and fresh:
                    conn.proclock_id = reply
        except BaseException as exc:  # noqa: BLE001  (handed to `late`: the reply is unknown)
            conn.disconnect()
            reply = exc
        else:
            self._give(conn)
        with contextlib.suppress(Exception):
            late(reply)

    def _command(self, *args: Any) -> Any:
        """One plain command within `connect_timeout`; BackendUnavailableError otherwise."""
        self._connect()
        try:
            return self._round_trip([args], None)[0]
        except _Timeout:
            raise self._unavailable(
                f"no reply within connect_timeout={self._connect_timeout}s"
            ) from None
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc

    def _value_parts(self, name: str, token: str) -> tuple[str, str]:
        """(token prefix, this holder's part of the JSON value) for a new attempt.

        The scripts end the value with ``"acquired_at"`` (the server's clock) and the fence.
        """
        static = self._static
        if static is None:
            static = self._static = json.dumps(
                {
                    "host": os.uname().nodename,
                    "pid": os.getpid(),
                    "argv": list(getattr(sys, "orig_argv", sys.argv)),
                    "v": 1,
                },
                separators=(",", ":"),
            )[1:-1]
        return f'{{"token":"{token}",', f'{static},"name":{json.dumps(name)}'

    # -- acquisition ---------------------------------------------------------------------------

    def try_acquire(self, spec: LockSpec) -> Handle | None:
        """One attempt (SET NX and a fencing token) within `connect_timeout`: a handle or None.

        The core's first try of a timed acquisition: within its timeout too (at least
        `_MIN_ATTEMPT`), so that `timeout=` bounds the whole acquisition.
        """
        bound = None
        timeout = spec.timeout
        if spec.blocking and timeout is not None and 0 < timeout < self._connect_timeout:
            bound = max(timeout, _MIN_ATTEMPT)
        won = self._try(_name(spec), _token(), bound)
        return None if isinstance(won, int) else won

    def acquire(
        self, spec: LockSpec, deadline: float | None, abort: _Abort | None = None
    ) -> Handle | None:
        """Wait for the lease until `deadline` (monotonic; None: forever); None if it passed.

        Each cycle is a try, which queues this waiter if the lock is held, then a wait
        (`_block`) that a release handing us the lease (one waiter per release), the holder's
        lease running out, ttl/3 or the deadline ends.
        """
        name = _name(spec)
        token = _token()  # one token for every try of this wait: `_try` is idempotent
        if deadline is not None and deadline <= _clock():
            won = self._try(name, token, None)  # timeout=0: one attempt, connect_timeout
            return None if isinstance(won, int) else won
        parts = self._value_parts(name, token)  # the same for every cycle of this wait
        first = True
        queued = False  # a try entered the queue: leave it on giving up
        try:
            while True:
                if abort is not None and abort.set:
                    raise _Aborted  # noqa: TRY301  (handled below, as a withdrawn wait)
                left = None if deadline is None else deadline - _clock()
                if left is not None and left <= 0:
                    break
                bound = left if left is None or not first else max(left, _MIN_ATTEMPT)
                sent = _clock()
                first, queued = False, True
                won = self._try(name, token, bound, queue=self._ttl / 3, parts=parts)
                if not isinstance(won, int):
                    return won
                # Each wait at most ttl/3: a lease handed over is proven from the wait's start
                # (the server set its ttl no earlier), so most of it is left when it comes.
                now = _clock()
                wait = self._ttl / 3
                if won >= 0:  # a holder's lease that ends (a holder that died sends nothing)
                    wait = min(wait, sent + won / 1000 - now + 0.002)
                left = None if deadline is None else deadline - now
                if left is not None:
                    if left <= 0:
                        break
                    wait = min(wait, left - 0.01)
                wait = max(wait, 0.001)
                wait_bound = wait + self._connect_timeout if left is None else max(left, wait)
                got = self._block(
                    name, token, parts, bound=left, wait=wait, wait_bound=wait_bound, abort=abort
                )
                if got is not None:
                    return got
        except _Aborted:
            self._leave(name, token)
            return None
        except _WaitTimedOut:
            # No reply by the deadline: a timeout (leaving the queue, in the background); with
            # no deadline, a server that stopped answering.
            self._leave(name, token, background=True)
            if deadline is None:
                msg = f"no reply within {self._connect_timeout}s past a wait's end"
                raise self._unavailable(msg) from None
            return None
        except BaseException:
            if queued:
                self._leave(name, token, background=True)
            raise
        if queued:
            self._leave(name, token, background=True)
        return None

    def _leave(self, name: str, token: str, *, background: bool = False) -> None:
        """Leave the queue; the last waiter to leave frees a ticket nobody took (best effort)."""
        keys = [self.key(name), self.queue_key(name), self.wake_key(name)]
        script = self._connect()[3]

        def run() -> None:
            with contextlib.suppress(RedisError, OSError, _Timeout, _Aborted):
                script(keys=keys, args=[token, self._ttl_ms])

        if background:
            threading.Thread(target=run, name="proclock-redis-leave", daemon=True).start()
        else:
            run()

    async def acquire_async(self, spec: LockSpec, deadline: float | None) -> Handle | None:
        """`acquire` for coroutines: the loop never blocks, cancellation leaves nothing held.

        The wait runs in a thread of its own; cancelling the task withdraws the wait (CLIENT
        UNBLOCK, its queue entry removed) and gives back a lease won meanwhile, before it
        re-raises.
        """
        import asyncio  # noqa: PLC0415

        loop = asyncio.get_running_loop()
        future: asyncio.Future[Handle | None] = loop.create_future()
        abort = _Abort(self)

        def run() -> None:
            try:
                result: Any = self.acquire(spec, deadline, abort)
                ok = True
            except BaseException as exc:  # noqa: BLE001  (handed to the awaiting task)
                result, ok = exc, False

            def settle() -> None:
                if future.cancelled():
                    if ok and result is not None:
                        threading.Thread(target=self.release, args=(result,), daemon=True).start()
                elif ok:
                    future.set_result(result)
                else:
                    future.set_exception(result)

            try:
                loop.call_soon_threadsafe(settle)
            except RuntimeError:  # the loop is closed: nobody will take the lease
                if ok and result is not None:
                    self.release(result)

        threading.Thread(target=run, name="proclock-redis-wait", daemon=True).start()
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            abort.fire()
            # The wait ends promptly (CLIENT UNBLOCK): wait for it, give back a lease
            # it won meanwhile, then be cancelled.
            while not future.done():
                try:
                    await asyncio.shield(future)
                except asyncio.CancelledError:
                    continue
                except BaseException:  # noqa: BLE001, S110  (its error is moot: we are cancelled)
                    pass
            if not future.cancelled() and future.exception() is None:
                won = future.result()
                if won is not None:
                    await asyncio.shield(asyncio.to_thread(self.release, won))
            raise

    def _try(
        self,
        name: str,
        token: str,
        bound: float | None,
        queue: float = 0.0,
        *,
        parts: tuple[str, str] | None = None,
    ) -> Handle | int:
        """One attempt: the handle, or the holder's PTTL in ms.

        With `queue` > 0, a try that finds the lock held puts this waiter in the queue for
        that many seconds (plus `_QUEUE_SLACK`, so that a waiter that died leaves by itself).
        `parts` is `_value_parts(name, token)`, made once per wait by its caller.
        """
        scripts = self._connect()
        keys = [self.key(name), self.fence_key(name), self.queue_key(name), self.wake_key(name)]
        prefix, rest = self._value_parts(name, token) if parts is None else parts
        queue_ms = round((queue + _QUEUE_SLACK) * 1000) if queue else 0
        args = [prefix, rest, self._ttl_ms, token, queue_ms, self._ttl_ms * 2 + 2000]
        sent = _clock()
        handle = None
        try:
            try:
                reply = scripts[0](keys=keys, args=args, bound=bound)
            except _Timeout:
                if queue and bound is not None and bound < _MIN_ATTEMPT:
                    # A later try of a timed wait, near its end: the deadline came before the
                    # server had a fair time to answer (it answered this wait before).
                    raise _WaitTimedOut from None
                raise self._unavailable(f"no reply within {self._bound_text(bound)}") from None
            except (RedisError, OSError) as exc:
                raise self._unavailable(exc) from exc
            if not reply[0]:
                return int(reply[1])
            handle = self._hold(name, prefix, sent, int(reply[0]))
        except (BackendUnavailableError, _WaitTimedOut):
            # A try whose reply we did not see may have won: given back, in the background.
            self._give_back(name, prefix, background=True)
            raise
        except BaseException:
            # Interrupted (Ctrl-C) after the SET may have won: give back whatever our token
            # holds, else it would block everyone for a ttl (or, renewed, forever).
            self._give_back(name, prefix, handle)
            raise
        return handle

    def _block(
        self,
        name: str,
        token: str,
        parts: tuple[str, str],
        *,
        bound: float | None,
        wait: float,
        wait_bound: float,
        abort: _Abort | None,
    ) -> Handle | None:
        """Wait up to `wait` seconds for a release to hand us the lease; None if none did.

        One write: a PING, whose reply within `connect_timeout` (or the deadline) shows the
        server is answering (BackendUnavailableError if not); a BLMOVE, which Redis answers
        when a release pushes a ticket (to the longest-blocked live waiter: one per release);
        and the claim behind it (_CLAIM), which the server runs as soon as the BLMOVE returns:
        the lease is ours, with our value, when the reply comes. That reply must come within
        `wait_bound`, else _WaitTimedOut; a ticket served as this wait gave up (a timeout, a
        withdrawal, Ctrl-C) is given back, which hands it on.
        """
        mine = f"{self._namespace}:got:{token}"
        keys = [self.key(name), self.queue_key(name), mine]
        own, rest = parts  # _value_parts(name, token)
        blmove = ("BLMOVE", self.wake_key(name), mine, "LEFT", "LEFT", f"{wait:.3f}")
        before = (("PING",), blmove)

        def give_back(claimed: Any) -> None:
            # The claim's reply that came too late, or the error that kept it from us: a lease
            # our token may hold is given back (which hands it on).
            if isinstance(claimed, BaseException) or (claimed and int(claimed[1])):
                self._give_back(name, own)

        sent = _clock()
        handle = None
        try:
            try:
                reply = self._connect()[4](
                    keys=keys,
                    args=[rest, self._ttl_ms, token],
                    bound=bound,
                    before=before,
                    wait_bound=wait_bound,
                    abort=abort,
                    late=give_back,
                )
            except _Timeout as exc:
                # The replies still to come are read by a thread of its own (`late`). Not even
                # the PING answered: the server is not answering (unless the deadline was too
                # near for a fair try: the wait's end, see `_try`).
                if not exc.args[0] and (bound is None or bound >= _MIN_ATTEMPT):
                    text = f"no reply within {self._bound_text(bound)}"
                    raise self._unavailable(text) from None
                raise _WaitTimedOut from None
            except _Aborted as exc:
                if exc.args:  # withdrawn mid-exchange: the claim's reply, if it came
                    replies = exc.args[0]
                    if len(replies) > len(before):
                        give_back(replies[-1])
                    else:  # whether the server claimed for us is unknown
                        self._give_back(name, own, background=True)
                raise
            except (RedisError, OSError) as exc:
                self._give_back(name, own, background=True)  # claimed for us, perhaps
                if "BLMOVE" in str(exc).upper() and isinstance(exc, redis.ResponseError):
                    text = f"{exc} (proclock's waits need Redis 6.2 or later, for BLMOVE)"
                    raise self._unavailable(text) from exc
                raise self._unavailable(exc) from exc
            if not reply or not int(reply[1]):
                return None  # no ticket (or its lease was gone): the caller tries again
            handle = self._hold(name, own, sent, int(reply[0].decode().split(":")[1]))
        except (_WaitTimedOut, _Aborted, BackendUnavailableError):
            raise
        except BaseException:
            # Interrupted (Ctrl-C): whether the server claimed for us may be unknown; what our
            # token holds is given back.
            self._give_back(name, own, handle)
            raise
        return handle

    def _hold(self, name: str, prefix: str, sent: float, fence: int) -> Handle:
        """The handle of a lease won (its value starts with `prefix`), renewed from now on."""
        lease = _Lease(self.key(name), name, prefix, sent, self._ttl, pid=self._pid)
        handle = Handle(
            f"{self._server} key {lease.key!r}", fencing_token=fence, shared=False, private=lease
        )
        lease.handle = ref = weakref.ref(handle, self._abandoned)
        self._leases[ref] = lease
        try:
            self._track(lease)
        except BaseException:
            self._drop(handle)  # interrupted (Ctrl-C): the caller gives the lease back
            raise
        return handle

    def _drop(self, handle: Handle | None) -> None:
        """Stop renewing a lease being given back (interrupted before it reached the caller)."""
        if handle is not None:
            self._retire(handle.private)

    def _retire(self, lease: _Lease) -> None:
        """RELEASED: no longer renewed, nor given back when its handle is dropped."""
        with self._mutex:
            lease.state = RELEASED
            self._renewing.discard(lease)
            self._unlist(lease)

    def _unlist(self, lease: _Lease) -> None:
        """Forget `lease` among those given back if their handle is dropped (`_abandoned`)."""
        if lease.handle is not None:
            self._leases.pop(lease.handle, None)

    def _abandoned(self, ref: weakref.ref[Handle]) -> None:
        """A handle is gone that was never released: its lease is given back.

        The core keeps every handle it was given until it releases it; one dropped anyway
        was lost to an interruption (Ctrl-C) after the backend returned it and before the core
        kept it: without this, it would be renewed, with no owner, for as long as the process
        lives. Called by the garbage collector, in any thread: it does not block.
        """
        lease = self._leases.pop(ref, None)
        if lease is None or lease.pid != os.getpid():
            return
        with self._mutex:
            if lease.state in (RELEASING, RELEASED):
                return
            self._retire(lease)
        self._give_back(lease.name, lease.prefix, background=True)

    def _release_script(self, name: str, prefix: str) -> Any:
        """Run the release: hand over (or free) what `prefix` holds of `name`; its result."""
        keys = [self.key(name), self.queue_key(name), self.wake_key(name), self.fence_key(name)]
        return self._connect()[2](keys=keys, args=[prefix, self._ticket_ms, _token()])

    def _give_back(
        self, name: str, prefix: str, handle: Handle | None = None, *, background: bool = False
    ) -> None:
        """Release the key if `prefix` holds it: a try or a wait whose outcome we did not see.

        `handle`'s lease (if one was made) is no longer renewed. In the `background` (a thread
        of its own) where the caller must not wait: a server that does not answer, a finalizer.
        """
        if handle is not None:
            self._drop(handle)
        if background:
            threading.Thread(target=self._give_back, args=(name, prefix), daemon=True).start()
            return
        with contextlib.suppress(RedisError, OSError, _Timeout, _Aborted):
            self._release_script(name, prefix)

    def _bound_text(self, bound: float | None) -> str:
        if bound is None:
            return f"connect_timeout={self._connect_timeout}s"
        return f"the acquisition's deadline ({bound:.3f}s)"

    # -- release -------------------------------------------------------------------------------

    def release(self, handle: Handle) -> None:
        """Delete the key if (and only if) it still holds our token, and wake the next waiter.

        Idempotent: a second call does nothing. Waits `connect_timeout` at most: a release
        Redis did not confirm is reported lost (`report_lost`: LockLostError), as is a lease
        found lost here; nothing of another holder's is touched. Nothing is done in a forked
        child: the lease is its parent's.
        """
        lease: _Lease = handle.private
        if lease.pid != os.getpid():
            lease.state = RELEASED
            return
        state = None
        try:
            with self._mutex:
                state = lease.state
                if state in (RELEASING, RELEASED):
                    return
                lease.state = RELEASING
                self._renewing.discard(lease)
                self._unlist(lease)
            result = self._release_script(lease.name, lease.prefix)
            retried = bool(getattr(self._tls, "retried", False))
        except (_Timeout, RedisError, OSError) as exc:
            lease.state = RELEASED
            if state == LOST:
                return
            reason = (
                f"no reply within connect_timeout={self._connect_timeout}s"
                if isinstance(exc, _Timeout)
                else f"{type(exc).__name__}: {exc}"
            )
            _core.report_lost(
                handle,
                f"Redis did not confirm the release ({reason}): the lease ends by itself "
                "within the ttl, and whether it was still ours is unknown",
            )
            return
        except BaseException:
            # Interrupted (Ctrl-C), even before the script was sent: the lease as it was (still
            # renewed if held), which the core's redo releases.
            if state is not None:
                with self._mutex:
                    lease.state, lease.redo = state, True
                    if state == HELD:
                        self._renewing.add(lease)
                    if lease.handle is not None:
                        self._leases[lease.handle] = lease
            raise
        lease.state = RELEASED
        if result == 1 or state == LOST:
            return
        if (retried or lease.redo) and _clock() < lease.expires:
            # An earlier try, whose connection dropped or that was interrupted (Ctrl-C), freed
            # the lease (0) or handed it to a waiter (-1): within its proof, nobody else could
            # have taken it.
            return
        _core.report_lost(handle, _TAKEN if result == -1 else _GONE)

    # -- renewal -------------------------------------------------------------------------------

    def _track(self, lease: _Lease) -> None:
        """Have the renewal thread extend `lease` each ttl/3 from now on."""
        with self._wake:
            self._renewing.add(lease)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._renewer, name="proclock-redis-renewal", daemon=True
                )
                self._thread.start()
            elif min(lease.due, lease.expires) < self._wake_at:
                # Due before the thread next wakes (a lease handed over after a long wait): wake
                # it now. Else, as for every lease taken at a steady pace, it wakes in time by
                # itself (when idle, it wakes every ttl/3): no wake-up per acquisition.
                self._wake.notify()

    def _renewer(self) -> None:
        """Extend every held lease each ttl/3; declare one lost at the end of its proof."""
        me = threading.current_thread()
        idle_since = None
        while True:
            with self._wake:
                while True:
                    if self._thread is not me:
                        return  # forked, or replaced
                    now = _clock()
                    if not self._renewing:
                        # Idle: it wakes every ttl/3, so a lease taken meanwhile (due ttl/3
                        # after it was taken) needs no wake-up (`_track`); it ends after
                        # _IDLE_EXIT with nothing to renew.
                        idle_since = now if idle_since is None else idle_since
                        if now - idle_since >= _IDLE_EXIT:
                            self._thread = None
                            return
                        self._wake_at = now + self._ttl / 3
                        self._wake.wait(self._ttl / 3)
                        continue
                    idle_since = None
                    due = [
                        lease for lease in self._renewing if min(lease.due, lease.expires) <= now
                    ]
                    if due:
                        self._wake_at = now
                        break
                    self._wake_at = min(min(x.due, x.expires) for x in self._renewing)
                    self._wake.wait(self._wake_at - now)
            for lease in due:
                self._extend(lease)

    def _extend(self, lease: _Lease) -> None:
        """One compare-and-extend, bounded by the lease's proof: renewed, retried, or lost."""
        scripts = self._scripts
        sent = _clock()
        result, failure = None, None
        left = lease.expires - sent
        try:
            if left <= 0:
                raise _Timeout(0, [])  # noqa: TRY301  (the proof ran out: not even a try)
            if scripts is None:
                raise redis.ConnectionError("no client")  # noqa: TRY301  (a failure like any other)
            bound = min(left, self._connect_timeout, self._ttl / 3)
            result = scripts[1](keys=[lease.key], args=[lease.prefix, self._ttl_ms], bound=bound)
        except Exception as exc:  # noqa: BLE001  (any failure is a renewal that did not come back)
            # Caught whole: an error escaping here would end the renewal thread, and with it
            # the renewal and the loss report of every lease of this backend.
            failure = exc
        now = _clock()
        with self._mutex:
            if lease.state != HELD:
                return
            if result == 1:
                lease.expires = sent + self._ttl - _margin(self._ttl)
                lease.due = sent + self._ttl / 3
                return
            if failure is not None and now < lease.expires:
                # Not reachable now: retry within what is left of the lease.
                lease.due = min(now + max(0.01, self._ttl / 20), lease.expires)
                return
            lease.state = LOST
            self._renewing.discard(lease)
        if failure is not None:
            text = "no reply" if isinstance(failure, _Timeout) else str(failure)
            reason = (
                "Redis could not be reached to renew the lease before its proven end "
                f"({text}); declared lost before the server can expire it"
            )
        else:
            reason = _TAKEN if result == -1 else _GONE
        handle = None if lease.handle is None else lease.handle()
        if handle is not None:  # else abandoned: given back (`_abandoned`)
            _core.report_lost(handle, reason)

    # -- holder --------------------------------------------------------------------------------

    def record_limit(self, name: str, limit: int) -> int:
        """Record semaphore `name`'s limit unless one is recorded (SET NX); the one that is.

        The key ``S:limit:N`` never expires: every user of the name sees it.
        """
        key = f"{self._namespace}:limit:{name}"
        self._command("SET", key, str(limit), "NX")
        return int(self._command("GET", key))

    def holder(self, spec: LockSpec) -> Holder | None:
        """Who holds the lease now, from the JSON its holder stored; None if it is free."""
        name = _name(spec)
        raw = self._command("GET", self.key(name))
        if raw is None:
            return None
        try:
            meta = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            meta = None
        if isinstance(meta, dict) and meta.get("handoff") is True:
            if self._command("LLEN", self.wake_key(name)):
                return None  # a ticket nobody took: the next attempt takes the lock
            # Being handed over: the waiter it went to writes its own value within a round trip.
            return Holder(None, name=name)
        if not isinstance(meta, dict):
            return Holder(None, name=name)  # a value not written by proclock

        def typed(field: str, kind: type | tuple[type, ...]) -> Any:
            value = meta.get(field)
            return value if isinstance(value, kind) and not isinstance(value, bool) else None

        argv = typed("argv", list)
        return _holder.reported(
            typed("pid", int),
            typed("host", str),
            os.uname().nodename,
            argv=tuple(str(a) for a in argv) if argv is not None else None,
            acquired_at=typed("acquired_at", (int, float)),
            name=typed("name", str),
        )


class _Retryable(redis.ConnectionError):
    """A pooled connection failed as it was reused (closed by the server): one fresh try."""


class _WaitTimedOut(Exception):  # noqa: N818
    """The BLMOVE of a timed wait got no reply by the deadline."""


def _stale(conn: Any) -> bool:
    """Whether a pooled connection has something to read: EOF (closed by the server) or junk."""
    try:
        return bool(conn.can_read())
    except (RedisError, OSError):
        return True


def _name(spec: LockSpec) -> str:
    name = spec.name
    if name is None:
        msg = f"the Redis backend locks names, not files: {spec.label!r} was given as path="
        raise ValueError(msg)
    return name
