"""Targets for child processes of test_backend_redis.py (importable under spawn)."""

from __future__ import annotations

import os
import time

import proclock
from proclock.backends import RedisBackend


def count(url, ns, counter, rounds, barrier):
    """Increment the number in `counter` `rounds` times through @process_locked."""

    @proclock.process_locked("counter", backend=RedisBackend(url, namespace=ns))
    def bump():
        with open(counter, "r+") as f:
            value = int(f.read() or "0")
            time.sleep(0.0005)  # widen the read-modify-write window a lost update needs
            f.seek(0)
            f.write(f"{value + 1:012d}")

    barrier.wait(30)
    for _ in range(rounds):
        bump()


def hold(url, ns, name, ttl, locked, release, report=None):  # noqa: PLR0917
    """Hold `name` until `release` is set (or the lock is lost); report how it ended.

    `report` (a Queue) gets ("fence", n) once held, then ("lost", reason) from on_lost and
    ("release", "ok" | "LockLostError: ...") from the end of the `with` block.
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


def acquire_once(url, ns, name, report):
    """Take `name` once (waiting), report its fencing token and release."""
    with proclock.ProcessLock(name, backend=RedisBackend(url, namespace=ns), timeout=20) as lock:
        report.put(lock.fencing_token)


def wait_then_stamp(url, ns, name, waiting, report):
    """Wait for `name`; report time.perf_counter() the moment it is ours (CLOCK_MONOTONIC)."""
    lock = proclock.ProcessLock(name, backend=RedisBackend(url, namespace=ns), timeout=20)
    waiting.set()
    lock.acquire()
    report.put(time.perf_counter())
    lock.release()


def pid():
    return os.getpid()
