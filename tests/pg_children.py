"""Targets for test_backend_postgres.py's child processes (importable under spawn)."""

from __future__ import annotations

import os

import proclock
from proclock.backends.postgres import PostgresBackend


def _lock(url, namespace, name, **options):
    return proclock.ProcessLock(name, backend=PostgresBackend(url, namespace=namespace), **options)


def hold(url, namespace, name, locked, release, shared=False):  # noqa: PLR0917  (a process target)
    """Hold `name` until `release` is set; `locked` is set once it is held."""
    with _lock(url, namespace, name, shared=shared):
        locked.set()
        if not release.wait(30):
            raise SystemExit(3)


def fence(url, namespace, name, path, iterations, start):  # noqa: PLR0917
    """Append each hold's fencing token to `path`, under the lock: the order they were taken."""
    lock = _lock(url, namespace, name)
    start.wait(30)
    for _ in range(iterations):
        with lock, open(path, "a") as f:
            f.write(f"{os.getpid()} {lock.fencing_token}\n")


def wait_then_interrupted(url, namespace, name, waiting, interrupted, done):  # noqa: PLR0917
    """Wait for `name` until Ctrl-C (SIGINT) interrupts; stay alive until `done`."""
    lock = _lock(url, namespace, name)
    waiting.set()
    try:
        lock.acquire()
    except KeyboardInterrupt:
        interrupted.set()
    else:
        lock.release()
        raise SystemExit(4)  # it should never have been granted
    if not done.wait(30):
        raise SystemExit(3)
