"""What is PostgreSQL's own in its backend, against a real server.

The guarantees every backend gives (exclusion of processes, threads and tasks, re-entry, shared
locks, timeouts, non-blocking attempts, SIGKILL of a holder, fork, cancellation) are tested once
for all backends in test_contract.py. Here: keys and locations, a session per acquisition, the
server's queue and lock_timeout, fencing tokens in their table, holder() from pg_locks and
application_name, loss (pg_terminate_backend, a transaction pooler), a server that is down, the
password, a forked child's connections, and cancelling a wait in the server.

The server comes from $PROCLOCK_TEST_POSTGRES_URL (default: trust auth on 127.0.0.1:5432).
Unreachable, these tests are skipped, unless PROCLOCK_REQUIRE_SERVICES=1 (CI) fails them.
Every test uses its own namespace or lock names and deletes only the fencing rows it made.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager

import pytest

from conftest import POSTGRES_URL, SPAWN, require_module

psycopg = require_module("psycopg", "postgres")

import pg_children  # noqa: E402
from proclock import (  # noqa: E402
    BackendUnavailableError,
    LockHeldError,
    LockLostError,
    LockTimeoutError,
    ProcessLock,
    ProcLockError,
    process_locked,
)
from proclock.backends import Backend, Handle, PostgresBackend, resolve  # noqa: E402
from proclock.backends import postgres as pg  # noqa: E402

URL = POSTGRES_URL
CLOSED = "postgresql://postgres@127.0.0.1:1/test"  # nothing listens on port 1
FORK_WARNING = "ignore:This process .* is multi-threaded:DeprecationWarning"
HOST = os.uname().nodename


@pytest.fixture(scope="module")
def url(postgres_url):
    return postgres_url


@pytest.fixture
def admin(url):
    """A plain connection of the test's own, to look at pg_locks and to kill sessions."""
    with psycopg.connect(url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def ns(admin):
    """A namespace of this test's own; its fencing rows are deleted afterwards."""
    namespace = f"test-{uuid.uuid4().hex}"
    yield namespace
    admin.execute("DELETE FROM proclock_fencing WHERE namespace = %s", (namespace,))


@pytest.fixture
def backend(url, ns):
    b = PostgresBackend(url, namespace=ns, heartbeat=0.1)
    yield b
    with pg._mutex:
        busy = b._links - set(b._idle)
    assert not busy, f"test left PostgreSQL sessions holding or waiting: {busy}"
    assert not b._mine
    b.close()


def spec_of(backend, name, **options):
    return ProcessLock(name, backend=backend, **options).spec


def server_locks(admin, key):
    """(server pid, mode, granted) of every session holding or awaiting advisory lock `key`."""
    rows = admin.execute(
        "SELECT pid, mode, granted FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1"
        " AND classid = %s::bigint::oid AND objid = %s::bigint::oid ORDER BY granted DESC",
        ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF),
    ).fetchall()
    return [tuple(r) for r in rows]


def waiting(admin, key):
    return [r for r in server_locks(admin, key) if not r[2]]


def wait_until(predicate, timeout=10.0):
    """Poll a probe of the test (pg_locks, an event) until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.005)


@contextmanager
def held_by_child(url, namespace, name, shared=False):
    """A spawned process holds `name`; yields (its pid, the event that releases it)."""
    locked, release = SPAWN.Event(), SPAWN.Event()
    child = SPAWN.Process(
        target=pg_children.hold, args=(url, namespace, name, locked, release, shared)
    )
    child.start()
    try:
        assert locked.wait(30), "the child never took the lock"
        yield child.pid, release
    finally:
        release.set()
        child.join(30)
    assert child.exitcode == 0


@contextmanager
def held_directly(backend, name, **options):
    """Hold `name` through the backend alone (a session of its own, unknown to the core)."""
    handle = backend.try_acquire(spec_of(backend, name, **options))
    assert handle is not None
    try:
        yield handle
    finally:
        backend.release(handle)


def in_thread(func):
    """Run `func` in another thread (another owner) and return what it returned or raised."""
    out = {}

    def run():
        try:
            out["value"] = func()
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    if "error" in out:
        raise out["error"]
    return out["value"]


# -- the key, the location, the URL, laziness -------------------------------------------------


def test_key_is_a_signed_64_bit_blake2b_of_namespace_and_name():
    digest = hashlib.blake2b(b"ns\0name", digest_size=8).digest()
    assert pg.advisory_key("ns", "name") == int.from_bytes(digest, "big", signed=True)
    assert pg.advisory_key("ns", "name") != pg.advisory_key("other", "name")
    keys = {pg.advisory_key("ns", f"n{i}") for i in range(1000)}
    assert len(keys) == 1000
    assert all(-(2**63) <= k < 2**63 for k in keys)
    backend = PostgresBackend(CLOSED, namespace="ns")
    assert backend.key("name") == pg.advisory_key("ns", "name")
    location = backend.location(spec_of(backend, "name"))
    assert location == f"postgresql://postgres@127.0.0.1:1/test advisory lock {backend.key('name')}"


def test_constructing_connects_to_nothing_and_messages_hide_the_password():
    backend = PostgresBackend("postgresql://app:s3cret@127.0.0.1:1/db", namespace="n")
    lock = ProcessLock("lazy", backend=backend)

    @process_locked("lazy", backend=backend)
    def never():  # pragma: no cover  (decorating must not connect either)
        raise AssertionError

    where = backend.location(lock.spec)
    assert lock.path == where
    assert not backend._links
    assert where.startswith("postgresql://app@127.0.0.1:1/db advisory lock ")
    assert "s3cret" not in where
    assert "s3cret" not in repr(backend)
    assert "s3cret" not in repr(lock)
    with pytest.raises(BackendUnavailableError) as info:
        lock.acquire()
    assert "s3cret" not in str(info.value)


def test_url_strings_resolve_to_one_postgres_backend():
    for scheme in ("postgresql", "postgres"):
        found = resolve(f"{scheme}://postgres@127.0.0.1:1/resolve-test")
        assert isinstance(found, PostgresBackend)
        assert found is resolve(f"{scheme}://postgres@127.0.0.1:1/resolve-test")


def test_it_is_a_backend_with_its_capabilities():
    backend = PostgresBackend(CLOSED)
    assert isinstance(backend, Backend)
    assert backend.capabilities == {"shared", "fencing", "loss", "freed-on-exit", "wait-any"}


@pytest.mark.parametrize(
    "options",
    [{"heartbeat": 0}, {"pool_size": -1}, {"connect_timeout": 0}, {"namespace": "a\0b"}],
)
def test_bad_options_are_refused(options):
    with pytest.raises(ValueError):
        PostgresBackend(CLOSED, **options)


def test_application_name_fits_and_keeps_the_pid_whole(monkeypatch):
    monkeypatch.setattr(os, "uname", lambda: os.uname_result(("L", "h" * 200, "r", "v", "m")))
    name = pg.application_name()
    assert len(name.encode()) <= 63
    assert name.startswith("proclock:hhh")
    assert name.split(":")[2] == str(os.getpid())


# -- sessions, the server's queue ----------------------------------------------------------------


def test_each_acquisition_has_a_session_of_its_own(backend, admin):
    spec = spec_of(backend, "sessions")
    key = backend.key("sessions")
    first = backend.try_acquire(spec)
    assert isinstance(first, Handle)
    assert first.location == backend.location(spec)
    assert first.fd is None
    assert not first.shared
    # The same thread again: another session, which the server refuses as it would refuse
    # another process (a session advisory lock would re-enter on the same session).
    assert backend.try_acquire(spec) is None
    assert backend.acquire(spec, time.monotonic() + 0.05) is None
    assert server_locks(admin, key) == [(first.private.pid, "ExclusiveLock", True)]
    backend.release(first)
    backend.release(first)  # idempotent
    assert server_locks(admin, key) == []
    second = backend.try_acquire(spec)
    assert second.fencing_token == first.fencing_token + 1
    backend.release(second)


def test_two_backend_objects_of_one_server_and_namespace_are_one_lock(url, backend, ns, admin):
    twin = PostgresBackend(url, namespace=ns, heartbeat=None)
    other = PostgresBackend(url, namespace=f"{ns}-other", heartbeat=None)
    try:
        with ProcessLock("twin", backend=backend):
            # The location is the lock's identity: re-entry is counted, not waited for.
            with ProcessLock("twin", backend=twin, timeout=5):
                assert len(server_locks(admin, backend.key("twin"))) == 1
            assert other.location(spec_of(other, "twin")) != backend.location(
                spec_of(backend, "twin")
            )
    finally:
        twin.close()
        other.close()


def test_waiters_queue_in_the_server_and_a_timeout_leaves_the_queue(backend, admin):
    key = backend.key("queued")
    with held_directly(backend, "queued") as first:
        got = []
        waiter = threading.Thread(target=lambda: got.append(_take_token(backend, "queued")))
        waiter.start()
        wait_until(lambda: waiting(admin, key))  # queued in the server, nothing polls
    waiter.join(30)
    assert got == [first.fencing_token + 1]
    with held_directly(backend, "queued"):
        start = time.monotonic()
        with pytest.raises(LockTimeoutError) as info:
            ProcessLock("queued", backend=backend, timeout=0.2).acquire()
        assert 0.2 <= info.value.waited <= time.monotonic() - start < 3
        assert info.value.holder.pid == os.getpid()
        assert info.value.path == backend.location(spec_of(backend, "queued"))
        assert not waiting(admin, key)  # lock_timeout took us out of the queue
        assert len(server_locks(admin, key)) == 1


def _take_token(backend, name):
    with ProcessLock(name, backend=backend, timeout=20) as lock:
        return lock.fencing_token


# -- holder() ------------------------------------------------------------------------------------


def test_holder_names_pid_host_program_time_and_prefers_another_reader(url, backend, ns, admin):
    lock = ProcessLock("who", backend=backend, shared=True)
    assert lock.holder() is None
    before = time.time()
    with held_by_child(url, ns, "who", shared=True) as (child_pid, release):
        holder = lock.holder()
        assert holder.pid == child_pid
        assert holder.hostname == HOST
        assert isinstance(holder.argv, tuple)
        assert len(holder.argv) == 1
        assert before - 1 <= holder.acquired_at <= time.time() + 1
        assert holder.name == "who"
        assert holder.shared
        server_pid = server_locks(admin, backend.key("who"))[0][0]
        (app,) = admin.execute(
            "SELECT application_name FROM pg_stat_activity WHERE pid = %s", (server_pid,)
        ).fetchone()
        assert app.startswith(f"proclock:{HOST}:{child_pid}:")
        with lock:
            assert lock.holder().pid == child_pid  # another reader than the caller
        release.set()
    with ProcessLock("who", backend=backend) as mine:
        assert mine.holder().pid == os.getpid()
        assert not mine.holder().shared
    assert lock.holder() is None


# -- fencing tokens ------------------------------------------------------------------------------


def test_fencing_tokens_strictly_increase_and_are_durable(url, backend, ns, admin, tmp_path):
    log = tmp_path / "tokens"
    iterations = 10
    start = SPAWN.Barrier(2)
    child = SPAWN.Process(
        target=pg_children.fence, args=(url, ns, "fenced", str(log), iterations, start)
    )
    child.start()
    try:
        start.wait(30)  # this process and the child take turns
        for _ in range(iterations):
            with ProcessLock("fenced", backend=backend) as lock, open(log, "a") as f:
                f.write(f"{os.getpid()} {lock.fencing_token}\n")
    finally:
        child.join(60)
    assert child.exitcode == 0
    entries = [line.split() for line in log.read_text().splitlines()]
    tokens = [int(t) for _, t in entries]
    assert len(tokens) == 2 * iterations
    assert tokens == sorted(set(tokens))  # in the order the lock was taken: strictly increasing
    assert {int(pid) for pid, _ in entries} == {os.getpid(), child.pid}
    # Drawn from the sequence, and carried on by a new session of a new backend object.
    (drawn,) = admin.execute("SELECT last_value FROM proclock_fencing_seq").fetchone()
    assert drawn >= tokens[-1]
    with ProcessLock("fenced", backend=backend) as lock:
        assert lock.fencing_token > drawn


def test_a_role_that_may_not_create_the_fencing_table_is_told_how(url, admin):
    suffix = uuid.uuid4().hex[:12]
    role, schema = f"proclock_test_{suffix}", f"proclock_test_{suffix}"
    admin.execute(f"CREATE ROLE {role} LOGIN")
    admin.execute(f"CREATE SCHEMA {schema}")
    admin.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
        params.update(user=role, options=f"-c search_path={schema}")
        backend = PostgresBackend(psycopg.conninfo.make_conninfo(**params))
        lock = ProcessLock("no-create", backend=backend)
        with pytest.raises(ProcLockError, match="GRANT SELECT, INSERT, UPDATE"):
            lock.acquire()
        assert server_locks(admin, backend.key("no-create")) == []
        backend.close()
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.execute(f"DROP ROLE {role}")


# -- loss: the session ends or changes ------------------------------------------------------------


def _terminate_holder(admin, key):
    ((server_pid, _, _),) = server_locks(admin, key)
    admin.execute("SELECT pg_terminate_backend(%s)", (server_pid,))


def test_pg_terminate_backend_is_detected_reported_and_frees_the_lock(backend, admin):
    key = backend.key("terminated")
    lost = threading.Event()
    seen = []

    def on_lost(error):
        seen.append(error)
        lost.set()

    lock = ProcessLock("terminated", backend=backend, on_lost=on_lost)
    tokens = []

    def hold_while_killed():
        with lock:
            tokens.append(lock.fencing_token)
            _terminate_holder(admin, key)
            assert lost.wait(10), "on_lost was never called"
            # Free for others at once, while this block still runs.
            other = ProcessLock("terminated", backend=backend, blocking=False)
            in_thread(lambda: other.acquire().release())

    with pytest.raises(LockLostError) as info:
        hold_while_killed()  # raised when the block ends
    (token,) = tokens
    assert info.value.fencing_token == token
    assert info.value.name == "terminated"
    assert info.value.path == backend.location(lock.spec)
    assert seen[0].fencing_token == token
    assert "connection failed" in seen[0].reason
    assert len(seen) == 1


def test_decorated_call_raises_lock_lost_when_it_ends(backend, admin):
    lost = threading.Event()
    ran = []

    @process_locked("deco-lost", backend=backend, on_lost=lambda _e: lost.set())
    def body():
        _terminate_holder(admin, backend.key("deco-lost"))
        assert lost.wait(10)
        ran.append(True)
        return 42

    with pytest.raises(LockLostError):
        body()
    assert ran == [True]


def test_on_lost_may_release_the_lock_from_the_heartbeat_thread(backend, admin):
    released = threading.Event()

    def on_lost(_error):
        try:
            lock.release()  # raises the LockLostError, which proclock logs
        finally:
            released.set()

    lock = ProcessLock("release-on-lost", backend=backend, on_lost=on_lost)
    lock.acquire()
    _terminate_holder(admin, backend.key("release-on-lost"))
    assert released.wait(10), "the heartbeat deadlocked in on_lost"
    assert not lock.locked


def test_another_connections_session_is_refused_as_a_pooler(url, ns, admin):
    # The real thing, through PgBouncer, is in test_faults_postgres.py; here the session's mark
    # is changed, as if the next statement ran on another client's session.
    quiet = PostgresBackend(url, namespace=ns, heartbeat=None)
    try:
        lock = ProcessLock("pooled", backend=quiet)
        lock.acquire().handle.private.link.mark = "another connection's"
        with pytest.raises(LockLostError, match="pooler in transaction or statement mode"):
            lock.release()
        # The hold's own session was ended (pg_terminate_backend): its lock is free.
        wait_until(lambda: server_locks(admin, quiet.key("pooled")) == [])
        # At acquisition: the lock statement ran on another session than the one we opened.
        connect = quiet._connect

        def pooled(deadline=None):
            link = connect(deadline)
            link.mark = "another connection's"
            return link

        quiet._connect = pooled
        quiet.close()
        with pytest.raises(ProcLockError, match="PgBouncer"):
            lock.acquire()
        assert not lock.locked
        assert not quiet._links  # its session closed: the lock it took is freed
    finally:
        quiet.close()


def test_heartbeat_sees_another_connections_session(backend, monkeypatch):
    monkeypatch.setattr(pg, "_IDLE_EXIT", 0.2)
    lost = threading.Event()
    seen = []
    lock = ProcessLock("beat", backend=backend, on_lost=lambda e: (seen.append(e), lost.set()))
    lock.acquire().handle.private.link.mark = "another connection's"
    assert lost.wait(10)
    with pytest.raises(LockLostError):
        lock.release()
    assert "pooler" in seen[0].reason
    wait_until(lambda: backend._heart is None)  # nothing held for _IDLE_EXIT: it stopped


def test_a_steady_pace_of_acquisitions_keeps_one_heartbeat_thread_and_never_wakes_it(
    backend, monkeypatch
):
    # The thread lingers while idle (it used to end at the first beat with nothing held, and
    # the next hold started another), and a hold's socket joins its epoll set without waking
    # it (it used to be woken through a pipe at every hold: a thread switch each time, half
    # of a handoff's cost with 20 processes queued).
    lock = ProcessLock("pace", backend=backend)
    with lock:  # the thread started
        pass
    thread = backend._heart
    writes = []
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: (writes.append(fd), real(fd, data))[1])
    for _ in range(4):
        time.sleep(0.25)  # beats (every 0.1 s here) pass with nothing held
        with lock:
            pass
    assert backend._heart is thread
    if pg._EPOLL:
        assert writes == []


@pytest.mark.parametrize("way", ["epoll", "pipe"])
def test_a_session_ended_right_after_its_lock_was_taken_is_seen_at_once(
    backend, admin, monkeypatch, way
):
    # The hold's socket is watched from the moment the hold exists (epoll: it joins the set by
    # itself; elsewhere the heartbeat is woken through a pipe): the server ending the session
    # is seen within a round trip, not at a beat.
    if way == "epoll" and not pg._EPOLL:
        pytest.skip("no epoll here")
    monkeypatch.setattr(pg, "_EPOLL", way == "epoll")
    slow = PostgresBackend(backend._url, namespace=backend._namespace, heartbeat=1.75)
    lost = threading.Event()
    lock = ProcessLock("ended", backend=slow, on_lost=lambda _e: lost.set())
    with lock:  # the thread started
        pass
    hold = lock.acquire()
    start = time.monotonic()
    admin.execute("SELECT pg_terminate_backend(%s)", (hold.handle.private.pid,))
    assert lost.wait(5)
    assert time.monotonic() - start < 1.0  # not the next beat (1.75 s)
    with pytest.raises(LockLostError):
        hold.release()
    slow.close()


def test_an_unlock_that_returns_false_is_reported_as_lost(backend):
    seen = []
    lock = ProcessLock("unlocked-behind", backend=backend, on_lost=seen.append)
    hold = lock.acquire().handle.private
    with hold.busy:
        hold.link.conn.execute("SELECT pg_advisory_unlock_all()")
    with pytest.raises(
        LockLostError, match=r"'unlocked-behind'.*pg_advisory_unlock returned false"
    ):
        lock.release()
    assert len(seen) == 1


def test_an_idle_connection_the_server_closed_is_replaced_quietly(backend, admin):
    lock = ProcessLock("stale", backend=backend)
    hold = lock.acquire()
    session = hold.handle.private.pid
    hold.release()
    admin.execute("SELECT pg_terminate_backend(%s)", (session,))  # idle in our pool now
    wait_until(
        lambda: (
            not admin.execute(
                "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (session,)
            ).fetchone()
        )
    )
    hold = lock.acquire()
    with hold:
        assert hold.handle.private.pid != session


# -- the server is down ------------------------------------------------------------------------


def test_unreachable_server_raises_backend_unavailable_at_once():
    backend = PostgresBackend(CLOSED)
    ran = []

    @process_locked("down", backend=backend, timeout=30)
    def body():  # pragma: no cover  (must never run)
        ran.append(True)

    for attempt in (
        lambda: ProcessLock("down", backend=backend).acquire(),
        lambda: ProcessLock("down", backend=backend, blocking=False).acquire(),
        body,
        lambda: asyncio.run(ProcessLock("down", backend=backend, timeout=30).acquire_async()),
        lambda: ProcessLock("down", backend=backend).holder(),
    ):
        start = time.monotonic()
        with pytest.raises(BackendUnavailableError) as info:
            attempt()
        assert time.monotonic() - start < 3
        assert isinstance(info.value, OSError)
        assert not isinstance(info.value, TimeoutError)
        assert "127.0.0.1:1" in str(info.value)
    assert ran == []


# -- singleton "on two hosts" ------------------------------------------------------------------

PROGRAM = """\
import sys
from proclock import singleton_process

@singleton_process(backend=sys.argv[1])
def main():
    print("ready", flush=True)
    sys.stdin.readline()

main()
"""


def test_singleton_across_two_lock_dirs_sharing_one_server(url, tmp_path, admin):
    script = tmp_path / "single.py"
    script.write_text(PROGRAM)

    def env(host):
        d = tmp_path / host
        d.mkdir(mode=0o700)
        return dict(os.environ, PROCLOCK_DIR=str(d))

    first = subprocess.Popen(
        [sys.executable, str(script), url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env("host-a"),
    )
    try:
        assert first.stdout.readline() == "ready\n"
        second = subprocess.run(
            [sys.executable, str(script), url],
            capture_output=True,
            text=True,
            env=env("host-b"),
            timeout=30,
            check=False,
        )
        assert second.returncode == 1
        assert "ready" not in second.stdout
        assert f"pid {first.pid}" in second.stderr
    finally:
        first.communicate("\n", timeout=30)
        admin.execute(
            "DELETE FROM proclock_fencing WHERE namespace = 'proclock' AND name LIKE %s",
            (f"%{script}%",),
        )
    assert first.returncode == 0


# -- cancelling the server's wait ----------------------------------------------------------------


async def until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.005)


def test_cancelling_a_waiting_task_cancels_the_servers_wait(backend, admin):
    key = backend.key("cancelled")

    async def main():
        task = asyncio.create_task(ProcessLock("cancelled", backend=backend).acquire_async())
        await until(lambda: waiting(admin, key))  # the loop runs while the task waits
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not waiting(admin, key)  # the server's queue no longer has us
        with pytest.raises(LockTimeoutError):
            await ProcessLock("cancelled", backend=backend, timeout=0.1).acquire_async()
        assert not waiting(admin, key)

    with held_directly(backend, "cancelled"):
        asyncio.run(main())
    # Had the cancelled wait been granted once the holder left, it would hold the lock now.
    assert server_locks(admin, key) == []
    with ProcessLock("cancelled", backend=backend, blocking=False):
        pass


@pytest.mark.parametrize("settled", [False, True], ids=["while-waiting", "after-the-grant"])
def test_a_grant_racing_with_the_cancellation_is_given_back(backend, admin, settled):
    key = backend.key("race")
    spec = spec_of(backend, "race")

    def wait_threads():
        return [t for t in threading.enumerate() if t.name == "proclock-postgres-wait"]

    async def once():
        holder = backend.try_acquire(spec)
        task = asyncio.create_task(ProcessLock("race", backend=backend).acquire_async())
        await until(lambda: waiting(admin, key))
        backend.release(holder)  # the server grants the queued wait now...
        if settled:
            # ...and its thread hands the handle to this loop, which has not run it yet.
            wait_until(lambda: not wait_threads())
        task.cancel()  # ...which the task no longer wants
        with pytest.raises(asyncio.CancelledError):
            await task

    for _ in range(3):
        asyncio.run(once())
        wait_until(lambda: server_locks(admin, key) == [])  # its session was closed


def test_ctrl_c_while_waiting_leaves_nothing_queued(url, backend, ns, admin):
    key = backend.key("sigint")
    waiting_event, interrupted, done = SPAWN.Event(), SPAWN.Event(), SPAWN.Event()
    with held_directly(backend, "sigint"):
        child = SPAWN.Process(
            target=pg_children.wait_then_interrupted,
            args=(url, ns, "sigint", waiting_event, interrupted, done),
        )
        child.start()
        try:
            assert waiting_event.wait(30)
            wait_until(lambda: waiting(admin, key))
            os.kill(child.pid, signal.SIGINT)
            assert interrupted.wait(10)
            # Its wait leaves the server's queue (the cancel, or the closed session, is handled
            # by the server a moment later under load); the child lives on.
            wait_until(lambda: not waiting(admin, key), timeout=5)
            assert child.is_alive()
        finally:
            done.set()
            child.join(30)
        assert child.exitcode == 0


# -- fork --------------------------------------------------------------------------------------


@pytest.mark.filterwarnings(FORK_WARNING)
def test_forked_child_never_uses_the_parents_connection(backend, admin):
    key = backend.key("forked")
    lock = ProcessLock("forked", backend=backend)
    lock.acquire()
    try:
        parent_session = server_locks(admin, key)[0][0]
        pid = os.fork()
        if pid == 0:  # pragma: no cover  (the child reports through its exit code)
            code = 10
            try:
                code = 11 if lock.locked else 12
                try:
                    # On the parent's session this would succeed (advisory locks re-enter).
                    ProcessLock("forked", backend=backend, blocking=False).acquire()
                except LockHeldError as exc:
                    code = 0 if exc.holder.pid == os.getppid() else 13
                if code == 0 and backend._links - set(backend._idle):
                    code = 14  # a session of the child's own is left busy
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The child's exit did not end the parent's session: still ours.
        assert server_locks(admin, key) == [(parent_session, "ExclusiveLock", True)]
        assert lock.holder().pid == os.getpid()
    finally:
        lock.release()  # LockLostError here would mean the child closed our session
    assert server_locks(admin, key) == []
