"""Targets for the semaphore tests' child processes (importable under the spawn start method)."""

from __future__ import annotations

import json
import os
import threading
import time

import proclock

MANY = "many"


@proclock.process_limited(MANY, limit=3)
def limited_call(log, inside, peak):
    """Record (enter, exit, slot) of one call, and count the callers inside at once."""
    entered = time.monotonic()
    slot = proclock.current_slot(MANY)
    with inside.get_lock():
        inside.value += 1
        peak.value = max(peak.value, inside.value)
    total = 0
    until = time.monotonic() + 0.0005
    while time.monotonic() < until:  # half a millisecond of work inside: calls overlap
        total += 1
    with inside.get_lock():
        inside.value -= 1
    log.append((entered, time.monotonic(), slot, os.getpid()))
    return total


def limited_worker(calls, start, out_dir, inside, peak):
    """`calls` calls of limited_call; their records go to `out_dir/<pid>.json`."""
    log = []
    start.wait(30)
    for _ in range(calls):
        limited_call(log, inside, peak)
    with open(os.path.join(out_dir, f"{os.getpid()}.json"), "w") as f:
        json.dump(log, f)


def hold_slots(name, limit, count, lock_dir, locked, release, indexes):  # noqa: PLR0917
    """Hold `count` slots of `name` (one thread each) until `release`; `indexes` gets them."""
    sem = proclock.ProcessSemaphore(name, limit=limit, lock_dir=lock_dir)
    ready = threading.Barrier(count + 1)
    errors = []

    def run(k):
        try:
            with sem as slot:
                indexes[k] = slot.index
                ready.wait(30)
                release.wait(60)
        except BaseException as exc:
            errors.append(exc)
            ready.abort()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(count)]
    for thread in threads:
        thread.start()
    ready.wait(30)
    locked.set()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def hold_slot_forever(name, limit, lock_dir, locked, index):
    """Hold one slot until killed."""
    with proclock.ProcessSemaphore(name, limit=limit, lock_dir=lock_dir) as slot:
        index.value = slot.index
        locked.set()
        while True:
            time.sleep(60)


def ask_with_limit(name, limit, lock_dir, answers):
    """Take and release one slot with `limit`; `answers` gets "ok" or the error's text."""
    try:
        with proclock.ProcessSemaphore(name, limit=limit, lock_dir=lock_dir, timeout=30):
            pass
    except ValueError as exc:
        answers.put(f"ValueError: {exc}")
    else:
        answers.put("ok")


def try_slot(name, limit, lock_dir):
    """Exit 0 if a slot of `name` can be taken at once (it is released again), 1 if full."""
    sem = proclock.ProcessSemaphore(name, limit=limit, lock_dir=lock_dir, blocking=False)
    try:
        sem.acquire()
    except proclock.SemaphoreFullError:
        raise SystemExit(1) from None
    sem.release()


def interrupted_waiter(name, lock_dir, release, result, backend=None):
    """Wait for a full semaphore in the main thread until Ctrl-C (SIGINT) interrupts it.

    `result` gets "ok" if nothing stayed held and both slots are taken once `release` is set.
    """
    import signal

    from proclock import _core

    sem = proclock.ProcessSemaphore(name, limit=2, lock_dir=lock_dir, backend=backend)

    def interrupt():
        while (
            waits_on_slots(backend, name, 2) < 2
        ):  # the head waits on both slots (in the kernel, or the server)
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    try:
        sem.acquire()
    except KeyboardInterrupt:
        pass
    else:
        result.put("acquired instead of being interrupted")
        return
    if _core.snapshot():
        result.put(f"left behind: {_core.snapshot()}")
        return
    release.set()
    first = sem.acquire(timeout=10)
    other = []
    thread = threading.Thread(target=lambda: other.append(sem.acquire(timeout=10).index))
    thread.start()
    thread.join(30)
    result.put("ok" if sorted([first.index, *other]) == [0, 1] else f"slots {first.index} {other}")
    first.release()


def hold_two(name, backend, locked, release):
    """Hold both slots of `name` (limit 2) on `backend`, one thread each, until `release`."""
    sem = proclock.ProcessSemaphore(name, limit=2, backend=backend)
    ready = threading.Barrier(3)

    def run():
        with sem:
            ready.wait(30)
            release.wait(60)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    ready.wait(30)
    locked.set()
    for thread in threads:
        thread.join()


def backend_worker(name, limit, backend, calls, start, inside, peak, slots_seen):  # noqa: PLR0917
    """`calls` acquisitions of `name` on `backend`, counting the holders inside at once."""
    sem = proclock.ProcessSemaphore(name, limit=limit, backend=backend, timeout=60)
    start.wait(30)
    for _ in range(calls):
        with sem as slot:
            with inside.get_lock():
                inside.value += 1
                peak.value = max(peak.value, inside.value)
                if slots_seen[slot.index]:
                    raise SystemExit(5)  # two holders of one slot at once
                slots_seen[slot.index] = 1
            until = time.monotonic() + 0.001
            while time.monotonic() < until:
                pass
            with inside.get_lock():
                slots_seen[slot.index] = 0
                inside.value -= 1


def hold_backend_slot_forever(name, limit, backend, locked, index):
    """Hold one slot of `name` on `backend` until killed."""
    with proclock.ProcessSemaphore(name, limit=limit, backend=backend) as slot:
        index.value = slot.index
        locked.set()
        while True:
            time.sleep(60)


def ask_backend_limit(name, limit, backend, answers):
    try:
        with proclock.ProcessSemaphore(name, limit=limit, backend=backend, timeout=30):
            pass
    except ValueError as exc:
        answers.put(f"ValueError: {exc}")
    else:
        answers.put("ok")


def waits_on_slots(backend, name, limit):
    """Waits on the slots of `name` now in progress, as the kernel or the server shows them.

    flock: this process's parked helpers; PostgreSQL: sessions queued for an advisory lock;
    Redis: waiters queued on the slots (the sorted sets NAMESPACE:queue:SLOT).
    """
    if backend is None:
        from proclock.backends import flock

        return flock.parked_waits()
    if backend.startswith("redis"):
        import redis

        client = redis.Redis.from_url(backend)
        try:
            queues = [f"proclock:queue:{name}\x1fslot-{i}" for i in range(limit)]
            return sum(client.zcard(queue) for queue in queues)
        finally:
            client.close()
    import psycopg

    with psycopg.connect(backend, autocommit=True) as conn:
        sql = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        return conn.execute(sql).fetchone()[0]
