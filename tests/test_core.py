"""The core's shape: one path for every caller, narrow backends, frozen values, bounded waits."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import threading

import pytest

from children import fd_targets, wait_until
from helpers import held_by_another_description
from proclock import LockTimeoutError, ProcessLock, _core, lock_path, process_locked
from proclock.backends import FLOCK, Backend, Handle
from proclock.backends import flock as flock_backend


def test_the_backend_protocol_is_checked_at_run_time():
    assert isinstance(FLOCK, Backend)
    assert not isinstance(object(), Backend)
    assert {"shared", "fd", "freed-on-exit", "local"} <= FLOCK.capabilities


def test_lock_spec_and_handle_are_frozen(lock_dir):
    lock = ProcessLock("frozen", timeout=1)
    spec = lock.spec
    with pytest.raises(AttributeError):
        spec.timeout = 2  # type: ignore[misc]
    assert spec == ProcessLock("frozen", timeout=1).spec  # compared by value
    assert spec.replace(timeout=2).timeout == 2
    assert spec.timeout == 1
    acquired = lock.acquire()
    try:
        handle = acquired.handle
        assert isinstance(handle, Handle)
        assert handle.location == lock.path
        assert handle.fd is not None
        assert handle.fencing_token is None
        for field in ("location", "fd", "fencing_token", "shared"):
            with pytest.raises(AttributeError):
                setattr(handle, field, None)
    finally:
        acquired.release()


def test_every_kind_of_decorated_call_takes_the_same_core_path(lock_dir, monkeypatch):
    taken, given = [], []
    real_take, real_take_async, real_give = _core.take, _core.take_async, _core.give

    def take(*args, **kwargs):
        taken.append("sync")
        return real_take(*args, **kwargs)

    async def take_async(*args, **kwargs):
        taken.append("async")
        return await real_take_async(*args, **kwargs)

    def give(hold):
        given.append(hold)
        return real_give(hold)

    monkeypatch.setattr(_core, "take", take)
    monkeypatch.setattr(_core, "take_async", take_async)
    monkeypatch.setattr(_core, "give", give)

    @process_locked("fixed")
    def fixed():
        return 1

    @process_locked("t-{n}")
    def template(n):
        return n

    @process_locked("gen")
    def gen():
        yield 1

    @process_locked("co")
    async def co():
        return 2

    @process_locked("agen")
    async def agen():
        yield 3

    async def run_async():
        assert await co() == 2
        assert [x async for x in agen()] == [3]

    assert fixed() == 1
    assert template(5) == 5
    assert list(gen()) == [1]
    asyncio.run(run_async())
    with ProcessLock("direct"):
        pass
    assert taken == ["sync", "sync", "sync", "async", "async", "sync"]
    assert len(given) == 6


@pytest.mark.timeout(30)
def test_past_the_parked_bound_a_timed_wait_polls_and_still_gets_the_lock(lock_dir, monkeypatch):
    monkeypatch.setattr(flock_backend, "PARKED_MAX", 1)
    got, errors = [], []

    def waiter(tag):
        try:
            with ProcessLock("bounded", timeout=20):
                got.append(tag)
        except BaseException as exc:
            errors.append(exc)

    with held_by_another_description("bounded") as fd:
        first = threading.Thread(target=waiter, args=("parked",))
        first.start()
        # The first waiter's helper is in flock(2): the bound is reached.
        assert wait_until(lambda: flock_backend.parked_waits() == 1)
        second = threading.Thread(target=waiter, args=("polling",))
        second.start()
        # The second one polls instead of parking a second helper.
        location = os.path.realpath(lock_path("bounded"))
        assert wait_until(lambda: _core.snapshot().get(location, {}).get("waiters") == 2)
        assert flock_backend.parked_waits() == 1
        fcntl.flock(fd, fcntl.LOCK_UN)
        first.join(30)
        second.join(30)
    assert errors == []
    assert sorted(got) == ["parked", "polling"]


@pytest.mark.timeout(30)
def test_the_first_two_parked_waits_of_a_process_both_reach_a_helper(lock_dir, monkeypatch):
    # The job queue is made at the first parked wait. Two threads parking at once both found
    # none and made one each; a job put into the overwritten queue never reached a helper
    # (seen as a contract test hanging once in a few dozen runs under load).
    import _queue

    monkeypatch.setattr(flock_backend, "_jobs", None)
    monkeypatch.setattr(flock_backend, "_helpers_idle", 0)
    both = threading.Barrier(2)
    real = _queue.SimpleQueue

    class Meeting:
        """A queue whose making waits (a while at most) until the other thread makes one."""

        def __new__(cls):
            with contextlib.suppress(threading.BrokenBarrierError):
                both.wait(0.5)
            return real()

    monkeypatch.setattr(_queue, "SimpleQueue", Meeting)
    got, errors = [], []

    def waiter(tag):
        try:
            with ProcessLock("first-parked", timeout=5):
                got.append(tag)
        except BaseException as exc:
            errors.append(exc)

    with held_by_another_description("first-parked") as fd:
        threads = [threading.Thread(target=waiter, args=(tag,)) for tag in ("a", "b")]
        for thread in threads:
            thread.start()
        assert wait_until(lambda: flock_backend._jobs is not None)
        location = os.path.realpath(lock_path("first-parked"))
        assert wait_until(lambda: _core.snapshot().get(location, {}).get("waiters") == 2)
        monkeypatch.setattr(_queue, "SimpleQueue", real)
        fcntl.flock(fd, fcntl.LOCK_UN)
        for thread in threads:
            thread.join(20)
    assert errors == []
    assert sorted(got) == ["a", "b"]


def test_a_timed_wait_past_the_bound_times_out_on_time(lock_dir, monkeypatch):
    monkeypatch.setattr(flock_backend, "PARKED_MAX", 0)
    with held_by_another_description("poll-timeout"), pytest.raises(LockTimeoutError) as info:
        ProcessLock("poll-timeout", timeout=0.2).acquire()
    assert 0.2 <= info.value.waited < 5
    assert flock_backend.parked_waits() == 0


def test_idle_descriptions_are_bounded_per_file(lock_dir):
    path = os.path.realpath(lock_path("pool"))
    release = threading.Event()
    held = threading.Barrier(11)

    def hold():
        with ProcessLock("pool", shared=True):  # readers: all ten hold at once
            held.wait(30)
            release.wait(30)

    threads = [threading.Thread(target=hold) for _ in range(10)]
    for thread in threads:
        thread.start()
    held.wait(30)
    during = fd_targets().count(path)  # ten owners at once: ten descriptions of their own
    release.set()
    for thread in threads:
        thread.join(30)
    assert during == 10
    # Once they are idle, at most IDLE_PER_FILE of them are kept open.
    assert fd_targets().count(path) == flock_backend.IDLE_PER_FILE


def test_a_grant_the_helper_has_not_reported_yet_is_seen_in_the_kernel(tmp_path):
    """The LOCK_NB retry after an own abandoned grant: flock(2) returned in the helper, which
    has not run since (seen as a rare busy on a loaded machine); /proc/self/fdinfo shows it."""
    import types

    from children import blocked_in_kernel
    from proclock.backends import flock as flock_backend

    path = tmp_path / "f"
    first = os.open(path, os.O_RDWR | os.O_CREAT)
    second = os.open(path, os.O_RDWR)
    waiting = types.SimpleNamespace(private=types.SimpleNamespace(fd=second))
    try:
        fcntl.flock(first, fcntl.LOCK_EX)
        blocked = threading.Thread(target=fcntl.flock, args=(second, fcntl.LOCK_EX))
        blocked.start()
        assert wait_until(lambda: blocked_in_kernel(str(path)))
        assert not flock_backend._holds_in_kernel(waiting)  # a blocked request holds nothing
        fcntl.flock(first, fcntl.LOCK_UN)
        blocked.join(30)
        assert flock_backend._holds_in_kernel(waiting)  # granted, whoever has said so
        assert not flock_backend._holds_in_kernel(types.SimpleNamespace(private=None))
    finally:
        os.close(first)
        os.close(second)
