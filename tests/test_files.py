"""The lock file: refusing traps at its path, its mode, its content, the unlink/replace races,
and OS failures surfacing as themselves."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import subprocess
import threading
import time
from typing import TYPE_CHECKING

import pytest

import children
import proclock
from conftest import SPAWN, lock_file
from proclock import (
    LockHeldError,
    LockTimeoutError,
    ProcessLock,
    ProcLockError,
    UnsafeLockPathError,
    _core,
    _flock,
    process_locked,
)
from proclock.backends import flock as flock_backend

if TYPE_CHECKING:
    from pathlib import Path

# -- refusing what is not a regular file ------------------------------------------------------


@pytest.fixture
def precious(tmp_path: Path) -> Path:
    """A file of someone else's, outside the lock directory, that a symlink may point at."""
    target = tmp_path / "precious.conf"
    target.write_bytes(b"do not touch\n")
    target.chmod(0o644)
    return target


def plant_symlink(path: Path, precious: Path) -> None:
    path.symlink_to(precious)


def plant_dangling_symlink(path: Path, precious: Path) -> None:
    path.symlink_to(precious.with_name("never-created"))


def plant_fifo(path: Path, precious: Path) -> None:
    os.mkfifo(path, 0o600)


def plant_directory(path: Path, precious: Path) -> None:
    path.mkdir()


def plant_socket(path: Path, precious: Path) -> None:
    # AF_UNIX paths are limited to ~108 bytes: bind relative to the directory.
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(path.name)
    finally:
        os.chdir(cwd)


def plant_char_device(path: Path, precious: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # like /dev/null


TRAPS = [
    pytest.param(plant_symlink, id="symlink"),
    pytest.param(plant_dangling_symlink, id="dangling-symlink"),
    pytest.param(plant_fifo, id="fifo"),
    pytest.param(plant_directory, id="directory"),
    pytest.param(plant_socket, id="socket"),
    pytest.param(plant_char_device, id="char-device"),
]


def state(path: Path, precious: Path) -> tuple:
    st = os.lstat(path)
    pst = os.stat(precious)
    return (
        st.st_mode,
        st.st_ino,
        sorted(os.listdir(path)) if stat.S_ISDIR(st.st_mode) else None,
        precious.read_bytes(),
        pst.st_mode,
        pst.st_mtime_ns,
        precious.with_name("never-created").exists(),
    )


@pytest.mark.timeout(10)
@pytest.mark.parametrize("how", ["name", "path"], ids=["by-name", "by-path"])
@pytest.mark.parametrize("plant", TRAPS)
def test_non_regular_lock_path_is_refused_quickly_and_untouched(lock_dir, precious, plant, how):
    path = lock_file("trap")
    plant(path, precious)
    before = state(path, precious)

    def make(**kw):
        return ProcessLock("trap", **kw) if how == "name" else ProcessLock(path=path, **kw)

    attempts = [
        lambda: make().acquire(),  # waits forever if it ever gets to waiting
        lambda: make(blocking=False).acquire(),
        lambda: make(timeout=5).acquire(),
        lambda: make(shared=True).acquire(),
        lambda: make(mode=0o666).acquire(),
    ]
    for attempt in attempts:
        start = time.monotonic()
        with pytest.raises(UnsafeLockPathError) as info:
            attempt()
        assert time.monotonic() - start < 1.0
        assert isinstance(info.value, PermissionError)
        assert str(path) in str(info.value)
    ran = []

    @process_locked("trap", timeout=5)
    def body():
        ran.append(1)

    if how == "name":
        with pytest.raises(UnsafeLockPathError):
            body()
        assert ran == []
    assert make().holder() is None
    assert state(path, precious) == before


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "plant",
    [p for p in TRAPS if p.id not in {"dangling-symlink", "char-device"}],
)
def test_trap_swapped_in_after_the_check_is_refused(lock_dir, precious, plant, monkeypatch):
    # A regular file when proclock looks (lstat), a trap when it opens: the race an attacker
    # with write access to a shared directory would try.
    path = lock_file("trap")
    path.write_bytes(b"")
    real_lstat = os.lstat
    swapped = []

    def lstat_then_swap(target, *args, **kwargs):
        st = real_lstat(target, *args, **kwargs)
        if not swapped and target == str(path) and stat.S_ISREG(st.st_mode):
            swapped.append(True)
            os.unlink(path)
            plant(path, precious)
        return st

    monkeypatch.setattr(os, "lstat", lstat_then_swap)
    start = time.monotonic()
    with pytest.raises(UnsafeLockPathError):
        ProcessLock("trap").acquire()
    assert time.monotonic() - start < 1.0
    assert swapped
    monkeypatch.undo()
    assert not stat.S_ISREG(os.lstat(path).st_mode)
    assert precious.read_bytes() == b"do not touch\n"
    assert stat.S_IMODE(os.stat(precious).st_mode) == 0o644


def test_symlinked_lock_file_target_keeps_its_mode_under_a_different_mode(lock_dir, precious):
    path = lock_file("trap")
    path.symlink_to(precious)
    with pytest.raises(UnsafeLockPathError):
        ProcessLock("trap", mode=0o600).acquire()
    assert stat.S_IMODE(os.stat(precious).st_mode) == 0o644
    assert precious.read_bytes() == b"do not touch\n"


# -- mode ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    ("mode", "mask"),
    [
        pytest.param(0o640, 0o077, id="0640-umask-077"),
        pytest.param(0o666, 0o022, id="0666-umask-022"),
        pytest.param(0o600, 0o077, id="default-0600"),
    ],
)
def test_created_file_gets_the_mode_despite_the_umask(lock_dir, mode, mask):
    with umask(mask), ProcessLock("m", mode=mode) as lock:
        assert stat.S_IMODE(os.stat(lock.path).st_mode) == mode
    assert stat.S_IMODE(os.stat(lock_file("m")).st_mode) == mode


def test_default_mode_is_0600(lock_dir):
    with umask(0), ProcessLock("m") as lock:
        assert stat.S_IMODE(os.stat(lock.path).st_mode) == 0o600


def test_existing_file_mode_is_left_alone(lock_dir):
    path = lock_file("m")
    path.touch()
    path.chmod(0o604)
    with umask(0), ProcessLock("m", mode=0o640):
        pass
    with ProcessLock("m"):
        pass
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o604


# -- nothing is written before the lock is held -------------------------------------------------

FOREIGN = b"a record of another program's own\n" * 20


@contextlib.contextmanager
def flock_holds(path: Path, *options: str):
    """flock(1) holding `path` (created if missing) until the block ends; yields its Popen."""
    proc = subprocess.Popen(
        ["flock", *options, str(path), "sh", "-c", "echo ready; read _"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        yield proc
    finally:
        proc.communicate("\n", timeout=30)
    assert proc.returncode == 0


def failed_attempts(name: str) -> None:
    with pytest.raises(LockHeldError):
        ProcessLock(name, blocking=False).acquire()
    with pytest.raises(LockHeldError):
        ProcessLock(name, timeout=0).acquire()
    with pytest.raises(LockTimeoutError):
        ProcessLock(name, timeout=0.05).acquire()
    with pytest.raises(LockHeldError):
        ProcessLock(name, blocking=False, shared=True).acquire()
    with pytest.raises(LockHeldError):
        ProcessLock(path=lock_file(name), blocking=False).acquire()


def snapshot(path: Path) -> tuple:
    st = os.stat(path)
    return path.read_bytes(), st.st_size, st.st_mtime_ns, st.st_ino


def test_file_held_by_flock1_keeps_its_content_while_we_fail(lock_dir):
    path = lock_file("busy")
    path.write_bytes(FOREIGN)
    with flock_holds(path):
        before = snapshot(path)
        failed_attempts("busy")
        assert snapshot(path) == before
    with ProcessLock("busy") as lock:  # held: still never written (not a proclock record)
        assert path.read_bytes() == FOREIGN
        assert lock.holder().pid == os.getpid()  # the kernel names the holder


def test_file_held_by_a_child_keeps_its_content_while_we_fail(lock_dir):
    locked, release = SPAWN.Event(), SPAWN.Event()
    child = SPAWN.Process(target=children.hold, args=("busy", str(lock_dir), locked, release))
    child.start()
    try:
        assert locked.wait(30)
        path = lock_file("busy")
        before = snapshot(path)
        assert str(child.pid).encode() in before[0]
        failed_attempts("busy")
        assert snapshot(path) == before
    finally:
        release.set()
        child.join(30)
    assert child.exitcode == 0


# -- the unlink and replace races ---------------------------------------------------------------


def fd_of(lock) -> int:
    """The descriptor of a hold: an `Acquired`, or a ProcessLock's innermost hold."""
    fd = lock.handle.fd if isinstance(lock, proclock.Acquired) else lock._held_fd()
    assert fd is not None
    return fd


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def third_party_cannot_take(lock_dir: Path, path: Path) -> None:
    """Another process using the path (proclock, and flock(1)) finds the lock busy."""
    child = SPAWN.Process(target=children.try_once, args=("race", str(lock_dir)))
    child.start()
    child.join(30)
    assert child.exitcode == 1
    assert (
        subprocess.run(["flock", "-n", str(path), "true"], timeout=30, check=False).returncode == 1
    )


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["unlink", "replace"])
def test_waiter_takes_the_file_now_at_the_path(lock_dir, tmp_path, how):
    path = lock_file("race")
    replacement = tmp_path / "replacement.lock"
    replacement.write_bytes(b"")
    new_ino = os.stat(replacement).st_ino
    locked, go = SPAWN.Event(), SPAWN.Event()
    holder = SPAWN.Process(
        target=children.hold_then_remove,
        args=("race", str(lock_dir), locked, go, how),
        kwargs={"replacement": str(replacement)},
    )
    holder.start()
    try:
        assert locked.wait(30)
        old = os.stat(path)

        def unleash():
            # We have opened the old inode and are blocked in flock(2) on it: now pull the
            # file from under us, then release.
            if children.wait_until(lambda: children.blocked_in_kernel(str(path))):
                go.set()

        trigger = threading.Thread(target=unleash)
        trigger.start()
        lock = ProcessLock("race").acquire(timeout=20)
        try:
            trigger.join(30)
            assert go.is_set()
            now = os.stat(path)
            assert not same_file(now, old)
            if how == "replace":
                assert now.st_ino == new_ino
            assert same_file(os.fstat(fd_of(lock)), now)
            assert lock.lock.holder().pid == os.getpid()
            third_party_cannot_take(lock_dir, path)
        finally:
            lock.release()
    finally:
        go.set()
        holder.join(30)
    assert holder.exitcode == 0
    child = SPAWN.Process(target=children.try_once, args=("race", str(lock_dir)))
    child.start()
    child.join(30)
    assert child.exitcode == 0


@pytest.mark.parametrize("how", ["unlink", "replace"])
def test_kept_descriptor_of_a_removed_file_is_not_trusted(lock_dir, tmp_path, how):
    # This process keeps the descriptor of an idle lock; a tmp cleaner removes the file and
    # another process then holds the new one: locking our orphaned inode would exclude nobody.
    path = lock_file("race")
    with ProcessLock("race"):
        pass
    if how == "unlink":
        os.unlink(path)
    else:
        replacement = tmp_path / "new"
        replacement.write_bytes(b"")
        os.replace(replacement, path)
    locked, release = SPAWN.Event(), SPAWN.Event()
    child = SPAWN.Process(target=children.hold, args=("race", str(lock_dir), locked, release))
    child.start()
    try:
        assert locked.wait(30)
        with pytest.raises(LockHeldError) as info:
            ProcessLock("race", blocking=False).acquire()
        assert info.value.holder.pid == child.pid
    finally:
        release.set()
        child.join(30)
    assert child.exitcode == 0
    with ProcessLock("race", blocking=False) as lock:
        assert same_file(os.fstat(fd_of(lock)), os.stat(path))


def test_file_removed_while_we_hold_is_taken_afresh_next_time(lock_dir):
    path = lock_file("race")
    with ProcessLock("race") as lock:
        os.unlink(path)  # deleted by someone else while we hold
        assert lock.locked
    with ProcessLock("race") as lock:
        assert path.is_file()
        assert same_file(os.fstat(fd_of(lock)), os.stat(path))
        third_party_cannot_take(lock_dir, path)


# -- OS failures surface as themselves, at once -------------------------------------------------


def is_lock_file(target: object, path: Path) -> bool:
    try:
        return os.path.realpath(os.fspath(target)) == os.path.realpath(path)  # type: ignore[arg-type]
    except TypeError:
        return False


def fd_is(fd: int, path: Path) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == os.path.realpath(path)
    except OSError:
        return False


@pytest.fixture
def sleeps(monkeypatch):
    """Pauses between retries, recorded instead of slept."""
    recorded: list[float] = []
    monkeypatch.setattr(_core, "sleep", recorded.append)
    return recorded


def attempts_for(name: str):
    return {
        "blocking": lambda: ProcessLock(name).acquire(),
        "timeout": lambda: ProcessLock(name, timeout=30).acquire(),
        "non-blocking": lambda: ProcessLock(name, blocking=False).acquire(),
        "retry-3": lambda: ProcessLock(name, blocking=False, retry=3).acquire(),
        "timeout-retry-3": lambda: ProcessLock(name, timeout=5, retry=3).acquire(),
        "shared": lambda: ProcessLock(name, shared=True, timeout=30).acquire(),
    }


ATTEMPTS = list(attempts_for("x"))
DECORATED = [
    pytest.param({}, id="default"),
    pytest.param({"timeout": 30}, id="timeout"),
    pytest.param({"blocking": False, "retry": 3}, id="retry-3"),
    pytest.param({"blocking": False, "on_contention": "skip"}, id="skip"),
]


def check_surfaces(info: pytest.ExceptionInfo, err: int, path: Path, start: float) -> None:
    exc = info.value
    assert exc.errno == err
    assert exc.filename == str(path)
    assert not isinstance(exc, (ProcLockError, TimeoutError))
    assert time.monotonic() - start < 1.0


OPEN_ERRORS = [
    pytest.param(errno.EACCES, id="EACCES"),
    pytest.param(errno.EROFS, id="EROFS"),
    pytest.param(errno.ENOSPC, id="ENOSPC"),
]


@pytest.fixture
def failing_open(monkeypatch, lock_dir):
    """Make os.open of the lock file fail with a given errno, counting the attempts."""
    path = lock_file("x")
    calls = []
    real_open = os.open

    def install(err: int, *, exists: bool):
        if exists:
            path.write_bytes(b"")

        def fake_open(target, flags, *args, **kwargs):
            if is_lock_file(target, path):
                if flags & os.O_EXCL and os.path.lexists(path):
                    return real_open(target, flags, *args, **kwargs)  # EEXIST, as for real
                calls.append(flags)
                raise OSError(err, os.strerror(err), os.fspath(target))
            return real_open(target, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", fake_open)
        return path, calls

    return install


@pytest.mark.timeout(10)
@pytest.mark.parametrize("exists", [False, True], ids=["missing", "exists"])
@pytest.mark.parametrize("attempt", ATTEMPTS)
@pytest.mark.parametrize("err", OPEN_ERRORS)
def test_open_error_surfaces_at_once(failing_open, sleeps, err, attempt, exists):
    path, calls = failing_open(err, exists=exists)
    start = time.monotonic()
    with pytest.raises(OSError) as info:
        attempts_for("x")[attempt]()
    check_surfaces(info, err, path, start)
    assert len(calls) == 1  # not retried
    assert sleeps == []


@pytest.mark.timeout(10)
@pytest.mark.parametrize("options", DECORATED)
@pytest.mark.parametrize("err", OPEN_ERRORS)
def test_open_error_never_runs_the_body(failing_open, sleeps, err, options):
    path, calls = failing_open(err, exists=False)
    ran = []

    @process_locked("x", **options)
    def body():
        ran.append(1)

    start = time.monotonic()
    with pytest.raises(OSError) as info:
        body()
    check_surfaces(info, err, path, start)
    assert ran == []
    assert len(calls) == 1
    assert sleeps == []


@pytest.fixture
def failing_flock(monkeypatch, lock_dir):
    """Make fcntl.flock on the lock file fail with ENOLCK (all locking calls, or blocking ones)."""
    path = lock_file("x")
    calls = []
    real_flock = fcntl.flock

    def install(*, only_blocking: bool = False):
        def fake_flock(fd, op):
            passes = op == fcntl.LOCK_UN or (only_blocking and op & fcntl.LOCK_NB)
            if fd_is(fd, path) and not passes:
                calls.append(op)
                raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))  # as fcntl raises it
            return real_flock(fd, op)

        monkeypatch.setattr(fcntl, "flock", fake_flock)
        # The flock backend calls flock(2) through these aliases.
        monkeypatch.setattr(_flock, "flock", fake_flock, raising=False)
        monkeypatch.setattr(flock_backend, "_flock_call", fake_flock)
        return path, calls

    return install


WARM = [
    pytest.param(False, id="first-use"),
    pytest.param(True, id="descriptor-kept"),  # taken and released before: the fast path
]


def warm_up(warm: bool) -> None:
    if warm:
        with ProcessLock("x"):
            pass


@pytest.mark.timeout(10)
@pytest.mark.parametrize("warm", WARM)
@pytest.mark.parametrize("attempt", ATTEMPTS)
def test_enolck_surfaces_at_once(failing_flock, sleeps, attempt, warm):
    warm_up(warm)
    path, calls = failing_flock()
    start = time.monotonic()
    with pytest.raises(OSError) as info:
        attempts_for("x")[attempt]()
    check_surfaces(info, errno.ENOLCK, path, start)
    assert len(calls) == 1
    assert sleeps == []


@pytest.mark.timeout(10)
@pytest.mark.parametrize("warm", WARM)
@pytest.mark.parametrize("options", DECORATED)
def test_enolck_never_runs_the_body(failing_flock, sleeps, options, warm):
    warm_up(warm)
    path, calls = failing_flock()
    ran = []

    @process_locked("x", **options)
    def body():
        ran.append(1)

    start = time.monotonic()
    with pytest.raises(OSError) as info:
        body()
    check_surfaces(info, errno.ENOLCK, path, start)
    assert ran == []
    assert len(calls) == 1
    assert sleeps == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "attempt",
    [
        pytest.param(lambda: ProcessLock("x").acquire(), id="blocking"),
        pytest.param(lambda: ProcessLock("x", timeout=20).acquire(), id="timeout"),
        pytest.param(lambda: ProcessLock("x", timeout=20, retry=3).acquire(), id="retry"),
        pytest.param(process_locked("x", timeout=20)(time.time), id="decorated"),
    ],
)
def test_enolck_while_waiting_surfaces_at_once(lock_dir, failing_flock, sleeps, attempt):
    # Busy: the non-blocking try passes through; the kernel wait then fails with ENOLCK.
    locked, release = SPAWN.Event(), SPAWN.Event()
    child = SPAWN.Process(target=children.hold, args=("x", str(lock_dir), locked, release))
    child.start()
    try:
        assert locked.wait(30)
        path, calls = failing_flock(only_blocking=True)
        start = time.monotonic()
        with pytest.raises(OSError) as info:
            attempt()
        check_surfaces(info, errno.ENOLCK, path, start)
        assert calls
        assert sleeps == []
    finally:
        release.set()
        child.join(30)
    assert child.exitcode == 0


@pytest.fixture
def failing_pwrite(monkeypatch, lock_dir):
    """Make the metadata write into the lock file fail with ENOSPC."""
    path = lock_file("x")
    calls = []
    real_pwrite = os.pwrite

    def fake_pwrite(fd, data, offset):
        if fd_is(fd, path):
            calls.append(offset)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    def install():
        monkeypatch.setattr(os, "pwrite", fake_pwrite)
        return path, calls

    return install


def nothing_held(lock_dir: Path, path: Path, lock: ProcessLock | None = None) -> None:
    if lock is not None:
        assert not lock.locked
    assert all(not s["owners"] for s in _core.snapshot().values())
    assert (
        subprocess.run(["flock", "-n", str(path), "true"], timeout=30, check=False).returncode == 0
    )
    child = SPAWN.Process(target=children.try_once, args=("x", str(lock_dir)))
    child.start()
    child.join(30)
    assert child.exitcode == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("warm", WARM)
def test_enospc_writing_metadata_surfaces_and_holds_nothing(
    lock_dir, failing_pwrite, sleeps, warm, monkeypatch
):
    warm_up(warm)
    # A record younger than RECORD_REFRESH is not rewritten: make every acquisition write.
    monkeypatch.setattr(flock_backend, "RECORD_REFRESH", 0.0)
    path, calls = failing_pwrite()
    for lock in (ProcessLock("x"), ProcessLock("x", timeout=5, retry=3)):
        start = time.monotonic()
        with pytest.raises(OSError) as info:
            lock.acquire()
        check_surfaces(info, errno.ENOSPC, path, start)
        assert sleeps == []
        nothing_held(lock_dir, path, lock)
    ran = []

    @process_locked("x", timeout=5)
    def body():
        ran.append(1)

    with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)):
        body()
    assert ran == []
    assert calls
    nothing_held(lock_dir, path)
    # A shared lock writes no metadata: it still works on a full disk.
    with ProcessLock("x", shared=True) as lock:
        assert lock.locked


@pytest.mark.timeout(30)
def test_enospc_after_waiting_surfaces_and_holds_nothing(lock_dir, failing_pwrite):
    path, calls = failing_pwrite()
    locked, release = SPAWN.Event(), SPAWN.Event()
    child = SPAWN.Process(target=children.hold, args=("x", str(lock_dir), locked, release))
    child.start()
    try:
        assert locked.wait(30)

        def let_go():
            if children.wait_until(lambda: children.blocked_in_kernel(str(path))):
                release.set()

        trigger = threading.Thread(target=let_go)
        trigger.start()
        lock = ProcessLock("x", timeout=20)
        with pytest.raises(OSError) as info:
            lock.acquire()
        trigger.join(30)
        assert release.is_set()
        assert info.value.errno == errno.ENOSPC
        assert info.value.filename == str(path)
        assert calls
    finally:
        release.set()
        child.join(30)
    assert child.exitcode == 0
    nothing_held(lock_dir, path, lock)
