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

# The suite starts a few hundred interpreters (spawned children, CLI runs). Let them compile
# proclock and the test helpers once and reuse the bytecode: with PYTHONDONTWRITEBYTECODE set
# (some images set it) each child compiled them again, a quarter of the suite's time.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

SPAWN = multiprocessing.get_context("spawn")
POSTGRES_URL = os.environ.get(
    "PROCLOCK_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("PROCLOCK_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# CI (.ci/run) sets it: a missing server or driver then fails the tests that need it.
REQUIRED = os.environ.get("PROCLOCK_REQUIRE_SERVICES") == "1"


def unusable(reason: str):
    """Skip the test for want of a server or driver; in CI (REQUIRED), fail it instead."""
    if REQUIRED:
        pytest.fail(f"{reason} (PROCLOCK_REQUIRE_SERVICES=1 turns this skip into a failure)")
    pytest.skip(reason)


def require_module(name: str, extra: str):
    """Import a driver for a test module: skipped without it, failed without it in CI."""
    try:
        return __import__(name)
    except ImportError as exc:
        message = f"{name} is not installed (pip install 'proclock[{extra}]'): {exc}"
        if REQUIRED:
            pytest.fail(
                f"{message} (PROCLOCK_REQUIRE_SERVICES=1 turns this skip into a failure)",
                pytrace=False,
            )
        pytest.skip(message, allow_module_level=True)


@pytest.fixture(scope="session")
def postgres_url():
    """The PostgreSQL server of the backend tests, checked to answer."""
    psycopg = require_module("psycopg", "postgres")
    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=3).close()
    except psycopg.Error as exc:
        unusable(
            f"PostgreSQL is not reachable at {POSTGRES_URL} ($PROCLOCK_TEST_POSTGRES_URL): {exc}"
        )
    return POSTGRES_URL


@pytest.fixture(scope="session")
def redis_url():
    """The Redis server of the backend tests, checked to answer."""
    redis = require_module("redis", "redis")
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        unusable(f"no Redis server at {REDIS_URL} ($PROCLOCK_TEST_REDIS_URL): {exc}")
    finally:
        client.close()
    return REDIS_URL


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


__all__ = ["FORK", "POSTGRES_URL", "REDIS_URL", "REQUIRED", "SPAWN", "TESTS", "proclock"]


def lock_file(name: str, **kwargs: Path | str) -> Path:
    """`proclock.lock_path(name)` as a Path, for tests that look at the file (it is a str)."""
    return Path(proclock.lock_path(name, **kwargs))
