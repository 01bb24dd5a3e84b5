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
