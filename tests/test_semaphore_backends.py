"""The semaphore's guarantees, once, over every backend that declares "wait-any".

flock(2), PostgreSQL and Redis hold semaphores. Names are unique per test: a server keeps the
limits recorded.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import threading
import time
import uuid

import pytest

from conftest import SPAWN
from proclock import (
    LockTimeoutError,
    ProcessSemaphore,
    SemaphoreFullError,
    SemaphoreTimeoutError,
    _core,
    current_slot,
    process_limited,
)
from proclock.backends import flock
from semaphore_children import (
    ask_backend_limit,
    backend_worker,
    hold_backend_slot_forever,
    hold_two,
    interrupted_waiter,
    waits_on_slots,
)


@pytest.fixture(autouse=True)
def _no_parked_wait_outlives_the_test():
    """A head's abandoned waits end once the slots they wait on are freed: wait for that.

    Another test in this worker counts parked waits (flock.parked_waits()); one of ours still
    in the kernel for a few milliseconds would skew its count.
    """
    yield
    deadline = time.monotonic() + 10
    while flock.parked_waits():
        assert time.monotonic() < deadline, "a parked wait outlived the test"
        time.sleep(0.001)


@pytest.fixture(params=["flock", "postgres", "redis"])
def backend(request, lock_dir):
    if request.param == "flock":
        return None
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def name():
    return f"sem-{uuid.uuid4().hex[:12]}"


class HeldInThread:
    """Another thread of this process holds a slot of `sem` until the block ends."""

    def __init__(self, sem):
        self.sem, self.index = sem, None
        self.locked, self.release = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self):
        with self.sem as slot:
            self.index = slot.index
            self.locked.set()
            self.release.wait(30)

    def __enter__(self):
        self.thread.start()
        assert self.locked.wait(30)
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.thread.join(30)


def held_elsewhere(sem, count):
    """`count` threads holding a slot each (a stack to enter with contextlib.ExitStack)."""
    import contextlib

    stack = contextlib.ExitStack()
    return stack, [stack.enter_context(HeldInThread(sem)) for _ in range(count)]


def test_slots_are_distinct_and_the_full_error_names_them(backend, name):
    sem = ProcessSemaphore(name, limit=2, backend=backend)
    stack, held = held_elsewhere(sem, 2)
    with stack:
        assert {h.index for h in held} == {0, 1}
        assert sorted(h.slot for h in sem.holders()) == [0, 1]
        start = time.monotonic()
        with pytest.raises(SemaphoreTimeoutError) as info:
            sem.acquire(timeout=0.3)
        assert 0.3 <= time.monotonic() - start < 3
        assert isinstance(info.value, LockTimeoutError)
        assert "limit 2" in str(info.value)
        with pytest.raises(SemaphoreFullError):
            sem.acquire(blocking=False)
    assert not sem.locked


def test_reentry_counts_on_the_held_slot(backend, name):
    sem = ProcessSemaphore(name, limit=2, backend=backend)
    with sem as outer, sem as inner:
        assert inner.index == outer.index
        assert current_slot(name) == outer.index
        with HeldInThread(sem) as other:  # the other slot is still free
            assert other.index != outer.index


def test_processes_never_exceed_the_limit(backend, name):
    workers, calls = 4, 15
    start = SPAWN.Barrier(workers)
    inside, peak = SPAWN.Value("i", 0), SPAWN.Value("i", 0)
    slots_seen = SPAWN.Array("i", [0, 0])
    procs = [
        SPAWN.Process(
            target=backend_worker,
            args=(name, 2, backend, calls, start, inside, peak, slots_seen),
        )
        for _ in range(workers)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(90)
        assert proc.exitcode == 0
    assert 1 <= peak.value <= 2


def test_sigkill_of_a_holder_lets_a_waiter_in(backend, name):
    if backend is not None and backend.startswith("redis"):
        pytest.skip(
            "redis has no 'freed-on-exit': a killed holder's slot frees when its lease ends"
        )
    procs, indexes = [], []
    try:
        for _ in range(2):
            locked, index = SPAWN.Event(), SPAWN.Value("i", -1)
            proc = SPAWN.Process(
                target=hold_backend_slot_forever, args=(name, 2, backend, locked, index)
            )
            proc.start()
            assert locked.wait(30)
            procs.append(proc)
            indexes.append(index)
        sem = ProcessSemaphore(name, limit=2, backend=backend)
        with pytest.raises(SemaphoreFullError):
            sem.acquire(blocking=False)
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].join(30)
        killed = time.monotonic()
        with sem.acquire(timeout=30) as slot:
            assert slot.index == indexes[0].value
        assert time.monotonic() - killed < 10
    finally:
        for proc in procs:
            proc.kill()
            proc.join(30)


def test_another_limit_is_refused_naming_both(backend, name):
    answers = SPAWN.Queue()
    with ProcessSemaphore(name, limit=2, backend=backend):
        for limit in (3, 2):
            proc = SPAWN.Process(target=ask_backend_limit, args=(name, limit, backend, answers))
            proc.start()
            proc.join(60)
        refused, accepted = answers.get(timeout=30), answers.get(timeout=30)
    assert refused.startswith("ValueError")
    assert "limit=2" in refused
    assert "limit=3" in refused
    assert accepted == "ok"


def test_tasks_take_slots_of_their_own_and_the_loop_keeps_ticking(backend, name):
    tasks_n, limit = 16, 4
    state = {"inside": 0, "peak": 0, "ran": 0}

    @process_limited(name, limit=limit, backend=backend)
    async def critical():
        state["inside"] += 1
        state["peak"] = max(state["peak"], state["inside"])
        await asyncio.sleep(0.002)
        state["inside"] -= 1
        state["ran"] += 1

    async def main():
        ticks = []

        async def ticker():
            while True:
                await asyncio.sleep(0.01)
                ticks.append(time.monotonic())

        tick_task = asyncio.create_task(ticker())
        await asyncio.wait_for(asyncio.gather(*(critical() for _ in range(tasks_n))), 60)
        tick_task.cancel()
        return ticks

    ticks = asyncio.run(main())
    assert state["ran"] == tasks_n
    assert 1 <= state["peak"] <= limit
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert not gaps or max(gaps) < 0.5


def test_cancelling_a_waiting_task_leaves_no_slot_held(backend, name):
    sem = ProcessSemaphore(name, limit=2, backend=backend)

    async def main():
        task = asyncio.create_task(sem.acquire_async())
        deadline = time.monotonic() + 30
        while waits_on_slots(backend, name, 2) < 2:  # the head waits on both slots
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    stack, _ = held_elsewhere(sem, 2)
    with stack:
        asyncio.run(main())
    assert _core.snapshot() == {}
    # Both slots free again: taken by two owners at once.
    with sem.acquire(timeout=10) as first, HeldInThread(sem) as second:
        assert {first.index, second.index} == {0, 1}


def test_ctrl_c_while_waiting_leaves_nothing_held(backend, name, lock_dir):
    locked, release, result = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    holder = SPAWN.Process(target=hold_two, args=(name, backend, locked, release))
    holder.start()
    try:
        assert locked.wait(30)
        waiter = SPAWN.Process(
            target=interrupted_waiter, args=(name, str(lock_dir), release, result, backend)
        )
        waiter.start()
        answer = result.get(timeout=60)
        waiter.join(30)
    finally:
        release.set()
        holder.join(30)
    assert answer == "ok"
    assert waiter.exitcode == 0
