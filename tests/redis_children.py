"""Targets for child processes of test_backend_redis.py (importable under spawn)."""

from __future__ import annotations

import proclock
from proclock.backends import RedisBackend


def hold(url, ns, name, ttl, locked, release, report=None):  # noqa: PLR0917
    """Hold `name` until `release` is set (or the lock is lost); report how it ended.

    `report` (a Queue) gets ("fence", n) once held, then ("lost", reason) from on_lost and
    ("release", "ok" | "LockLostError: ...") from the end of the `with` block. A lost lock
    exits with code 7.
    """
    backend = RedisBackend(url, namespace=ns, ttl=ttl)

    def on_lost(error):
        if report is not None:
            report.put(("lost", error.reason))

    try:
        with proclock.ProcessLock(name, backend=backend, on_lost=on_lost) as lock:
            if report is not None:
                report.put(("fence", lock.fencing_token))
            locked.set()
            release.wait(30)
    except proclock.LockLostError as error:
        if report is not None:
            report.put(("release", f"LockLostError: {error.reason}"))
        raise SystemExit(7) from None
    if report is not None:
        report.put(("release", "ok"))


def count_attempts(backend, count):
    """Have `count()` called at each attempt of `backend` (each run of its acquire script)."""
    backend._connect()
    real = backend._scripts[0]

    def counting(*args, **kwargs):
        count()
        return real(*args, **kwargs)

    backend._scripts = (counting, *backend._scripts[1:])


def wait_then_hold(url, ns, name, go, got, release, token, tries):  # noqa: PLR0917
    """Once `go` is set, wait for `name` (ttl 30 s) and hold it until `release` is set.

    `tries` counts this process's attempts (the acquire script's runs) as they are made;
    `token` gets the fencing token; `got` is set once held.
    """
    backend = RedisBackend(url, namespace=ns, ttl=30)

    def count():
        with tries.get_lock():
            tries.value += 1

    count_attempts(backend, count)
    go.wait(30)
    with proclock.ProcessLock(name, backend=backend, timeout=30) as lock:
        token.value = lock.fencing_token
        got.set()
        release.wait(30)


def churn(url, ns, name, marker, seconds, seed, out):  # noqa: PLR0917
    """Take `name` for `seconds` in every way at once: waiting forever, short timeouts, and
    coroutines cancelled mid-wait. Report ("ok", n), overlaps seen through `marker` (a file
    only a holder may create), timeouts, cancellations and the longest wait without timeout.
    """
    import asyncio
    import os
    import random
    import time

    rnd = random.Random(seed)  # noqa: S311  (a reproducible mix, not a secret)
    backend = RedisBackend(url, namespace=ns, ttl=2)
    stats = {"ok": 0, "timeouts": 0, "cancels": 0, "overlaps": 0, "longest": 0.0}

    def critical():
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            stats["overlaps"] += 1
            return
        os.close(fd)
        os.unlink(marker)
        stats["ok"] += 1

    async def cancelled_or_held(lock):
        try:
            await asyncio.wait_for(lock.acquire_async(), rnd.choice([0.0005, 0.002, 0.01]))
        except TimeoutError:
            stats["cancels"] += 1
            return
        try:
            critical()
        finally:
            lock.release()

    loop = asyncio.new_event_loop()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        kind = rnd.random()
        timeout = rnd.choice([None, 0.001, 0.01]) if kind < 0.6 else None
        lock = proclock.ProcessLock(name, backend=backend, timeout=timeout)
        if kind >= 0.8:
            loop.run_until_complete(cancelled_or_held(lock))
            continue
        start = time.monotonic()
        try:
            with lock:
                if timeout is None:
                    stats["longest"] = max(stats["longest"], time.monotonic() - start)
                critical()
        except proclock.LockTimeoutError:
            stats["timeouts"] += 1
    loop.close()
    out.put(stats)
