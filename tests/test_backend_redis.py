"""What only the Redis backend does: leases, renewal, loss, fencing, the wake-up queue, servers.

The guarantees every backend gives (exclusion, re-entry, timeouts, fork, async, cancellation,
loss fan-out) are tested once for all of them in test_contract.py.

The server is $PROCLOCK_TEST_REDIS_URL (default redis://127.0.0.1:6379/0). Without redis-py or
a server the tests skip, unless PROCLOCK_REQUIRE_SERVICES=1 (CI), where they fail. Each test
has its own key namespace and deletes only its own keys; a test that needs a server to go down
starts a private `redis-server` of its own (the shared one is never stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid

import pytest

from conftest import REDIS_URL, SPAWN, require_module, unusable

URL = REDIS_URL
FORK_WARNING = "ignore:This process .* is multi-threaded:DeprecationWarning"

redis = require_module("redis", "redis")

# Both import the backend, which needs redis-py: after the check above.
import redis_children  # noqa: E402
import redis_server  # noqa: E402
from proclock import (  # noqa: E402
    BackendUnavailableError,
    LockHeldError,
    LockLostError,
    ProcessLock,
    process_locked,
)
from proclock.backends import RedisBackend  # noqa: E402


@pytest.fixture(scope="module")
def url(redis_url):
    return redis_url


@pytest.fixture
def admin(url):
    """A plain client of our own (no proclock name: CLIENT KILL of proclock's spares it)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def ns(admin):
    """A key namespace of this test's own; its keys are deleted afterwards."""
    namespace = f"proclock-test-{uuid.uuid4().hex}"
    yield namespace
    keys = list(admin.scan_iter(match=f"{namespace}:*", count=1000))
    if keys:
        admin.delete(*keys)


@pytest.fixture
def backend(url, ns):
    return RedisBackend(url, namespace=ns, ttl=1.0)


@pytest.fixture
def private_redis():
    """(url, process) of a redis-server of this test's own, on a Unix socket: free to kill."""
    exe = shutil.which("redis-server")
    if exe is None:
        unusable("redis-server is not on PATH (a test that stops a server starts its own)")
    directory = tempfile.mkdtemp(prefix="proclock-redis-")  # short: sun_path has 108 bytes
    sock = os.path.join(directory, "redis.sock")
    args = [exe, "--port", "0", "--unixsocket", sock, "--save", "", "--appendonly", "no"]
    server = subprocess.Popen(
        [*args, "--dir", directory], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"unix://{sock}?db=0"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:  # until it answers: a condition, not a pause
            try:
                client.ping()
                break
            except (redis.RedisError, OSError):
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the private redis-server did not start ({server.returncode})")
                time.sleep(0.005)
        client.close()
        yield url, server
    finally:
        server.kill()
        server.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


def _wait_for(condition, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def _token_of(admin, key):
    value = admin.get(key)
    return None if value is None else value[: len('{"token":"') + 32]


def _lease(lock):
    """The backend's lease behind the innermost hold of `lock`."""
    return lock._live()[-1].handle.private


def _wait_for_value(make, timeout=10.0, what="value"):
    deadline = time.monotonic() + timeout
    while not (value := make()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)
    return value


def _start_waiter(url, ns, name):
    """A process that, once `proc.go` is set, waits for lock `name` (ttl 30 s), sets
    `proc.got` when it holds it, and releases it when the returned event is set."""
    go, got, release = SPAWN.Event(), SPAWN.Event(), SPAWN.Event()
    token, tries = SPAWN.Value("q", 0), SPAWN.Value("i", 0)
    proc = SPAWN.Process(
        target=redis_children.wait_then_hold,
        args=(url, ns, name, go, got, release, token, tries),
    )
    proc.start()
    proc.go, proc.got, proc.token, proc.tries = go, got, token, tries
    return proc, release


def _start_holder(url, ns, name, ttl, report=None):
    locked, release = SPAWN.Event(), SPAWN.Event()
    proc = SPAWN.Process(
        target=redis_children.hold, args=(url, ns, name, ttl, locked, release, report)
    )
    proc.start()
    assert locked.wait(30), "the holder never took the lock"
    return proc, release


def _patch_script(backend, index, wrap):
    """Replace one of the backend's scripts (0 acquire, 1 extend, 2 release) by wrap(real)."""
    backend._connect()
    scripts = list(backend._scripts)
    scripts[index] = wrap(scripts[index])
    backend._scripts = tuple(scripts)


def _kill_proclock_clients(admin):
    """CLIENT KILL every connection this process's backends opened (named proclock-PID)."""
    name = f"proclock-{os.getpid()}"
    ids = [c["id"] for c in admin.client_list() if c.get("name") == name]
    for client_id in ids:
        admin.client_kill_filter(_id=client_id)
    return len(ids)


# -- what the backend declares and returns ---------------------------------------------------


def test_shared_is_refused_clearly(backend):
    assert "shared" not in backend.capabilities
    assert backend.capabilities == {"fencing", "loss", "wait-any"}  # a dead holder: after the ttl
    with pytest.raises(ValueError, match=r"no shared locks.*PostgreSQL"):
        ProcessLock("s", backend=backend, shared=True)
    with pytest.raises(ValueError, match="no shared locks"):
        process_locked("s", backend=backend, shared=True)(lambda: None)


def test_each_acquisition_is_a_lease_of_its_own_and_release_is_idempotent(backend, admin, ns):
    spec = ProcessLock("own", backend=backend).spec
    key = f"{ns}:lock:own"
    first = backend.try_acquire(spec)
    assert first is not None
    assert (first.shared, first.fd) == (False, None)
    assert first.fencing_token > 10**15  # the server's TIME in µs: see test_faults_redis.py
    assert first.location == backend.location(spec)
    assert first.location.endswith(f" key {key!r}")
    assert backend.try_acquire(spec) is None  # one process, another token: excluded
    backend.release(first)
    second = backend.try_acquire(spec)
    assert second.fencing_token > first.fencing_token
    token = _token_of(admin, key)
    backend.release(first)  # again: does nothing, least of all delete the new holder's key
    assert _token_of(admin, key) == token
    backend.release(second)
    assert not admin.exists(key)
    assert int(admin.get(f"{ns}:fence:own")) == second.fencing_token  # outlives the leases
    assert backend._renewing == set()


def test_location_is_one_spelling_of_the_server_without_the_password():
    ns = "no-server-needed"
    spec = ProcessLock("x", backend=RedisBackend(URL, namespace=ns)).spec
    want = f"redis://127.0.0.1:6379/0 key '{ns}:lock:x'"
    for spelling in (
        "redis://127.0.0.1:6379/0",
        "redis://127.0.0.1",
        "REDIS://user:s3cret@127.0.0.1:6379?db=0",
    ):
        assert RedisBackend(spelling, namespace=ns).location(spec) == want
    sock = RedisBackend("unix:///run/redis.sock?db=2", namespace=ns)
    assert sock.location(spec) == f"unix:///run/redis.sock?db=2 key '{ns}:lock:x'"


def test_the_password_is_never_shown():
    secret = RedisBackend("redis://user:s3cret@127.0.0.1:1/0")
    assert "s3cret" not in repr(secret)
    lock = ProcessLock("x", backend=secret, blocking=False)
    assert "s3cret" not in lock.path
    with pytest.raises(BackendUnavailableError) as info:
        lock.acquire()  # a closed port
    assert "s3cret" not in str(info.value)
    assert "user:***@127.0.0.1:1" in str(info.value)


def test_invalid_construction_is_refused_at_once():
    with pytest.raises(ValueError, match="redis://"):
        RedisBackend("http://x")
    with pytest.raises(ValueError, match="ttl"):
        RedisBackend("redis://x", ttl=0)
    with pytest.raises(TypeError, match="connect_timeout"):
        RedisBackend("redis://x", connect_timeout="2")
    with pytest.raises(ValueError, match="namespace"):
        RedisBackend("redis://x", namespace="")
    with pytest.raises(ValueError, match="cannot read the URL"):
        RedisBackend("redis://host:port/0")


# -- holder, fencing -------------------------------------------------------------------------


def test_holder_and_fencing_across_processes(url, ns, admin, backend):
    report = SPAWN.Queue()
    proc, release = _start_holder(url, ns, "busy", 5.0, report)
    try:
        kind, fence = report.get(timeout=10)
        assert kind == "fence"
        lock = ProcessLock("busy", backend=backend)
        for kwargs in ({"blocking": False}, {"timeout": 0}):
            with pytest.raises(LockHeldError) as info:
                lock.acquire(**kwargs)
            holder = info.value.holder
            assert holder.pid == proc.pid
            assert holder.hostname == os.uname().nodename
            assert holder.argv
            assert holder.name == "busy"
            assert f" key '{ns}:lock:busy'" in info.value.path
        assert lock.holder() == holder
        # The losers' attempts issued no token: INCR runs in the script only for a winner.
        assert int(admin.get(f"{ns}:fence:busy")) == fence
    finally:
        release.set()
        proc.join(10)
    assert proc.exitcode == 0
    assert lock.holder() is None
    before = time.time()
    with lock:
        assert lock.fencing_token > fence
        mine = lock.holder()
        assert (mine.pid, mine.name) == (os.getpid(), "busy")
        assert before - 1 <= mine.acquired_at <= time.time() + 1


def test_a_value_not_written_by_proclock_is_a_holder_without_details(backend, admin, ns):
    admin.set(f"{ns}:lock:foreign", "not json", px=60_000)
    lock = ProcessLock("foreign", backend=backend, blocking=False)
    with pytest.raises(LockHeldError) as info:
        lock.acquire()
    assert info.value.holder.pid is None
    assert info.value.holder.name == "foreign"


# -- waiting ---------------------------------------------------------------------------------


def test_a_waiter_is_woken_by_the_release(url, ns, admin):
    # A long ttl: a waiter not woken by the release would sleep for the whole PTTL.
    backend = RedisBackend(url, namespace=ns, ttl=30)
    spec = ProcessLock("handoff", backend=backend).spec
    holding = backend.try_acquire(spec)
    got = {}

    def waiter():
        handle = backend.acquire(spec, time.monotonic() + 20)
        got["at"], got["handle"] = time.monotonic(), handle

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        queue = backend.queue_key("handoff")
        _wait_for(lambda: admin.zcard(queue) == 1, what="the waiter queued")
        released_at = time.monotonic()
        backend.release(holding)
    finally:
        thread.join(30)
    assert got["handle"] is not None
    backend.release(got["handle"])
    assert got["at"] - released_at < 0.5  # not the 30 s PTTL: the release woke it
    assert admin.zcard(backend.queue_key("handoff")) == 0  # the winner left the queue


def _blocked(admin, name):
    """Whether a client named `name` is blocked in a BLMOVE (Redis will serve it a push)."""
    return any(
        c.get("name") == name and c.get("cmd") == "blmove" and "b" in c.get("flags", "")
        for c in admin.client_list()
    )


def test_a_release_hands_the_lock_to_the_waiter_and_no_newcomer_barges_in(url, ns, admin):
    # The waiter is in another process (a client name of its own, to see it blocked).
    proc, release_waiter = _start_waiter(url, ns, "handover")
    backend = RedisBackend(url, namespace=ns, ttl=30)
    spec = ProcessLock("handover", backend=backend).spec
    try:
        holding = _wait_for_value(lambda: backend.try_acquire(spec), what="the first hold")
        proc.go.set()
        _wait_for(lambda: _blocked(admin, f"proclock-{proc.pid}"), what="the waiter blocked")
        tries = []
        redis_children.count_attempts(backend, lambda: tries.append(1))
        waiter_tries = proc.tries.value
        released_at = time.time()
        backend.release(holding)
        # At once, before the waiter could even read its reply: the lock is not free.
        assert backend.try_acquire(spec) is None
        assert len(tries) == 1
        assert proc.got.wait(10), "the waiter was not handed the lock"
        assert proc.tries.value == waiter_tries  # handed over: no attempt after the release
        holder = backend.holder(spec)
        # Its own value, written over the releaser's placeholder by the claim that the server
        # ran as it handed the waiter the ticket: before the waiter's acquire returned.
        assert holder is not None
        assert holder.pid == proc.pid
        assert holder.acquired_at >= released_at - 0.05  # when it was handed the lock
        assert proc.token.value > holding.fencing_token
        assert admin.zcard(backend.queue_key("handover")) == 0
    finally:
        release_waiter.set()
        proc.join(10)
    assert backend.holder(spec) is None


def test_a_ticket_nobody_took_leaves_the_lock_free(url, ns, admin):
    # A waiter killed while queued leaves a live queue entry: the release hands the lock to
    # it, and nobody is blocked to take it. The lock is free for the next attempt all the same.
    proc, _release = _start_waiter(url, ns, "orphan")
    backend = RedisBackend(url, namespace=ns, ttl=30)
    spec = ProcessLock("orphan", backend=backend).spec
    holding = _wait_for_value(lambda: backend.try_acquire(spec), what="the first hold")
    proc.go.set()
    _wait_for(lambda: _blocked(admin, f"proclock-{proc.pid}"), what="the waiter blocked")
    proc.kill()
    proc.join(10)
    _wait_for(lambda: not _blocked(admin, f"proclock-{proc.pid}"), what="the waiter gone")
    assert admin.zcard(backend.queue_key("orphan")) == 1
    backend.release(holding)
    assert admin.llen(backend.wake_key("orphan")) == 1  # a ticket for nobody
    assert backend.holder(spec) is None
    again = backend.try_acquire(spec)
    assert again is not None
    assert again.fencing_token > holding.fencing_token
    assert admin.llen(backend.wake_key("orphan")) == 0  # withdrawn: nobody can pop it later
    backend.release(again)


def test_the_last_waiter_leaving_withdraws_a_ticket_nobody_took(backend, admin, ns):
    # Set up by hand: a placeholder lease, its ticket unpopped, one live waiter that leaves.
    key, wake, queue = f"{ns}:lock:left", backend.wake_key("left"), backend.queue_key("left")
    admin.set(key, '{"token":"t1","handoff":true,"fence":7}', px=30_000)
    admin.rpush(wake, "t1:7")
    admin.zadd(queue, {"w1": time.time() * 1000 + 30_000})
    backend._leave("left", "w1")
    assert admin.exists(key, wake) == 0
    assert admin.zcard(queue) == 0


def test_sigkill_of_the_holder_frees_the_lock_when_its_lease_runs_out(url, ns):
    ttl = 0.5
    proc, _release = _start_holder(url, ns, "killed", ttl)
    lock = ProcessLock("killed", backend=RedisBackend(url, namespace=ns), timeout=10)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    start = time.monotonic()
    with lock:  # woken by the lease's expiry (its PTTL), not by a release nobody sends
        waited = time.monotonic() - start
        assert lock.holder().pid == os.getpid()
    assert waited < ttl + 1.0


# -- loss ------------------------------------------------------------------------------------


def test_sigstop_past_the_ttl_loses_the_lease_and_spares_the_next_holder(url, ns, admin):
    ttl = 0.5
    report = SPAWN.Queue()
    proc, release = _start_holder(url, ns, "paused", ttl, report)
    first_fence = report.get(timeout=10)[1]
    key = f"{ns}:lock:paused"
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        second = ProcessLock("paused", backend=RedisBackend(url, namespace=ns), timeout=10)
        with second:
            assert second.fencing_token > first_fence
            mine = _token_of(admin, key)
            os.kill(proc.pid, signal.SIGCONT)
            # On resuming, the first holder's renewal fails: on_lost at once.
            kind, reason = report.get(timeout=10)
            assert kind == "lost"
            assert "another holder" in reason or "proven end" in reason
            release.set()
            kind, outcome = report.get(timeout=10)
            assert (kind, outcome.split(":")[0]) == ("release", "LockLostError")
            proc.join(10)
            assert proc.exitcode == 7
            # Its release left our key alone: still ours, with our token and a live lease.
            assert _token_of(admin, key) == mine
            assert admin.pttl(key) > 0
            assert second.holder().pid == os.getpid()
        assert not admin.exists(key)
    finally:
        if proc.exitcode is None:
            os.kill(proc.pid, signal.SIGCONT)
        proc.join(10)


def test_release_never_deletes_another_holders_key(backend, admin, ns):
    lost = []
    key = f"{ns}:lock:stolen"
    lock = ProcessLock("stolen", backend=backend, on_lost=lost.append)
    lock.acquire()
    fence = lock.fencing_token
    admin.set(key, '{"token":"someone-else","pid":1}', px=60_000)
    with pytest.raises(LockLostError, match="another holder") as info:
        lock.release()
    assert info.value.fencing_token == fence
    assert [(e.reason, e.fencing_token) for e in lost] == [(info.value.reason, fence)]
    assert admin.get(key) == b'{"token":"someone-else","pid":1}'  # untouched
    assert not lock.locked


def test_client_kill_renewal_reconnects_and_keeps_a_lease_it_still_owns(url, admin, ns):
    ttl = 0.4
    backend = RedisBackend(url, namespace=ns, ttl=ttl)
    lost = []
    key = f"{ns}:lock:killed-conn"
    lock = ProcessLock("killed-conn", backend=backend, on_lost=lost.append)
    with lock:
        lease = _lease(lock)
        first = lease.expires
        _wait_for(lambda: lease.expires > first, what="a first renewal")  # both connections
        token = _token_of(admin, key)
        killed_at = time.monotonic()
        assert _kill_proclock_clients(admin) >= 2  # the command and the renewal connections
        _wait_for(lambda: lease.expires > killed_at + ttl, what="a renewal after the kill")
        assert lost == []
        assert _token_of(admin, key) == token
        assert admin.pttl(key) > 0
    assert not admin.exists(key)  # released through a fresh connection
    assert lost == []


def test_client_kill_and_expiry_is_detected_as_loss(backend, admin, ns):
    lost = threading.Event()
    errors = []

    def on_lost(error):
        errors.append(error)
        lost.set()

    lock = ProcessLock("expired", backend=backend, on_lost=on_lost)
    with pytest.raises(LockLostError, match="key is gone"), lock:  # noqa: PT012
        _kill_proclock_clients(admin)
        admin.delete(f"{ns}:lock:expired")  # what the expiry of a cut-off holder does
        assert lost.wait(5 * backend._ttl), "the loss was not detected"
        assert errors[0].name == "expired"
    assert len(errors) == 1


def test_a_lease_taken_after_the_renewal_thread_went_idle_is_renewed(url, ns):
    # Regression: the thread waited 30 s for work after its last lease was released, so a
    # lease taken meanwhile was not renewed and lost after one ttl.
    ttl = 0.5
    backend = RedisBackend(url, namespace=ns, ttl=ttl)
    lost = []
    lock = ProcessLock("idle", backend=backend, on_lost=lost.append)
    with lock:
        pass
    time.sleep(ttl)  # time passing: the renewal thread's next due time comes and goes
    with lock:
        lease = _lease(lock)
        first = lease.expires
        _wait_for(lambda: lease.expires > first, timeout=5, what="a renewal")  # not 30 s
    assert lost == []


# -- a server that is down -------------------------------------------------------------------


def test_unreachable_server_raises_backend_unavailable_promptly():
    backend = RedisBackend("redis://127.0.0.1:1/0")  # a closed port: lazy, no error yet
    ran = []

    @process_locked("down", backend=backend, timeout=30)
    def body():
        ran.append(1)

    start = time.monotonic()
    with pytest.raises(BackendUnavailableError) as info:
        body()
    assert time.monotonic() - start < 2.5
    assert not isinstance(info.value, TimeoutError)
    assert isinstance(info.value, OSError)
    assert "127.0.0.1:1" in str(info.value)
    assert ran == []
    with pytest.raises(BackendUnavailableError):
        ProcessLock("down", backend=backend, blocking=False).acquire()


def test_a_server_that_stops_answering_as_a_task_waits_fails_by_the_deadline(private_redis):
    # Each round trip of a wait is bounded by the acquisition's deadline. SIGSTOP:
    # connections are still accepted (the
    # kernel's backlog), nothing is answered.
    url, server = private_redis
    backend = RedisBackend(url, ttl=30)
    spec = ProcessLock("silent", backend=backend).spec
    holding = backend.try_acquire(spec)

    def stopping(real):
        def script(*args, **kwargs):
            result = real(*args, **kwargs)
            if not result[0]:  # the waiter's try, which lost: silence before it waits
                os.kill(server.pid, signal.SIGSTOP)
            return result

        return script

    _patch_script(backend, 0, stopping)
    start = time.monotonic()
    try:
        try:
            handle = asyncio.run(backend.acquire_async(spec, start + 0.5))
        except BackendUnavailableError as exc:
            handle = exc
        waited = time.monotonic() - start
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert isinstance(handle, BackendUnavailableError)  # at its deadline, not later, no hang
    assert 0.4 < waited < 0.7
    backend.release(holding)


def test_a_release_that_redis_cannot_confirm_is_a_loss(private_redis):
    # Whether the lease was still ours when the server went away is unknown: lost, said so.
    url, server = private_redis
    lost = []
    lock = ProcessLock("down", backend=RedisBackend(url, ttl=30), on_lost=lost.append)
    lock.acquire()
    server.kill()
    server.wait(10)
    with pytest.raises(LockLostError, match="did not confirm the release"):
        lock.release()
    assert len(lost) == 1
    assert not lock.locked


def test_redis_unreachable_past_the_lease_end_is_a_loss(private_redis):
    url, server = private_redis
    lost = threading.Event()
    errors = []

    def on_lost(error):
        errors.append(error)
        lost.set()

    lock = ProcessLock("down", backend=RedisBackend(url, ttl=0.3), on_lost=on_lost)
    lock.acquire()
    server.kill()
    server.wait(10)
    assert lost.wait(10), "the loss was not detected"
    assert "could not be reached" in errors[0].reason
    with pytest.raises(LockLostError) as info:
        lock.release()
    assert info.value is not errors[0]
    assert info.value.reason == errors[0].reason
    assert len(errors) == 1


def test_a_round_trip_that_starts_past_its_deadline_fails_as_a_timeout(backend, monkeypatch):
    # A slow thread can reach the connect after its deadline: the socket timeout must not go
    # negative (a ValueError that ended the renewal thread, and with it every loss report).
    import proclock.backends.redis as module

    backend._connect()
    ticks = iter([100.0])
    monkeypatch.setattr(module, "_clock", lambda: next(ticks, 200.0))
    with contextlib.suppress(module._Timeout, redis.RedisError, OSError):
        backend._round_trip([("PING",)], 0.5)


def test_a_renewal_that_fails_in_any_way_still_ends_in_a_loss_report(url, ns):
    lost = threading.Event()
    backend = RedisBackend(url, namespace=ns, ttl=0.3)
    lock = ProcessLock("odd", backend=backend, on_lost=lambda _error: lost.set())
    lock.acquire()

    def broken(*args, **kwargs):
        msg = "not an error the renewal expects"
        raise RuntimeError(msg)

    backend._scripts = (backend._scripts[0], broken, *backend._scripts[2:])
    assert lost.wait(10), "the renewal thread died: the loss was never reported"
    with pytest.raises(LockLostError):
        lock.release()


# -- interruptions ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["script", "tracking"])
def test_an_interrupt_after_the_set_won_gives_the_lease_back(backend, admin, ns, where):
    spec = ProcessLock("ctrl-c", backend=backend).spec

    def interrupted(real):
        def call(*args, **kwargs):
            result = real(*args, **kwargs)  # won on the server
            raise KeyboardInterrupt
            return result  # pragma: no cover

        return call

    if where == "script":
        _patch_script(backend, 0, interrupted)
    else:
        backend._track = interrupted(backend._track)
    with pytest.raises(KeyboardInterrupt):
        backend.try_acquire(spec)
    assert admin.exists(f"{ns}:fence:ctrl-c")  # it did win
    assert not admin.exists(f"{ns}:lock:ctrl-c")  # and gave it back
    assert backend._renewing == set()


def test_an_interrupted_release_is_redone(backend, admin, ns):
    lost = []
    lock = ProcessLock("ctrl-c-release", backend=backend, on_lost=lost.append)
    lock.acquire()

    def once(real):
        calls = []

        def call(*args, **kwargs):
            result = real(*args, **kwargs)
            calls.append(result)
            if len(calls) == 1:
                raise KeyboardInterrupt  # after the server deleted the key
            return result

        return call

    _patch_script(backend, 2, once)
    with pytest.raises(KeyboardInterrupt):
        lock.release()  # the core redoes the release, which finds the key deleted: not lost
    assert lost == []
    assert not admin.exists(f"{ns}:lock:ctrl-c-release")
    assert not lock.locked


def test_ctrl_c_before_the_release_script_is_sent_is_redone_too(backend, admin, ns, monkeypatch):
    # Interrupted after the lease was marked as being released, before its script was sent:
    # the core's redo must still delete the key (it found the lease "being released" and did
    # nothing, and the lease, no longer renewed, held the lock to its ttl).
    lost = []
    lock = ProcessLock("ctrl-c-early", backend=backend, on_lost=lost.append)
    lock.acquire()
    real, calls = backend._unlist, []

    def unlist(lease):
        calls.append(lease)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(lease)

    monkeypatch.setattr(backend, "_unlist", unlist)
    with pytest.raises(KeyboardInterrupt):
        lock.release()
    assert lost == []
    assert not admin.exists(f"{ns}:lock:ctrl-c-early")
    assert not lock.locked
    assert backend._renewing == set()


def test_cancelling_while_a_winning_set_is_in_flight_gives_it_back(backend, admin, ns):
    spec = ProcessLock("cancel", backend=backend).spec
    started, proceed = threading.Event(), threading.Event()

    def slow(real):
        def call(*args, **kwargs):
            started.set()
            proceed.wait(10)
            return real(*args, **kwargs)

        return call

    _patch_script(backend, 0, slow)

    async def main():
        task = asyncio.create_task(backend.acquire_async(spec, None))
        assert await asyncio.to_thread(started.wait, 10)
        task.cancel()  # while the SET NX runs in its worker thread
        proceed.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    # The withdrawn wait never sent its try, or gave back what it won.
    assert not admin.exists(f"{ns}:lock:cancel")
    assert backend._renewing == set()


def test_cancelling_a_task_as_its_subscribe_is_sent_is_never_lost(url, ns, admin):
    # Regression: with a socket_timeout, redis-py sends through asyncio.wait_for, which on
    # Python < 3.12 drops a cancellation that arrives in the loop step its send completed
    # (CPython gh-86296): 10-15% of cancellations went on waiting, and were granted the lock
    # once the holder released it. Cancelling the moment the server counts the SUBSCRIBE
    # (checked from the loop's own thread, before the waiting task resumes) hits that step.
    # Odd rounds wait forever, even ones with a timeout (a lost one would time out later).
    backend = RedisBackend(url, namespace=ns, ttl=30)  # a lost cancellation waits, not retries
    lock = ProcessLock("sub", backend=backend)
    queue, key, fence = backend.queue_key("sub"), f"{ns}:lock:sub", f"{ns}:fence:sub"
    holding = backend.try_acquire(lock.spec)  # another owner: a token of its own
    token = _token_of(admin, key)
    first_fence = int(admin.get(fence))

    def subscribers():
        return admin.zcard(queue)

    async def until(condition, what):
        deadline = time.monotonic() + 10
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            await asyncio.sleep(0)  # one loop step: the waiting task runs between checks

    async def main():
        for round_ in range(1, 101):
            await until(lambda: subscribers() == 0, "the last round's connection to close")
            timeout = None if round_ % 2 else 30.0
            task = asyncio.create_task(lock.acquire_async(timeout=timeout))
            await until(lambda: subscribers() == 1, "the waiter's SUBSCRIBE")
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=2)
            if done and task.cancelled():
                continue
            # Lost: free the lock so that the wait ends; is the cancelled task granted it?
            backend.release(holding)
            await asyncio.wait([task], timeout=10)
            if not task.done():
                outcome = "still waiting"
            elif task.cancelled():
                outcome = "cancelled only once the holder released"
            elif task.exception() is not None:
                outcome = repr(task.exception())
            else:
                task.result().release()
                outcome = "granted the lock once the holder released it"
            return f"round {round_}: the cancellation was lost; the task was then {outcome}"
        return None

    start = time.monotonic()
    try:
        lost = asyncio.run(main())
        assert lost is None, lost
        assert _token_of(admin, key) == token  # still the holder's
        assert int(admin.get(fence)) == first_fence  # no cancelled task ever won the SET
        assert not lock.locked
    finally:
        backend.release(holding)
    assert not admin.exists(key)
    assert time.monotonic() - start < 5


# -- processes -------------------------------------------------------------------------------

_SINGLETON = """
import sys
from proclock import singleton_process
from proclock.backends import RedisBackend

backend = RedisBackend(sys.argv[2], namespace=sys.argv[3])

@singleton_process(name="job", backend=backend)
def main():
    print("started", flush=True)
    sys.stdin.readline()

main()
"""


def test_singleton_across_two_hosts_sharing_one_server(url, ns, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(_SINGLETON))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    host_a = {**env, "PROCLOCK_DIR": str(tmp_path / "host-a")}
    host_b = {**env, "PROCLOCK_DIR": str(tmp_path / "host-b")}
    args = [sys.executable, str(script), "job", url, ns]
    with subprocess.Popen(
        args, env=host_a, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as first:
        try:
            assert first.stdout.readline() == "started\n"
            second = subprocess.run(
                args, env=host_b, capture_output=True, text=True, timeout=30, check=False
            )
            assert second.returncode == 1
            assert second.stdout == ""
            assert f"pid {first.pid}" in second.stderr
            first.stdin.close()
            assert first.wait(30) == 0
        finally:
            if first.poll() is None:
                first.kill()


@pytest.mark.filterwarnings(FORK_WARNING)
def test_a_forked_child_uses_clients_of_its_own_and_spares_the_parents(backend, admin, ns):
    key = f"{ns}:lock:forked"
    lock = ProcessLock("forked", backend=backend)
    with lock:
        token = _token_of(admin, key)
        parent_idle = backend._idle
        pid = os.fork()
        if pid == 0:  # the child: os._exit only
            code = 0
            try:
                if backend._scripts is not None or backend._renewing or backend._idle:
                    code = 2  # it did not forget the parent's connections and leases
                with ProcessLock("forked-child", backend=backend):
                    if backend._idle is parent_idle:
                        code = 3
            except BaseException:
                code = 4
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The child's exit left the parent's connections working: renewed, then released.
        exited_at = time.monotonic()
        lease = _lease(lock)
        _wait_for(lambda: lease.expires > exited_at + backend._ttl, what="a renewal")
        assert _token_of(admin, key) == token
        assert backend._idle is parent_idle
    assert not admin.exists(key)


def test_a_handoff_late_in_a_long_wait_is_held_not_lost(url, ns):
    # Regression: a wait's BLPOP lasted up to the holder's whole lease (a ttl), and the lease a
    # release handed over was proven only from that BLPOP's send: a handoff in its last
    # ttl/20 + 20 ms was declared lost as it was acquired (on_lost, then LockLostError).
    ttl = 1.0
    holder = ProcessLock("late", backend=RedisBackend(url, namespace=ns, ttl=ttl))
    waiter_backend = RedisBackend(url, namespace=ns, ttl=ttl)
    lost, got, done = [], threading.Event(), threading.Event()
    waiter = ProcessLock("late", backend=waiter_backend, on_lost=lost.append)

    def wait() -> None:
        with waiter:
            got.set()
            done.wait(10)

    holder.acquire()
    start = time.monotonic()
    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.95 * ttl)  # the release lands near the end of the waiter's first wait
    holder.release()
    assert got.wait(10)
    time.sleep(0.1)  # past the end of a proof counted from the wait's start
    done.set()
    thread.join(10)
    assert not thread.is_alive()
    assert lost == [], f"declared lost {time.monotonic() - start:.3f}s after the wait began"


def test_scripts_flushed_while_a_waiter_blocks_still_hand_the_lock_over(private_redis):
    # SCRIPT FLUSH between the wait's write and its claim: the claim, refused (NOSCRIPT), is
    # sent again in full, alone (its BLMOVE already moved the ticket where the claim finds it).
    url, _server = private_redis
    admin = redis.Redis.from_url(url)
    holder = RedisBackend(url, ttl=30)
    spec = ProcessLock("flushed", backend=holder).spec
    holding = holder.try_acquire(spec)
    waiter = RedisBackend(url, ttl=30)
    got = {}
    thread = threading.Thread(target=lambda: got.update(h=waiter.acquire(spec, None)))
    thread.start()
    try:
        _wait_for(lambda: _blocked(admin, f"proclock-{os.getpid()}"), what="the waiter blocked")
        admin.script_flush()
        holder.release(holding)
    finally:
        thread.join(10)
    handle = got["h"]
    assert handle.fencing_token > holding.fencing_token
    assert waiter.holder(spec).pid == os.getpid()
    waiter.release(handle)
    assert admin.get(holder.key("flushed")) is None
    admin.close()


@pytest.mark.filterwarnings(FORK_WARNING)
def test_a_forked_child_draws_tokens_of_its_own():
    from proclock.backends import redis as module

    read, write = os.pipe()
    before = module._token()
    pid = os.fork()
    if pid == 0:  # the child: os._exit only
        os.write(write, module._token().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    after = module._token()
    assert len({before, child, after}) == 3
    assert child[:16] != before[:16] == after[:16]  # its own prefix, not the parent's counter


def test_a_steady_pace_of_acquisitions_never_wakes_the_renewal_thread(backend):
    # The thread wakes by itself every ttl/3 when idle, as soon as any new lease could be
    # due: an acquisition does not wake it (a futex wake and a GIL handoff each time).
    lock = ProcessLock("pace", backend=backend)
    with lock:  # the thread started
        pass
    wakes = []
    real = backend._wake.notify
    backend._wake.notify = lambda n=1: (wakes.append(n), real(n))
    for _ in range(20):
        with lock:
            pass
    assert wakes == []
    with lock:  # and it still renews
        lease = _lease(lock)
        first = lease.expires
        _wait_for(lambda: lease.expires > first, timeout=5, what="a renewal")


def test_a_server_without_blmove_is_refused_naming_the_version_needed():
    # BLMOVE came with Redis 6.2: an older server (here: one that renamed it away) refuses the
    # wait, and the error says what is needed instead of "unknown command".
    if not redis_server.available():
        unusable("redis-server is not on PATH (a test that changes a server starts its own)")
    with redis_server.RedisServer("--rename-command", "BLMOVE", '""') as server:
        backend = RedisBackend(server.url, ttl=30)
        spec = ProcessLock("old", backend=backend).spec
        holding = backend.try_acquire(spec)
        with pytest.raises(BackendUnavailableError, match=r"Redis 6\.2 or later"):
            backend.acquire(spec, time.monotonic() + 5)
        backend.release(holding)


def test_ctrl_c_as_a_wait_reads_its_claim_gives_the_lease_back(url, ns, admin, monkeypatch):
    # The server has handed this wait the lease and claimed it under the wait's own token;
    # Ctrl-C lands before the claim's reply is read. The lease is given back at once (our
    # token is known without the reply), not left to its ttl (30 s).
    holder = RedisBackend(url, namespace=ns, ttl=30)
    waiter = RedisBackend(url, namespace=ns, ttl=30)
    spec = ProcessLock("ctrl-c-claim", backend=holder).spec
    holding = holder.try_acquire(spec)
    assert waiter.holder(spec) is not None  # connected: the wait's reads are its own three
    real_block, real_read = waiter._block, redis.connection.AbstractConnection.read_response
    reads = []

    def block(*args, **kwargs):
        holder.release(holding)  # the ticket waits in the list: this BLMOVE takes it at once
        reads.append(threading.current_thread())
        return real_block(*args, **kwargs)

    def read_response(self, *args, **kwargs):
        if reads and reads[0] is threading.current_thread():
            reads.append(1)
            if len(reads) == 4:  # PING, BLMOVE, then the claim's reply: not read
                reads.clear()
                raise KeyboardInterrupt
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(waiter, "_block", block)
    monkeypatch.setattr(redis.connection.AbstractConnection, "read_response", read_response)
    with pytest.raises(KeyboardInterrupt):
        waiter.acquire(spec, time.monotonic() + 5)
    monkeypatch.undo()
    assert admin.get(holder.key("ctrl-c-claim")) is None
    assert waiter._renewing == set()
    again = holder.try_acquire(spec)
    assert again is not None
    assert again.fencing_token > holding.fencing_token
    holder.release(again)


def test_ctrl_c_between_the_backends_return_and_the_core_gives_the_lease_back(url, ns, admin):
    # The backend returned the handle, and Ctrl-C lands before the core kept it: the handle,
    # dropped, gives its lease back (it would otherwise be renewed, with no owner, for as long
    # as the process lives).
    backend = RedisBackend(url, namespace=ns, ttl=30)
    lock = ProcessLock("dropped", backend=backend)
    real = backend.acquire

    def acquire(*args, **kwargs):
        real(*args, **kwargs)  # won; the handle is dropped with this frame
        raise KeyboardInterrupt

    backend.acquire = acquire
    with pytest.raises(KeyboardInterrupt):
        lock.acquire()
    del backend.acquire
    key = backend.key("dropped")
    _wait_for(lambda: admin.get(key) is None, timeout=5, what="the dropped lease given back")
    assert backend._renewing == set()
    with ProcessLock("dropped", backend=backend, timeout=1):  # free for its owner and others
        pass


def test_released_leases_are_not_kept_for_the_dropped_handle_check(backend):
    # The leases given back if their handle is dropped are those held: none is kept after its
    # release (every acquisition would otherwise leave one behind).
    lock = ProcessLock("kept", backend=backend)
    for _ in range(5):
        with lock:
            assert len(backend._leases) == 1
    assert backend._leases == {}


def test_connections_never_use_hiredis_even_where_it_is_installed(url, ns, monkeypatch):
    # hiredis's packer crashed the process (SIGSEGV) when Ctrl-C landed in it: proclock's
    # connections pack and parse in Python, whether or not hiredis is installed.
    from redis import connection

    class Trap:
        @staticmethod
        def pack_command(_args):
            msg = "hiredis's packer was used"
            raise AssertionError(msg)

    monkeypatch.setattr(connection, "HIREDIS_AVAILABLE", True)
    monkeypatch.setattr(connection, "hiredis", Trap, raising=False)
    backend = RedisBackend(url, namespace=ns)
    with ProcessLock("no-hiredis", backend=backend) as lock:
        assert lock.fencing_token is not None
    conn = backend._take()
    assert "Hiredis" not in type(conn._parser).__name__
    backend._give(conn)


def test_a_ticket_taken_and_never_claimed_strands_the_lock_briefly_not_for_the_ttl(url, ns, admin):
    # A waiter whose connection died between its BLMOVE and its claim (killed, Ctrl-C, in the
    # same instant as the release): done here by hand, a client that takes the ticket and
    # claims nothing. The ticket's lease is short: the lock frees in 0.5 s, not the ttl (30 s).
    backend = RedisBackend(url, namespace=ns, ttl=30)
    spec = ProcessLock("stranded", backend=backend).spec
    holding = backend.try_acquire(spec)
    admin.zadd(backend.queue_key("stranded"), {"ghost": time.time() * 1000 + 30_000})
    backend.release(holding)  # handed over: the ghost's BLMOVE takes the ticket
    assert admin.lmove(backend.wake_key("stranded"), f"{ns}:got:ghost", "LEFT", "LEFT")
    assert backend.try_acquire(spec) is None  # being handed over: held
    start = time.monotonic()
    with ProcessLock("stranded", backend=backend, timeout=5) as lock:
        waited = time.monotonic() - start
        assert lock.fencing_token > holding.fencing_token
    assert waited < 2.0  # the ticket lapses at 0.5 s (Redis notices a wait's end within 1/hz)
