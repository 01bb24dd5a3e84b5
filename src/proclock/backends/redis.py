"""Redis leases: SET NX PX with a random token, renewed by one thread, fenced by INCR.

A Redis lock is a *lease*, not a lock like flock(2): a holder that is paused (SIGSTOP, a long GC,
a VM migration) for longer than the ttl loses it without knowing, and another process takes it.
proclock detects the loss when the holder resumes (its renewal fails: `on_lost`, then
LockLostError at release), but the paused holder may already have written something: pass
`lock.fencing_token` to the storage you protect and have it refuse tokens older than the newest
it has seen (Kleppmann, "How to do distributed locking", 2016).

Keys, for a lock named N in namespace S (names are used verbatim: readable and injective):

- ``S:lock:N``  the lease: a JSON value (token, host, pid, argv, acquired_at, fence) with a PX
  expiry of `ttl`; only its holder's token extends or deletes it (compare-and-extend/-delete).
- ``S:fence:N`` the fencing counter, INCR-ed in the same script that wins the lease, so a token
  is issued only to a winner; it never expires (an expired counter would restart at 1).
- ``S:chan:N``  the channel the release PUBLISHes on: waiters subscribe, then retry, then sleep
  until a message or the holder's remaining PTTL (a dead holder publishes nothing).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import sys
import threading
import time
import weakref
from time import monotonic as _clock

# An absolute import: this module is proclock.backends.redis, and Python 3 has no implicit
# relative imports, so this is redis-py.
import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as _RedisConnectionError
from redis.exceptions import RedisError
from redis.retry import Retry

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
    from collections.abc import Callable
    from typing import Any, TypeVar

    from .._lock import ProcessLock

    _T = TypeVar("_T")

__all__ = ["RedisBackend"]

_DEBUG = 10  # logging.DEBUG
_COMMAND_TIMEOUT = 5.0  # seconds a command may take before the server counts as unavailable
_IDLE_EXIT = 30.0  # seconds the renewal thread lingers with nothing to renew
_SCHEMES = ("redis", "rediss", "unix")
_MIN_TTL = 0.01

# KEYS: lock, fence. ARGV: token prefix, rest of the value up to '"fence":', ttl in ms.
# Returns {fence, 0} to the winner, {0, pttl of the holder} otherwise. Idempotent for one token
# (a retry after a dropped connection finds its own win), and INCR runs only for a winner.
_ACQUIRE = """
local v = redis.call('GET', KEYS[1])
if v then
  if string.sub(v, 1, #ARGV[1]) == ARGV[1] then
    return {tonumber(string.match(v, '(%d+)}$')), 0}
  end
  return {0, redis.call('PTTL', KEYS[1])}
end
local f = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ARGV[2] .. f .. '}', 'PX', ARGV[3])
return {f, 0}
"""

# KEYS: lock. ARGV: token prefix, ttl in ms. 1: extended; 0: key gone; -1: another's token.
_EXTEND = """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
if string.sub(v, 1, #ARGV[1]) ~= ARGV[1] then return -1 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: lock. ARGV: token prefix, channel. 1: deleted and published; 0: gone; -1: another's.
_RELEASE = """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
if string.sub(v, 1, #ARGV[1]) ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[2], 'released')
return 1
"""

_GONE = (
    "its key is gone: the lease expired before it could be renewed (the holder was paused or "
    "Redis unreachable for longer than the ttl), or Redis was restarted or flushed"
)
_TAKEN = (
    "its key now holds another holder's token: the lease expired (the holder was paused for "
    "longer than the ttl) and another process took the lock"
)


class _NoSharedLocksError(ProcLockError, ValueError):
    """shared=True asked of the Redis backend, which has only exclusive leases."""


class _Lease:
    """One held lease: what release, renewal and `fencing_token` need."""

    __slots__ = (
        "count",
        "due",
        "expires",
        "fence",
        "key",
        "locks",
        "lost",
        "name",
        "owner",
        "path",
        "pid",
        "prefix",
        "released",
    )
    fd = None  # ProcessLock._held_fd(): a lease has no descriptor to pass on

    def __init__(  # noqa: PLR0917  (internal: built in one place)
        self,
        name: str,
        key: str,
        path: str,
        prefix: str,
        fence: int,
        owner: object,
        lock: ProcessLock,
        sent: float,
        ttl: float,
    ) -> None:
        self.name, self.key, self.path, self.prefix = name, key, path, prefix
        self.fence, self.owner, self.locks = fence, owner, [lock]
        self.count = 1
        # Proven held until `expires` (monotonic): the expiry ran from no earlier than `sent`.
        self.expires = sent + ttl
        self.due = sent + ttl / 3
        self.lost: LockLostError | None = None
        self.released = False
        self.pid = os.getpid()

    def __repr__(self) -> str:
        return f"<redis lease {self.key!r} fence={self.fence}>"


_INSTANCES: weakref.WeakSet[RedisBackend] = weakref.WeakSet()


def _after_fork_in_child() -> None:
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


class RedisBackend:
    """Exclusive locks as Redis leases, renewed while held, with fencing tokens.

    Args:
        url: ``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS) or
            ``unix:///path/to/socket?db=0``, as redis-py reads it.
        namespace: the prefix of every key and channel this backend uses.
        ttl: the lease in seconds: a holder that dies frees the lock after at most this long;
            a holder paused for longer loses it. It is renewed every ttl/3.
        connect_timeout: seconds to wait for a connection before BackendUnavailableError.

    Nothing connects until the first acquisition. `shared=True` is refused: use PostgreSQL.
    """

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
        self._connect_timeout = float(connect_timeout)
        # Renewal gives up on a silent server well within the lease, to retry or call it lost.
        self._renew_timeout = max(0.05, min(self._connect_timeout, self._ttl / 3))
        self._display = _redact(url)
        self._forget()
        _INSTANCES.add(self)

    def _forget(self) -> None:
        """Start afresh: at construction, and in a forked child (which holds nothing).

        The parent's clients are dropped, not closed: redis-py shuts a socket down only in the
        process that opened it, so the parent's connections (and leases) are untouched.
        """
        self._mutex = threading.Lock()
        self._wake = threading.Condition(self._mutex)
        self._held: dict[tuple[str, object], _Lease] = {}  # (name, owner) -> lease
        self._renewing: set[_Lease] = set()
        self._thread: threading.Thread | None = None
        self._client: redis.Redis | None = None
        self._renew_client: redis.Redis | None = None
        self._scripts: Any = None
        self._static: str | None = None
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"RedisBackend({self._display!r}, namespace={self._namespace!r}, ttl={self._ttl})"

    # -- options, keys, messages ---------------------------------------------------------------

    def validate(self, lock: ProcessLock) -> None:
        """Refuse options this backend cannot honour (called when the lock is made)."""
        if lock._op == _owners.SH:
            msg = (
                f"lock {lock.name!r}: the Redis backend has no shared locks (a lease has one "
                "holder); use PostgreSQL (backend='postgresql://...') for shared=True"
            )
            raise _NoSharedLocksError(msg)

    def key(self, name: str) -> str:
        """The Redis key of the lease for the lock `name`."""
        return f"{self._namespace}:lock:{name}"

    def fence_key(self, name: str) -> str:
        """The Redis key of the fencing counter for the lock `name`."""
        return f"{self._namespace}:fence:{name}"

    def channel(self, name: str) -> str:
        """The channel a release of `name` publishes on."""
        return f"{self._namespace}:chan:{name}"

    def where(self, lock: ProcessLock, token: object | None) -> str:
        """The server and key, e.g. "redis://127.0.0.1:6379/0 key 'proclock:lock:name'"."""
        if token is not None:
            return token.path  # type: ignore[attr-defined, no-any-return]
        return f"{self._display} key {self.key(lock._label)!r}"

    def fencing_token(self, token: object) -> int | None:
        """The INCR-ed counter issued with this lease: strictly increasing per name."""
        return token.fence  # type: ignore[attr-defined, no-any-return]

    def _unavailable(self, exc: BaseException) -> BackendUnavailableError:
        return BackendUnavailableError(self._display, f"{type(exc).__name__}: {exc}")

    # -- connections ---------------------------------------------------------------------------

    def _pool(self, timeout: float, connect_timeout: float) -> redis.ConnectionPool:
        # No retries inside redis-py (its default backs off for seconds): a closed port must
        # fail at once, and `_call` retries only what is safe to retry.
        return redis.ConnectionPool.from_url(
            self._url,
            socket_connect_timeout=connect_timeout,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            client_name=f"proclock-{os.getpid()}",
        )

    def _connect(self) -> tuple[redis.Redis, Any]:
        if self._pid != os.getpid():
            self._forget()  # forked without the at-fork hook (e.g. os.fork in C code)
        client, scripts = self._client, self._scripts
        if client is None or scripts is None:
            with self._mutex:
                if self._client is None:
                    pool = self._pool(
                        max(_COMMAND_TIMEOUT, self._connect_timeout), self._connect_timeout
                    )
                    client = redis.Redis(connection_pool=pool)
                    self._scripts = tuple(
                        client.register_script(s) for s in (_ACQUIRE, _EXTEND, _RELEASE)
                    )
                    renew = self._pool(self._renew_timeout, self._renew_timeout)
                    self._renew_client = redis.Redis(connection_pool=renew)
                    self._client = client
                client, scripts = self._client, self._scripts
        assert client is not None  # noqa: S101
        return client, scripts

    def _call(self, fn: Callable[[], _T]) -> tuple[_T, bool]:
        """fn(), retried once after a dropped connection; (result, whether it was retried).

        A pooled connection the server closed (a restart, CLIENT KILL) fails its next command;
        one fresh try tells that apart from a server that is down (which fails again at once).
        """
        try:
            return fn(), False
        except _RedisConnectionError:
            pass
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc
        try:
            return fn(), True
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc

    def _value_parts(self, name: str, token: str) -> tuple[str, str]:
        """(token prefix, rest of the JSON value up to the fence) for a new attempt."""
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
        rest = f'{static},"name":{json.dumps(name)},"acquired_at":{time.time():.6f},"fence":'
        return f'{{"token":"{token}",', rest

    # -- acquisition ---------------------------------------------------------------------------

    def _reenter(self, lock: ProcessLock, owner: object) -> _Lease | None:
        """Count a re-entry by an owner that holds `lock` already. Under _mutex."""
        lease = self._held.get((lock._label, owner))
        if lease is None:
            return None
        if not lock._reentrant:
            kind = "thread" if isinstance(owner, int) else "task"
            msg = (
                f"{lock.name!r} ({lease.path}) is already held by this {kind} and "
                "reentrant=False forbids taking it again; release it first, or pass reentrant=True"
            )
            raise ProcLockError(msg)
        if lease.lost is not None:
            raise lease.lost  # the outer hold is gone: the inner body must not run
        lease.count += 1
        if all(lk is not lock for lk in lease.locks):
            lease.locks.append(lock)
        return lease

    def try_now(self, lock: ProcessLock, owner: object) -> _Lease | None:
        """Re-entry only (no network): `attempt` tries SET NX before it subscribes."""
        with self._mutex:
            return self._reenter(lock, owner)

    def _try(self, lock: ProcessLock, owner: object, token: str) -> _Lease | int:
        """One atomic SET NX + INCR: the lease, or the holder's remaining PTTL in ms."""
        _client, scripts = self._connect()
        name = lock._label
        key = self.key(name)
        prefix, rest = self._value_parts(name, token)
        sent = _clock()
        try:
            (fence, pttl), _ = self._call(
                lambda: scripts[0](
                    keys=[key, self.fence_key(name)], args=[prefix, rest, self._ttl_ms]
                )
            )
        except KeyboardInterrupt:
            # The SET may have won before the interrupt: give back whatever our token holds
            # (else it would block everyone for a ttl).
            with contextlib.suppress(RedisError, OSError):
                scripts[2](keys=[key], args=[prefix, self.channel(name)])
            raise
        if not fence:
            return int(pttl)
        lease = _Lease(
            name,
            key,
            f"{self._display} key {key!r}",
            prefix,
            int(fence),
            owner,
            lock,
            sent,
            self._ttl,
        )
        with self._mutex:
            self._held[name, owner] = lease
            self._renewing.add(lease)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._renewer, name="proclock-redis-renewal", daemon=True
                )
                self._thread.start()
        if _log.isEnabledFor(_DEBUG):
            _log.debug("acquired %r (%s) fence %d", name, key, lease.fence)
        return lease

    def _give_up(self, lock: ProcessLock, start: float, *, timed_out: bool) -> LockHeldError:
        try:
            holder = self.holder(lock, None)
        except BackendUnavailableError:
            holder = None
        cls = LockTimeoutError if timed_out else LockHeldError
        return cls(self.where(lock, None), lock.name, holder, _clock() - start)

    def _pause(self, pttl: int, deadline: float | None) -> float:
        """How long to sleep for a message: the holder's PTTL and the deadline at most.

        A dead holder publishes nothing, hence the PTTL; a key without expiry (not proclock's)
        is re-read each ttl.
        """
        wait = pttl / 1000 if pttl >= 0 else self._ttl
        wait = max(wait, 0.001)
        if deadline is not None:
            wait = min(wait, deadline - _clock())
        return wait

    @staticmethod
    def _confirm_by(deadline: float | None) -> float:
        """When a SUBSCRIBE must have been confirmed: by the deadline, or a command timeout."""
        end = _clock() + _COMMAND_TIMEOUT
        return end if deadline is None else min(end, deadline)

    def attempt(
        self, lock: ProcessLock, owner: object, *, blocking: bool, timeout: float | None
    ) -> _Lease | LockHeldError:
        """One attempt: SET NX; if busy and allowed to wait, subscribe, retry, and sleep.

        Each sleep lasts until a release publishes, the holder's lease runs out or the deadline.
        """
        with self._mutex:
            lease = self._reenter(lock, owner)
        if lease is not None:
            return lease
        start = _clock()
        token = secrets.token_hex(16)
        won = self._try(lock, owner, token)
        if isinstance(won, _Lease):
            return won
        if not blocking or timeout == 0:
            return self._give_up(lock, start, timed_out=False)
        deadline = None if timeout is None else start + timeout
        if _log.isEnabledFor(_DEBUG):
            _log.debug("waiting for %r (%s)", lock.name, self.where(lock, None))
        client, _ = self._connect()
        pubsub = client.pubsub()  # type: ignore[no-untyped-call]
        try:
            try:
                pubsub.subscribe(self.channel(lock._label))
                # Retry only once the server confirms the subscription: a release between our
                # retry and the confirmation would otherwise publish to nobody.
                end = self._confirm_by(deadline)
                while True:
                    left = end - _clock()
                    if left <= 0:
                        if deadline is not None and _clock() >= deadline:
                            return self._give_up(lock, start, timed_out=True)
                        raise self._unavailable(TimeoutError("no SUBSCRIBE confirmation"))
                    message = pubsub.get_message(timeout=left)
                    if message is not None and message["type"] == "subscribe":
                        break
            except (RedisError, OSError) as exc:
                if isinstance(exc, BackendUnavailableError):
                    raise
                raise self._unavailable(exc) from exc
            while True:
                won = self._try(lock, owner, token)
                if isinstance(won, _Lease):
                    if _log.isEnabledFor(_DEBUG):
                        _log.debug("acquired %r after %.6fs", lock.name, _clock() - start)
                    return won
                wait = self._pause(won, deadline)
                if wait <= 0:
                    return self._give_up(lock, start, timed_out=True)
                try:
                    pubsub.get_message(timeout=wait)
                except (RedisError, OSError) as exc:
                    raise self._unavailable(exc) from exc
        finally:
            pubsub.close()

    async def attempt_async(
        self, lock: ProcessLock, owner: object, *, blocking: bool, timeout: float | None
    ) -> _Lease | LockHeldError:
        """`attempt` for coroutines; the loop never blocks, cancellation leaves nothing held.

        Each SET NX runs in a worker thread on the shared connection pool (one pool for every
        thread and event loop; redis.asyncio pools are bound to one loop). A cancelled task
        waits for its in-flight try to finish and gives back what it won before it re-raises.
        Waiting is a redis.asyncio subscription of its own, which cancellation just closes.
        """
        import asyncio  # noqa: PLC0415

        with self._mutex:
            lease = self._reenter(lock, owner)
        if lease is not None:
            return lease
        start = _clock()
        token = secrets.token_hex(16)
        won = await self._try_async(lock, owner, token)
        if isinstance(won, _Lease):
            return won
        if not blocking or timeout == 0:
            return await asyncio.to_thread(self._give_up, lock, start, timed_out=False)
        deadline = None if timeout is None else start + timeout
        return await self._wait_async(lock, owner, token, start, deadline)

    async def _try_async(self, lock: ProcessLock, owner: object, token: str) -> _Lease | int:
        import asyncio  # noqa: PLC0415

        future = asyncio.ensure_future(asyncio.to_thread(self._try, lock, owner, token))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The script may have won on the server: finish, give it back, then be cancelled.
            while not future.done():
                try:
                    await asyncio.shield(future)
                except asyncio.CancelledError:
                    continue
                except BaseException:  # noqa: BLE001, S110  (its error is moot: we are cancelled)
                    pass
            if not future.cancelled() and future.exception() is None:
                won = future.result()
                if isinstance(won, _Lease):
                    await asyncio.shield(asyncio.to_thread(self._discard, won))
            raise

    def _discard(self, lease: _Lease) -> None:
        """Give back a lease nobody will use (won by a cancelled task): errors are moot."""
        try:
            self.release(lease.locks[0], lease, lease.owner)
        except (ProcLockError, OSError) as exc:
            _log.debug("discarding %r after cancellation: %s", lease.name, exc)

    async def _wait_async(
        self,
        lock: ProcessLock,
        owner: object,
        token: str,
        start: float,
        deadline: float | None,
    ) -> _Lease | LockHeldError:
        import asyncio  # noqa: PLC0415

        import redis.asyncio as aioredis  # noqa: PLC0415
        from redis.asyncio.retry import Retry as AsyncRetry  # noqa: PLC0415

        pool = aioredis.ConnectionPool.from_url(
            self._url,
            socket_connect_timeout=self._connect_timeout,
            socket_timeout=max(_COMMAND_TIMEOUT, self._connect_timeout),
            retry=AsyncRetry(NoBackoff(), 0),
        )
        client = aioredis.Redis(connection_pool=pool)
        pubsub = client.pubsub()
        try:
            try:
                await pubsub.subscribe(self.channel(lock._label))
                end = self._confirm_by(deadline)
                while True:  # the confirmation first, as in `attempt`
                    left = end - _clock()
                    if left <= 0:
                        if deadline is not None and _clock() >= deadline:
                            return await asyncio.to_thread(
                                self._give_up, lock, start, timed_out=True
                            )
                        raise self._unavailable(TimeoutError("no SUBSCRIBE confirmation"))
                    message = await pubsub.get_message(timeout=left)
                    if message is not None and message["type"] == "subscribe":
                        break
            except (RedisError, OSError) as exc:
                if isinstance(exc, BackendUnavailableError):
                    raise
                raise self._unavailable(exc) from exc
            while True:
                won = await self._try_async(lock, owner, token)
                if isinstance(won, _Lease):
                    return won
                wait = self._pause(won, deadline)
                if wait <= 0:
                    return await asyncio.to_thread(self._give_up, lock, start, timed_out=True)
                try:
                    await pubsub.get_message(timeout=wait)
                except (RedisError, OSError) as exc:
                    raise self._unavailable(exc) from exc
        finally:
            await asyncio.shield(self._close_async(pubsub, client, pool))

    @staticmethod
    async def _close_async(pubsub: Any, client: Any, pool: Any) -> None:
        try:
            await pubsub.aclose()
            await client.aclose()
            await pool.aclose()
        except (RedisError, OSError) as exc:
            _log.debug("closing a Redis subscription: %s", exc)

    # -- release -------------------------------------------------------------------------------

    def release(self, lock: ProcessLock, token: object, owner: object) -> None:  # noqa: ARG002
        """Give back one hold; the last one deletes the key if (and only if) it is still ours.

        Raises:
            LockLostError: the lease was lost while held (then nothing of another holder's is
                touched).
        """
        lease: _Lease = token  # type: ignore[assignment]
        with self._mutex:
            if lease.released:
                return
            if lease.count > 1:
                lease.count -= 1
                lost = lease.lost
            else:
                lease.count, lease.released, lost = 0, True, lease.lost
                if self._held.get((lease.name, owner)) is lease:
                    del self._held[lease.name, owner]
                self._renewing.discard(lease)
        if lease.count:
            if lost is not None:
                raise lost
            return
        if lease.pid != os.getpid():
            return  # a forked child holds nothing of its parent's
        try:
            _client, scripts = self._connect()
            result, retried = self._call(
                lambda: scripts[2](keys=[lease.key], args=[lease.prefix, self.channel(lease.name)])
            )
        except BackendUnavailableError as exc:
            if lost is not None:
                raise lost from None
            if _clock() < lease.expires:
                # Held (proven) until now, so the work was protected; the key expires by itself.
                import logging  # noqa: PLC0415

                logging.getLogger("proclock").warning(
                    "could not release %r, its lease expires in the ttl: %s", lease.name, exc
                )
                return
            error = LockLostError(
                lease.path,
                lease.name,
                f"Redis unreachable past the lease's end ({exc.reason})",
                lease.fence,
            )
            self._notify(lease, error)
            raise error from exc
        if lost is not None:
            raise lost
        if result == 1 or (result == 0 and retried and _clock() < lease.expires):
            # (0 after a retry: the first try deleted it before the connection dropped.)
            if _log.isEnabledFor(_DEBUG):
                _log.debug("released %r (%s)", lease.name, lease.key)
            return
        error = LockLostError(
            lease.path, lease.name, _TAKEN if result == -1 else _GONE, lease.fence
        )
        self._notify(lease, error)
        raise error

    def _notify(self, lease: _Lease, error: LockLostError) -> None:
        """Record the loss and tell every ProcessLock holding through this lease."""
        with self._mutex:
            if lease.lost is not None:
                return
            lease.lost = error
            self._renewing.discard(lease)
            locks = list(lease.locks)
        for lock in locks:
            lock._lost(error)

    # -- renewal -------------------------------------------------------------------------------

    def _renewer(self) -> None:
        """Extend every held lease each ttl/3 (one thread per backend and process)."""
        me = threading.current_thread()
        while True:
            with self._wake:
                while True:
                    if self._thread is not me:
                        return  # forked, or replaced
                    if not self._renewing:
                        if not self._wake.wait(_IDLE_EXIT) and not self._renewing:
                            self._thread = None
                            return
                        continue
                    now = _clock()
                    due = [lease for lease in self._renewing if lease.due <= now]
                    if due:
                        break
                    self._wake.wait(min(lease.due for lease in self._renewing) - now)
            for lease in due:
                self._extend(lease)

    def _extend(self, lease: _Lease) -> None:
        """One compare-and-extend: renewed, retried later, or lost."""
        client, scripts = self._renew_client, self._scripts
        sent = _clock()
        result, failure = None, None
        try:
            if client is None or scripts is None:
                raise _RedisConnectionError("no client")
            result = scripts[1](keys=[lease.key], args=[lease.prefix, self._ttl_ms], client=client)
        except (RedisError, OSError) as exc:
            failure = exc
        now = _clock()
        with self._mutex:
            if lease.released or lease.lost is not None:
                return
            if result == 1:
                lease.expires, lease.due = sent + self._ttl, sent + self._ttl / 3
                return
            if failure is not None and now < lease.expires:
                # Not reachable now: retry within what is left of the lease.
                lease.due = min(now + max(0.01, self._ttl / 20), lease.expires)
                return
        if failure is not None:
            reason = f"Redis could not be reached to renew the lease before it ran out ({failure})"
        else:
            reason = _TAKEN if result == -1 else _GONE
        self._notify(lease, LockLostError(lease.path, lease.name, reason, lease.fence))

    # -- holder --------------------------------------------------------------------------------

    def holder(self, lock: ProcessLock, token: object | None) -> Holder | None:
        """Who holds the lease now, from the JSON its holder stored; None if it is free."""
        client, _ = self._connect()
        key = token.key if token is not None else self.key(lock._label)  # type: ignore[attr-defined]
        raw, _ = self._call(lambda: client.get(key))
        if raw is None:
            return None
        try:
            meta = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            meta = None
        if not isinstance(meta, dict):
            return Holder(None, name=lock.name)  # a value not written by proclock

        def typed(field: str, kind: type | tuple[type, ...]) -> Any:
            value = meta.get(field)
            return value if isinstance(value, kind) and not isinstance(value, bool) else None

        argv = typed("argv", list)
        return Holder(
            typed("pid", int),
            typed("host", str),
            tuple(str(a) for a in argv) if argv is not None else None,
            typed("acquired_at", (int, float)),
            False,  # noqa: FBT003
            typed("name", str),
        )
