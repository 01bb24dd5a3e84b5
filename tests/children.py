"""Targets for child processes (importable under the spawn start method)."""

from __future__ import annotations

import os
import time

import proclock


def hold(name, lock_dir, locked, release, shared=False):
    """Hold `name` until `release` is set; `locked` is set once it is held."""
    with proclock.ProcessLock(name, lock_dir=lock_dir, shared=shared):
        locked.set()
        if not release.wait(30):
            raise SystemExit(3)


def hold_path(path, locked, release):
    with proclock.ProcessLock(path=path):
        locked.set()
        if not release.wait(30):
            raise SystemExit(3)


def hold_forever(name, lock_dir, locked):
    """Hold until killed."""
    with proclock.ProcessLock(name, lock_dir=lock_dir):
        locked.set()
        while True:
            time.sleep(60)


def pid_file_write(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
