"""The PostgreSQL backend against a real server: processes, threads, tasks, loss, fork.

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

psycopg = pytest.importorskip("psycopg")

import pg_children  # noqa: E402
from conftest import SPAWN  # noqa: E402
from proclock import (  # noqa: E402
    BackendUnavailableError,
    LockHeldError,
    LockLostError,
    LockTimeoutError,
    ProcessLock,
    ProcLockError,
    process_locked,
)
from proclock.backends import PostgresBackend, resolve  # noqa: E402
from proclock.backends import postgres as pg  # noqa: E402

URL = os.environ.get("PROCLOCK_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
CLOSED = "postgresql://postgres@127.0.0.1:1/test"  # nothing listens on port 1
FORK_WARNING = "ignore:This process .* is multi-threaded:DeprecationWarning"
HOST = os.uname().nodename


@pytest.fixture(scope="module")
def url():
    try:
        psycopg.connect(URL, connect_timeout=3).close()
    except psycopg.Error as exc:
        reason = f"PostgreSQL is not reachable at {URL} ($PROCLOCK_TEST_POSTGRES_URL): {exc}"
        if os.environ.get("PROCLOCK_REQUIRE_SERVICES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return URL


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
def names(admin):
    """Unique lock names in the default namespace (for backend=<URL string>), cleaned up."""
    prefix = f"test-{uuid.uuid4().hex}"
    made = []

    def name(suffix=""):
        made.append(f"{prefix}{suffix}")
        return made[-1]

    yield name
    admin.execute(
        "DELETE FROM proclock_fencing WHERE namespace = 'proclock' AND name = ANY(%s)", (made,)
    )


@pytest.fixture
def backend(url, ns):
    b = PostgresBackend(url, namespace=ns, heartbeat=0.1)
    yield b
    with pg._mutex:
        left = {k: len(v) for k, v in pg._held.items() if k[0] == b._identity}
    assert not left, f"test left PostgreSQL locks held: {left}"
    b.close()


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


# -- the key, the URL, laziness ---------------------------------------------------------------


def test_key_is_a_signed_64_bit_blake2b_of_namespace_and_name():
    digest = hashlib.blake2b(b"ns\0name", digest_size=8).digest()
    assert pg.advisory_key("ns", "name") == int.from_bytes(digest, "big", signed=True)
    assert pg.advisory_key("ns", "name") != pg.advisory_key("other", "name")
    keys = {pg.advisory_key("ns", f"n{i}") for i in range(1000)}
    assert len(keys) == 1000
    assert all(-(2**63) <= k < 2**63 for k in keys)
    assert PostgresBackend(CLOSED, namespace="ns").key("name") == pg.advisory_key("ns", "name")


def test_constructing_connects_to_nothing_and_messages_hide_the_password():
    backend = PostgresBackend("postgresql://app:s3cret@127.0.0.1:1/db", namespace="n")
    lock = ProcessLock("lazy", backend=backend)

    @process_locked("lazy", backend=backend)
    def never():  # pragma: no cover  (decorating must not connect either)
        raise AssertionError

    assert not backend._links
    where = backend.where(lock, None)
    assert where.startswith("postgresql://app@127.0.0.1:1/db advisory lock ")
    assert "s3cret" not in where
    assert "s3cret" not in repr(backend)
    assert "s3cret" not in repr(lock)


def test_url_strings_resolve_to_one_postgres_backend():
    for scheme in ("postgresql", "postgres"):
        found = resolve(f"{scheme}://postgres@127.0.0.1:1/resolve-test")
        assert isinstance(found, PostgresBackend)
        assert found is resolve(f"{scheme}://postgres@127.0.0.1:1/resolve-test")


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


# -- exclusion --------------------------------------------------------------------------------


def test_processes_exclude_each_other_no_lost_updates(url, names, tmp_path):
    counter = tmp_path / "counter"
    counter.write_text("0")
    nproc, iterations = 4, 25
    start = SPAWN.Barrier(nproc)
    name = names()
    procs = [
        SPAWN.Process(target=pg_children.count, args=(url, name, str(counter), iterations, start))
        for _ in range(nproc)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * nproc
    assert int(counter.read_text()) == nproc * iterations


def test_threads_of_one_process_exclude_each_other(backend):
    state = {"inside": 0, "most": 0, "total": 0}
    pids = set()

    def work():
        lock = ProcessLock("threads", backend=backend)
        for _ in range(10):
            with lock:
                pids.add(lock._holds[-1][1].pid)
                state["inside"] += 1
                state["most"] = max(state["most"], state["inside"])
                value = state["total"]
                time.sleep(0.001)
                state["total"] = value + 1
                state["inside"] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert state["total"] == 40
    assert state["most"] == 1
    assert len(pids) >= 2  # each owner its own session (an idle one is reused)


def test_reentry_is_counted_and_reentrant_false_raises(backend, admin):
    key = backend.key("reenter")
    lock = ProcessLock("reenter", backend=backend)
    with lock:
        token = lock.fencing_token
        with ProcessLock("reenter", backend=backend):  # another object, same owner: counted
            assert len(server_locks(admin, key)) == 1
        assert server_locks(admin, key)[0][2]  # still held after the inner release
        assert lock.fencing_token == token
        with pytest.raises(ProcLockError, match="reentrant=False"):
            ProcessLock("reenter", backend=backend, reentrant=False).acquire()
    assert server_locks(admin, key) == []
    with ProcessLock("reenter", backend=backend, shared=True), pytest.raises(ProcLockError):
        ProcessLock("reenter", backend=backend).acquire()  # held shared: no upgrade


def test_shared_readers_share_and_a_writer_is_excluded(url, backend, ns, admin):
    key = backend.key("rw")
    with held_by_child(url, ns, "rw", shared=True) as (child_pid, release):
        reader = ProcessLock("rw", backend=backend, shared=True, blocking=False)
        with reader:
            assert [m for _, m, g in server_locks(admin, key) if g] == ["ShareLock"] * 2
            writer = ProcessLock("rw", backend=backend, blocking=False)
            with pytest.raises(LockHeldError) as info:
                in_thread(writer.acquire)
            assert info.value.holder.shared
            assert info.value.holder.pid in (child_pid, os.getpid())
        release.set()
    with ProcessLock("rw", backend=backend, blocking=False):
        assert [m for _, m, _ in server_locks(admin, key)] == ["ExclusiveLock"]


# -- contention: timeouts, non-blocking, holder ------------------------------------------------


def test_timeout_raises_after_the_timeout_and_leaves_nothing(url, backend, ns, admin):
    key = backend.key("busy")
    with held_by_child(url, ns, "busy") as (child_pid, _):
        start = time.monotonic()
        with pytest.raises(LockTimeoutError) as info:
            ProcessLock("busy", backend=backend, timeout=0.3).acquire()
        elapsed = time.monotonic() - start
        assert 0.3 <= info.value.waited <= elapsed < 3
        assert info.value.holder.pid == child_pid
        assert info.value.path == backend.where(ProcessLock("busy", backend=backend), None)
        assert len(server_locks(admin, key)) == 1  # only the child's: we wait for nothing
        assert not waiting(admin, key)


@pytest.mark.parametrize("options", [{"blocking": False}, {"timeout": 0}])
def test_non_blocking_raises_held_naming_the_holder(url, backend, ns, options):
    with held_by_child(url, ns, "nb") as (child_pid, _):
        start = time.monotonic()
        with pytest.raises(LockHeldError) as info:
            ProcessLock("nb", backend=backend, **options).acquire()
        assert time.monotonic() - start < 2
        assert not isinstance(info.value, LockTimeoutError)
        holder = info.value.holder
        assert holder.pid == child_pid
        assert holder.hostname == HOST
        assert f"pid {child_pid}" in str(info.value)


def test_holder_names_pid_host_program_and_time(url, backend, ns, admin):
    lock = ProcessLock("who", backend=backend)
    assert lock.holder() is None
    before = time.time()
    with held_by_child(url, ns, "who") as (child_pid, _):
        holder = lock.holder()
        assert holder.pid == child_pid
        assert holder.hostname == HOST
        assert isinstance(holder.argv, tuple)
        assert len(holder.argv) == 1
        assert before - 1 <= holder.acquired_at <= time.time() + 1
        assert holder.name == "who"
        server_pid = server_locks(admin, backend.key("who"))[0][0]
        (app,) = admin.execute(
            "SELECT application_name FROM pg_stat_activity WHERE pid = %s", (server_pid,)
        ).fetchone()
        assert app.startswith(f"proclock:{HOST}:{child_pid}:")
    with lock:
        assert lock.holder().pid == os.getpid()
    assert lock.holder() is None


# -- the holder dies or loses its session ------------------------------------------------------


def test_sigkill_of_the_holder_frees_the_lock_for_a_waiter_at_once(url, backend, ns, admin):
    key = backend.key("killed")
    locked = SPAWN.Event()
    child = SPAWN.Process(target=pg_children.hold_forever, args=(url, ns, "killed", locked))
    child.start()
    try:
        assert locked.wait(30)
        got = {}

        def wait_for_it():
            with ProcessLock("killed", backend=backend, timeout=20):
                got["at"] = time.monotonic()

        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        wait_until(lambda: waiting(admin, key))  # queued in the server
        killed_at = time.monotonic()
        os.kill(child.pid, signal.SIGKILL)
        waiter.join(20)
        assert got["at"] - killed_at < 2
    finally:
        child.kill()
        child.join(10)


def test_fencing_tokens_strictly_increase_across_processes(url, backend, ns, tmp_path):
    log = tmp_path / "tokens"
    nproc, iterations = 3, 10
    start = SPAWN.Barrier(nproc)
    procs = [
        SPAWN.Process(
            target=pg_children.fence, args=(url, ns, "fenced", str(log), iterations, start)
        )
        for _ in range(nproc)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * nproc
    entries = [line.split() for line in log.read_text().splitlines()]
    tokens = [int(t) for _, t in entries]
    assert len(tokens) == nproc * iterations
    assert tokens == sorted(set(tokens))  # in the order the lock was taken: strictly increasing
    assert len({pid for pid, _ in entries}) == nproc
    with ProcessLock("fenced", backend=backend) as lock:
        assert lock.fencing_token == tokens[-1] + 1


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
    assert seen[0].fencing_token == token
    assert "connection failed" in seen[0].reason


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
    lock = ProcessLock("release-on-lost", backend=backend)

    def on_lost(_error):
        try:
            lock.release()  # raises the LockLostError, which proclock logs
        finally:
            released.set()

    lock._on_lost = on_lost
    lock.acquire()
    _terminate_holder(admin, backend.key("release-on-lost"))
    assert released.wait(10), "the heartbeat deadlocked in on_lost"
    assert not lock.locked


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


def test_a_changed_backend_pid_is_refused_as_a_transaction_pooler(url, ns, admin):
    quiet = PostgresBackend(url, namespace=ns, heartbeat=None)
    try:
        lock = ProcessLock("pooled", backend=quiet)
        lock.acquire()
        lock._holds[-1][1].pid += 1  # as if the next statement ran on another session
        with pytest.raises(LockLostError, match="transaction-mode pooler"):
            lock.release()
        # The session was closed; the server drops its locks as it notices the disconnect.
        wait_until(lambda: server_locks(admin, quiet.key("pooled")) == [])
        # At acquisition: the lock statement ran on another session than the one we opened.
        connect = quiet._connect

        def pooled():
            link = connect()
            link.pid += 1
            return link

        quiet._connect = pooled
        quiet.close()
        with pytest.raises(ProcLockError, match="PgBouncer"):
            lock.acquire()
        assert not lock.locked
    finally:
        quiet.close()


def test_heartbeat_sees_a_changed_backend_pid(backend):
    lost = threading.Event()
    seen = []
    lock = ProcessLock("beat", backend=backend, on_lost=lambda e: (seen.append(e), lost.set()))
    lock.acquire()
    lock._holds[-1][1].pid += 1
    assert lost.wait(10)
    with pytest.raises(LockLostError):
        lock.release()
    assert "pooler" in seen[0].reason
    wait_until(lambda: backend._heart is None)  # nothing held: the heartbeat stopped


def test_an_unlock_that_returns_false_is_an_error(backend):
    lock = ProcessLock("unlocked-behind", backend=backend)
    lock.acquire()
    hold = lock._holds[-1][1]
    with hold.busy:
        hold.link.conn.execute("SELECT pg_advisory_unlock_all()")
    with pytest.raises(
        ProcLockError, match=r"'unlocked-behind'.*pg_advisory_unlock returned false"
    ):
        lock.release()


def test_an_idle_connection_the_server_closed_is_replaced_quietly(backend, admin):
    lock = ProcessLock("stale", backend=backend)
    with lock:
        session = lock._holds[-1][1].pid
    admin.execute("SELECT pg_terminate_backend(%s)", (session,))  # idle in our pool now
    wait_until(
        lambda: (
            not admin.execute(
                "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (session,)
            ).fetchone()
        )
    )
    with lock:
        assert lock._holds[-1][1].pid != session


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


# -- asyncio and Ctrl-C ------------------------------------------------------------------------


async def until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.005)


def test_async_wait_does_not_block_the_loop(url, backend, ns, admin):
    key = backend.key("async")

    async def main(release):
        ticks = 0
        lock = ProcessLock("async", backend=backend)

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        async def take():
            async with lock:
                return lock.fencing_token

        tick = asyncio.create_task(ticker())
        taker = asyncio.create_task(take())
        await until(lambda: waiting(admin, key))
        before = ticks
        await until(lambda: ticks >= before + 10)  # the loop runs while the task waits
        assert not taker.done()
        release.set()
        token = await asyncio.wait_for(taker, 10)
        tick.cancel()
        return token

    with held_by_child(url, ns, "async") as (_, release):
        assert asyncio.run(main(release)) >= 2


def test_cancelling_a_waiting_task_leaves_nothing_held(url, backend, ns, admin):
    key = backend.key("cancelled")

    async def main():
        task = asyncio.create_task(ProcessLock("cancelled", backend=backend).acquire_async())
        await until(lambda: waiting(admin, key))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not waiting(admin, key)  # the server's queue no longer has us

    with held_by_child(url, ns, "cancelled"):
        asyncio.run(main())
    # Had the cancelled wait been granted after the child left, it would hold the lock now
    # (and for good: this would time out). The child's session ends as the server notices.
    wait_until(lambda: server_locks(admin, key) == [])
    with ProcessLock("cancelled", backend=backend, blocking=False):
        pass


def test_ctrl_c_while_waiting_leaves_nothing_queued(url, backend, ns, admin):
    key = backend.key("sigint")
    waiting_event, interrupted, done = SPAWN.Event(), SPAWN.Event(), SPAWN.Event()
    with held_by_child(url, ns, "sigint"):
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
            assert not waiting(admin, key)  # its wait left the server's queue; it still lives
            assert child.is_alive()
        finally:
            done.set()
            child.join(30)
        assert child.exitcode == 0


# -- fork --------------------------------------------------------------------------------------


@pytest.mark.filterwarnings(FORK_WARNING)
def test_forked_child_never_uses_the_parents_connection(backend, admin):
    key = backend.key("forked")
    lock = ProcessLock("forked", backend=backend).acquire()
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
