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

What this module guarantees (the core, `proclock._core`, does re-entry, errors, logging and
the fan-out of a loss; this is the primitive only):

- Each acquisition is a lease with a token of its own, so two owners of one process exclude
  each other exactly as two processes do.
- A lease is proven held until `sent + ttl`, where `sent` is taken before the command that set
  or extended it left. One thread per backend and process extends every held lease each ttl/3;
  it reports a lease lost (`_core.report_lost`) when its key is gone, holds another token, or
  Redis stayed unreachable past the proven end.
- Release deletes the key only if it still holds our token, and publishes on the channel.
  A release that cannot reach Redis while the lease is proven valid warns and lets the key
  expire by itself (the work was protected: not a loss); past the proven end it is a loss.
- An interruption (Ctrl-C) between the server's grant and the return of the handle gives the
  lease back; one during release leaves it to be redone.
- A forked child forgets its parent's clients and leases without closing them (redis-py shuts
  a socket down only in the process that opened it): the parent's leases live on.
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

from .. import _core, _holder
from .._errors import BackendUnavailableError
from .._holder import Holder
from ._base import FENCING, LOSS, WAIT_ANY, Handle

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable, Coroutine
    from typing import Any, TypeVar

    from .._spec import LockSpec

    _T = TypeVar("_T")

__all__ = ["RedisBackend"]

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

# Lease states, changed under the backend's mutex.
HELD = 0  # proven held until `expires`, renewed every ttl/3
LOST = 1  # found lost by the renewal (reported); release still runs its compare-and-delete
RELEASING = 2  # release is deleting the key; the renewal leaves it alone
RELEASED = 3  # given back (or forgotten by a forked child): a further release does nothing
_STATE_NAMES = ("HELD", "LOST", "RELEASING", "RELEASED")


class _Lease:
    """One acquisition's lease: the backend's private state of a Handle."""

    __slots__ = ("channel", "due", "expires", "handle", "key", "pid", "prefix", "redo", "state")

    def __init__(self, key: str, channel: str, prefix: str, sent: float, ttl: float) -> None:
        self.key, self.channel, self.prefix = key, channel, prefix
        # Proven held until `expires` (monotonic): the expiry ran from no earlier than `sent`.
        self.expires = sent + ttl
        self.due = sent + ttl / 3
        self.state = HELD
        self.redo = False  # a release was interrupted: a redo may find the key deleted already
        self.pid = os.getpid()
        self.handle: Handle | None = None

    def __repr__(self) -> str:
        return f"<redis lease {self.key!r} {_STATE_NAMES[self.state]}>"


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
        namespace: the prefix of every key and channel this backend uses.
        ttl: the lease in seconds: a holder that dies frees the lock after at most this long;
            a holder paused for longer loses it. It is renewed every ttl/3.
        connect_timeout: seconds to wait for a connection before BackendUnavailableError.

    Nothing connects until the first acquisition. There are no shared locks (a lease has one
    holder): use PostgreSQL for shared=True.
    """

    # WAIT_ANY: a wait is woken by the release's message on the channel, or when the holder's
    # lease runs out (its PTTL: a timer, not a poll), and cancelling acquire_async withdraws
    # it: a semaphore's head waits for any of its slots with one such wait per slot.
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
        self._connect_timeout = float(connect_timeout)
        # Renewal gives up on a silent server well within the lease, to retry or call it lost.
        self._renew_timeout = max(0.05, min(self._connect_timeout, self._ttl / 3))
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

        The parent's clients are dropped, not closed: redis-py shuts a socket down only in the
        process that opened it, so the parent's connections (and leases) are untouched.
        """
        # Reentrant: a signal handler or finalizer may take or release a lock while this
        # thread is inside one of the (short, call-free) sections it guards.
        self._mutex = threading.RLock()
        self._wake = threading.Condition(self._mutex)
        self._renewing: set[_Lease] = set()
        self._thread: threading.Thread | None = None
        self._client: redis.Redis | None = None
        self._renew_client: redis.Redis | None = None
        self._scripts: Any = None
        self._static: str | None = None
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"RedisBackend({self._display!r}, namespace={self._namespace!r}, ttl={self._ttl})"

    # -- keys, where ---------------------------------------------------------------------------

    def key(self, name: str) -> str:
        """The Redis key of the lease for the lock `name`."""
        return f"{self._namespace}:lock:{name}"

    def fence_key(self, name: str) -> str:
        """The Redis key of the fencing counter for the lock `name`."""
        return f"{self._namespace}:fence:{name}"

    def channel(self, name: str) -> str:
        """The channel a release of `name` publishes on."""
        return f"{self._namespace}:chan:{name}"

    def location(self, spec: LockSpec) -> str:
        """The server and key, e.g. "redis://127.0.0.1:6379/0 key 'proclock:lock:name'"."""
        return f"{self._server} key {self.key(_name(spec))!r}"

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

    def _connect(self) -> Any:
        """The scripts (acquire, extend, release), on clients made at first use."""
        if self._pid != os.getpid():
            self._forget()  # forked without the at-fork hook (e.g. os.fork in C code)
        scripts = self._scripts
        if scripts is not None:
            return scripts
        pool = self._pool(max(_COMMAND_TIMEOUT, self._connect_timeout), self._connect_timeout)
        renew = self._pool(self._renew_timeout, self._renew_timeout)
        client = redis.Redis(connection_pool=pool)
        made = tuple(client.register_script(s) for s in (_ACQUIRE, _EXTEND, _RELEASE))
        with self._mutex:
            if self._scripts is None:  # else another thread won: ours are dropped unused
                self._client, self._renew_client = client, redis.Redis(connection_pool=renew)
                self._scripts = made
            return self._scripts

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

    def try_acquire(self, spec: LockSpec) -> Handle | None:
        """One atomic SET NX + INCR with a token of its own: a handle, or None if held."""
        won = self._try(_name(spec), secrets.token_hex(16))
        return None if isinstance(won, int) else won

    def acquire(self, spec: LockSpec, deadline: float | None) -> Handle | None:
        """Wait for the lease until `deadline` (monotonic; None: forever); None if it passed.

        Tries; if held, subscribes to the release channel, retries, and sleeps until a release
        publishes, the holder's lease runs out or the deadline passes.
        """
        name = _name(spec)
        token = secrets.token_hex(16)  # one token for every try of this wait: `_try` is idempotent
        won = self._try(name, token)
        if not isinstance(won, int):
            return won
        if deadline is not None and _clock() >= deadline:
            return None
        self._connect()
        assert self._client is not None  # noqa: S101
        pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]
        try:
            handle = self._wait(pubsub, name, token, deadline)
        except BaseException:
            _close_quietly(pubsub)
            raise
        try:
            _close_quietly(pubsub)
        except BaseException:  # interrupted (Ctrl-C) before the handle reached the core
            if handle is not None:
                self.release(handle)
            raise
        return handle

    def _wait(self, pubsub: Any, name: str, token: str, deadline: float | None) -> Handle | None:
        try:
            pubsub.subscribe(self.channel(name))
            # Retry only once the server confirms the subscription: a release between our
            # retry and the confirmation would otherwise publish to nobody.
            end = _confirm_by(deadline)
            while True:
                left = end - _clock()
                if left <= 0:
                    if deadline is not None and _clock() >= deadline:
                        return None
                    raise self._unavailable(TimeoutError("no SUBSCRIBE confirmation"))
                message = pubsub.get_message(timeout=left)
                if message is not None and message["type"] == "subscribe":
                    break
        except (RedisError, OSError) as exc:
            if isinstance(exc, BackendUnavailableError):
                raise
            raise self._unavailable(exc) from exc
        while True:
            won = self._try(name, token)
            if not isinstance(won, int):
                return won
            wait = self._pause(won, deadline)
            if wait <= 0:
                return None
            try:
                pubsub.get_message(timeout=wait)
            except (RedisError, OSError) as exc:
                raise self._unavailable(exc) from exc

    async def acquire_async(self, spec: LockSpec, deadline: float | None) -> Handle | None:
        """`acquire` for coroutines; the loop never blocks, cancellation leaves nothing held.

        Each SET NX runs in a worker thread on the shared connection pool (one pool for every
        thread and event loop; redis.asyncio pools are bound to one loop). A cancelled task
        waits for its in-flight try to finish and gives back what it won before it re-raises.
        Waiting is a redis.asyncio subscription of its own, which cancellation just closes;
        each of its round trips is bounded by `_bounded`, which always re-raises a cancellation.
        """
        name = _name(spec)
        token = secrets.token_hex(16)
        won = await self._try_async(name, token)
        if not isinstance(won, int):
            return won
        if deadline is not None and _clock() >= deadline:
            return None
        return await self._wait_async(name, token, deadline)

    async def _try_async(self, name: str, token: str) -> Handle | int:
        import asyncio  # noqa: PLC0415

        future = asyncio.ensure_future(asyncio.to_thread(self._try, name, token))
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
                if not isinstance(won, int):
                    await asyncio.shield(asyncio.to_thread(self.release, won))
            raise

    async def _wait_async(self, name: str, token: str, deadline: float | None) -> Handle | None:
        import asyncio  # noqa: PLC0415

        import redis.asyncio as aioredis  # noqa: PLC0415
        from redis.asyncio.retry import Retry as AsyncRetry  # noqa: PLC0415

        pool = aioredis.ConnectionPool.from_url(
            self._url,
            socket_connect_timeout=self._connect_timeout,
            # None: with a socket_timeout, redis-py sends through asyncio.wait_for, which loses
            # a cancellation on Python < 3.12. `_bounded` times each round trip instead.
            socket_timeout=None,
            retry=AsyncRetry(NoBackoff(), 0),
            client_name=f"proclock-{os.getpid()}",
        )
        client = aioredis.Redis(connection_pool=pool)
        pubsub = client.pubsub()
        handle = None
        try:
            handle = await self._wait_subscribed(pubsub, name, token, deadline)
        finally:
            try:
                # Shielded: a cancellation must not leave the subscription's connection open.
                await asyncio.shield(_close_async(pubsub, client, pool))
            except BaseException:  # cancelled while closing: the lease won must not be kept
                if handle is not None:
                    await asyncio.shield(asyncio.to_thread(self.release, handle))
                raise
        return handle

    async def _wait_subscribed(
        self, pubsub: Any, name: str, token: str, deadline: float | None
    ) -> Handle | None:
        end = _confirm_by(deadline)
        if not await self._subscribe_async(pubsub, self.channel(name), end):
            if deadline is not None and deadline <= end:  # the deadline came first: timed out
                return None
            raise self._unavailable(TimeoutError("no SUBSCRIBE confirmation"))
        while True:
            won = await self._try_async(name, token)
            if not isinstance(won, int):
                return won
            wait = self._pause(won, deadline)
            if wait <= 0:
                return None
            try:
                # redis-py returns None after `wait`; the bound is for a call that hangs.
                await _bounded(pubsub.get_message(timeout=wait), wait + _COMMAND_TIMEOUT)
            except (RedisError, OSError) as exc:
                raise self._unavailable(exc) from exc

    async def _subscribe_async(self, pubsub: Any, channel: str, end: float) -> bool:
        """SUBSCRIBE, and its confirmation first, as in `_wait`; False if `end` passed first."""
        try:
            # The connection and its handshake too: a server that stays silent ends here.
            await _bounded(pubsub.subscribe(channel), end - _clock())
            while (left := end - _clock()) > 0:
                message = await _bounded(pubsub.get_message(timeout=left), left)
                if message is not None and message["type"] == "subscribe":
                    return True
        except TimeoutError:  # `_bounded`'s (a builtin, not redis-py's): no reply by `end`
            pass
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc
        return False

    def _try(self, name: str, token: str) -> Handle | int:
        """One atomic SET NX + INCR: the handle, or the holder's remaining PTTL in ms."""
        scripts = self._connect()
        key = self._key_and_fence(name)
        prefix, rest = self._value_parts(name, token)
        lease = None
        sent = _clock()
        try:
            (fence, pttl), _ = self._call(
                lambda: scripts[0](keys=key, args=[prefix, rest, self._ttl_ms])
            )
            if not fence:
                return int(pttl)
            lease = _Lease(key[0], self.channel(name), prefix, sent, self._ttl)
            handle = Handle(
                f"{self._server} key {key[0]!r}",
                fencing_token=int(fence),
                shared=False,
                private=lease,
            )
            lease.handle = handle
            self._track(lease)
        except BackendUnavailableError:
            raise
        except BaseException:
            # Interrupted (Ctrl-C) after the SET may have won: give back whatever our token
            # holds, else it would block everyone for a ttl (or, renewed, forever).
            if lease is not None:
                with self._mutex:
                    lease.state = RELEASED
                    self._renewing.discard(lease)
            with contextlib.suppress(RedisError, OSError):
                scripts[2](keys=[key[0]], args=[prefix, self.channel(name)])
            raise
        return handle

    def _key_and_fence(self, name: str) -> list[str]:
        return [self.key(name), self.fence_key(name)]

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

    # -- release -------------------------------------------------------------------------------

    def release(self, handle: Handle) -> None:
        """Delete the key if (and only if) it still holds our token, and publish the release.

        Idempotent: a second call does nothing. A lease found lost here is reported to the
        core (`report_lost`), which raises LockLostError; nothing of another holder's is
        touched. Nothing is done in a forked child: the lease is its parent's.
        """
        lease: _Lease = handle.private
        with self._mutex:
            state = lease.state
            if state in (RELEASING, RELEASED):
                return
            lease.state = RELEASING
            self._renewing.discard(lease)
        if lease.pid != os.getpid():
            lease.state = RELEASED
            return
        try:
            scripts = self._connect()
            result, retried = self._call(
                lambda: scripts[2](keys=[lease.key], args=[lease.prefix, lease.channel])
            )
        except BackendUnavailableError as exc:
            lease.state = RELEASED
            if state == LOST:
                return
            if _clock() < lease.expires:
                # Held (proven) until now, so the work was protected; the key expires by itself.
                import logging  # noqa: PLC0415

                logging.getLogger("proclock").warning(
                    "could not release %s, its lease expires within the ttl: %s",
                    handle.location,
                    exc,
                )
                return
            _core.report_lost(handle, f"Redis unreachable past the lease's end ({exc.reason})")
            return
        except BaseException:
            lease.state, lease.redo = state, True  # interrupted (Ctrl-C): the core redoes it
            raise
        lease.state = RELEASED
        if result == 1 or state == LOST:
            return
        if result == 0 and (retried or lease.redo) and _clock() < lease.expires:
            return  # an earlier try deleted it before its connection dropped or was interrupted
        _core.report_lost(handle, _TAKEN if result == -1 else _GONE)

    # -- renewal -------------------------------------------------------------------------------

    def _track(self, lease: _Lease) -> None:
        """Have the renewal thread extend `lease` each ttl/3 from now on."""
        with self._wake:
            idle = not self._renewing
            self._renewing.add(lease)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._renewer, name="proclock-redis-renewal", daemon=True
                )
                self._thread.start()
            elif idle:
                # It waits _IDLE_EXIT for work: wake it, or this lease is not renewed in time.
                # (Otherwise it waits for an earlier due time than this lease's: no need.)
                self._wake.notify()

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
            if lease.state != HELD:
                return
            if result == 1:
                lease.expires, lease.due = sent + self._ttl, sent + self._ttl / 3
                return
            if failure is not None and now < lease.expires:
                # Not reachable now: retry within what is left of the lease.
                lease.due = min(now + max(0.01, self._ttl / 20), lease.expires)
                return
            lease.state = LOST
            self._renewing.discard(lease)
        if failure is not None:
            reason = f"Redis could not be reached to renew the lease before it ran out ({failure})"
        else:
            reason = _TAKEN if result == -1 else _GONE
        assert lease.handle is not None  # noqa: S101
        _core.report_lost(lease.handle, reason)

    # -- holder --------------------------------------------------------------------------------

    def record_limit(self, name: str, limit: int) -> int:
        """Record semaphore `name`'s limit unless one is recorded (SET NX); the one that is.

        The key ``S:limit:N`` never expires: every user of the name sees it.
        """
        self._connect()
        key = f"{self._namespace}:limit:{name}"
        client = self._client
        assert client is not None  # noqa: S101  (made by _connect)

        def record() -> Any:
            client.set(key, str(limit), nx=True)
            return client.get(key)

        value, _ = self._call(record)
        return int(value)

    def holder(self, spec: LockSpec) -> Holder | None:
        """Who holds the lease now, from the JSON its holder stored; None if it is free."""
        name = _name(spec)
        self._connect()
        client = self._client
        assert client is not None  # noqa: S101
        key = self.key(name)
        raw, _ = self._call(lambda: client.get(key))
        if raw is None:
            return None
        try:
            meta = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            meta = None
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


def _name(spec: LockSpec) -> str:
    name = spec.name
    if name is None:
        msg = f"the Redis backend locks names, not files: {spec.label!r} was given as path="
        raise ValueError(msg)
    return name


def _confirm_by(deadline: float | None) -> float:
    """When a SUBSCRIBE must have been confirmed: by the deadline, or a command timeout."""
    end = _clock() + _COMMAND_TIMEOUT
    return end if deadline is None else min(end, deadline)


def _close_quietly(pubsub: Any) -> None:
    # The server went away: the socket is closed all the same.
    with contextlib.suppress(RedisError, OSError):
        pubsub.close()


async def _bounded(call: Coroutine[Any, Any, _T], timeout: float) -> _T:
    """Await `call`, a round trip into redis.asyncio, as a task of its own; at most `timeout` s.

    Raises TimeoutError (the builtin) when `timeout` passes, and a cancellation of the caller
    always, once the call has ended. redis-py's own timers cannot promise that before Python
    3.12: asyncio.wait_for (its socket_timeout, when sending) returns the result of an await
    that completed in the loop step its caller was cancelled in, and the cancellation is lost
    (CPython gh-86296, bpo-42130); async_timeout (its timer before 3.11.3) turns one that
    coincides with its expiry into a timeout, which a read with a timeout returns as "no
    message". asyncio.wait never catches its caller's cancellation: whatever the call's task
    makes of its own, the caller's is raised.
    """
    import asyncio  # noqa: PLC0415

    task = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait((task,), timeout=max(timeout, 0.0))
    except BaseException:
        await _end(task)
        raise
    if not done:
        await _end(task)
        msg = f"no reply from Redis within {timeout:.3f}s"
        raise TimeoutError(msg)
    return task.result()


async def _end(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait until it ends: its connection is closed next, and must be idle.

    A cancellation of the caller meanwhile is raised once it has ended. A call that ignores
    its cancellation is waited for _COMMAND_TIMEOUT at most: closing its socket ends it.
    """
    import asyncio  # noqa: PLC0415

    task.cancel()
    cancelled = None
    end = _clock() + _COMMAND_TIMEOUT
    while not task.done() and (left := end - _clock()) > 0:
        try:
            await asyncio.wait((task,), timeout=left)
        except asyncio.CancelledError as exc:  # again: it still ends first
            cancelled = exc
    task.add_done_callback(_retrieve)  # its outcome is moot: not an error "never retrieved"
    if cancelled is not None:
        raise cancelled


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def _close_async(pubsub: Any, client: Any, pool: Any) -> None:
    try:
        await pubsub.aclose()
        await client.aclose()
        await pool.aclose()
    except (RedisError, OSError):  # the server went away: the sockets are closed all the same
        pass
