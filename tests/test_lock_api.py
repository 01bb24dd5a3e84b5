"""ProcessLock's API: acquire/release, locked, path, holder(), re-entry, threads, logging."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from children import hold
from conftest import SPAWN
from helpers import taken_elsewhere
from proclock import (
    Acquired,
    Holder,
    LockHeldError,
    LockTimeoutError,
    ProcessLock,
    ProcLockError,
    _core,
    lock_path,
)


def kernel_busy(path):
    """True if a fresh open file description cannot flock `path`: as another process sees it."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def wait_until(predicate, timeout=30):
    """Wait for a condition another thread or process brings about (bounded, never assumed)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.001)


def waiters(path):
    return _core.snapshot().get(path, {}).get("waiters", 0)


class ChildHolder:
    """A spawned process holding a lock until `stop()`."""

    def __init__(self, name, lock_dir, *, shared=False):
        self.locked, self.release = SPAWN.Event(), SPAWN.Event()
        self.process = SPAWN.Process(
            target=hold, args=(name, str(lock_dir), self.locked, self.release, shared)
        )

    def __enter__(self):
        self.process.start()
        assert self.locked.wait(30), "the child never took the lock"
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.process.join(timeout=30)
        assert self.process.exitcode == 0


# -- acquire / release ------------------------------------------------------------------------


def test_acquire_returns_the_hold_whose_with_gives_the_lock(lock_dir):
    lock = ProcessLock("ret")
    with lock.acquire(timeout=1) as same:
        assert same is lock
        assert lock.locked
        assert _core.snapshot()[lock.path]["holds"] == 1  # `with lock.acquire()` holds once
    assert not lock.locked
    acquired = lock.acquire()
    assert isinstance(acquired, Acquired)
    assert acquired.lock is lock
    assert acquired.held
    assert acquired.handle.location == lock.path
    with lock:  # a second hold: the block's end releases only its own
        assert _core.snapshot()[lock.path]["holds"] == 2
    assert lock.locked
    lock.release()
    assert not lock.locked
    assert not acquired.held


def test_an_acquired_hold_is_released_once(lock_dir):
    lock = ProcessLock("once")
    acquired = lock.acquire()
    acquired.release()
    assert not lock.locked
    with pytest.raises(ProcLockError, match="released already"):
        acquired.release()


def test_context_manager(lock_dir):
    lock = ProcessLock("ctx")
    with lock as same:
        assert same is lock
        assert lock.locked
        assert kernel_busy(lock.path)
    assert not lock.locked
    assert not kernel_busy(lock.path)


def test_acquire_raises_and_never_returns_false(lock_dir):
    with ChildHolder("busy", lock_dir) as child:
        lock = ProcessLock("busy", blocking=False)
        with pytest.raises(LockHeldError) as info:
            lock.acquire()
        assert info.value.holder is not None
        assert info.value.holder.pid == child.process.pid
        with pytest.raises(LockTimeoutError):
            lock.acquire(timeout=0.01)
        assert not lock.locked
    assert lock.acquire().lock is lock
    lock.release()


def test_release_of_a_lock_not_held(lock_dir):
    lock = ProcessLock("never")
    with pytest.raises(ProcLockError, match="never"):
        lock.release()
    with lock:
        pass
    with pytest.raises(ProcLockError):
        lock.release()


def test_release_by_another_object_does_not_release(lock_dir):
    first, second = ProcessLock("objs"), ProcessLock("objs")
    with first:
        with pytest.raises(ProcLockError):
            second.release()
        assert first.locked
        assert taken_elsewhere("objs")


# -- locked, path, holder ---------------------------------------------------------------------


def test_locked_is_true_only_for_the_holding_object(lock_dir):
    lock, other = ProcessLock("state"), ProcessLock("state")
    assert not lock.locked
    with lock:
        assert lock.locked
        assert not other.locked  # another object for the same name does not hold it
        seen_from_thread = []
        thread = threading.Thread(target=lambda: seen_from_thread.append(lock.locked))
        thread.start()
        thread.join(30)
        assert seen_from_thread == [True]  # this object holds it, in this process
    assert not lock.locked


def test_locked_is_false_while_another_process_holds(lock_dir):
    with ChildHolder("remote", lock_dir):
        assert not ProcessLock("remote").locked


def test_path_is_the_lock_path(lock_dir):
    lock = ProcessLock("where")
    assert lock.path == str(lock_path("where"))
    assert os.path.dirname(lock.path) == str(lock_dir)
    with lock:
        assert lock.path == str(lock_path("where"))
        assert os.path.isfile(lock.path)
    assert os.path.isfile(lock.path)  # never unlinked on release


def test_explicit_path(tmp_path):
    path = tmp_path / "explicit.lock"
    lock = ProcessLock(path=path)
    assert lock.path == str(path)
    with lock:
        assert path.is_file()
        assert kernel_busy(str(path))
        assert taken_elsewhere_path(path)
    assert not kernel_busy(str(path))


def taken_elsewhere_path(path):
    result = []

    def attempt():
        try:
            ProcessLock(path=path, blocking=False).acquire().release()
        except LockHeldError:
            result.append(True)
        else:
            result.append(False)

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join(30)
    return result[0]


def test_name_and_path_are_exclusive(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        ProcessLock("x", path=tmp_path / "x.lock")
    with pytest.raises(TypeError):
        ProcessLock()


def test_holder_of_a_free_lock_is_none(lock_dir):
    assert ProcessLock("free").holder() is None
    with ProcessLock("free"):
        pass
    assert ProcessLock("free").holder() is None


def test_holder_of_our_own_lock(lock_dir):
    before = time.time()
    with ProcessLock("mine") as lock:
        holder = lock.holder()
        assert isinstance(holder, Holder)
        assert holder.pid == os.getpid()
        assert holder.hostname == os.uname().nodename
        assert holder.argv  # the command line (the metadata's, or /proc/<pid>/cmdline)
        assert " ".join(sys.argv[1:]) in " ".join(holder.argv)
        assert before - 1 <= holder.acquired_at <= time.time() + 1
        assert ProcessLock("mine").holder() == holder  # any object sees the same holder
    assert lock.holder() is None


def test_holder_of_another_process(lock_dir):
    with ChildHolder("theirs", lock_dir) as child:
        holder = ProcessLock("theirs").holder()
        assert holder is not None
        assert holder.pid == child.process.pid
        assert holder.hostname == os.uname().nodename
        assert holder.argv  # the child's command line
        assert isinstance(holder.acquired_at, float)
    assert ProcessLock("theirs").holder() is None


# -- re-entry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("second_object", [False, True], ids=["same-object", "second-object"])
def test_reentry_is_counted(lock_dir, second_object):
    outer = ProcessLock("again")
    inner = ProcessLock("again") if second_object else outer
    with outer:
        with inner:  # must not hang: the same thread holds it
            assert inner.locked
            assert taken_elsewhere("again")
        assert outer.locked
        assert taken_elsewhere("again")  # released only after the outermost release
        assert kernel_busy(outer.path)
    assert not outer.locked
    assert not taken_elsewhere("again")
    assert not kernel_busy(outer.path)


def test_reentry_three_deep_through_acquire(lock_dir):
    lock = ProcessLock("deep")
    for _ in range(3):
        lock.acquire()
    for _ in range(2):
        lock.release()
        assert kernel_busy(lock.path)
    lock.release()
    assert not kernel_busy(lock.path)
    assert not lock.locked


@pytest.mark.parametrize("second_object", [False, True], ids=["same-object", "second-object"])
def test_reentry_refused_when_not_reentrant(lock_dir, second_object):
    outer = ProcessLock("once", reentrant=False)
    inner = ProcessLock("once", reentrant=False) if second_object else outer
    with outer:
        start = time.monotonic()
        with pytest.raises(ProcLockError, match="reentrant") as info:
            inner.acquire()  # blocking, no timeout: refused at once rather than hanging
        assert not isinstance(info.value, LockHeldError)
        assert time.monotonic() - start < 5
        assert outer.locked
        assert kernel_busy(outer.path)
    assert not kernel_busy(outer.path)
    assert not inner.locked


def test_shared_holder_asking_for_exclusive_is_refused(lock_dir):
    reader = ProcessLock("upgrade", shared=True)
    writer = ProcessLock("upgrade")
    with reader:
        with pytest.raises(ProcLockError, match="upgrade"):
            writer.acquire()
        assert not writer.locked
        assert reader.locked
        assert not taken_elsewhere("upgrade", shared=True)  # still shared, not converted
        assert taken_elsewhere("upgrade")
    assert not taken_elsewhere("upgrade")


def test_exclusive_holder_asking_for_shared_is_counted(lock_dir):
    writer = ProcessLock("downgrade")
    reader = ProcessLock("downgrade", shared=True)
    with writer:
        with reader:
            assert reader.locked
        assert writer.locked
        assert taken_elsewhere("downgrade", shared=True)  # still exclusive
    assert not taken_elsewhere("downgrade")


# -- threads ----------------------------------------------------------------------------------


def test_threads_exclude_each_other(lock_dir):
    lock = ProcessLock("counter")
    counter = {"n": 0, "inside": 0, "max_inside": 0}
    n_threads, n_rounds = 8, 50
    barrier = threading.Barrier(n_threads)

    def work():
        barrier.wait()
        for _ in range(n_rounds):
            with lock:
                counter["inside"] += 1
                counter["max_inside"] = max(counter["max_inside"], counter["inside"])
                value = counter["n"]
                time.sleep(0)  # invite a switch inside the critical section
                counter["n"] = value + 1
                counter["inside"] -= 1

    threads = [threading.Thread(target=work) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert counter["n"] == n_threads * n_rounds
    assert counter["max_inside"] == 1


def test_a_waiting_thread_gets_the_lock_when_the_holder_releases(lock_dir):
    holder = ProcessLock("handoff")
    holder.acquire()
    got = threading.Event()

    def wait():
        with ProcessLock("handoff"):
            got.set()

    thread = threading.Thread(target=wait)
    thread.start()
    wait_until(lambda: waiters(holder.path) == 1)
    assert not got.is_set()
    holder.release()
    assert got.wait(30)
    thread.join(30)


def test_a_waiting_thread_is_woken_by_another_process(lock_dir):
    got = threading.Event()

    def wait():
        with ProcessLock("cross"):
            got.set()

    with ChildHolder("cross", lock_dir):
        thread = threading.Thread(target=wait)
        thread.start()
        wait_until(lambda: waiters(str(lock_path("cross"))) == 1)
        assert not got.is_set()
    assert got.wait(30)
    thread.join(30)


def test_shared_holders_share_across_threads_and_processes(lock_dir):
    with ChildHolder("readers", lock_dir, shared=True):
        with ProcessLock("readers", shared=True, blocking=False):
            assert not taken_elsewhere("readers", shared=True)
            assert taken_elsewhere("readers")
        with pytest.raises(LockHeldError):
            ProcessLock("readers", blocking=False).acquire()


# -- logging ----------------------------------------------------------------------------------


def test_debug_logging_of_wait_acquire_release(lock_dir, caplog):
    caplog.set_level(logging.DEBUG, logger="proclock")
    holder = ProcessLock("logged")
    holder.acquire()
    thread = threading.Thread(target=lambda: ProcessLock("logged").acquire().release())
    thread.start()
    wait_until(lambda: waiters(holder.path) == 1)
    time.sleep(0.05)  # a measurable wait, for the duration in the log line
    holder.release()
    thread.join(30)
    records = [r for r in caplog.records if r.name == "proclock"]
    messages = [r.getMessage() for r in records]
    assert any(m.startswith("waiting for 'logged'") for m in messages), messages
    acquired = [m for m in messages if m.startswith("acquired 'logged'")]
    assert len(acquired) == 2
    # The uncontended one may say "at once"; the waiter's line gives how long it waited.
    durations = [re.search(r"after (\d+\.\d+)s", m) for m in acquired]
    assert any(durations), acquired
    waited = max(float(d.group(1)) for d in durations if d)
    assert waited >= 0.04  # the waiter's duration covers its wait
    assert sum(m.startswith("released 'logged'") for m in messages) == 2
    assert all(r.levelno == logging.DEBUG for r in records)


def test_nothing_at_info_or_above_on_the_happy_path(lock_dir, caplog):
    caplog.set_level(logging.DEBUG)
    with ProcessLock("quiet"), ProcessLock("quiet"):
        pass
    lock = ProcessLock("quiet", shared=True, timeout=1)
    with lock:
        pass
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []
    assert any(r.name == "proclock" for r in caplog.records)


# -- platform ---------------------------------------------------------------------------------


def test_import_without_fcntl_says_flock_is_required():
    code = "import sys; sys.modules['fcntl'] = None; import proclock"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError"), result.stderr
    assert "flock(2)" in last
