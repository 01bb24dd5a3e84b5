"""ProcessSemaphore and @process_limited: at most N at once, across processes, threads, tasks."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import pickle
import signal
import sys
import threading
import time

import pytest

import proclock
from conftest import SPAWN, TESTS
from proclock import (
    LockHeldError,
    LockTimeoutError,
    ProcessSemaphore,
    ProcLockError,
    SemaphoreFullError,
    SemaphoreTimeoutError,
    _core,
    current_slot,
    process_limited,
)
from proclock._semaphore import parse_limit_record
from proclock.backends import flock
from semaphore_children import (
    MANY,
    ask_with_limit,
    hold_slot_forever,
    hold_slots,
    interrupted_waiter,
    limited_worker,
    try_slot,
)


def other_thread(fn):
    """Run `fn` in another thread of this process; its result, or raise its exception."""
    out = []

    def run():
        try:
            out.append((True, fn()))
        except BaseException as exc:
            out.append((False, exc))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    ok, value = out[0]
    if not ok:
        raise value
    return value


class HeldInThread:
    """Another thread of this process holds a slot of `sem` (a live thread: its id is its own)."""

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


class HeldByChild:
    """A spawned process holds `count` slots of `name` until `release()` (or the end)."""

    def __init__(self, name, limit, count, lock_dir):
        self.locked, self.release_event = SPAWN.Event(), SPAWN.Event()
        self.indexes = SPAWN.Array("i", [-1] * count)
        self.child = SPAWN.Process(
            target=hold_slots,
            args=(name, limit, count, str(lock_dir), self.locked, self.release_event, self.indexes),
        )

    def __enter__(self):
        self.child.start()
        assert self.locked.wait(30), "the child never took its slots"
        return self

    def release(self):
        self.release_event.set()
        self.child.join(30)
        assert self.child.exitcode == 0

    def __exit__(self, *exc):
        self.release_event.set()
        self.child.join(30)
        assert self.child.exitcode == 0


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


# -- the API ----------------------------------------------------------------------------------


def test_slots_are_distinct_and_numbered(lock_dir):
    sem = ProcessSemaphore("gpu", limit=2)
    with sem as first:
        assert first.index in (0, 1)
        assert current_slot("gpu") == first.index
        with HeldInThread(sem) as second:  # a thread takes a slot of its own
            assert {first.index, second.index} == {0, 1}
            holders = sem.holders()
            assert sorted(h.slot for h in holders) == [0, 1]
            assert all(h.pid == os.getpid() for h in holders)
            assert all(h.name == "gpu" for h in holders)
            assert isinstance(holders[0], proclock.Holder)
            with pytest.raises(SemaphoreFullError) as info:
                other_thread(lambda: sem.acquire(blocking=False))
    assert sem.holders() == []
    message = str(info.value)
    assert "'gpu'" in message
    assert "limit 2" in message
    assert f"slot 0: pid {os.getpid()}" in message
    assert f"slot 1: pid {os.getpid()}" in message


def test_acquire_returns_the_slot_and_with_on_it_releases_that_hold(lock_dir):
    sem = ProcessSemaphore("one-hold", limit=3)
    slot = sem.acquire()
    assert sem.locked
    with slot as same:
        assert same is slot
        assert slot.held
    assert not slot.held
    assert not sem.locked
    with sem.acquire(timeout=1) as slot:
        assert slot.semaphore is sem
    assert not sem.locked


def test_reentry_counts_on_the_held_slot(lock_dir):
    sem = ProcessSemaphore("reenter", limit=2)
    with sem as outer:
        with sem as inner:
            assert inner.index == outer.index
            assert _core.snapshot()[sem.path]["holds"] == 2
            # The other slot is still free: re-entry took none.
            other_thread(lambda: sem.acquire(blocking=False).release())
        assert sem.locked
    assert not sem.locked
    strict = ProcessSemaphore("reenter", limit=2, reentrant=False)
    with strict, pytest.raises(ProcLockError, match="reentrant=False"):
        strict.acquire()


def test_decorator_injects_nothing_and_current_slot_names_the_slot(lock_dir):
    seen = []

    @process_limited("gpu-deco", limit=2)
    def infer(batch):
        seen.append((batch, current_slot("gpu-deco")))
        return batch * 2

    assert infer(21) == 42
    assert seen == [(21, 0)]
    with pytest.raises(ProcLockError, match="holds no slot"):
        current_slot("gpu-deco")


def test_templates_name_one_semaphore_per_value(lock_dir):
    @process_limited("export-{tenant}", limit=1, blocking=False)
    def export(tenant, inner=None):
        return inner() if inner else current_slot(f"export-{tenant}")

    assert export("a") == 0
    # Another tenant's semaphore is another one: taken while "a"'s is held.
    assert export("a", inner=lambda: other_thread(lambda: export("b"))) == 0
    with pytest.raises(SemaphoreFullError):
        export("a", inner=lambda: other_thread(lambda: export("a")))


def test_on_contention_skip_and_exit(lock_dir):
    calls = []

    @process_limited("skip", limit=1, on_contention="skip", blocking=False)
    def skipped():
        calls.append(1)

    @process_limited("skip", limit=1, on_contention="exit", exit_code=7, blocking=False)
    def exits():
        calls.append(2)

    with ProcessSemaphore("skip", limit=1):
        assert other_thread(skipped) is None
        with pytest.raises(SystemExit) as info:
            other_thread(exits)
    assert info.value.code == 7
    assert calls == []


def test_options_are_validated_once_naming_the_option(lock_dir):
    with pytest.raises(TypeError, match="limit must be an int"):
        ProcessSemaphore("x", limit=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit=0"):
        process_limited("x", limit=0)
    with pytest.raises(ValueError, match="limit=65"):
        ProcessSemaphore("x", limit=65)
    with pytest.raises(ValueError, match="blocking=False with timeout"):
        process_limited("x", limit=2, blocking=False, timeout=1)
    with pytest.raises(ValueError, match="on_contention"):
        process_limited("x", limit=2, on_contention="wait")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        process_limited("x")  # type: ignore[call-arg]


def test_network_backends_are_refused_rather_than_polled():
    class Fake:
        capabilities = frozenset({"local"})

        def __repr__(self):
            return "fake"

    fake = Fake()
    for method in ("location", "try_acquire", "acquire", "acquire_async", "release", "holder"):
        setattr(fake, method, lambda *_: None)
    with pytest.raises(ValueError, match="without polling"):
        ProcessSemaphore("x", limit=2, backend=fake)


def test_ctrl_c_while_waiting_leaves_nothing_held(lock_dir):
    with HeldByChild("ctrl-c", 2, 2, lock_dir) as child:
        result = SPAWN.Queue()
        proc = SPAWN.Process(
            target=interrupted_waiter, args=("ctrl-c", str(lock_dir), child.release_event, result)
        )
        proc.start()
        answer = result.get(timeout=60)
        proc.join(30)
    assert answer == "ok"
    assert proc.exitcode == 0


def test_a_decorated_generator_holds_its_slot_until_exhausted(lock_dir):
    @process_limited("gen", limit=2)
    def produce():
        yield current_slot("gen")
        yield current_slot("gen")

    gen = produce()
    assert next(gen) == 0
    assert ProcessSemaphore("gen", limit=2).holders()[0].slot == 0
    assert list(gen) == [0]
    assert ProcessSemaphore("gen", limit=2).holders() == []


def test_errors_pickle_and_are_the_lock_errors(lock_dir):
    full = SemaphoreFullError("/p", "gpu", 2, [], 0.5, 2)
    timed = SemaphoreTimeoutError("/p", "gpu", 2, [], 1.0, 1)
    assert isinstance(full, LockHeldError)
    assert not isinstance(full, LockTimeoutError)
    assert isinstance(timed, SemaphoreFullError)
    assert isinstance(timed, LockTimeoutError)
    assert isinstance(timed, TimeoutError)
    for error in (full, timed):
        again = pickle.loads(pickle.dumps(error))  # noqa: S301  (our own bytes)
        assert type(again) is type(error)
        assert str(again) == str(error)
        assert again.limit == 2


def test_limit_one_behaves_like_process_locked(lock_dir):
    sem = ProcessSemaphore("solo", limit=1)
    with sem as slot:
        assert slot.index == 0
        with pytest.raises(LockHeldError):
            other_thread(lambda: sem.acquire(blocking=False))
        with pytest.raises(LockTimeoutError):
            other_thread(lambda: sem.acquire(timeout=0.05))
        with pytest.raises(ProcLockError, match="reentrant=False"):
            ProcessSemaphore("solo", limit=1, reentrant=False).acquire()
    with HeldByChild("solo", 1, 1, lock_dir) as child:
        assert SPAWN.Process  # the child holds the only slot
        proc = SPAWN.Process(target=try_slot, args=("solo", 1, str(lock_dir)))
        proc.start()
        proc.join(30)
        assert proc.exitcode == 1
        child.release()
    proc = SPAWN.Process(target=try_slot, args=("solo", 1, str(lock_dir)))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0


# -- the limit record ----------------------------------------------------------------------------


def test_a_process_asking_another_limit_gets_a_value_error_naming_both(lock_dir):
    answers = SPAWN.Queue()
    with HeldByChild("limits", 2, 1, lock_dir):
        for limit in (3, 2):
            proc = SPAWN.Process(
                target=ask_with_limit, args=("limits", limit, str(lock_dir), answers)
            )
            proc.start()
            proc.join(30)
            assert proc.exitcode == 0
        refused, accepted = answers.get(timeout=30), answers.get(timeout=30)
    assert refused.startswith("ValueError")
    assert "limit=2" in refused
    assert "limit=3" in refused
    assert "'limits'" in refused
    assert accepted == "ok"
    # In this process too, before anything could be counted as re-entry.
    with (
        ProcessSemaphore("limits", limit=2),
        pytest.raises(ValueError, match=r"limit=2.*limit=5"),
    ):
        ProcessSemaphore("limits", limit=5).acquire()


def test_the_limit_is_recorded_in_the_turnstile(lock_dir):
    sem = ProcessSemaphore("recorded", limit=4)
    with sem:
        pass
    with open(sem.path, "rb") as f:
        assert parse_limit_record(f.read()) == ("recorded", 4)
    # Slot files are made when first tried: an uncontended semaphore has used slot 0 only.
    names = sorted(n.split("-")[0] for n in os.listdir(lock_dir))
    assert names == ["recorded_slot", "recorded_turnstile"]


# -- processes -----------------------------------------------------------------------------------


def test_eight_processes_never_more_than_three_inside(lock_dir, tmp_path):
    workers, calls = 8, 50
    out = tmp_path / "out"
    out.mkdir()
    start = SPAWN.Barrier(workers)
    inside, peak = SPAWN.Value("i", 0), SPAWN.Value("i", 0)
    procs = [
        SPAWN.Process(target=limited_worker, args=(calls, start, str(out), inside, peak))
        for _ in range(workers)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    records = []
    for path in out.iterdir():
        records.extend(json.loads(path.read_text()))
    assert len(records) == workers * calls  # no call lost
    assert peak.value <= 3
    assert peak.value >= 2  # they did overlap (or the test proves nothing)
    events = sorted(
        [(t0, 1, slot) for t0, _, slot, _ in records]
        + [(t1, -1, slot) for _, t1, slot, _ in records]
    )
    holding: set[int] = set()
    for _, kind, slot in sorted(events, key=lambda e: (e[0], e[1])):
        if kind == 1:
            assert slot not in holding, "two simultaneous holders of one slot"
            holding.add(slot)
            assert len(holding) <= 3
        else:
            holding.discard(slot)
    assert {slot for _, _, slot, _ in records} <= {0, 1, 2}
    assert MANY


def test_sigkill_of_a_slot_holder_lets_a_waiter_in_at_once(lock_dir):
    procs, indexes = [], []
    for _ in range(2):
        locked, index = SPAWN.Event(), SPAWN.Value("i", -1)
        proc = SPAWN.Process(
            target=hold_slot_forever, args=("kill", 2, str(lock_dir), locked, index)
        )
        proc.start()
        assert locked.wait(30)
        procs.append(proc)
        indexes.append(index)
    try:
        sem = ProcessSemaphore("kill", limit=2)
        with pytest.raises(SemaphoreFullError):
            sem.acquire(blocking=False)
        got = []
        waiting = threading.Event()

        def waiter():
            waiting.set()
            with sem.acquire(timeout=30) as slot:
                got.append((time.monotonic(), slot.index))

        thread = threading.Thread(target=waiter)
        thread.start()
        assert waiting.wait(30)
        assert flock_waiters_reach(2)  # the head waits on both slots in the kernel
        killed = time.monotonic()
        os.kill(procs[1].pid, signal.SIGKILL)
        thread.join(30)
        assert got, "the waiter never got in"
        assert got[0][1] == indexes[1].value
        assert got[0][0] - killed < 2.0
    finally:
        for proc in procs:
            proc.kill()
            proc.join(30)


def flock_waiters_reach(n, timeout=30.0):
    deadline = time.monotonic() + timeout
    while flock.parked_waits() < n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def test_timeout_is_accurate_and_the_error_names_the_holders(lock_dir):
    with HeldByChild("timed", 2, 2, lock_dir) as child:
        sem = ProcessSemaphore("timed", limit=2)
        start = time.monotonic()
        with pytest.raises(SemaphoreTimeoutError) as info:
            sem.acquire(timeout=0.3)
        waited = time.monotonic() - start
        assert 0.3 <= waited < 1.3
        error = info.value
        assert isinstance(error, LockTimeoutError)
        assert 0.3 <= error.waited < 1.3
        assert sorted(h.slot for h in error.holders) == [0, 1]
        assert {h.pid for h in error.holders} == {child.child.pid}
        assert f"pid {child.child.pid}" in str(error)
        assert "limit 2" in str(error)
        # No parked wait outlives its use holding anything: a slot freed now is taken.
        child.release()
        with sem.acquire(timeout=5) as slot:
            assert slot.index in (0, 1)


def test_a_waiter_gets_the_slot_freed_by_another_process(lock_dir):
    with HeldByChild("handoff", 2, 2, lock_dir) as child:
        sem = ProcessSemaphore("handoff", limit=2)
        got = []

        def waiter():
            with sem as slot:
                got.append(slot.index)

        thread = threading.Thread(target=waiter)
        thread.start()
        assert flock_waiters_reach(2)
        assert not got
        child.release()
        thread.join(30)
        assert got
        assert got[0] in (0, 1)


def test_waiters_queue_on_the_turnstile_and_all_get_in(lock_dir):
    sem = ProcessSemaphore("queue", limit=2)
    results = []
    with HeldByChild("queue", 2, 2, lock_dir) as child:
        threads = [
            threading.Thread(target=lambda: results.append(sem.acquire(timeout=30).release()))
            for _ in range(6)
        ]
        for thread in threads:
            thread.start()
        assert flock_waiters_reach(2)
        child.release()
        for thread in threads:
            thread.join(30)
    assert results == [None] * 6


def test_fork_child_holds_nothing_of_the_parent(lock_dir):
    sem = ProcessSemaphore("forked", limit=2)
    with sem as slot:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                os.close(read)
                try:
                    current_slot("forked")
                    code = 2
                except ProcLockError:
                    pass
                sem.release()  # the parent's hold: does nothing here
                with sem.acquire(blocking=False) as mine:
                    if mine.index == slot.index:
                        code = 3
                try:
                    sem.acquire(blocking=False)
                    sem.release()
                except SemaphoreFullError:
                    code = code or 0
                os.write(write, b"done")
            except BaseException:
                code = 4
            os._exit(code)
        os.close(write)
        assert os.read(read, 4) == b"done"
        os.close(read)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert slot.held
        # The parent's slot is still held: another process finds one slot free only.
        assert current_slot("forked") == slot.index
        with HeldInThread(sem), pytest.raises(SemaphoreFullError):
            other_thread(lambda: sem.acquire(blocking=False))


# -- asyncio ------------------------------------------------------------------------------------


def test_64_tasks_limit_4_and_the_loop_keeps_ticking(lock_dir):
    tasks_n, limit = 64, 4
    state = {"inside": 0, "peak": 0, "ran": 0, "slots": set()}

    @process_limited("async-many", limit=limit)
    async def critical():
        state["inside"] += 1
        state["peak"] = max(state["peak"], state["inside"])
        slot = current_slot("async-many")
        assert slot not in state["slots"]
        state["slots"].add(slot)
        await asyncio.sleep(0.002)
        state["slots"].discard(slot)
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
        await until(lambda: flock.parked_waits() >= limit)
        start = len(ticks)
        await until(lambda: len(ticks) >= start + 5, timeout=10)
        assert state["ran"] == 0
        release()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        tick_task.cancel()
        return ticks

    with HeldByChild("async-many", limit, limit, lock_dir) as child:
        ticks = asyncio.run(main(child.release_event.set))
    assert state["ran"] == tasks_n
    assert 2 <= state["peak"] <= limit
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert max(gaps) < 0.5, f"the event loop was blocked for {max(gaps):.3f}s"


async def until(predicate, timeout=30):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.001)


def test_cancelling_a_waiting_task_leaves_no_slot_held(lock_dir):
    sem = ProcessSemaphore("cancel", limit=2)

    async def main(release):
        task = asyncio.create_task(sem.acquire_async())
        await until(lambda: flock.parked_waits() >= 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not sem.locked
        release()

    with HeldByChild("cancel", 2, 2, lock_dir) as child:
        asyncio.run(main(child.release_event.set))
        child.child.join(30)
    # Both slots free again for another process: nothing of the cancelled wait holds one.
    assert _core.snapshot() == {}
    assert wait_for_free("cancel", 2, lock_dir)


def wait_for_free(name, limit, lock_dir, timeout=30.0):
    """True once another process can take a slot, twice in a row (abandoned waits let go)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sem = ProcessSemaphore(name, limit=limit, lock_dir=lock_dir)
        with sem.acquire(timeout=5) as a, HeldInThread(sem) as b:
            if {a.index, b.index} == set(range(limit)):
                return True
    return False


def test_async_with_gives_the_slot(lock_dir):
    async def main():
        sem = ProcessSemaphore("async-with", limit=2)
        async with sem as slot:
            assert slot.index == 0
            assert current_slot("async-with") == 0
            other = await asyncio.create_task(sem.acquire_async())
            assert other.index == 1
            with pytest.raises(SemaphoreFullError):
                await asyncio.create_task(sem.acquire_async(blocking=False))
            other.release()
        assert not sem.locked

    asyncio.run(main())


def test_the_docs_examples_run(lock_dir):
    sys.path.insert(0, str(TESTS / "typing"))
    try:
        import semaphore_examples

        semaphore_examples.run_all()
    finally:
        sys.path.remove(str(TESTS / "typing"))


def test_past_the_parked_helpers_bound_a_head_falls_back_to_the_documented_back_off(
    lock_dir, monkeypatch
):
    monkeypatch.setattr(flock, "PARKED_MAX", 0)  # every helper slot taken, as it were
    with HeldByChild("bound", 2, 2, lock_dir) as child:
        sem = ProcessSemaphore("bound", limit=2)
        with pytest.raises(SemaphoreTimeoutError):
            sem.acquire(timeout=0.05)
        got = []
        thread = threading.Thread(target=lambda: got.append(sem.acquire(timeout=30).index))
        thread.start()
        child.release()
        thread.join(30)
    assert got[0] in (0, 1)
    sem.release()


def test_an_async_timeout_is_a_semaphore_timeout(lock_dir):
    async def main():
        sem = ProcessSemaphore("async-timeout", limit=2)
        start = time.monotonic()
        with pytest.raises(SemaphoreTimeoutError) as info:
            await sem.acquire_async(timeout=0.2)
        assert time.monotonic() - start >= 0.2
        assert sorted(h.slot for h in info.value.holders) == [0, 1]
        assert not sem.locked

    with HeldByChild("async-timeout", 2, 2, lock_dir):
        asyncio.run(main())


def test_transfer_on_fork_hands_the_slot_to_the_child(lock_dir):
    sem = ProcessSemaphore("daemon", limit=2)
    slot = sem.acquire()
    index = slot.index
    sem.transfer_on_fork()
    read, write = os.pipe()
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(read)
            os.close(go_write)
            if current_slot("daemon") == index:
                code = 0
            os.write(write, b"held")
            os.read(go_read, 1)  # hold it until the parent has looked
            sem.release()
        finally:
            os._exit(code)
    os.close(write)
    os.close(go_read)
    try:
        assert os.read(read, 4) == b"held"
        assert not slot.held
        assert not sem.locked
        # The child holds `index`: this process gets the other slot, and no more.
        with HeldInThread(sem) as other:
            assert other.index == 1 - index
            with pytest.raises(SemaphoreFullError):
                other_thread(lambda: sem.acquire(blocking=False))
    finally:
        os.write(go_write, b"x")
        os.close(go_write)
        os.close(read)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_sync_wait_in_a_loop_is_refused_only_when_its_own_blockers_fill_every_slot(lock_dir):
    async def main():
        sem = ProcessSemaphore("loop", limit=2)
        held = asyncio.Event()
        done = asyncio.Event()

        async def holder():
            async with sem:
                held.set()
                await done.wait()

        task = asyncio.create_task(holder())
        await held.wait()
        with sem as slot:  # a sync wait inside the loop: the other slot is free
            assert slot.index == 1
            with pytest.raises(ProcLockError, match="another task of this event loop"):
                await asyncio.create_task(_sync_in_task(ProcessSemaphore("loop", limit=2)))
        done.set()
        await task

    asyncio.run(main())


async def _sync_in_task(sem):
    """A task that blocks its loop on `sem` (both slots held by this loop's other owners)."""
    with sem:
        pass


def test_retry_makes_its_attempts_and_the_error_counts_them(lock_dir):
    sem = ProcessSemaphore("retry", limit=1, blocking=False, retry=proclock.Retry(3, delay=0.01))
    with HeldByChild("retry", 1, 1, lock_dir):
        with pytest.raises(SemaphoreFullError) as info:
            sem.acquire()
        assert info.value.attempts == 3
        assert "3 attempts" in str(info.value)


def test_a_turnstile_with_foreign_content_is_refused_and_left_alone(lock_dir):
    sem = ProcessSemaphore("foreign", limit=2)
    with sem:
        pass
    path = sem.path
    with open(path, "w") as f:
        f.write("#!/bin/sh\necho not a lock file\n")
    with pytest.raises(ProcLockError, match="holds something else") as info:
        sem.acquire()
    assert path in str(info.value)
    with open(path) as f:
        assert f.read() == "#!/bin/sh\necho not a lock file\n"
    assert not sem.locked
