"""The lock contract, written once and run over every backend: flock, PostgreSQL, Redis.

Each guarantee is one test, parametrised over the backends (`target`). A backend that does not
declare a capability ("shared", "fencing", "loss", "freed-on-exit") is skipped, by name, for
exactly the tests that need it. The servers come from $PROCLOCK_TEST_POSTGRES_URL and
$PROCLOCK_TEST_REDIS_URL; without a server (or its driver) those tests skip, unless
PROCLOCK_REQUIRE_SERVICES=1 (CI), which fails them instead. Each test has a namespace (or, for
flock, a lock directory) of its own, and deletes only what it made.

Children are spawned and receive a `Target` (the URL and namespace, or the lock directory):
they build the backend themselves.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import select
import signal
import threading
import time
import uuid
from contextlib import contextmanager, suppress

import pytest

import contract_children
from conftest import SPAWN
from contract_children import Target
from proclock import (
    LockHeldError,
    LockLostError,
    LockTimeoutError,
    ProcLockError,
    _core,
)
from proclock.backends._base import FENCING, FREED_ON_EXIT, LOSS, SHARED

TTL = 1.0  # the Redis lease: a dead holder frees the lock within it
HEARTBEAT = 0.1  # how often the PostgreSQL backend checks a held lock's session
NAME = "contract"
FORK_WARNING = "ignore:This process .* is multi-threaded:DeprecationWarning"
BACKENDS = ("flock", "postgres", "redis")


# -- the backends ------------------------------------------------------------------------------


@pytest.fixture
def pg_admin(postgres_url):
    """A plain connection of the test's own: to look at pg_locks, to kill a session."""
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def redis_admin(redis_url):
    """A plain client of the test's own."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture(params=BACKENDS)
def target(request, tmp_path):
    """The backend under test, as a Target (children rebuild it from that)."""
    kind = request.param
    if kind == "flock":
        lock_dir = tmp_path / "locks"
        lock_dir.mkdir(mode=0o700)
        yield Target("flock", lock_dir=str(lock_dir))
        return
    namespace = f"contract-{uuid.uuid4().hex}"
    if kind == "postgres":
        admin = request.getfixturevalue("pg_admin")
        url = request.getfixturevalue("postgres_url")
        made = Target("postgres", url=url, namespace=namespace, options=(("heartbeat", HEARTBEAT),))
    else:
        admin = request.getfixturevalue("redis_admin")
        url = request.getfixturevalue("redis_url")
        made = Target("redis", url=url, namespace=namespace, options=(("ttl", TTL),))
    try:
        yield made
    finally:
        made.close()
        if kind == "postgres":
            import psycopg

            with suppress(psycopg.errors.UndefinedTable):
                admin.execute("DELETE FROM proclock_fencing WHERE namespace = %s", (namespace,))
        else:
            keys = list(admin.scan_iter(match=f"{namespace}:*", count=1000))
            if keys:
                admin.delete(*keys)


def need(target, capability):
    """Skip the test, saying why, unless the backend declares `capability`."""
    if capability not in target.backend().capabilities:
        pytest.skip(f"{target.kind} has no {capability!r} capability")


@pytest.fixture
def saboteur(target, request):
    """A callable that makes the lock held by this process lost, as the server would."""
    need(target, LOSS)
    if target.kind == "postgres":
        admin = request.getfixturevalue("pg_admin")

        def terminate(lock):
            # The session holding the advisory lock: ours (application_name names this pid).
            rows = _pg_locks(admin, target.backend().key(NAME), granted=True)
            assert len(rows) == 1, f"expected one session holding {lock.path}: {rows}"
            (pid, app) = rows[0]
            assert f":{os.getpid()}:" in app, app
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

        return terminate
    admin = request.getfixturevalue("redis_admin")

    def delete(lock):
        # What the expiry of a lease that was not renewed in time does.
        key = _redis_key(lock, target)
        assert admin.delete(key) == 1, f"no key {key!r} to delete ({lock.path})"

    return delete


def _pg_locks(admin, key, *, granted):
    """(server pid, application_name) of each session holding (or awaiting) advisory `key`."""
    rows = admin.execute(
        "SELECT l.pid, a.application_name FROM pg_locks l"
        " LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted = %s"
        " AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid",
        (granted, (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF),
    ).fetchall()
    return [tuple(row) for row in rows]


@pytest.fixture
def server_waiters(target, request):
    """How many waiters for NAME the kernel or the server sees now (a probe of the test's own).

    flock: blocked flock(2) calls in /proc/locks; PostgreSQL: ungranted rows in pg_locks;
    Redis: waiters in the lock's queue (a sorted set).
    """
    if target.kind == "flock":
        from children import kernel_flocks

        path = target.lock(NAME).path

        def in_kernel():
            try:
                return sum(waiting for _, _, waiting in kernel_flocks(path))
            except FileNotFoundError:
                return 0

        return in_kernel
    if target.kind == "postgres":
        admin = request.getfixturevalue("pg_admin")
        key = target.backend().key(NAME)
        return lambda: len(_pg_locks(admin, key, granted=False))
    admin = request.getfixturevalue("redis_admin")
    queue = target.backend().queue_key(NAME)
    return lambda: admin.zcard(queue)


def wait_until(predicate, what, timeout=10.0):
    """Poll a probe of the test's own (never the lock under test) until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.002)


def _redis_key(lock, target):
    key = target.backend().key(NAME)
    assert key in lock.path
    return key


# -- helpers -----------------------------------------------------------------------------------


def held_here():
    """What this process holds or waits for now, per location (empty when nothing)."""
    return {p: s for p, s in _core.snapshot().items() if s["owners"] or s["waiters"]}


def holds_of(lock):
    return _core.snapshot().get(lock.path, {}).get("holds", 0)


def waiters_of(path):
    return _core.snapshot().get(path, {}).get("waiters", 0)


def in_thread(func, timeout=30):
    """Run `func` in another thread (another owner); return its result or raise its error."""
    out = {}

    def run():
        try:
            out["value"] = func()
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{func} did not return within {timeout}s"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def busy_for_others(target, *, shared=False):
    """True if another thread of this process cannot take the lock at once."""

    def attempt():
        try:
            target.lock(NAME, blocking=False, shared=shared).acquire().release()
        except LockHeldError:
            return True
        return False

    return in_thread(attempt)


class Holding:
    """A child process holding the lock: its pid, the lock's path there, its release event."""

    def __init__(self, pid, path, release):
        self.pid, self.path, self.release = pid, path, release


@contextmanager
def child_holding(target, *, shared=False):
    """A spawned process holds NAME until the block ends (or `release` is set)."""
    locked, release = SPAWN.Event(), SPAWN.Event()
    receive, send = SPAWN.Pipe(duplex=False)
    child = SPAWN.Process(
        target=contract_children.hold, args=(target, NAME, locked, release, send, shared)
    )
    child.start()
    send.close()
    try:
        assert locked.wait(30), "the child never took the lock"
        pid, path = receive.recv()
        yield Holding(pid, path, release)
    finally:
        release.set()
        finish([child])
        receive.close()
    assert child.exitcode == 0


@contextmanager
def thread_holding(target):
    """Another thread of this process holds NAME until the block ends."""
    held, release = threading.Event(), threading.Event()

    def hold():
        with target.lock(NAME):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30), "the holder thread never took the lock"
        yield
    finally:
        release.set()
        holder.join(30)


def finish(procs, timeout=30):
    """Join every process (killing any still alive after `timeout`)."""
    procs = [proc for proc in procs if proc.pid is not None]  # started ones
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.exitcode is None:
            proc.kill()
            proc.join(10)


def run_async(coro, timeout=30):
    """asyncio.run with a bound, so that a wait that never ends fails instead of hanging."""

    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def until(predicate, timeout=10.0):
    """Poll `predicate` (a probe, never the lock under test) from a task, yielding the loop."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.001)


# -- exclusion ---------------------------------------------------------------------------------


def test_processes_threads_and_tasks_exclude_each_other(target, tmp_path):
    # In each process, one thread and one task go through a shared ProcessLock (`with`,
    # `async with`), one thread and one task through @process_locked: all on one name.
    counter = tmp_path / "counter"
    counter.write_text("0")
    nprocs, iterations = 2, 8
    start = SPAWN.Barrier(nprocs)
    procs = [
        SPAWN.Process(
            target=contract_children.count, args=(target, NAME, str(counter), iterations, start)
        )
        for _ in range(nprocs)
    ]
    for proc in procs:
        proc.start()
    finish(procs)
    assert [p.exitcode for p in procs] == [0] * nprocs
    assert int(counter.read_text()) == nprocs * 4 * iterations


# -- re-entry ----------------------------------------------------------------------------------


def test_reentry_by_one_thread_is_counted_across_lock_objects(target):
    lock, twin = target.lock(NAME), target.lock(NAME)
    outer = lock.acquire()
    with lock:
        with twin:
            assert holds_of(lock) == 3
            assert lock.locked
            assert twin.locked
            assert busy_for_others(target)
        assert holds_of(lock) == 2
        assert not twin.locked
    assert busy_for_others(target)
    outer.release()
    assert not lock.locked
    assert not held_here()
    assert not busy_for_others(target)


def test_reentry_by_one_task_is_counted_and_other_tasks_are_excluded(target):
    async def other_task_is_refused():
        try:
            acquired = await target.lock(NAME).acquire_async(blocking=False)
        except LockHeldError:
            return True
        acquired.release()
        return False

    async def main():
        lock, twin = target.lock(NAME), target.lock(NAME)
        outer = await lock.acquire_async()
        async with lock, twin:
            assert holds_of(lock) == 3
            assert await asyncio.create_task(other_task_is_refused())
        assert holds_of(lock) == 1
        assert await asyncio.create_task(other_task_is_refused())
        outer.release()
        assert not await asyncio.create_task(other_task_is_refused())

    run_async(main())
    assert not held_here()


def test_reentrant_false_refuses_re_entry(target):
    lock = target.lock(NAME, reentrant=False)
    with lock:
        for again in (lock, target.lock(NAME, reentrant=False)):
            with pytest.raises(ProcLockError, match="reentrant=False") as info:
                again.acquire()
            assert not isinstance(info.value, LockHeldError)
        assert holds_of(lock) == 1
        assert busy_for_others(target)
    assert not busy_for_others(target)

    async def in_a_task():
        async with lock:
            with pytest.raises(ProcLockError, match="reentrant=False"):
                await lock.acquire_async()
            assert holds_of(lock) == 1

    run_async(in_a_task())
    assert not held_here()
    assert not busy_for_others(target)


# -- shared ------------------------------------------------------------------------------------


def test_shared_holders_share_across_processes_and_threads_while_a_writer_waits(target):
    need(target, SHARED)
    waiting, acquired, left = threading.Event(), threading.Event(), threading.Event()
    early = []

    def write():
        lock = target.lock(NAME)
        with pytest.raises(LockHeldError):
            lock.acquire(blocking=False)
        waiting.set()
        with lock.acquire(timeout=20):
            if not left.is_set():
                early.append("the writer got the lock while readers held it")
            acquired.set()

    writer = threading.Thread(target=write)
    with child_holding(target, shared=True):
        both, done = threading.Barrier(3), threading.Event()

        def reader():
            with target.lock(NAME, shared=True, blocking=False):
                both.wait(10)  # two threads and the child hold it at once
                assert done.wait(30)

        readers = [threading.Thread(target=reader) for _ in range(2)]
        for thread in readers:
            thread.start()
        try:
            both.wait(10)
            with pytest.raises(LockTimeoutError):
                target.lock(NAME).acquire(timeout=0.1)
            writer.start()
            assert waiting.wait(30), "the writer found the lock free"
        finally:
            done.set()
            for thread in readers:
                thread.join(30)
        assert not acquired.is_set()  # the child still holds it shared
        left.set()  # the child releases as the block ends
    try:
        assert acquired.wait(20), "the writer never got the lock after the readers left"
    finally:
        writer.join(30)
    assert not early
    assert not held_here()


def test_shared_waiters_all_wake_when_the_writer_releases(target, server_waiters):
    need(target, SHARED)
    together = threading.Barrier(3)
    failed = []

    def read(timeout):
        with target.lock(NAME, shared=True).acquire(timeout=timeout):
            together.wait(10)  # the readers hold it at the same time

    async def read_async():
        async with await target.lock(NAME, shared=True).acquire_async(timeout=10):
            await asyncio.to_thread(together.wait, 10)

    def reporting(func, *args):
        try:
            func(*args)
        except BaseException as exc:
            failed.append(exc)

    readers = [
        threading.Thread(target=reporting, args=(read, None)),
        threading.Thread(target=reporting, args=(read, 10)),
        threading.Thread(target=reporting, args=(lambda: run_async(read_async()),)),
    ]
    with target.lock(NAME):
        for reader in readers:
            reader.start()
        wait_until(lambda: server_waiters() >= 3, "the three readers wait")
    for reader in readers:
        reader.join(30)
    assert not failed
    assert not together.broken
    assert not held_here()


def test_a_writer_that_gave_up_does_not_hold_back_readers(target):
    need(target, SHARED)
    with target.lock(NAME, shared=True):
        for form, give_up in {
            "acquire(timeout=0.1)": lambda: target.lock(NAME).acquire(timeout=0.1),
            "acquire_async(timeout=0.1)": lambda: run_async(
                target.lock(NAME).acquire_async(timeout=0.1)
            ),
        }.items():
            with pytest.raises(LockTimeoutError):
                in_thread(give_up)
            # Only readers hold it: another reader gets it at once.
            assert not busy_for_others(target, shared=True), form
    assert not held_here()


def test_a_shared_holder_asking_for_the_exclusive_lock_is_refused(target):
    need(target, SHARED)
    with target.lock(NAME, shared=True) as lock:
        with pytest.raises(ProcLockError, match="exclusive") as info:
            target.lock(NAME).acquire()
        assert not isinstance(info.value, LockHeldError)
        with pytest.raises(ProcLockError, match="exclusive"):
            target.lock(NAME).acquire(timeout=1)
        assert holds_of(lock) == 1
        assert not busy_for_others(target, shared=True)
        assert busy_for_others(target)
    assert not held_here()
    assert not busy_for_others(target)


# -- contention: non-blocking, timeouts, who holds it, where -----------------------------------


def test_busy_without_waiting_raises_lock_held_naming_the_holder_and_the_path(target):
    lock = target.lock(NAME)

    @target.locked(NAME, blocking=False)
    def decorated():
        raise AssertionError("ran although the lock is held elsewhere")

    forms = {
        "ProcessLock(blocking=False)": lambda: target.lock(NAME, blocking=False).acquire(),
        "ProcessLock(timeout=0)": lambda: target.lock(NAME, timeout=0).acquire(),
        "acquire(blocking=False)": lambda: lock.acquire(blocking=False),
        "acquire(timeout=0)": lambda: lock.acquire(timeout=0),
        "acquire_async(blocking=False)": lambda: run_async(lock.acquire_async(blocking=False)),
        "acquire_async(timeout=0)": lambda: run_async(lock.acquire_async(timeout=0)),
        "@process_locked(blocking=False)": decorated,
    }
    with child_holding(target) as child:
        assert lock.path == child.path  # one location, seen from both processes
        for form, attempt in forms.items():
            start = time.monotonic()
            with pytest.raises(LockHeldError) as info:
                attempt()
            error = info.value
            assert type(error) is LockHeldError, form
            assert time.monotonic() - start < 2, form
            assert error.path == child.path, form
            assert error.holder is not None, form
            assert error.holder.pid == child.pid, form
            assert f"pid {child.pid}" in str(error), form
        assert lock.holder().pid == child.pid
        assert not lock.locked
        assert not held_here()


def test_holder_is_none_when_free_and_the_path_is_the_same_free_or_held(target):
    lock = target.lock(NAME)
    assert lock.holder() is None
    free_path = lock.path
    with lock:
        assert lock.path == free_path
        holder = lock.holder()
        assert holder is not None
        assert holder.pid == os.getpid()
    assert lock.holder() is None


def test_a_positive_timeout_raises_lock_timeout_not_before_it_and_leaves_nothing(target):
    timeout = 0.2
    lock = target.lock(NAME)
    forms = {
        "acquire(timeout=0.2)": lambda: lock.acquire(timeout=timeout),
        "ProcessLock(timeout=0.2)": lambda: target.lock(NAME, timeout=timeout).acquire(),
        "acquire_async(timeout=0.2)": lambda: run_async(lock.acquire_async(timeout=timeout)),
    }
    with thread_holding(target):  # another owner (the process case is the test above)
        for form, attempt in forms.items():
            start = time.monotonic()
            with pytest.raises(LockTimeoutError) as info:
                attempt()
            elapsed = time.monotonic() - start
            assert elapsed >= timeout, form
            assert elapsed < timeout + 2, form
            assert info.value.waited >= timeout, form
            assert info.value.path == lock.path, form
            assert info.value.holder.pid == os.getpid(), form
            assert isinstance(info.value, TimeoutError), form
            assert not lock.locked, form
            assert held_here()[lock.path] == {"owners": 1, "holds": 1, "waiters": 0}, form
    # The holder left: the lock is free for this process at once (nothing of the waits stayed
    # behind to hold it, here or in the server).
    start = time.monotonic()
    with lock.acquire(timeout=5):
        assert time.monotonic() - start < 1
    assert not held_here()


# -- waiting and waking ------------------------------------------------------------------------


def test_a_waiting_process_gets_the_lock_when_the_holder_releases(target, server_waiters):
    # The holder releases once the kernel or the server sees the waiter wait: it must be woken.
    waiting, acquired = SPAWN.Event(), SPAWN.Event()
    proc = SPAWN.Process(
        target=contract_children.wait_for, args=(target, NAME, waiting, acquired, 10)
    )
    try:
        with target.lock(NAME):
            proc.start()
            assert waiting.wait(30), "the waiting process found the lock free"
            wait_until(lambda: server_waiters() >= 1, "the waiter waits")
            assert not acquired.is_set()
        assert acquired.wait(20), "the waiting process never got the lock"
    finally:
        finish([proc])
    assert proc.exitcode == 0


@pytest.mark.parametrize("timeout", [None, 10], ids=["forever", "timeout"])
@pytest.mark.parametrize("waiter", ["thread", "task"])
def test_a_waiter_gets_the_lock_when_the_holder_releases(target, server_waiters, waiter, timeout):
    # The holder, another thread (a task may not wait for its own thread), releases once the
    # kernel or the server sees the waiter wait: the waiter must be woken.
    held, waiting, acquired, failed = threading.Event(), threading.Event(), threading.Event(), []

    def hold():
        with target.lock(NAME):
            held.set()
            try:
                assert waiting.wait(30), "the waiter never started waiting"
                wait_until(lambda: server_waiters() >= 1, "the waiter waits")
                assert not acquired.is_set(), "the waiter got the lock while it was held"
            except AssertionError as exc:
                failed.append(exc)

    def wait_sync():
        lock = target.lock(NAME)
        with pytest.raises(LockHeldError):
            lock.acquire(blocking=False)
        waiting.set()
        with lock.acquire(timeout=timeout):
            acquired.set()

    async def wait_async():
        lock = target.lock(NAME)
        with pytest.raises(LockHeldError):
            await lock.acquire_async(blocking=False)
        waiting.set()
        async with await lock.acquire_async(timeout=timeout):
            acquired.set()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)
        if waiter == "thread":
            in_thread(wait_sync)
        else:
            run_async(wait_async())
    finally:
        waiting.set()
        holder.join(30)
    assert not failed
    assert acquired.is_set()
    assert not held_here()


def test_sigkill_of_a_holder_frees_the_lock_for_a_waiter(target, server_waiters):
    # At once where the backend frees a dead holder's lock; else within the lease.
    bound = 1.5 if FREED_ON_EXIT in target.backend().capabilities else TTL + 2.0
    locked = SPAWN.Event()
    proc = SPAWN.Process(target=contract_children.hold_forever, args=(target, NAME, locked))
    proc.start()
    got = {}

    def wait():
        lock = target.lock(NAME)
        with lock.acquire(timeout=bound + 10):
            got["at"] = time.monotonic()
            got["holder"] = lock.holder()

    waiter = threading.Thread(target=wait)
    try:
        assert locked.wait(30), "the child never took the lock"
        waiter.start()
        wait_until(lambda: server_waiters() >= 1, "the waiter waits")
        killed = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert proc.exitcode == -signal.SIGKILL
        waiter.join(bound + 15)
    finally:
        finish([proc], timeout=0)
    assert "at" in got, "the waiter never got the lock"
    assert got["at"] - killed < bound
    assert got["holder"].pid == os.getpid()  # never the dead process
    assert not held_here()


# -- fork --------------------------------------------------------------------------------------


def _read_line(fd, timeout=20):
    """One line from a pipe, waiting at most `timeout` seconds (b"" on timeout or EOF)."""
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return data
        chunk = os.read(fd, 4096)
        if not chunk:
            return data
        data += chunk
    return data


def _forked_child(target, lock, to_parent, from_parent):
    """In the forked child: holds nothing of the parent's; can lock only after it released.

    Says "checked" (or what went wrong) to the parent, waits for "released", then says "ok".
    """
    problems = []
    if lock.locked:
        problems.append("the child's ProcessLock says it is held")
    try:
        lock.release()  # the parent's hold: does nothing here
    except Exception as exc:
        problems.append(f"release() of the parent's hold raised {exc!r}")
    if _core.snapshot():
        problems.append(f"the child holds {_core.snapshot()}")
    for attempt in (lambda: lock.acquire(blocking=False), target.lock(NAME, timeout=0).acquire):
        try:
            attempt()
        except LockHeldError:
            continue
        problems.append("the child took the lock that its parent holds")
    os.write(to_parent, ("; ".join(problems) or "checked").encode() + b"\n")
    if _read_line(from_parent) != b"released\n":
        return
    with lock.acquire(timeout=10):
        said = b"ok\n" if lock.locked else b"not locked after acquire\n"
    os.write(to_parent, said)


@pytest.mark.filterwarnings(FORK_WARNING)
def test_a_forked_child_holds_nothing_and_locks_only_after_the_parent_releases(target):
    lock = target.lock(NAME)
    to_parent_r, to_parent_w = os.pipe()
    from_parent_r, from_parent_w = os.pipe()
    open_fds = {to_parent_r, to_parent_w, from_parent_r, from_parent_w}
    held = lock.acquire()
    pid = None
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                os.close(to_parent_r)
                os.close(from_parent_w)
                _forked_child(target, lock, to_parent_w, from_parent_r)
                code = 0
            except BaseException as exc:
                os.write(to_parent_w, f"the child raised {exc!r}\n".encode())
            finally:
                os._exit(code)
        for fd in (to_parent_w, from_parent_r):
            os.close(fd)
            open_fds.discard(fd)
        assert _read_line(to_parent_r) == b"checked\n"
        assert lock.locked
        assert holds_of(lock) == 1
        assert busy_for_others(target)  # the child's release() left the parent's hold alone
        held.release()
        os.write(from_parent_w, b"released\n")
        assert _read_line(to_parent_r) == b"ok\n"
    finally:
        if held.held:
            held.release()
        for fd in open_fds:
            os.close(fd)
        if pid:
            _reap(pid)
    assert not held_here()


def _reap(pid, timeout=20):
    """Wait for a forked child to exit (SIGKILL it past `timeout`); its exit status."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]
        time.sleep(0.01)


# -- asyncio -----------------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [None, 10], ids=["forever", "timeout"])
def test_cancelling_a_waiting_task_leaves_nothing_held_and_the_lock_free(
    target, server_waiters, timeout
):
    # Several rounds: a cancellation can arrive at any await of the backend's wait (the request
    # sent, its reply not yet read...), and each of them must end the wait.
    rounds = 10
    held, release = threading.Event(), threading.Event()

    def hold():
        with target.lock(NAME):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)
        run_async(_cancel_waits(target, server_waiters, timeout, rounds, release))
        assert {p: s["owners"] for p, s in held_here().items()} == {target.lock(NAME).path: 1}
    finally:
        release.set()
        holder.join(30)
    # Free for another owner (another description or session, as another process has).
    in_thread(lambda: target.lock(NAME, timeout=5).acquire().release())
    assert not held_here()


async def _cancel_waits(target, server_waiters, timeout, rounds, release):
    lock = target.lock(NAME)
    path = lock.path
    for round_ in range(1, rounds + 1):
        task = asyncio.create_task(lock.acquire_async(timeout=timeout))
        await until(lambda: waiters_of(path) == 1)
        await until(lambda: server_waiters() >= 1)  # the kernel or the server has it
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=2)
        if not done:
            # The cancellation was lost: free the lock so that the wait ends, give back what
            # it got, then fail.
            release.set()
            await asyncio.wait([task], timeout=15)
            outcome = "still waiting" if not task.done() else repr(task.exception())
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().release()
                outcome = "granted the lock after the holder released it"
            pytest.fail(
                f"round {round_}: task.cancel() did not end the wait within 2 s; after the "
                f"holder released, the cancelled wait was {outcome}"
            )
        assert task.cancelled(), f"round {round_}: {task.exception() or task.result()!r}"
        assert not lock.locked
        assert waiters_of(path) == 0


def test_async_waits_never_block_the_event_loop(target, server_waiters):
    with child_holding(target) as child:
        watchdog = threading.Timer(15, child.release.set)  # a blocked loop fails, not hangs
        watchdog.start()
        try:
            ticks, inside, most = run_async(
                _tick_while_waiting(target, child.release, server_waiters)
            )
        finally:
            watchdog.cancel()
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        assert max(gaps) < 1.0, f"the event loop was blocked for {max(gaps):.3f}s"
        assert sorted(inside) == ["decorated", "forever", "timeout"]
        assert most == 1  # the waiters held the lock one at a time
    assert not held_here()


async def _tick_while_waiting(target, release, server_waiters):
    ticks, inside, now_inside, most = [], [], [0], [0]
    stop = asyncio.Event()
    path = target.lock(NAME).path

    async def ticker():
        while not stop.is_set():
            ticks.append(time.monotonic())
            await asyncio.sleep(0.005)

    async def critical(label):
        now_inside[0] += 1
        most[0] = max(most[0], now_inside[0])
        inside.append(label)
        await asyncio.sleep(0.01)
        now_inside[0] -= 1

    async def waiter(label, timeout):
        async with await target.lock(NAME).acquire_async(timeout=timeout):
            await critical(label)

    @target.locked(NAME)
    async def decorated():
        await critical("decorated")

    tick = asyncio.create_task(ticker())
    waiters = [
        asyncio.create_task(waiter("forever", None)),
        asyncio.create_task(waiter("timeout", 20)),
        asyncio.create_task(decorated()),
    ]
    await until(lambda: waiters_of(path) == 3)
    await until(lambda: server_waiters() >= 1)
    seen = len(ticks)
    await until(lambda: len(ticks) >= seen + 20)  # the loop runs while three tasks wait
    release.set()
    await asyncio.gather(*waiters)
    stop.set()
    await tick
    return ticks, inside, most[0]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("timeout", [None, 5], ids=["forever", "timeout"])
def test_a_sync_wait_in_a_task_while_another_task_holds_is_refused(target, timeout):
    async def main():
        held, done = asyncio.Event(), asyncio.Event()

        async def holder():
            async with target.lock(NAME):
                held.set()
                await done.wait()

        task = asyncio.create_task(holder())
        await held.wait()
        try:
            start = time.monotonic()
            with pytest.raises(ProcLockError, match="event loop") as info:
                target.lock(NAME).acquire(timeout=timeout)  # would block the holder's loop
            assert not isinstance(info.value, LockHeldError)
            assert time.monotonic() - start < 2
        finally:
            done.set()
            await task

    run_async(main())
    assert not held_here()


@pytest.mark.parametrize("timeout", [None, 5], ids=["forever", "timeout"])
def test_a_task_awaiting_a_lock_its_own_thread_holds_is_refused(target, timeout):
    async def main():
        start = time.monotonic()
        with pytest.raises(ProcLockError) as info:
            await asyncio.wait_for(target.lock(NAME).acquire_async(timeout=timeout), 10)
        assert not isinstance(info.value, LockHeldError)
        assert time.monotonic() - start < 2

    with target.lock(NAME):
        asyncio.run(main())
        assert busy_for_others(target)
    assert not held_here()


# -- fencing -----------------------------------------------------------------------------------


def test_fencing_tokens_strictly_increase_across_holders(target, tmp_path):
    need(target, FENCING)
    log = tmp_path / "fences"
    log.touch()
    iterations = 5
    start = SPAWN.Barrier(3)  # a child process and two threads of this one
    proc = SPAWN.Process(
        target=contract_children.fence, args=(target, NAME, str(log), iterations, start)
    )
    proc.start()

    def fence():
        contract_children.fence(target, NAME, str(log), iterations, start)

    threads = [threading.Thread(target=fence) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    finish([proc])
    assert proc.exitcode == 0
    lines = [line.split() for line in log.read_text().splitlines()]
    assert len(lines) == 3 * iterations
    assert len({pid for pid, _ in lines}) == 2
    tokens = [int(token) for _, token in lines]
    assert all(a < b for a, b in itertools.pairwise(tokens)), tokens
    lock = target.lock(NAME)
    assert lock.fencing_token is None
    with lock:
        assert lock.fencing_token > tokens[-1]


# -- loss --------------------------------------------------------------------------------------


def test_a_lost_lock_is_reported_once_then_raised_on_reentry_and_release(target, saboteur):
    errors, lost = [], threading.Event()

    def on_lost(error):
        errors.append(error)
        lost.set()

    lock = target.lock(NAME, on_lost=on_lost)
    other_holds, other_done = threading.Event(), threading.Event()

    def other_owner():
        with target.lock(NAME, timeout=10):
            other_holds.set()
            other_done.wait(30)

    other = threading.Thread(target=other_owner)

    def while_held():
        saboteur(lock)
        assert lost.wait(10), "on_lost was never called"
        with pytest.raises(LockLostError):
            lock.acquire()  # re-entry into a lost hold
        with pytest.raises(LockLostError):
            target.lock(NAME).acquire()  # through another object: the same owner's hold
        other.start()  # the lock is free for others again
        assert other_holds.wait(15), "another owner could not take the lost lock"

    failed = raised = None
    try:
        try:
            with lock:
                path, token = lock.path, lock.fencing_token
                try:
                    while_held()
                except BaseException as exc:  # raised after the block: not masked by its exit
                    failed = exc
        except LockLostError as exc:
            raised = exc
        if failed is not None:
            raise failed
        # Releasing the lost hold did not free the lock the other owner holds now.
        assert busy_for_others(target)
    finally:
        other_done.set()
        if other.is_alive():
            other.join(30)
    assert raised is not None, "leaving the with block of a lost lock raised nothing"
    _check_lost(target, lock, raised, errors, path=path, token=token)


def _check_lost(target, lock, raised, errors, *, path, token):
    """The LockLostError of the block's end, and the one on_lost got (exactly once)."""
    assert raised.path == path
    assert raised.path == lock.path
    assert raised.name == NAME
    assert len(errors) == 1, errors
    assert isinstance(errors[0], LockLostError)
    assert errors[0].path == path
    if FENCING in target.backend().capabilities:
        assert token is not None
        assert raised.fencing_token == token
        assert errors[0].fencing_token == token
    assert not lock.locked
    assert not held_here()


@pytest.mark.parametrize("how", ["async with", "decorator", "coroutine"])
def test_a_lost_lock_raises_when_the_async_block_or_decorated_call_ends(target, saboteur, how):
    errors, lost = [], threading.Event()

    def on_lost(error):
        errors.append(error)
        lost.set()

    lock = target.lock(NAME, on_lost=on_lost)
    path = lock.path

    @target.locked(NAME, on_lost=on_lost)
    def decorated():
        saboteur(lock)
        assert lost.wait(10), "on_lost was never called"

    @target.locked(NAME, on_lost=on_lost)
    async def coroutine():
        saboteur(lock)
        await until(lost.is_set)

    async def block():
        async with lock:
            saboteur(lock)
            await until(lost.is_set)

    def call():
        if how == "decorator":
            decorated()
        else:
            run_async(block() if how == "async with" else coroutine())

    with pytest.raises(LockLostError) as info:
        call()
    assert info.value.path == path
    assert len(errors) == 1, errors
    assert errors[0].path == path
    assert not held_here()
