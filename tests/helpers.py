"""Helpers shared by the test modules (not child-process targets: those are in children.py)."""

from __future__ import annotations

import fcntl
import os
import threading
from contextlib import contextmanager

from children import hold
from conftest import SPAWN
from proclock import LockHeldError, ProcessLock, lock_path


def taken_elsewhere(name, **options):
    """True if another thread of this process cannot take `name` right now."""
    result = []

    def attempt():
        lock = ProcessLock(name, blocking=False, **options)
        try:
            lock.acquire()
        except LockHeldError:
            result.append(True)
        else:
            lock.release()
            result.append(False)

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join(30)
    return result[0]


@contextmanager
def held_by_another_description(name):
    """Hold `name` through an open file description of our own, as another process would."""
    fd = os.open(lock_path(name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


@contextmanager
def held_by_child(name, lock_dir, *, shared=False):
    """A spawned process holds `name`; `child.release.set()` frees it early, exiting always does."""
    locked, release = SPAWN.Event(), SPAWN.Event()
    child = SPAWN.Process(target=hold, args=(name, str(lock_dir), locked, release, shared))
    child.start()
    child.release = release
    try:
        assert locked.wait(30), "the child never took the lock"
        yield child
    finally:
        release.set()
        child.join(timeout=30)
    assert child.exitcode == 0
