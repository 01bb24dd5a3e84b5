"""Who holds a lock: the metadata written under the lock, and holder() as the kernel reports it."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import children
from conftest import SPAWN, lock_file
from proclock import ProcessLock
from proclock.backends import flock as flock_backend


def cmdline(pid: int) -> tuple[str, ...]:
    """A process's command line, as ps shows it (what holder metadata records as argv)."""
    data = Path(f"/proc/{pid}/cmdline").read_bytes()
    return tuple(os.fsdecode(arg) for arg in data.split(b"\0")[:-1])


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat (clock ticks since boot)."""
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return int(data[data.rfind(b")") + 2 :].split()[19])


def record(path: Path) -> dict:
    return json.loads(path.read_bytes().decode())


# -- what is written -----------------------------------------------------------------------------


def test_exclusive_acquisition_writes_who_and_when(lock_dir):
    before = time.time()
    with ProcessLock("job") as lock:
        after = time.time()
        text = Path(lock.path).read_bytes().decode()
        values = list(json.loads(text).values())
    assert os.getpid() in values
    assert os.uname().nodename in values
    assert start_time(os.getpid()) in values
    assert list(sys.orig_argv) in values
    assert [v for v in values if isinstance(v, float) and before <= v <= after]


def test_a_longer_record_of_another_holder_is_replaced_entirely(lock_dir):
    path = lock_file("job")
    other = json.dumps({"v": 1, "pid": 1, "argv": ["x" * 5000], "name": "job", "at": 1.0})
    path.write_bytes(other.encode() + b"\n")
    with ProcessLock("job"):
        assert record(path)["pid"] == os.getpid()  # parses: no tail of the old content
        assert os.stat(path).st_size < 4096


FOREIGN_CONTENTS = [
    pytest.param(b"x" * 100_000, id="long-garbage"),
    pytest.param(b'{"pid": 1, "argv": ["init"]}' + b" " * 5000 + b"\n", id="other-json"),
    pytest.param(b"\x00\xff" * 3000, id="binary"),
    pytest.param(b"#!/bin/sh\necho a script given as path=\n", id="script"),
    pytest.param(b"12345\n", id="a-pid-written-by-a-flock1-user"),
]


@pytest.mark.parametrize("content", FOREIGN_CONTENTS)
def test_a_file_with_other_content_is_never_written(lock_dir, content):
    # Invariant 5: only an empty file or a proclock record is ever written; the holder is
    # still named, from the kernel.
    path = lock_file("job")
    path.write_bytes(content)
    os.chmod(path, 0o644)
    before = os.stat(path)
    with ProcessLock("job", mode=0o600) as lock:
        assert lock.holder().pid == os.getpid()
        assert lock.holder().argv == tuple(cmdline(os.getpid()))
    after = os.stat(path)
    assert path.read_bytes() == content
    assert (after.st_size, after.st_mtime_ns, stat.S_IMODE(after.st_mode)) == (
        before.st_size,
        before.st_mtime_ns,
        0o644,
    )


def test_record_is_refreshed_once_a_second(lock_dir, monkeypatch):
    path = lock_file("job")
    stamps = []
    for _ in range(2):
        before = time.time()
        with ProcessLock("job") as lock:
            stamps.append(lock.holder().acquired_at)
        assert before - flock_backend.RECORD_REFRESH <= stamps[-1]
    # Re-acquired within RECORD_REFRESH: the record (and its acquired_at) is kept.
    assert stamps[0] == stamps[1]
    monkeypatch.setattr(flock_backend, "RECORD_REFRESH", 0.0)
    before = time.time()
    with ProcessLock("job") as lock:
        assert before <= lock.holder().acquired_at
    assert record(path)["pid"] == os.getpid()


def test_shared_acquisition_writes_nothing(lock_dir):
    path = lock_file("job")
    path.write_bytes(b"")
    with ProcessLock("job", shared=True):
        assert path.read_bytes() == b""


# -- holder() -----------------------------------------------------------------------------------


@pytest.fixture
def child_holds(lock_dir):
    """Start a spawn child holding `job`; yields (child, time before start, time once held)."""
    started = []

    def start(shared=False):
        locked, release = SPAWN.Event(), SPAWN.Event()
        before = time.time()
        child = SPAWN.Process(
            target=children.hold, args=("job", str(lock_dir), locked, release, shared)
        )
        child.start()
        started.append((child, release))
        assert locked.wait(30)
        return child, before, time.time()

    yield start
    for child, release in started:
        release.set()
        child.join(30)
        assert child.exitcode == 0


def test_holder_from_another_process(child_holds):
    child, before, after = child_holds()
    holder = ProcessLock("job").holder()
    assert holder is not None
    assert holder.pid == child.pid
    assert holder.hostname == os.uname().nodename
    assert holder.argv == cmdline(child.pid)
    assert before <= holder.acquired_at <= after
    assert holder.start_time == start_time(child.pid)
    assert not holder.shared
    # The same answer through an explicit path, and from a lock object that holds nothing.
    assert ProcessLock(path=lock_file("job")).holder() == holder


def test_holder_of_our_own_lock(lock_dir):
    with ProcessLock("job") as lock:
        holder = ProcessLock("job").holder()
        assert holder == lock.holder()
        assert holder.pid == os.getpid()
        assert holder.argv == tuple(sys.orig_argv)


def test_holder_is_none_for_a_lock_never_taken(lock_dir):
    assert ProcessLock("job").holder() is None
    assert not lock_file("job").exists()


def test_holder_is_none_for_a_free_lock(lock_dir):
    with ProcessLock("job"):
        pass
    assert ProcessLock("job").holder() is None


def test_holder_is_none_after_a_holder_exits(lock_dir):
    child = SPAWN.Process(target=children.try_once, args=("job", str(lock_dir)))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert record(lock_file("job"))["pid"] == child.pid  # its record stays in the file
    assert ProcessLock("job").holder() is None


def test_killed_holder_never_reads_as_live(lock_dir):
    locked = SPAWN.Event()
    child = SPAWN.Process(target=children.hold_forever, args=("job", str(lock_dir), locked))
    child.start()
    assert locked.wait(30)
    assert ProcessLock("job").holder().pid == child.pid
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    assert record(lock_file("job"))["pid"] == child.pid
    assert ProcessLock("job").holder() is None
    with ProcessLock("job", blocking=False) as lock:
        assert lock.holder().pid == os.getpid()


def test_live_process_record_in_a_free_file_is_not_a_holder(lock_dir):
    # A record naming a live process (this one) in a file nobody has locked.
    path = lock_file("job")
    with ProcessLock("job"):
        content = path.read_bytes()
    path.write_bytes(content)
    assert ProcessLock("job").holder() is None


CONTENTS = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\x00\xff\xfe" * 100, id="binary"),
    pytest.param(b"not json at all\n", id="text"),
    pytest.param(b"12345\n", id="bare-pid"),
    pytest.param(b"[1, 2, 3]", id="json-list"),
    pytest.param(b'{"pid": "seven", "argv": 3, "at": "noon", "host": 1}', id="wrong-types"),
    pytest.param(b'{"pid": 1, "argv": ["/sbin/init"], "at": 1.0}', id="other-pid"),
    pytest.param(b'{"pid": 1', id="truncated"),
    pytest.param(b"\xed\xa0\x80", id="encoded-surrogate"),
]


@pytest.mark.parametrize("content", CONTENTS)
def test_odd_content_of_a_free_lock(lock_dir, content):
    path = lock_file("job")
    path.write_bytes(content)
    assert ProcessLock("job").holder() is None
    with ProcessLock("job", blocking=False) as lock:
        assert lock.holder().pid == os.getpid()
        if content:
            assert path.read_bytes() == content  # not a proclock record: never written
        else:
            assert record(path)["pid"] == os.getpid()


def flock_holding(path: Path, *options: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["flock", *options, str(path), "sh", "-c", "echo ready; read _"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    return proc


def done(proc: subprocess.Popen) -> None:
    proc.communicate("\n", timeout=30)
    assert proc.returncode == 0


@pytest.mark.parametrize("content", CONTENTS)
@pytest.mark.parametrize("options", [(), ("-s",)], ids=["exclusive", "shared"])
def test_holder_that_is_not_proclock(lock_dir, content, options):
    # flock(1) holds the file whatever it contains: the kernel's pid wins over any record.
    path = lock_file("job")
    path.write_bytes(content)
    proc = flock_holding(path, *options)
    try:
        holder = ProcessLock("job").holder()
        assert holder is not None
        assert holder.pid == proc.pid
        assert holder.argv == ("flock", *options, str(path), "sh", "-c", "echo ready; read _")
        assert holder.shared == bool(options)
        assert path.read_bytes() == content
    finally:
        done(proc)
    assert ProcessLock("job").holder() is None


def test_stale_proclock_record_under_a_foreign_holder(lock_dir):
    # Our own record from an earlier hold stays in the file; flock(1) takes it next.
    path = lock_file("job")
    with ProcessLock("job"):
        pass
    proc = flock_holding(path)
    try:
        holder = ProcessLock("job").holder()
        assert holder.pid == proc.pid
        assert holder.argv[0] == "flock"
        assert holder.acquired_at is None  # not our record's time: it is not flock's
    finally:
        done(proc)


def test_shared_holder_is_reported(child_holds):
    child, _, _ = child_holds(shared=True)
    holder = ProcessLock("job").holder()
    assert holder is not None
    assert holder.pid == child.pid
    assert holder.shared


def test_one_of_several_shared_holders_is_reported(child_holds):
    first, _, _ = child_holds(shared=True)
    second, _, _ = child_holds(shared=True)
    with ProcessLock("job", shared=True) as lock:
        holder = lock.holder()
        assert holder is not None
        assert holder.pid in {first.pid, second.pid, os.getpid()}
        assert holder.shared


def test_holder_while_a_waiter_is_queued(child_holds, lock_dir):
    # A process blocked in flock(2) is listed in /proc/locks too: it is not the holder.
    child, _, _ = child_holds()
    path = lock_file("job")
    waiter = subprocess.Popen(["flock", str(path), "true"])
    try:
        assert children.wait_until(lambda: children.blocked_in_kernel(str(path), waiter.pid))
        assert ProcessLock("job").holder().pid == child.pid
    finally:
        waiter.kill()
        waiter.wait(30)


def test_holder_command_line_is_reported_exactly(lock_dir):
    # Spaces, quotes and bytes that are not UTF-8 survive the trip through the lock file.
    code = (
        "import sys, proclock\n"
        "lock = proclock.ProcessLock('job').acquire()\n"
        "print('locked', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    args = [sys.executable, "-c", code, "nightly run", 'it\'s "quoted"', b"\xff\xfe-raw"]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"locked\n"
        holder = ProcessLock("job").holder()
        assert holder is not None
        assert holder.pid == proc.pid
        assert holder.argv == tuple(os.fsdecode(a) for a in args)
        assert holder.acquired_at is not None
    finally:
        proc.communicate(b"\n", timeout=30)
    assert proc.returncode == 0
