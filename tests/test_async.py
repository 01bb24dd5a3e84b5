"""asyncio: never blocking the loop, tasks excluding each other, cancellation, timeouts."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time

import pytest

from helpers import held_by_child
from proclock import (
    LockHeldError,
    LockTimeoutError,
    ProcessLock,
    ProcLockError,
    _core,
    lock_path,
    process_locked,
)


def registry(name):
    return _core.snapshot().get(str(lock_path(name)), {"owners": 0, "waiters": 0})


async def until(predicate, timeout=30):
    """Await a condition other tasks, threads or processes bring about (bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.001)


def test_decorated_coroutine_runs_holding_the_lock(lock_dir):
    @process_locked("co")
    async def work(x, *, y):
        await asyncio.sleep(0)
        return x + y, registry("co")["owners"]

    assert asyncio.iscoroutinefunction(work)
    assert asyncio.run(work(1, y=2)) == (3, 1)
    assert registry("co")["owners"] == 0


def test_waiting_never_blocks_the_loop(lock_dir):
    tasks_n = 64
    name = "ticker"
    state = {"inside": 0, "max_inside": 0, "ran": 0}

    @process_locked(name)
    async def critical():
        state["inside"] += 1
        state["max_inside"] = max(state["max_inside"], state["inside"])
        await asyncio.sleep(0)  # give any other task the chance to (wrongly) enter
        state["inside"] -= 1
        state["ran"] += 1

    async def main(release):
        ticks = []

        async def ticker():
            while True:
                await asyncio.sleep(0.01)
                ticks.append(time.monotonic())

        tick_task = asyncio.create_task(ticker())
        tasks = [asyncio.create_task(critical()) for _ in range(tasks_n)]
        await until(lambda: registry(name)["waiters"] == tasks_n)
        # The window: from "all 64 wait" until the ticker has ticked five more times, during
        # which the other process holds the lock throughout and nobody has run.
        start = len(ticks)
        await until(lambda: len(ticks) >= start + 5, timeout=10)
        assert registry(name)["waiters"] == tasks_n
        assert state["ran"] == 0
        release.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        tick_task.cancel()
        return ticks

    with held_by_child(name, lock_dir) as child:
        asyncio.run(main(child.release))
    assert state == {"inside": 0, "max_inside": 1, "ran": tasks_n}
    assert registry(name) == {**registry(name), "owners": 0, "waiters": 0}


def test_two_tasks_of_one_loop_exclude_each_other(lock_dir):
    async def main():
        first_in, go = asyncio.Event(), asyncio.Event()
        order = []

        async def first():
            async with ProcessLock("tasks"):
                order.append("first in")
                first_in.set()
                await go.wait()
                order.append("first out")

        async def second():
            await first_in.wait()
            with pytest.raises(LockHeldError):
                await ProcessLock("tasks", blocking=False).acquire_async()
            async with ProcessLock("tasks"):
                order.append("second in")

        a, b = asyncio.create_task(first()), asyncio.create_task(second())
        await until(lambda: registry("tasks")["waiters"] == 1)
        assert order == ["first in"]
        go.set()
        await asyncio.gather(a, b)
        return order

    assert asyncio.run(main()) == ["first in", "first out", "second in"]


def test_two_tasks_through_a_decorated_coroutine(lock_dir):
    state = {"inside": 0, "max_inside": 0}

    @process_locked("deco-tasks")
    async def work():
        state["inside"] += 1
        state["max_inside"] = max(state["max_inside"], state["inside"])
        for _ in range(3):
            await asyncio.sleep(0)
        state["inside"] -= 1

    async def main():
        await asyncio.gather(*(work() for _ in range(10)))

    asyncio.run(main())
    assert state == {"inside": 0, "max_inside": 1}


def test_cancelling_a_task_waiting_on_another_process_leaves_nothing_held(lock_dir):
    async def main():
        task = asyncio.create_task(ProcessLock("cancel").acquire_async())
        await until(lambda: registry("cancel")["waiters"] == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert registry("cancel")["owners"] == 0
        assert registry("cancel")["waiters"] == 0

    with held_by_child("cancel", lock_dir):
        asyncio.run(main())
    # Another process can now take it (the helper thread lets go of whatever it got).
    with held_by_child("cancel", lock_dir):
        pass
    assert registry("cancel")["owners"] == 0
    with ProcessLock("cancel", timeout=10):
        pass


def test_cancelling_a_task_waiting_on_another_task(lock_dir):
    async def main():
        holder = ProcessLock("cancel-task")
        await holder.acquire_async()
        waiter = asyncio.create_task(ProcessLock("cancel-task").acquire_async())
        await until(lambda: registry("cancel-task")["waiters"] == 1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert registry("cancel-task") == {**registry("cancel-task"), "owners": 1, "waiters": 0}
        holder.release()
        assert registry("cancel-task")["owners"] == 0
        async with ProcessLock("cancel-task", blocking=False):
            pass

    asyncio.run(main())


def test_cancelling_a_decorated_coroutine_while_it_waits(lock_dir):
    ran = []

    @process_locked("cancel-deco")
    async def work():
        ran.append(1)

    async def main():
        task = asyncio.create_task(work())
        await until(lambda: registry("cancel-deco")["waiters"] == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with held_by_child("cancel-deco", lock_dir):
        asyncio.run(main())
    assert ran == []
    assert registry("cancel-deco")["owners"] == 0
    asyncio.run(work())
    assert ran == [1]


def test_async_with(lock_dir):
    async def main():
        lock = ProcessLock("awith")
        async with lock as same:
            assert same is lock
            assert lock.locked
            assert registry("awith")["owners"] == 1
        assert not lock.locked
        assert registry("awith")["owners"] == 0

    asyncio.run(main())


def test_async_timeout_option_gives_lock_timeout_error(lock_dir):
    async def main():
        with pytest.raises(LockTimeoutError):
            async with ProcessLock("atimeout", timeout=0.02):
                pass
        with pytest.raises(LockHeldError) as info:
            await ProcessLock("atimeout", blocking=False).acquire_async()
        assert type(info.value) is LockHeldError
        with pytest.raises(LockTimeoutError):
            await ProcessLock("atimeout").acquire_async(timeout=0.02)

        @process_locked("atimeout", timeout=0.02)
        async def work():
            return "ran"

        with pytest.raises(LockTimeoutError):
            await work()
        assert registry("atimeout")["waiters"] == 0

    with held_by_child("atimeout", lock_dir):
        asyncio.run(main())


def test_wait_for_timeout_leaves_nothing_held(lock_dir):
    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(ProcessLock("waitfor").acquire_async(), 0.02)
        assert registry("waitfor")["owners"] == 0
        assert registry("waitfor")["waiters"] == 0

    with held_by_child("waitfor", lock_dir):
        asyncio.run(main())
    with ProcessLock("waitfor", timeout=10):
        pass


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is new in 3.11")
def test_asyncio_timeout_leaves_nothing_held(lock_dir):
    async def main():
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.02), ProcessLock("ctxtimeout"):
                pass
        assert registry("ctxtimeout")["owners"] == 0
        assert registry("ctxtimeout")["waiters"] == 0

    with held_by_child("ctxtimeout", lock_dir):
        asyncio.run(main())


def test_task_waiting_for_a_lock_its_thread_holds_is_refused(lock_dir):
    async def main():
        with pytest.raises(ProcLockError, match="event loop"):
            await asyncio.wait_for(ProcessLock("own-thread").acquire_async(), 10)

        @process_locked("own-thread")
        async def work():
            return "ran"

        with pytest.raises(ProcLockError):
            await asyncio.wait_for(work(), 10)

    with ProcessLock("own-thread"):
        asyncio.run(main())
    assert registry("own-thread")["waiters"] == 0


def test_sync_wait_inside_a_task_for_a_lock_another_task_holds_is_refused(lock_dir):
    async def main():
        holder = ProcessLock("sync-in-task")
        await holder.acquire_async()

        async def blocking_inside():
            ProcessLock("sync-in-task").acquire()  # would block the loop forever

        with pytest.raises(ProcLockError, match="event loop"):
            await asyncio.create_task(blocking_inside())
        holder.release()

    asyncio.run(main())
    assert registry("sync-in-task")["owners"] == 0


def test_reentry_by_the_same_task_is_counted(lock_dir):
    async def main():
        outer = ProcessLock("areent")
        async with outer, ProcessLock("areent"):
            assert registry("areent")["owners"] == 1
        assert registry("areent")["owners"] == 0
        with pytest.raises(ProcLockError):
            async with ProcessLock("areent", reentrant=False):
                await ProcessLock("areent", reentrant=False).acquire_async()

    asyncio.run(main())


def test_debug_logging_of_an_async_wait(lock_dir, caplog):
    caplog.set_level(logging.DEBUG, logger="proclock")

    async def main():
        holder = ProcessLock("alog")
        await holder.acquire_async()
        waiter = asyncio.create_task(ProcessLock("alog").acquire_async())
        await until(lambda: registry("alog")["waiters"] == 1)
        await asyncio.sleep(0.05)  # a measurable wait, for the duration in the log line
        holder.release()
        (await waiter).release()

    asyncio.run(main())
    records = [r for r in caplog.records if r.name == "proclock"]
    messages = [r.getMessage() for r in records]
    assert any(m.startswith("waiting for 'alog'") for m in messages), messages
    durations = [re.search(r"^acquired 'alog'.* after (\d+\.\d+)s", m) for m in messages]
    assert max(float(d.group(1)) for d in durations if d) >= 0.04, messages
    assert sum(m.startswith("released 'alog'") for m in messages) == 2
    assert all(r.levelno == logging.DEBUG for r in records)
