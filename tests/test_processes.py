"""Real processes contending for locks: counters, SIGKILL, fork, exec, signals, flock(1)."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import children
from children import blocked_in_kernel, fd_targets, kernel_flocks, wait_until
from conftest import FORK, SPAWN, TESTS, lock_file
from proclock import LockHeldError, LockTimeoutError, ProcessLock, _core
from proclock.backends import flock as flock_backend

FLOCK = "/usr/bin/flock"
# Python 3.12+ warns when a multi-threaded process forks (idle proclock helpers, xdist threads).
FORK_WARNING = "ignore:This process .* is multi-threaded:DeprecationWarning"


@pytest.fixture
def start():
    """Start a child process (spawn unless told); any still alive at teardown is killed."""
    started = []

    def start(target, *args, ctx=SPAWN):
        process = ctx.Process(target=target, args=args, daemon=True)
        process.start()
        started.append(process)
        return process

    yield start
    for process in started:
        if process.is_alive():
            process.kill()
        process.join(10)


def finish(process):
    process.join(30)
    assert process.exitcode == 0


def ready(event, process, timeout=30.0):
    """Wait for `event` from `process`, failing at once if the process dies first."""
    deadline = time.monotonic() + timeout
    while not event.wait(0.05):
        assert process.exitcode is None, f"{process} died before signalling"
        assert time.monotonic() < deadline
    return True


def held_by(name, lock_dir, start):
    """A spawned child holding `name` until the returned event is set."""
    locked, release = SPAWN.Event(), SPAWN.Event()
    process = start(children.hold, name, str(lock_dir), locked, release)
    assert ready(locked, process)
    return process, release


def flock_nb(path, *options):
    """Exit status of `flock -n [options] PATH true`: 0 taken, 1 busy."""
    return subprocess.run([FLOCK, "-n", *options, str(path), "true"], check=False).returncode


def held_here():
    return {path: state for path, state in _core.snapshot().items() if state["owners"]}


def own_kernel_holds(path):
    """Locks this process holds (not waits for) in the kernel on `path`."""
    return [lock for lock in kernel_flocks(path) if lock[0] == os.getpid() and not lock[2]]


# -- 1. exclusion under load ----------------------------------------------------------------


@pytest.mark.timeout(30)
def test_processes_and_threads_lose_no_update(lock_dir, tmp_path, start):
    counter = tmp_path / "counter"
    counter.write_text("0")
    processes, threads, iterations = 4, 4, 60
    go = SPAWN.Barrier(processes)
    workers = [
        start(children.count_worker, str(counter), threads, iterations, go)
        for _ in range(processes)
    ]
    for worker in workers:
        finish(worker)
    assert int(counter.read_text()) == processes * threads * iterations


# -- 2. SIGKILL of a holder -----------------------------------------------------------------


def test_sigkilled_holder_frees_the_lock_at_once(lock_dir, start):
    locked = SPAWN.Event()
    holder = start(children.hold_forever, "killed", str(lock_dir), locked)
    assert ready(locked, holder)
    lock = ProcessLock("killed")
    live = lock.holder()
    assert live is not None
    assert live.pid == holder.pid
    with pytest.raises(LockHeldError) as busy:
        lock.acquire(blocking=False)
    assert busy.value.holder.pid == holder.pid

    os.kill(holder.pid, signal.SIGKILL)  # mid-section: it holds the lock and never returns
    holder.join(10)
    assert holder.exitcode == -signal.SIGKILL
    # The kernel freed the lock at exit; its record is still in the file, and is history.
    assert json.loads(lock_file("killed").read_bytes())["pid"] == holder.pid
    assert lock.holder() is None
    with lock.acquire(blocking=False):  # at once: not even a wait
        me = lock.holder()
        assert me is not None
        assert me.pid == os.getpid()
    assert lock.holder() is None


# -- 3. fork while holding ------------------------------------------------------------------


@pytest.mark.filterwarnings(FORK_WARNING)
def test_forked_child_owns_nothing_and_cannot_unlock_the_parent(lock_dir, start):
    lock = ProcessLock("forked")
    lock.acquire()
    path = os.path.realpath(lock.path)
    assert path in fd_targets()  # the kept descriptor: what the child must not keep
    seen, report = FORK.Pipe(duplex=False)

    def child():
        observed = {}
        try:
            observed["locked"] = lock.locked
            lock.release()  # a silent no-op in the child
            observed["fds"] = fd_targets()
            observed["registry"] = held_here()
            try:
                ProcessLock("forked", blocking=False).acquire()
            except LockHeldError as exc:
                observed["own_try"] = exc.holder.pid
        except BaseException as exc:
            observed["error"] = repr(exc)
        report.send(observed)

    try:
        forked = start(child, ctx=FORK)
        assert seen.poll(30)
        observed = seen.recv()
        finish(forked)
        assert "error" not in observed, observed["error"]
        assert observed["locked"] is False
        assert path not in observed["fds"]
        assert observed["registry"] == {}
        assert observed["own_try"] == os.getpid()
        # The child's release() did not unlock ours: a third process still finds it busy.
        third = start(children.try_once, "forked", str(lock_dir))
        third.join(30)
        assert third.exitcode == 1
        assert lock.locked
    finally:
        lock.release()


def test_parent_sigkilled_while_forked_child_lives_frees_the_lock(lock_dir, start):
    holding, done, child_pid = SPAWN.Event(), SPAWN.Event(), SPAWN.Value("i", 0)
    parent = start(children.fork_while_holding, "orphan", str(lock_dir), holding, child_pid, done)
    try:
        assert ready(holding, parent)
        with pytest.raises(LockHeldError):
            ProcessLock("orphan", blocking=False).acquire()
        os.kill(parent.pid, signal.SIGKILL)
        parent.join(10)
        os.kill(child_pid.value, 0)  # the forked child lives on...
        lock = ProcessLock("orphan")
        assert lock.holder() is None  # ...and does not keep the lock alive
        with lock.acquire(blocking=False):
            pass
    finally:
        done.set()


# -- 4. transfer_on_fork --------------------------------------------------------------------


def test_transfer_on_fork_hands_the_lock_to_the_child(lock_dir, start):
    state = SPAWN.Array("i", 5)
    child_ready, child_exit = SPAWN.Event(), SPAWN.Event()
    lock = ProcessLock("daemon")
    parent = start(
        children.transfer_and_exit, "daemon", str(lock_dir), state, child_ready, child_exit
    )
    try:
        finish(parent)  # the parent released nothing and exited
        assert child_ready.is_set()
        child_locked, parent_locked, parent_fd, child_fd, child_pid = state[:]
        assert child_locked == 1
        assert parent_locked == 0
        assert parent_fd == 0  # closed without unlocking
        assert child_fd == 1
        os.kill(child_pid, 0)
        with pytest.raises(LockHeldError):
            lock.acquire(blocking=False)
        assert flock_nb(lock.path) == 1
        assert lock.holder() is not None
    finally:
        child_exit.set()
    with lock.acquire(timeout=10):  # free once the child exits
        assert lock.holder().pid == os.getpid()


def test_holder_after_transfer_on_fork_is_the_child(lock_dir, start):
    state = SPAWN.Array("i", 5)
    child_ready, child_exit = SPAWN.Event(), SPAWN.Event()
    parent = start(
        children.transfer_and_exit, "daemon", str(lock_dir), state, child_ready, child_exit
    )
    try:
        finish(parent)
        found = ProcessLock("daemon").holder()
        assert found is not None
        assert found.pid == state[4]  # the daemon, not its exited parent
    finally:
        child_exit.set()


# -- 5. exec ----------------------------------------------------------------------------------


def test_exec_children_do_not_inherit_the_lock_fd(lock_dir):
    with ProcessLock("exec") as lock:
        path = os.path.realpath(lock.path)
        assert path in fd_targets()
        child = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"],
            stdin=subprocess.PIPE,
            close_fds=False,
        )
        try:
            # Popen returns once the exec succeeded (its error pipe closed on exec).
            inherited = fd_targets(child.pid)
        finally:
            child.communicate(timeout=30)
        assert child.returncode == 0
        assert inherited  # stdin, stdout, stderr at least: the probe works
        assert path not in inherited


# -- 6. flock(1) interop --------------------------------------------------------------------


def test_flock1_fails_while_proclock_holds(lock_dir):
    path = lock_file("interop")
    with ProcessLock("interop"):
        assert flock_nb(path) == 1
        assert flock_nb(path, "-s") == 1
    assert flock_nb(path) == 0
    with ProcessLock("interop", shared=True):
        assert flock_nb(path, "-s") == 0  # readers share with flock(1) readers too
        assert flock_nb(path) == 1


def test_proclock_fails_while_flock1_holds(lock_dir):
    path = lock_file("interop")
    with ProcessLock("interop"):
        pass  # leave a record of ours (a live pid) in the file: it must not be read as holder
    shell = subprocess.Popen(
        [FLOCK, str(path), "sh", "-c", "echo locked; read _"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert shell.stdout.readline() == "locked\n"
        lock = ProcessLock("interop")
        with pytest.raises(LockHeldError) as busy:
            lock.acquire(blocking=False)
        assert busy.value.holder.pid == shell.pid
        assert os.path.basename(busy.value.holder.argv[0]) == "flock"
        assert not lock.locked
    finally:
        shell.communicate("\n", timeout=30)
    assert shell.returncode == 0
    with lock.acquire(timeout=10):
        pass


# -- 7. timeout accuracy --------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [0.05, 0.3])
def test_timed_out_wait_is_accurate_and_holds_nothing(lock_dir, start, fd_count, timeout):
    holder, release = held_by("timeout", lock_dir, start)
    lock = ProcessLock("timeout")
    with pytest.raises(LockHeldError):
        lock.acquire(blocking=False)  # opens the one kept descriptor
    fds = fd_count()
    began = time.perf_counter()
    with pytest.raises(LockTimeoutError) as timed_out:
        lock.acquire(timeout=timeout)
    waited = time.perf_counter() - began
    # The spec's figure is timeout + 50 ms; a loaded 2-core CI machine can stretch one
    # wait past it, so the test bounds it loosely and bench/ measures the figure.
    assert timeout <= waited < timeout + 0.25
    assert isinstance(timed_out.value, TimeoutError)
    assert timed_out.value.holder.pid == holder.pid
    assert not lock.locked
    # The abandoned parked wait stays in flock(2) on a description of its own (one more).
    assert fd_count() <= fds + 1
    assert lock.path not in _core.snapshot()
    assert own_kernel_holds(lock.path) == []
    release.set()
    finish(holder)
    # The abandoned helper, granted the lock now, lets go of it: flock(1) gets it.
    assert subprocess.run([FLOCK, "-w", "10", lock.path, "true"], check=False).returncode == 0
    assert fd_count() == fds


# -- 8. Ctrl-C while waiting ----------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("timeout", ["none", "30"])
def test_ctrl_c_while_waiting_leaves_nothing_behind(lock_dir, timeout):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    lock = ProcessLock("ctrl-c")
    lock.acquire()
    script = subprocess.Popen(
        [sys.executable, "-c", "import children; children.sigint_waiter()", "ctrl-c", timeout],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert script.stdout.readline() == "waiting\n"
        script.send_signal(signal.SIGINT)
        assert script.stdout.readline() == "interrupted\n"
        lock.release()
        script.stdin.write("released\n")
        script.stdin.flush()
        assert script.stdout.readline() == "free\n"
        with ProcessLock("ctrl-c", blocking=False):  # its helper (if any) got it and let go
            pass
        out, _ = script.communicate("checked\n", timeout=30)
    finally:
        if lock.locked:
            lock.release()
        if script.poll() is None:
            script.kill()
            script.communicate()
    assert out == "OK\n"
    assert script.returncode == 0


# -- 9. signals arriving during a wait ------------------------------------------------------


@pytest.mark.parametrize("timeout", [None, 30])
def test_signal_every_millisecond_does_not_break_a_wait(lock_dir, start, timeout):
    waiting, acquired = SPAWN.Event(), SPAWN.Event()
    with ProcessLock("alarm"):
        waiter = start(children.alarm_waiter, "alarm", str(lock_dir), timeout, waiting, acquired)
        assert ready(waiting, waiter)  # blocked, and 100 signals have been handled during the wait
        assert not acquired.is_set()
        assert waiter.is_alive()
    assert ready(acquired, waiter)
    finish(waiter)


# -- 10. handoff without polling -------------------------------------------------------------


@pytest.mark.parametrize("timeout", [None, 30], ids=["forever", "timeout"])
@pytest.mark.parametrize("in_main_thread", [True, False], ids=["main", "thread"])
def test_release_wakes_the_waiter_without_polling(lock_dir, start, timeout, in_main_thread):
    locked, go, released_ns = SPAWN.Event(), SPAWN.Event(), SPAWN.Value("q", 0)
    holder = start(children.hold_until_go, "handoff", str(lock_dir), locked, go, released_ns)
    assert ready(locked, holder)
    lock = ProcessLock("handoff")
    returned_ns, in_kernel = [], []

    def wait():
        lock.acquire(timeout=timeout)
        returned_ns.append(time.perf_counter_ns())
        lock.release()

    def announce():  # the holder releases only once we wait in the kernel
        in_kernel.append(wait_until(lambda: blocked_in_kernel(lock.path), timeout=10))
        go.set()

    helper = threading.Thread(target=announce if in_main_thread else wait)
    helper.start()
    if in_main_thread:
        wait()
    else:
        announce()
    helper.join(30)
    finish(holder)
    assert in_kernel == [True]  # woken by the kernel: a poller never blocks in flock(2)
    assert len(returned_ns) == 1
    latency = returned_ns[0] - released_ns.value
    assert 0 < latency < 50_000_000  # ns: far below the 50-250 ms of polling locks


# -- 11. no descriptor or thread leak -------------------------------------------------------


@pytest.mark.timeout(30)
def test_failed_attempts_and_timeouts_leak_nothing(lock_dir, start, fd_count):
    holder, release = held_by("leak", lock_dir, start)
    with pytest.raises(LockHeldError):
        ProcessLock("leak", blocking=False).acquire()
    gc.collect()  # descriptors of earlier tests' garbage must not close during the count
    fds, threads = fd_count(), threading.active_count()
    path = os.path.realpath(lock_file("leak"))
    assert fd_targets().count(path) == 1  # the kept descriptor
    for i in range(1_000):  # a leak per attempt shows at the first count
        with pytest.raises(LockHeldError):
            ProcessLock("leak", blocking=False).acquire()
        if i % 250 == 0:
            assert fd_count() == fds
    assert fd_count() == fds
    lock = ProcessLock("leak", timeout=0.001)
    for i in range(300):
        with pytest.raises(LockTimeoutError):
            lock.acquire()
        if i % 50 == 0:
            # The first timed-out wait leaves its parked wait in flock(2) (a thread and a
            # descriptor of its own); every later one adopts it instead of starting another.
            # (On a loaded machine a 1 ms wait may give up before its helper even started:
            # the wait is then cancelled, not parked, and none is in flock(2).)
            assert fd_count() <= fds + 1
            assert threading.active_count() <= threads + 1
            assert flock_backend.parked_waits() <= 1
    assert fd_count() <= fds + 1
    assert fd_targets().count(path) <= 2
    assert threading.active_count() <= threads + 1
    assert held_here() == {}
    release.set()
    finish(holder)
    with ProcessLock("leak", timeout=10):
        pass
    assert fd_count() <= fds + 1  # the parked wait's description, idle in the pool now
    assert children.wait_until(lambda: flock_backend.parked_waits() == 0)


# -- 12. threads exclude each other as processes do ------------------------------------------


def test_threads_exclude_each_other(lock_dir):
    lock = ProcessLock("threads")
    holding, release, done = threading.Event(), threading.Event(), threading.Event()

    def hold():
        with lock:
            holding.set()
            release.wait(30)
        done.set()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(30)
        with pytest.raises(LockHeldError):
            lock.acquire(blocking=False)  # the same object, another thread
        with pytest.raises(LockHeldError) as busy:
            ProcessLock("threads", blocking=False).acquire()
        assert busy.value.holder.pid == os.getpid()
        assert flock_nb(lock.path) == 1
    finally:
        release.set()
        thread.join(30)
    assert done.is_set()
    with lock.acquire(blocking=False):
        pass


def test_shared_holders_in_threads_share(lock_dir):
    both = threading.Barrier(3, timeout=10)
    errors = []

    def read():
        try:
            with ProcessLock("readers", shared=True):
                both.wait()  # both threads hold at once: else this barrier breaks
                both.wait()  # while the main thread checks
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        both.wait()
        assert sum(s["owners"] for s in _core.snapshot().values()) == 2
        with pytest.raises(LockHeldError):
            ProcessLock("readers", blocking=False).acquire()  # a writer is excluded
        assert flock_nb(lock_file("readers"), "-s") == 0
        assert flock_nb(lock_file("readers")) == 1
    finally:
        both.wait()
        for reader in readers:
            reader.join(30)
    assert errors == []


# -- 13. stale and foreign content in the lock file -----------------------------------------


def _record(pid, **fields):
    meta = {"v": 1, "pid": pid, "host": "elsewhere", "start": 1, "argv": ["old", "program"]}
    meta.update(at=1.0, name="stale", **fields)
    return json.dumps(meta).encode()


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00\xff\xfe garbage \xc3\n", id="binary"),
        pytest.param(b"not json", id="text"),
        pytest.param(b"[1, 2, 3]", id="json-list"),
        pytest.param(b'{"pid": "12"}', id="pid-str"),
        pytest.param(b'{"pid": 1, "argv": "x", "at": "y", "host": 5, "start": "z"}', id="types"),
        pytest.param(_record(1), id="record-of-pid-1"),
        pytest.param(_record(1)[:30], id="truncated"),
        pytest.param(b"x" * 200_000, id="huge"),
        pytest.param(None, id="own-live-record"),
    ],
)
def test_stale_metadata_is_tolerated(lock_dir, content):
    lock = ProcessLock("stale")
    path = lock.path
    if content is None:
        with lock:
            pass  # leaves our own record: a live pid, with its right start time
    else:
        with open(path, "wb") as f:
            f.write(content)
    assert lock.holder() is None  # free, whatever the file says
    shell = subprocess.Popen(
        [FLOCK, path, "sh", "-c", "echo locked; read _"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert shell.stdout.readline() == "locked\n"
        found = lock.holder()
        assert found is not None
        assert found.pid == shell.pid
        assert os.path.basename(found.argv[0]) == "flock"
    finally:
        shell.communicate("\n", timeout=30)
    with lock:
        me = lock.holder()
        assert me is not None
        assert (me.pid, me.argv) == (os.getpid(), tuple(sys.orig_argv))
        if content is None or content == b"" or content.startswith(b'{"v":'):
            assert me.acquired_at is not None  # from the record we just wrote
            assert json.loads(lock_file("stale").read_bytes())["pid"] == os.getpid()
        else:  # not a proclock record: never written (the kernel names the holder)
            assert me.acquired_at is None
            assert lock_file("stale").read_bytes() == content
    assert lock.holder() is None


def test_record_of_a_reused_pid_is_not_the_holder(lock_dir):
    """A record naming the holder's pid but another start time is a dead process's record."""
    lock = ProcessLock("reused")
    shell = subprocess.Popen(
        [FLOCK, lock.path, "sh", "-c", "echo locked; read _"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert shell.stdout.readline() == "locked\n"
        with open(lock.path, "wb") as f:
            f.write(_record(shell.pid))
        found = lock.holder()
        assert found is not None
        assert found.pid == shell.pid
        assert os.path.basename(found.argv[0]) == "flock"
        assert found.hostname != "elsewhere"
        assert found.acquired_at != 1.0
    finally:
        shell.communicate("\n", timeout=30)
