"""The Redis backend against a real server: leases, renewal, loss, fencing, waiting, async.

The server is $PROCLOCK_TEST_REDIS_URL (default redis://127.0.0.1:6379/0). Unreachable: the
tests skip, unless PROCLOCK_REQUIRE_SERVICES=1 (CI), where they fail. Each test has its own key
namespace and deletes only its own keys.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

import proclock
import redis_children
from conftest import SPAWN
from proclock import (
    BackendUnavailableError,
    LockHeldError,
    LockLostError,
    LockTimeoutError,
    ProcessLock,
    ProcLockError,
)

URL = os.environ.get("PROCLOCK_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRED = os.environ.get("PROCLOCK_REQUIRE_SERVICES") == "1"


def _unusable(reason: str):
    if REQUIRED:
        pytest.fail(f"{reason} (PROCLOCK_REQUIRE_SERVICES=1 turns this skip into a failure)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def url():
    try:
        import redis
    except ImportError as exc:
        _unusable(f"redis-py is not installed (pip install 'proclock[redis]'): {exc}")
    client = redis.Redis.from_url(URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        _unusable(f"no Redis server at {URL} (set PROCLOCK_TEST_REDIS_URL): {exc}")
    finally:
        client.close()
    return URL


@pytest.fixture
def admin(url):
    """A plain client of our own (no proclock name: CLIENT KILL of proclock's spares it)."""
    import redis

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
    from proclock.backends import RedisBackend

    return RedisBackend(url, namespace=ns, ttl=1.0)


def _wait_for(condition, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def _token_of(admin, key):
    value = admin.get(key)
    return None if value is None else value[: len('{"token":"') + 32]


def _start_holder(url, ns, name, ttl, report=None):
    locked, release = SPAWN.Event(), SPAWN.Event()
    proc = SPAWN.Process(
        target=redis_children.hold, args=(url, ns, name, ttl, locked, release, report)
    )
    proc.start()
    assert locked.wait(30), "the holder never took the lock"
    return proc, release


# -- exclusion -----------------------------------------------------------------------------


def test_processes_exclude_each_other_no_lost_updates(url, ns, tmp_path):
    counter = tmp_path / "counter"
    counter.write_text("0")
    nproc, rounds = 4, 40
    barrier = SPAWN.Barrier(nproc)
    procs = [
        SPAWN.Process(target=redis_children.count, args=(url, ns, str(counter), rounds, barrier))
        for _ in range(nproc)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * nproc
    assert int(counter.read_text()) == nproc * rounds  # 0 lost updates


def test_threads_of_one_process_exclude_each_other(backend):
    inside, most, total = [0], [0], [0]
    guard = threading.Lock()

    @proclock.process_locked("threads", backend=backend)
    def section():
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        value = total[0]
        time.sleep(0.0005)
        total[0] = value + 1
        with guard:
            inside[0] -= 1

    threads = [threading.Thread(target=lambda: [section() for _ in range(25)]) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert total[0] == 150
    assert most[0] == 1
    assert backend._held == {}


def test_reentry_is_counted_or_refused(backend, admin, ns):
    lock = ProcessLock("re", backend=backend)
    with lock:
        fence = lock.fencing_token
        with lock, ProcessLock("re", backend=backend):  # another object, same owner
            assert lock.fencing_token == fence
        assert admin.exists(f"{ns}:lock:re")  # inner releases did not give it back
    assert not admin.exists(f"{ns}:lock:re")
    strict = ProcessLock("re2", backend=backend, reentrant=False)
    with strict, pytest.raises(ProcLockError, match="reentrant=False"):
        strict.acquire()


def test_shared_is_refused_clearly(backend):
    with pytest.raises(ValueError, match=r"no shared locks.*PostgreSQL") as info:
        ProcessLock("s", backend=backend, shared=True)
    assert isinstance(info.value, ProcLockError)
    with pytest.raises(ValueError, match="no shared locks"):
        proclock.process_locked("s", backend=backend, shared=True)(lambda: None)


# -- holder death, pause, loss -------------------------------------------------------------


def test_sigkill_of_the_holder_frees_the_lock_after_the_ttl(url, ns):
    ttl = 0.5
    proc, _release = _start_holder(url, ns, "killed", ttl)
    from proclock.backends import RedisBackend

    lock = ProcessLock("killed", backend=RedisBackend(url, namespace=ns), timeout=10)
    with pytest.raises(LockHeldError) as info:
        lock.acquire(blocking=False)
    assert info.value.holder.pid == proc.pid
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    start = time.monotonic()
    with lock:  # woken by the lease's expiry (PTTL), not by a release nobody sends
        waited = time.monotonic() - start
        assert lock.holder().pid == os.getpid()
    assert waited < ttl + 1.0


def test_sigstop_past_the_ttl_loses_the_lease_and_spares_the_next_holder(url, ns, admin):
    ttl = 0.5
    report = SPAWN.Queue()
    proc, release = _start_holder(url, ns, "paused", ttl, report)
    first_fence = report.get(timeout=10)[1]
    from proclock.backends import RedisBackend

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
            assert "another holder" in reason
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
    assert lost == [info.value]
    assert admin.get(key) == b'{"token":"someone-else","pid":1}'  # untouched
    assert not lock.locked
    assert pickle.loads(pickle.dumps(info.value)).reason == info.value.reason  # noqa: S301


def test_client_kill_renewal_reconnects_and_keeps_a_lease_it_still_owns(url, admin, ns):
    from proclock.backends import RedisBackend

    backend = RedisBackend(url, namespace=ns, ttl=0.4)
    lost = []
    key = f"{ns}:lock:killed-conn"
    lock = ProcessLock("killed-conn", backend=backend, on_lost=lost.append)
    with lock:
        token = _token_of(admin, key)
        killed = _kill_proclock_clients(admin)
        assert killed >= 2  # the command and the renewal connections
        time.sleep(2.5 * backend._ttl)  # several renewal periods: lease time must pass
        assert lost == []
        assert _token_of(admin, key) == token
        assert admin.pttl(key) > 0
    assert not admin.exists(key)


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


def _kill_proclock_clients(admin):
    """CLIENT KILL every connection this process's backends opened (named proclock-PID)."""
    name = f"proclock-{os.getpid()}"
    ids = [c["id"] for c in admin.client_list() if c.get("name") == name]
    for client_id in ids:
        admin.client_kill_filter(_id=client_id)
    return len(ids)


# -- fencing, waiting ----------------------------------------------------------------------


def test_fencing_tokens_strictly_increase_across_holders(url, ns, backend):
    lock = ProcessLock("fenced", backend=backend)
    fences = []
    with lock:
        fences.append(lock.fencing_token)
    report = SPAWN.Queue()
    proc = SPAWN.Process(target=redis_children.acquire_once, args=(url, ns, "fenced", report))
    proc.start()
    fences.append(report.get(timeout=30))
    proc.join(30)
    assert proc.exitcode == 0
    for _ in range(3):
        with lock:
            fences.append(lock.fencing_token)
    assert fences == sorted(set(fences))  # strictly increasing
    assert lock.fencing_token is None  # not held


def test_a_waiter_wakes_at_once_on_release(url, ns, admin):
    from proclock.backends import RedisBackend

    # A long ttl: a waiter not woken by the release's PUBLISH would sleep for the whole PTTL.
    lock = ProcessLock("handoff", backend=RedisBackend(url, namespace=ns, ttl=30))
    lock.acquire()
    waiting, report = SPAWN.Event(), SPAWN.Queue()
    proc = SPAWN.Process(
        target=redis_children.wait_then_stamp, args=(url, ns, "handoff", waiting, report)
    )
    proc.start()
    assert waiting.wait(30)
    chan = f"{ns}:chan:handoff"
    _wait_for(lambda: admin.pubsub_numsub(chan)[0][1] >= 1, what="the waiter's SUBSCRIBE")
    time.sleep(0.05)  # its retry after subscribing (not needed for correctness, only timing)
    t0 = time.perf_counter()
    lock.release()
    t1 = report.get(timeout=10)
    proc.join(10)
    assert proc.exitcode == 0
    assert t1 - t0 < 0.1  # no polling interval, no PTTL wait: the PUBLISH woke it


def test_timeouts_and_non_blocking_name_the_holder(url, ns, backend):
    proc, release = _start_holder(url, ns, "busy", 5.0)
    try:
        lock = ProcessLock("busy", backend=backend)
        for kwargs in ({"blocking": False}, {"timeout": 0}):
            with pytest.raises(LockHeldError) as info:
                lock.acquire(**kwargs)
            assert not isinstance(info.value, LockTimeoutError)
            assert info.value.holder.pid == proc.pid
            assert info.value.holder.argv
            assert f"pid {proc.pid}" in str(info.value)
            assert f"{backend._namespace}:lock:busy" in info.value.path
        start = time.monotonic()
        with pytest.raises(LockTimeoutError) as timed_out:
            lock.acquire(timeout=0.3)
        assert 0.3 <= time.monotonic() - start < 0.8
        assert timed_out.value.holder.pid == proc.pid
        assert not lock.locked
        assert lock.holder().pid == proc.pid
    finally:
        release.set()
        proc.join(10)
    assert proc.exitcode == 0
    assert lock.holder() is None


def test_holder_and_path_describe_the_lease(backend, ns):
    lock = ProcessLock("meta", backend=backend)
    assert lock.path.endswith(f" key '{ns}:lock:meta'")
    before = time.time()
    with lock:
        holder = lock.holder()
        assert holder.pid == os.getpid()
        assert holder.hostname == os.uname().nodename
        assert holder.argv
        assert before - 1 <= holder.acquired_at <= time.time() + 1
        assert f"{ns}:lock:meta" in lock.path
    assert lock.holder() is None


def test_password_is_not_shown(ns):
    from proclock.backends import RedisBackend

    b = RedisBackend("redis://user:s3cret@127.0.0.1:1/0", namespace=ns)
    assert "s3cret" not in repr(b)
    assert "s3cret" not in b.where(ProcessLock("x", backend=b), None)


# -- server unreachable --------------------------------------------------------------------


def test_unreachable_server_raises_backend_unavailable_promptly():
    from proclock.backends import RedisBackend

    backend = RedisBackend("redis://127.0.0.1:1/0")  # a closed port: lazy, no error yet
    ran = []

    @proclock.process_locked("down", backend=backend, timeout=30)
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


def test_invalid_construction_is_refused_at_once():
    from proclock.backends import RedisBackend

    with pytest.raises(ValueError, match="redis://"):
        RedisBackend("http://x")
    with pytest.raises(ValueError, match="ttl"):
        RedisBackend("redis://x", ttl=0)
    with pytest.raises(ValueError, match="namespace"):
        RedisBackend("redis://x", namespace="")


# -- two hosts, fork -----------------------------------------------------------------------

_SINGLETON = """
import sys
from proclock import singleton_process

@singleton_process(name=sys.argv[1], backend=sys.argv[2])
def main():
    print("started", flush=True)
    sys.stdin.readline()

main()
"""


def test_singleton_across_two_hosts_sharing_one_server(url, admin, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(_SINGLETON))
    name = f"proclock-test-singleton-{uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    host_a = {**env, "PROCLOCK_DIR": str(tmp_path / "host-a")}
    host_b = {**env, "PROCLOCK_DIR": str(tmp_path / "host-b")}
    args = [sys.executable, str(script), name, url]
    try:
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
    finally:
        admin.delete(f"proclock:lock:{name}", f"proclock:fence:{name}")


def test_a_forked_child_holds_nothing_and_can_lock_afresh(backend, admin, ns):
    key = f"{ns}:lock:forked"
    lock = ProcessLock("forked", backend=backend)
    with lock:
        token = _token_of(admin, key)
        pid = os.fork()
        if pid == 0:  # the child: os._exit only
            code = 0
            try:
                lock.release()  # a silent no-op: not the child's
                if _token_of(admin, key) != token:
                    code = 2
                with ProcessLock("forked-child", backend=backend):
                    pass
            except BaseException:
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert _token_of(admin, key) == token
    assert not admin.exists(key)


# -- async ---------------------------------------------------------------------------------


def test_async_waiting_does_not_block_the_loop_and_gets_the_lock(url, ns, backend):
    proc, release = _start_holder(url, ns, "async", 5.0)

    async def main():
        gaps, stop = [], asyncio.Event()

        async def ticker():
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        lock = ProcessLock("async", backend=backend)
        order = []

        async def waiter(i):
            async with lock:
                order.append(i)
                await asyncio.sleep(0)

        waiters = [asyncio.create_task(waiter(i)) for i in range(16)]
        await asyncio.sleep(0.3)
        assert order == []
        release.set()  # the other process lets go: every waiter gets it in turn
        await asyncio.wait_for(asyncio.gather(*waiters), 20)
        stop.set()
        await tick
        return order, gaps

    try:
        order, gaps = asyncio.run(main())
    finally:
        release.set()
        proc.join(10)
    assert sorted(order) == list(range(16))
    assert len(gaps) > 20
    assert max(gaps) < 0.25  # the loop was never blocked for long


def test_async_cancellation_leaves_nothing_held(url, ns, backend, admin):
    key = f"{ns}:lock:cancel"

    async def cancel_while_waiting():
        lock = ProcessLock("cancel", backend=backend)
        task = asyncio.create_task(lock.acquire_async())
        await asyncio.sleep(0.2)  # waiting on the other process's lease
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not lock.locked

    async def cancel_while_trying(yields):
        lock = ProcessLock("cancel", backend=backend)
        task = asyncio.create_task(lock.acquire_async())
        for _ in range(yields):
            await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            assert not lock.locked
            assert not admin.exists(key)  # a SET that won after cancellation was given back
        else:
            assert lock.locked  # finished before the cancel arrived
            lock.release()

    proc, release = _start_holder(url, ns, "cancel", 5.0)
    try:
        asyncio.run(cancel_while_waiting())
    finally:
        release.set()
        proc.join(10)
    assert not admin.exists(key)
    given_back = []
    discard = backend._discard
    backend._discard = lambda lease: (given_back.append(lease), discard(lease))
    for yields in range(4):
        asyncio.run(cancel_while_trying(yields))
    assert given_back  # some cancellation did land while a winning SET was in flight
    assert not admin.exists(key)
    assert backend._held == {}


def test_async_non_blocking_and_timeout(url, ns, backend):
    proc, release = _start_holder(url, ns, "async-busy", 5.0)

    async def main():
        lock = ProcessLock("async-busy", backend=backend)
        with pytest.raises(LockHeldError) as info:
            await lock.acquire_async(blocking=False)
        assert info.value.holder.pid == proc.pid
        start = time.monotonic()
        with pytest.raises(LockTimeoutError):
            await lock.acquire_async(timeout=0.2)
        assert 0.2 <= time.monotonic() - start < 0.7

    try:
        asyncio.run(main())
    finally:
        release.set()
        proc.join(10)
