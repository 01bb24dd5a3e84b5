"""Shared fixtures: a private lock directory per test, and spawn-context helpers."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import sys
from pathlib import Path

import pytest

import proclock

SPAWN = multiprocessing.get_context("spawn")
FORK = multiprocessing.get_context("fork")
TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))  # so that spawned children can import tests' helper modules


@pytest.fixture
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh lock directory, also exported as PROCLOCK_DIR (children inherit it)."""
    d = tmp_path / "locks"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("PROCLOCK_DIR", str(d))
    return d


@pytest.fixture
def fd_count():
    """Number of open descriptors of this process, as a callable."""

    def count() -> int:
        # Files only: earlier tests' pipes (multiprocessing) and sockets (database and Redis
        # connections) are closed by garbage collection and backend threads at times of their
        # own. Lock files are files; collect first so that nothing of theirs is pending either.
        gc.collect()
        total = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue  # the listing's own descriptor, already closed
            total += target.startswith("/")
        return total

    return count


@pytest.fixture(autouse=True)
def _no_leftover_holds():
    """Each test starts and ends with nothing held by this process."""
    yield
    from proclock import _core

    held = {p: s for p, s in _core.snapshot().items() if s["owners"] or s["waiters"]}
    if held:  # release them, so that one failure does not fail every later test of the worker
        for hold in _core.holds():
            while hold.state == _core.HELD:
                with contextlib.suppress(Exception):  # a lost hold: given back all the same
                    _core.give(hold)
            _core._holds.pop(hold.key, None)
    assert not held, f"test left locks held: {held}"


__all__ = ["FORK", "SPAWN", "TESTS", "proclock"]
