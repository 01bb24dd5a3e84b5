"""The Redis backend under faults: silent and blackholed servers, restarts, dead waiters.

Each test runs against a private `redis-server` (tests/redis_server.py: a free port, no
persistence, never the machine's 6379), most through a TCP proxy of our own
(tests/tcp_proxy.py) that blackholes, drops or silences connections. The guarantees are the
assertions: deadlines met, the holder's `on_lost` before anyone else's acquisition (on one
machine's monotonic clock), fencing tokens strictly increasing across a restart without
persistence, one waiter woken per release. Timing figures (the margins) go to `print`, for
`pytest -s`; the bounds asserted are generous enough for a noisy machine.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid

import pytest

from conftest import SPAWN, require_module, unusable

redis = require_module("redis", "redis")

import redis_children  # noqa: E402
import redis_server  # noqa: E402
from proclock import (  # noqa: E402
    BackendUnavailableError,
    LockLostError,
    ProcessLock,
    ProcessSemaphore,
)
from proclock.backends import RedisBackend  # noqa: E402
from tcp_proxy import TcpProxy  # noqa: E402

CONNECT = 0.3  # the backends' connect_timeout here: every deadline below derives from it
SLACK = 0.25  # what a noisy machine may add to a deadline (thread wake-ups, GC)


@pytest.fixture(scope="module")
def server():
    if not redis_server.available():
        unusable("redis-server is not on PATH (the fault tests start a private one)")
    with redis_server.RedisServer() as srv:
        yield srv


@pytest.fixture
def proxy(server):
    with TcpProxy("127.0.0.1", server.port) as prx:
        yield prx


@pytest.fixture
def ns():
    return f"faults-{uuid.uuid4().hex[:12]}"


def _via(proxy, ns, **kwargs):
    kwargs.setdefault("connect_timeout", CONNECT)
    return RedisBackend(f"redis://127.0.0.1:{proxy.port}/0", namespace=ns, **kwargs)


def _direct(server, ns, **kwargs):
    kwargs.setdefault("connect_timeout", CONNECT)
    return RedisBackend(server.url, namespace=ns, **kwargs)


def _timed(fn):
    start = time.monotonic()
    try:
        return fn(), time.monotonic() - start
    except Exception as exc:  # returned for the assertions
        return exc, time.monotonic() - start


# -- deadlines ---------------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [0, 0.5, None], ids=["timeout=0", "timeout=0.5", "forever"])
def test_a_silent_server_is_unavailable_within_the_deadline(proxy, ns, timeout):
    proxy.silent()  # accepts, never answers: the handshake itself hangs
    lock = ProcessLock("silent", backend=_via(proxy, ns), timeout=timeout)
    error, took = _timed(lock.acquire)
    assert isinstance(error, BackendUnavailableError), error
    bound = CONNECT if timeout in (0, None) else timeout
    print(f"silent server, timeout={timeout}: BackendUnavailableError after {took:.3f}s")
    assert took < bound + SLACK
    assert not lock.locked


def test_a_blackholed_pooled_connection_fails_the_next_acquisition_by_its_deadline(proxy, ns):
    backend = _via(proxy, ns)
    ProcessLock("pooled", backend=backend).acquire().release()  # leaves a pooled connection
    proxy.pause()
    lock = ProcessLock("pooled", backend=backend, timeout=0.5)
    error, took = _timed(lock.acquire)
    print(f"blackholed pooled connection, timeout=0.5: {type(error).__name__} after {took:.3f}s")
    assert isinstance(error, BackendUnavailableError), error
    assert took < 0.5 + SLACK


def test_a_blackholed_release_returns_within_connect_timeout_as_a_loss(proxy, ns):
    lost = []
    lock = ProcessLock("release", backend=_via(proxy, ns, ttl=30), on_lost=lost.append)
    lock.acquire()
    proxy.pause()
    error, took = _timed(lock.release)
    print(f"blackholed release: {type(error).__name__} after {took:.3f}s")
    assert isinstance(error, LockLostError), error
    assert "did not confirm the release" in error.reason
    assert took < CONNECT + SLACK
    assert len(lost) == 1
    assert not lock.locked


def test_a_dropped_connection_is_replaced_without_an_error(proxy, ns):
    backend = _via(proxy, ns)
    ProcessLock("dropped", backend=backend).acquire().release()
    proxy.drop()  # the pooled connection is closed under it
    with ProcessLock("dropped", backend=backend, timeout=1) as lock:
        assert lock.fencing_token


def test_a_refused_connection_fails_at_once(proxy, ns):
    proxy.refuse()
    error, took = _timed(ProcessLock("refused", backend=_via(proxy, ns), timeout=5).acquire)
    assert isinstance(error, BackendUnavailableError), error
    assert took < CONNECT + SLACK


# -- the holder learns first -------------------------------------------------------------------

RUNS = 5


def test_a_blackholed_holder_learns_it_lost_the_lock_before_anyone_takes_it(server, proxy, ns):
    # The holder talks through the proxy, the waiter directly. The proxy blackholes the holder:
    # its renewals get no reply. It must call on_lost (at sent + ttl - margin) before the
    # key expires on the server, so before the waiter's acquisition returns.
    ttl = 0.4
    holder_backend = _via(proxy, ns, ttl=ttl)
    waiter_backend = _direct(server, ns, ttl=ttl)
    margins = []
    for run in range(RUNS):
        name = f"first-{run}"
        lost_at: list[float] = []
        proxy.resume()
        holder = ProcessLock(
            name,
            backend=holder_backend,
            on_lost=lambda _e, lost_at=lost_at: lost_at.append(time.monotonic()),
        )
        holder.acquire()
        acquired_at = time.monotonic()
        proxy.pause()  # from now on, no renewal reaches the server
        with ProcessLock(name, backend=waiter_backend, timeout=10):
            waiter_at = time.monotonic()
        assert lost_at, f"run {run}: the waiter acquired and the holder was never told"
        margin = waiter_at - lost_at[0]
        margins.append(margin)
        # No overlap: [acquired_at, lost_at] ends before the waiter's hold begins.
        assert acquired_at < lost_at[0] < waiter_at, f"run {run}: margin {margin:.4f}s"
        with pytest.raises(LockLostError):
            holder.release()  # within connect_timeout: the proxy is still paused
    print(
        f"on_lost before the waiter's acquisition by {min(margins) * 1000:.1f}"
        f"..{max(margins) * 1000:.1f} ms in {RUNS} runs (ttl {ttl}s, margin "
        f"{(ttl / 20 + 0.02) * 1000:.0f} ms)"
    )


# -- fencing -----------------------------------------------------------------------------------


def test_fencing_tokens_increase_across_a_restart_without_persistence(server, ns):
    backend = _direct(server, ns)
    tokens = []
    for _ in range(3):
        with ProcessLock("fenced", backend=backend) as lock:
            tokens.append(lock.fencing_token)
    server.restart()  # no persistence: the counter key is gone
    probe = redis.Redis.from_url(server.url)
    assert probe.get(backend.fence_key("fenced")) is None
    probe.close()
    for _ in range(2):
        with ProcessLock("fenced", backend=backend) as lock:
            tokens.append(lock.fencing_token)
    print(f"tokens across a restart: {tokens}")
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == len(tokens)


def test_a_restart_frees_the_lock_at_once_and_tokens_still_increase(server, ns):
    # The documented case where the holder cannot learn first: the server forgets the lease.
    holder_backend = _direct(server, ns, ttl=0.6)
    lost = []
    holder = ProcessLock(
        "restart", backend=holder_backend, on_lost=lambda _e: lost.append(time.monotonic())
    )
    holder.acquire()
    old = holder.fencing_token
    server.restart()
    got = {}

    def other():  # another thread: the same thread would re-enter the holder's hold
        with ProcessLock("restart", backend=_direct(server, ns), timeout=5) as lock:
            got["at"], got["token"] = time.monotonic(), lock.fencing_token
            deadline = time.monotonic() + 5
            while not lost and time.monotonic() < deadline:
                time.sleep(0.005)  # the holder's renewal (every ttl/3) finds the key gone

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(20)
    assert got["token"] > old
    taken_at = got["at"]
    assert lost, "the holder never learnt its lease was gone"
    print(f"restart: two holders for {(lost[0] - taken_at) * 1000:.0f} ms (ttl 0.6 s)")
    with pytest.raises(LockLostError):
        holder.release()


# -- no herd -----------------------------------------------------------------------------------


def test_a_release_wakes_one_waiter_and_each_waiter_tries_a_few_times_only(server, ns):
    backend = _direct(server, ns, ttl=30)  # a waiter woken by anything but a release: slow
    spec = ProcessLock("herd", backend=backend).spec
    tries = []
    redis_children.count_attempts(backend, lambda: tries.append(1))
    first = backend.try_acquire(spec)
    waiters = 10
    handles = []
    done = threading.Semaphore(0)

    def wait():
        handle = backend.acquire(spec, time.monotonic() + 20)
        handles.append(handle)
        done.release()

    threads = [threading.Thread(target=wait) for _ in range(waiters)]
    for thread in threads:
        thread.start()
    admin = redis.Redis.from_url(server.url)
    queue = backend.queue_key("herd")
    deadline = time.monotonic() + 10
    while admin.zcard(queue) < waiters:
        assert time.monotonic() < deadline, "the waiters never queued"
        time.sleep(0.002)
    tries.clear()  # from here on: the tries the handoffs cost
    start = time.monotonic()
    backend.release(first)
    for _ in range(waiters):
        assert done.acquire(timeout=10), "a waiter was never woken"
        backend.release(handles[-1])
    took = time.monotonic() - start
    for thread in threads:
        thread.join(10)
    admin.close()
    print(f"{waiters} handoffs: {len(tries)} tries, {took * 1000:.1f} ms in all")
    assert all(h is not None for h in handles)
    assert len(tries) <= 2 * waiters  # a herd costs O(N²): 55 here
    assert took < 5  # never a 30 s lease timer


def test_a_waiter_killed_while_queued_does_not_block_the_next(server, ns):
    backend = _direct(server, ns, ttl=30)
    spec = ProcessLock("dead-waiter", backend=backend).spec
    first = backend.try_acquire(spec)
    code = (
        "import sys; from proclock import ProcessLock; from proclock.backends import RedisBackend;"
        "ProcessLock('dead-waiter', backend=RedisBackend(sys.argv[1], namespace=sys.argv[2]))"
        ".acquire()"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, server.url, ns])
    admin = redis.Redis.from_url(server.url)
    queue = backend.queue_key("dead-waiter")
    deadline = time.monotonic() + 30
    while admin.zcard(queue) < 1:
        assert time.monotonic() < deadline, "the waiting process never queued"
        time.sleep(0.002)
    proc.kill()
    proc.wait(10)
    got = []
    thread = threading.Thread(target=lambda: got.append(backend.acquire(spec, None)))
    thread.start()
    while admin.zcard(queue) < 2 and thread.is_alive():
        time.sleep(0.002)  # both queued: the dead one's entry and ours
    start = time.monotonic()
    backend.release(first)
    thread.join(10)
    took = time.monotonic() - start
    admin.close()
    assert got
    assert got[0] is not None
    backend.release(got[0])
    assert took < 1.0  # not the 30 s lease: the dead waiter's wake-up was not lost


def test_semaphore_slot_tokens_increase_across_a_restart(server, ns):
    backend = _direct(server, ns)
    tokens = []
    for _ in range(2):
        with ProcessSemaphore("sem", limit=2, backend=backend) as slot:
            tokens.append(slot.fencing_token)
    server.restart()
    with ProcessSemaphore("sem", limit=2, backend=backend) as slot:
        tokens.append(slot.fencing_token)
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == len(tokens)


def test_waits_timeouts_and_cancellations_together_never_overlap_nor_lose_a_handoff(
    redis_url, tmp_path
):
    # Four processes take one lock every way at once for a while. A ticket lost to a waiter
    # that timed out or was cancelled as Redis served it would block everyone for the ttl
    # (2 s): the longest wait without a timeout stays far below it.
    url, ns, name = redis_url, f"proclock-churn-{uuid.uuid4().hex}", "churn"
    marker = str(tmp_path / "inside")
    out = SPAWN.Queue()
    procs = [
        SPAWN.Process(target=redis_children.churn, args=(url, ns, name, marker, 1.5, i, out))
        for i in range(4)
    ]
    for proc in procs:
        proc.start()
    try:
        stats = [out.get(timeout=60) for _ in procs]
    finally:
        for proc in procs:
            proc.join(30)
    print(stats)
    assert [proc.exitcode for proc in procs] == [0] * 4
    assert sum(s["overlaps"] for s in stats) == 0
    assert sum(s["ok"] for s in stats) > 0
    assert sum(s["cancels"] for s in stats) > 0
    assert max(s["longest"] for s in stats) < 1.0


def test_a_ticket_claimed_behind_a_reply_that_timed_out_is_given_back(server, proxy, ns):
    # The server runs a wait's PING, BLMOVE (a ticket was waiting) and claim, but the replies
    # are late on the way back: the wait gives up at its deadline, and the lease it claimed is
    # given back by the thread that reads the late replies. (Regression: redis-py closed the
    # connection at the first reply's timeout, and the lock stayed held by nobody for the ttl.)
    holder = _direct(server, ns, ttl=30)
    waiter = _via(proxy, ns, ttl=30)
    spec = ProcessLock("behind", backend=holder).spec
    holding = holder.try_acquire(spec)
    admin = redis.Redis.from_url(server.url)
    real_block = waiter._block

    def block(*args, **kwargs):
        holder.release(holding)  # the ticket waits in the list: this BLMOVE takes it at once
        assert admin.llen(holder.wake_key("behind")) == 1
        for link in proxy.connections():
            link.hold_replies()
        return real_block(*args, **kwargs)

    waiter._block = block
    start = time.monotonic()
    with pytest.raises(BackendUnavailableError):  # not even the PING's reply came in time
        waiter.acquire(spec, start + 0.2)
    assert time.monotonic() - start < 0.2 + SLACK
    assert admin.get(holder.key("behind")) is not None  # claimed by the wait that gave up
    for link in proxy.connections():
        link.resume()
    key = holder.key("behind")
    deadline = time.monotonic() + 5
    while admin.get(key) is not None:  # given back within a round trip, not the ttl (30 s)
        assert time.monotonic() < deadline, "the claimed ticket was not given back"
        time.sleep(0.005)
    assert holder.try_acquire(spec) is not None
    admin.close()
