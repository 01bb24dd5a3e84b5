"""The error tree: relations to the builtins, messages, attributes, and pickling."""

from __future__ import annotations

import os
import pickle
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

import children
import proclock
from conftest import SPAWN
from proclock import (
    AlreadyRunningError,
    Holder,
    LockHeldError,
    LockNameError,
    LockTimeoutError,
    ProcessLock,
    ProcLockError,
    UnsafeLockPathError,
    process_locked,
    singleton_process,
)
from proclock._holder import short_command

PATH = "/run/user/1000/proclock/billing-export-0123456789abcdef.lock"
HOLDER = Holder(
    pid=4242,
    hostname="build-7",
    argv=("python", "-m", "billing", "--all"),
    acquired_at=1_700_000_000.25,
    name="billing-export",
    start_time=987654,
)

# (class name, constructor arguments, attributes that must survive)
ERRORS = [
    pytest.param(
        "ProcLockError",
        ("something went wrong",),
        {"args": ("something went wrong",)},
        id="ProcLockError",
    ),
    pytest.param(
        "LockHeldError",
        (PATH, "billing-export", HOLDER, 0.0),
        {"path": PATH, "name": "billing-export", "holder": HOLDER, "waited": 0.0},
        id="LockHeldError",
    ),
    pytest.param(
        "LockHeldError",
        (PATH,),
        {"path": PATH, "name": None, "holder": None},
        id="LockHeldError-path-only",
    ),
    pytest.param(
        "LockTimeoutError",
        (PATH, "billing-export", HOLDER, 2.5),
        {"path": PATH, "name": "billing-export", "holder": HOLDER, "waited": 2.5},
        id="LockTimeoutError",
    ),
    pytest.param(
        "AlreadyRunningError",
        (PATH, "/srv/app/main.py", HOLDER, 0.0),
        {"path": PATH, "name": "/srv/app/main.py", "holder": HOLDER},
        id="AlreadyRunningError",
    ),
    pytest.param(
        "LockNameError",
        ("a\x00b", "a lock name cannot contain a NUL byte"),
        {"name": "a\x00b", "reason": "a lock name cannot contain a NUL byte"},
        id="LockNameError",
    ),
    pytest.param(
        "UnsafeLockPathError",
        (PATH, "the lock file is a symlink"),
        {"path": PATH, "reason": "the lock file is a symlink", "filename": PATH},
        id="UnsafeLockPathError",
    ),
]


def roundtrip(error: BaseException, protocol: int = pickle.HIGHEST_PROTOCOL) -> BaseException:
    return pickle.loads(pickle.dumps(error, protocol))  # noqa: S301  (bytes we just made)


def check_same(original: BaseException, copy: BaseException, attributes: dict) -> None:
    assert type(copy) is type(original)
    assert str(copy) == str(original)
    for attribute, value in attributes.items():
        assert getattr(copy, attribute) == value, attribute
        assert getattr(original, attribute) == value, attribute


@pytest.mark.parametrize(("kind", "args", "attributes"), ERRORS)
@pytest.mark.parametrize("protocol", [0, pickle.HIGHEST_PROTOCOL], ids=["protocol-0", "highest"])
def test_error_pickles_with_its_attributes(kind, args, attributes, protocol):
    error = children.make_error(kind, *args)
    check_same(error, roundtrip(error, protocol), attributes)


@pytest.fixture(scope="module")
def pool():
    with ProcessPoolExecutor(max_workers=1, mp_context=SPAWN) as executor:
        yield executor


@pytest.mark.parametrize(("kind", "args", "attributes"), ERRORS)
def test_error_raised_in_a_spawned_child_arrives_intact(pool, kind, args, attributes):
    error = pool.submit(children.raise_error, kind, *args).exception(timeout=60)
    assert error is not None
    check_same(children.make_error(kind, *args), error, attributes)


def test_real_contention_error_crosses_the_process_boundary(pool, lock_dir):
    with ProcessLock("busy") as lock:
        error = pool.submit(children.take_busy, "busy", str(lock_dir)).exception(timeout=60)
        assert type(error) is LockHeldError
        assert error.path == lock.path
        assert error.name == "busy"
        assert error.holder.pid == os.getpid()
        assert error.holder.argv == tuple(sys.orig_argv)

        error = pool.submit(children.take_busy, "busy", str(lock_dir), 0.05).exception(timeout=60)
        assert type(error) is LockTimeoutError
        assert error.waited >= 0.05
        assert error.holder.pid == os.getpid()


# -- the tree -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "bases"),
    [
        pytest.param(LockHeldError, (ProcLockError,), id="LockHeldError"),
        pytest.param(
            LockTimeoutError, (LockHeldError, TimeoutError, ProcLockError), id="LockTimeoutError"
        ),
        pytest.param(AlreadyRunningError, (LockHeldError, ProcLockError), id="AlreadyRunningError"),
        pytest.param(LockNameError, (ValueError, ProcLockError), id="LockNameError"),
        pytest.param(
            UnsafeLockPathError, (PermissionError, OSError, ProcLockError), id="UnsafeLockPath"
        ),
        pytest.param(ProcLockError, (Exception,), id="ProcLockError"),
    ],
)
def test_error_is_the_builtin_a_caller_would_catch(cls, bases):
    for base in bases:
        assert issubclass(cls, base)
    assert getattr(proclock, cls.__name__) is cls


def test_unrelated_errors_stay_apart():
    assert not issubclass(LockHeldError, TimeoutError)
    assert not issubclass(AlreadyRunningError, TimeoutError)
    assert not issubclass(LockNameError, LockHeldError)
    assert not issubclass(UnsafeLockPathError, LockHeldError)


# -- real errors: what they carry and say -----------------------------------------------------


def cmdline(pid: int) -> tuple[str, ...]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return tuple(os.fsdecode(arg) for arg in f.read().split(b"\0")[:-1])


@pytest.fixture
def held_by_child(lock_dir):
    locked, release = SPAWN.Event(), SPAWN.Event()
    child = SPAWN.Process(target=children.hold, args=("busy", str(lock_dir), locked, release))
    child.start()
    try:
        assert locked.wait(30)
        yield child
    finally:
        release.set()
        child.join(30)
    assert child.exitcode == 0


def check_names_holder(error: LockHeldError, child, path: str) -> None:
    assert error.path == path
    assert error.holder is not None
    assert error.holder.pid == child.pid
    assert error.holder.argv == cmdline(child.pid)
    assert error.holder.acquired_at is not None  # from the child's record, not only the kernel
    message = str(error)
    assert path in message
    assert str(child.pid) in message
    assert short_command(cmdline(child.pid)) in message


@pytest.mark.parametrize(
    "attempt",
    [
        pytest.param(lambda: ProcessLock("busy", blocking=False).acquire(), id="non-blocking"),
        pytest.param(lambda: ProcessLock("busy", timeout=0).acquire(), id="timeout-0"),
        pytest.param(process_locked("busy", blocking=False)(print), id="decorated-non-blocking"),
    ],
)
def test_lock_held_error_from_contention(held_by_child, attempt):
    with pytest.raises(LockHeldError) as info:
        attempt()
    assert type(info.value) is LockHeldError
    assert info.value.name == "busy"
    assert "'busy'" in str(info.value)
    check_names_holder(info.value, held_by_child, str(proclock.lock_path("busy")))
    check_same(info.value, roundtrip(info.value), {"holder": info.value.holder})


def test_lock_timeout_error_from_contention(held_by_child):
    with pytest.raises(TimeoutError) as info:
        ProcessLock("busy", timeout=0.05).acquire()
    assert isinstance(info.value, LockTimeoutError)
    assert info.value.waited >= 0.05
    check_names_holder(info.value, held_by_child, str(proclock.lock_path("busy")))


def test_already_running_error_from_contention(held_by_child):
    @singleton_process(name="busy", on_contention="raise")
    def main():
        raise AssertionError("ran")

    with pytest.raises(AlreadyRunningError) as info:
        main()
    assert info.value.name == "busy"
    check_names_holder(info.value, held_by_child, str(proclock.lock_path("busy")))


def test_lock_held_error_with_an_explicit_path_names_it(held_by_child):
    path = str(proclock.lock_path("busy"))
    with pytest.raises(LockHeldError) as info:
        ProcessLock(path=path, blocking=False).acquire()
    check_names_holder(info.value, held_by_child, path)


def test_unsafe_lock_path_error_names_the_path(lock_dir):
    path = Path(proclock.lock_path("trap"))
    path.symlink_to(lock_dir / "elsewhere")
    with pytest.raises(PermissionError) as info:
        ProcessLock("trap").acquire()
    assert isinstance(info.value, UnsafeLockPathError)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    assert info.value.filename == str(path)
    check_same(info.value, roundtrip(info.value), {"path": str(path)})


@pytest.mark.parametrize(
    ("make", "name"),
    [
        pytest.param(lambda: ProcessLock(""), "", id="empty"),
        pytest.param(lambda: ProcessLock("job\x00x"), "job\x00x", id="nul"),
        pytest.param(
            lambda: process_locked("sync-{missing}")(lambda a: a), "sync-{missing}", id="template"
        ),
    ],
)
def test_lock_name_error_names_the_name(lock_dir, make, name):
    with pytest.raises(ValueError) as info:
        make()
    assert isinstance(info.value, LockNameError)
    assert repr(name) in str(info.value)
    copy = roundtrip(info.value)
    check_same(info.value, copy, {"name": name})


def test_a_holder_is_described_on_one_line_with_control_characters_escaped():
    from proclock import Holder

    holder = Holder(pid=42, argv=("/usr/bin/python3", "job.py", "line\nbreak", "\x1b[31mred"))
    text = holder.describe()
    assert text.startswith("pid 42 (python3 job.py line")
    assert "\n" not in text
    assert "\x1b" not in text
    assert "\\n" in text
    assert "\\x1b" in text
    long = Holder(pid=7, argv=("prog", "x" * 500)).describe()
    assert len(long) < 100
    assert long.endswith("...)")
    message = str(proclock.LockHeldError("/l", "name", holder))
    assert "\n" not in message
