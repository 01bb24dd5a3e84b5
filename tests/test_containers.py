"""Containers: one kernel, several pid namespaces (unshare --pid --fork --mount-proc).

flock(2) excludes across pid namespaces (one inode, one kernel), but a pid means something
only in its own namespace. These tests run real processes in real pid namespaces (skipped
with the reason where unshare(CLONE_NEWPID) is not permitted) and check that holder(), the
errors and `proclock status` never name a local process that is not the holder.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from proclock import Holder, LockHeldError, ProcessLock, lock_path
from proclock._holder import identity, short_command

UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc"]
# Without root, a user namespace of our own (where we are root) makes the pid namespace.
UNSHARE_AS_USER = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"]

# A process that takes orders on stdin and answers one JSON line each: the same program runs
# inside a pid namespace and outside, as pid 1 of its namespace or as pid 2 under a shell.
AGENT = r"""
import json, os, sys
import proclock

def say(**values):
    sys.stdout.write(json.dumps(values) + "\n")
    sys.stdout.flush()

locks = {}
say(pid=os.getpid(), ns=os.stat("/proc/self/ns/pid").st_ino)
for line in sys.stdin:
    order, name = line.split()
    lock = locks.setdefault(name, proclock.ProcessLock(name))
    if order == "hold":
        lock.acquire(timeout=0)
        say(ok=True)
    elif order == "wait":
        lock.acquire(timeout=30)
        say(ok=True)
    elif order == "release":
        lock.release()
        say(ok=True)
    elif order == "try":
        try:
            lock.acquire(timeout=0)
        except proclock.LockHeldError as exc:
            say(ok=False, error=str(exc))
        else:
            lock.release()
            say(ok=True)
    elif order == "holder":
        h = lock.holder()
        fields = None if h is None else {f: getattr(h, f) for f in type(h)._fields}
        say(holder=fields, describe=None if h is None else h.describe())
"""


def _unshare_refusal() -> str | None:
    """Why pid namespaces cannot be made here, or None: tried once per session.

    Tries as root first, then in a user namespace of our own; UNSHARE becomes the one that
    works.
    """
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed (util-linux)"
    errors = []
    for command in (UNSHARE, UNSHARE_AS_USER):
        try:
            done = subprocess.run(
                # This interpreter, not true(1): it must be reachable from the namespace too
                # (a user namespace's root is nobody to the files of the real root).
                [*command, sys.executable, "-c", "import proclock"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except OSError as exc:
            return f"unshare(1) cannot run: {exc}"
        if done.returncode == 0:
            UNSHARE[:] = command
            return None
        errors.append(f"{' '.join(command)}: {done.stderr.strip()}")
    return "pid namespaces are not permitted here (" + "; ".join(errors) + ")"


@pytest.fixture(scope="session")
def namespaces():
    refusal = _unshare_refusal()
    if refusal is not None:
        pytest.skip(refusal)


class Agent:
    """One agent process; `inside` runs it in a new pid namespace, as pid 1 or pid 2."""

    def __init__(self, script: Path, *, inside: bool, own_pid: int = 1) -> None:
        command = [sys.executable, str(script)]
        if inside and own_pid == 2:
            # The shell is pid 1 and stays (a command after it: it cannot exec the agent).
            command = ["sh", "-c", '"$@"; exit $?', "sh", *command]
        self.proc = subprocess.Popen(
            [*UNSHARE, *command] if inside else command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        hello = self.read()
        self.own_pid, self.ns = hello["pid"], hello["ns"]
        self.argv = [sys.executable, str(script)]
        if inside:
            assert self.own_pid == own_pid
            assert self.ns != os.stat("/proc/self/ns/pid").st_ino
        self.pid = outer_pid(self.ns, self.own_pid)  # its pid here

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"agent exited with {self.proc.wait(30)}"
        return json.loads(line)

    def ask(self, order: str, name: str) -> dict:
        self.proc.stdin.write(f"{order} {name}\n")
        self.proc.stdin.flush()
        return self.read()

    def kill(self) -> None:
        """SIGKILL the agent itself, and wait until it (and its namespace) is gone."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(30)

    def close(self) -> None:
        killed = self.proc.poll() is not None
        self.proc.stdin.close()  # EOF: the agent exits, its locks go with it
        self.proc.stdout.close()
        code = self.proc.wait(30)
        assert killed or code == 0


def outer_pid(ns: int, own_pid: int) -> int:
    """The pid here of the process that is `own_pid` in the pid namespace with inode `ns`."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/pid").st_ino != ns:
                continue
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        nspid = next(line for line in status.splitlines() if line.startswith("NSpid:"))
        if int(nspid.split()[-1]) == own_pid:
            return int(entry)
    raise AssertionError(f"no process is pid {own_pid} of pid namespace {ns}")


@pytest.fixture
def agents(tmp_path, lock_dir):
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    started: list[Agent] = []

    def start(*, inside: bool, own_pid: int = 1) -> Agent:
        agent = Agent(script, inside=inside, own_pid=own_pid)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.close()


def fields(holder: Holder) -> dict:
    return {f: getattr(holder, f) for f in type(holder)._fields}


# -- exclusion -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("holder_inside", "other_inside"),
    [
        pytest.param(True, False, id="holder-inside"),
        pytest.param(False, True, id="holder-outside"),
        pytest.param(True, True, id="sibling-namespaces"),
    ],
)
def test_processes_of_different_pid_namespaces_exclude_each_other(
    namespaces, agents, holder_inside, other_inside
):
    holder = agents(inside=holder_inside)
    other = agents(inside=other_inside)
    assert holder.ns != other.ns
    assert holder.ask("hold", "shared-volume") == {"ok": True}
    busy = other.ask("try", "shared-volume")
    assert busy["ok"] is False
    assert (
        "in another pid namespace" in busy["error"] or "in its own pid namespace" in busy["error"]
    )
    assert holder.ask("release", "shared-volume") == {"ok": True}
    assert other.ask("try", "shared-volume") == {"ok": True}


# -- holder() from outside: the kernel names the holder by its pid here -----------------------


@pytest.mark.parametrize("own_pid", [1, 2], ids=["holder-is-pid-1", "holder-is-pid-2"])
def test_holder_inside_seen_from_outside_is_named_by_its_pid_here(namespaces, agents, own_pid):
    inner = agents(inside=True, own_pid=own_pid)
    assert inner.ask("hold", "job") == {"ok": True}
    found = ProcessLock("job").holder()
    assert found is not None
    # Never this machine's pid 1 or 2 (init, kthreadd): the process that holds the lock.
    assert found.pid == inner.pid
    assert found.pid not in (1, 2)
    assert found.own_pid == own_pid
    assert found.elsewhere == "pid-namespace"
    assert found.argv == tuple(inner.argv)
    assert found.name == "job"
    assert found.acquired_at is not None
    text = found.describe()
    assert text == (
        f"pid {inner.pid} ({short_command(inner.argv)}), pid {own_pid} in its own pid namespace"
    )
    with pytest.raises(LockHeldError) as info:
        ProcessLock("job").acquire(timeout=0)
    assert text in str(info.value)


def status_json(*args: str) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "proclock", "status", "--json", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(out.stdout)


def test_status_from_outside_names_the_holder_by_its_pid_here(namespaces, agents):
    inner = agents(inside=True)
    assert inner.ask("hold", "job") == {"ok": True}
    (row,) = status_json("job")
    assert row["state"] == "held"
    assert row["pid"] == inner.pid


# -- holder() from inside: the holder has no pid here ------------------------------------------


def test_holder_outside_seen_from_inside_has_no_local_pid(namespaces, agents):
    inner = agents(inside=True)
    with ProcessLock("job"):
        seen = inner.ask("holder", "job")
        busy = inner.ask("try", "job")
    me = os.getpid()
    assert seen["holder"] == {
        "pid": None,  # our pid means nothing there: it could be any process of theirs
        "hostname": os.uname().nodename,
        "argv": list(sys.orig_argv),
        "acquired_at": seen["holder"]["acquired_at"],
        "shared": False,
        "name": "job",
        "start_time": seen["holder"]["start_time"],
        "own_pid": me,
        "elsewhere": "pid-namespace",
    }
    prefix = f"pid {me} in another pid namespace, host {os.uname().nodename} ("
    assert seen["describe"].startswith(prefix)
    assert busy["ok"] is False
    assert seen["describe"] in busy["error"]
    # Released: free for them at once, and holder() says so (the record stays: history).
    assert inner.ask("holder", "job") == {"holder": None, "describe": None}
    assert inner.ask("try", "job") == {"ok": True}


@pytest.mark.parametrize("own_pid", [1, 2], ids=["viewer-is-pid-1", "viewer-is-pid-2"])
def test_sibling_namespaces_never_take_the_holders_pid_for_their_own(namespaces, agents, own_pid):
    # The holder is pid 1 of its namespace; so is the viewer (or its shell) in its own: a
    # record's pid 1 is neither the viewer's init nor this machine's.
    holder = agents(inside=True)
    viewer = agents(inside=True, own_pid=own_pid)
    assert holder.ask("hold", "job") == {"ok": True}
    seen = viewer.ask("holder", "job")
    assert seen["holder"]["pid"] is None
    assert seen["holder"]["own_pid"] == 1
    assert seen["holder"]["elsewhere"] == "pid-namespace"
    assert seen["holder"]["argv"] == holder.argv
    assert seen["describe"].startswith(
        f"pid 1 in another pid namespace, host {os.uname().nodename} ("
    )


def test_status_from_inside_says_held_not_free(namespaces, agents, lock_dir):
    # /proc/locks inside the namespace leaves the line out: the lock itself is asked.
    with ProcessLock("job"):
        out = subprocess.run(
            [*UNSHARE, sys.executable, "-m", "proclock", "status", "--json", "job"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    (row,) = json.loads(out.stdout)
    assert row["state"] == "held"
    assert row["pid"] is None


def test_a_shared_holder_outside_is_seen_as_shared_from_inside(namespaces, agents):
    inner = agents(inside=True)
    with ProcessLock("readers", shared=True):
        seen = inner.ask("holder", "readers")
    assert seen["holder"]["shared"] is True
    assert seen["holder"]["pid"] is None
    assert seen["describe"] == "a process in another pid namespace"


# -- a killed holder ---------------------------------------------------------------------------


def test_holder_killed_inside_frees_the_lock_outside_at_once(namespaces, agents):
    inner = agents(inside=True)
    waiter = agents(inside=False)
    assert inner.ask("hold", "job") == {"ok": True}
    assert waiter.ask("try", "job")["ok"] is False
    inner.kill()  # SIGKILL to pid 1 of the namespace; unshare has reaped it
    assert ProcessLock("job").holder() is None
    with ProcessLock("job").acquire(timeout=0):  # no grace period, no stale lock
        assert waiter.ask("try", "job")["ok"] is False
    assert waiter.ask("try", "job") == {"ok": True}


def test_holder_killed_outside_frees_the_lock_inside_at_once(namespaces, agents):
    outer = agents(inside=False)
    inner = agents(inside=True, own_pid=2)
    assert outer.ask("hold", "job") == {"ok": True}
    assert inner.ask("try", "job")["ok"] is False
    outer.kill()
    assert inner.ask("holder", "job") == {"holder": None, "describe": None}
    assert inner.ask("try", "job") == {"ok": True}


def test_a_waiter_in_another_namespace_gets_the_lock_of_a_killed_holder(namespaces, agents):
    holder = agents(inside=True)
    waiter = agents(inside=True)
    assert holder.ask("hold", "job") == {"ok": True}
    waiter.proc.stdin.write("wait job\n")  # blocks in flock(2) until the holder dies
    waiter.proc.stdin.flush()
    holder.kill()
    assert waiter.read() == {"ok": True}
    assert ProcessLock("job").holder().pid == waiter.pid


# -- what the record says ----------------------------------------------------------------------


def test_the_record_says_which_kernel_and_pid_namespace_wrote_it(namespaces, agents):
    inner = agents(inside=True)
    assert inner.ask("hold", "job") == {"ok": True}
    record = json.loads(Path(lock_path("job")).read_bytes())
    assert record["pid"] == 1
    assert record["pidns"] == inner.ns
    assert record["boot"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert (record["boot"], os.stat("/proc/self/ns/pid").st_ino) == identity()
    # It starts as every version's records do: each recognises it as a record, and replaces
    # it with its own at its next acquisition.
    assert Path(lock_path("job")).read_bytes().startswith(b'{"v":1,')
    assert inner.ask("release", "job") == {"ok": True}
    with ProcessLock("job"):
        assert json.loads(Path(lock_path("job")).read_bytes())["pid"] == os.getpid()


def flock_holding(path: Path) -> subprocess.Popen:
    """flock(1) holding `path` until its stdin closes (a holder that writes no record)."""
    proc = subprocess.Popen(
        ["flock", "-x", str(path), "sh", "-c", "echo locked; exec cat >/dev/null"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "locked\n"
    return proc


def done(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.stdout.close()
    assert proc.wait(30) == 0


def proc_start(pid: int) -> int:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return int(data[data.rfind(b")") + 2 :].split()[19])


def write_record(path: Path, **record) -> None:
    path.write_text(json.dumps({"v": 1, "name": "job", "at": 1_700_000_000.5, **record}) + "\n")


def test_a_record_written_before_namespaces_were_recorded_still_reads(lock_dir):
    # A record of an earlier version (no "boot", no "pidns") of the live holder: as before.
    path = Path(lock_path("job"))
    path.touch()
    holder = flock_holding(path)
    try:
        write_record(path, pid=holder.pid, start=proc_start(holder.pid), argv=["old", "x"])
        found = ProcessLock("job").holder()
    finally:
        done(holder)
    assert found.pid == holder.pid
    assert found.argv == ("old", "x")
    assert found.own_pid is None
    assert found.elsewhere is None
    assert found.describe() == f"pid {holder.pid} (old x)"


def test_an_old_record_of_a_holder_outside_reads_from_inside(namespaces, agents):
    inner = agents(inside=True)
    path = Path(lock_path("job"))
    path.touch()
    holder = flock_holding(path)
    try:
        write_record(path, pid=holder.pid, start=proc_start(holder.pid), argv=["old", "x"])
        seen = inner.ask("holder", "job")
    finally:
        done(holder)
    assert seen["holder"]["pid"] is None
    assert seen["holder"]["own_pid"] == holder.pid
    assert seen["describe"].startswith(f"pid {holder.pid} in another pid namespace")


@pytest.mark.parametrize(
    "where",
    [
        pytest.param({"pidns": 4026599999}, id="another-pid-namespace"),
        pytest.param({"pidns": 0xEFFFFFFC, "boot": "another-machine"}, id="another-machine"),
    ],
)
def test_a_pid_1_recorded_elsewhere_is_never_this_machines_init(lock_dir, where):
    # A record says pid 1 (a container's init, or another machine's holder) while a local
    # process holds the lock: the kernel's holder is named, never our pid 1.
    path = Path(lock_path("job"))
    path.touch()
    holder = flock_holding(path)
    try:
        record = {"boot": identity()[0], **where}
        write_record(path, pid=1, start=proc_start(1), argv=["init"], **record)
        found = ProcessLock("job").holder()
    finally:
        done(holder)
    assert found.pid == holder.pid
    assert found.argv[0] == "flock"
    assert found.elsewhere is None


def test_a_hidden_holder_of_another_machine_is_described_from_its_record(namespaces, agents):
    # What a container sees of a holder it cannot see whose record another kernel wrote
    # (an NFS client): its pid and host as recorded, never a pid of ours.
    inner = agents(inside=True)
    path = Path(lock_path("job"))
    path.touch()
    holder = flock_holding(path)
    try:
        write_record(path, pid=1, start=5, argv=["backup"], host="nfs-b", boot="x", pidns=1)
        seen = inner.ask("holder", "job")
    finally:
        done(holder)
    assert seen["holder"]["pid"] is None
    assert seen["holder"]["elsewhere"] == "machine"
    assert seen["describe"] == "pid 1 on another machine, host nfs-b (backup)"


# -- descriptions and pickling -----------------------------------------------------------------


DESCRIBED = [
    pytest.param(Holder(42, argv=("python", "job.py")), "pid 42 (python job.py)", id="here"),
    pytest.param(
        Holder(5884, argv=("python", "job.py"), own_pid=1, elsewhere="pid-namespace"),
        "pid 5884 (python job.py), pid 1 in its own pid namespace",
        id="inside-seen-from-outside",
    ),
    pytest.param(
        Holder(None, "web-1", ("python", "job.py"), own_pid=1, elsewhere="pid-namespace"),
        "pid 1 in another pid namespace, host web-1 (python job.py)",
        id="outside-seen-from-inside",
    ),
    pytest.param(
        Holder(None, "nfs-b", ("backup",), own_pid=7, elsewhere="machine"),
        "pid 7 on another machine, host nfs-b (backup)",
        id="another-machine",
    ),
    pytest.param(
        Holder(None, elsewhere="pid-namespace"),
        "a process in another pid namespace",
        id="unknown-in-another-namespace",
    ),
    pytest.param(
        Holder(None, "evil\nhost", ("x",), own_pid=3, elsewhere="pid-namespace"),
        "pid 3 in another pid namespace, host evil\\nhost (x)",
        id="escaped-hostname",
    ),
]


@pytest.mark.parametrize(("holder", "text"), DESCRIBED)
def test_a_holder_elsewhere_is_described_on_one_line(holder, text):
    assert holder.describe() == text
    error = LockHeldError("/run/proclock/job.lock", "job", holder)
    assert text in str(error)
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301  (our own bytes)
    assert fields(copy.holder) == fields(holder)
    assert str(copy) == str(error)
    assert pickle.loads(pickle.dumps(holder, 0)) == holder  # noqa: S301


# -- network file systems: what can be checked on one machine ----------------------------------


def test_the_probe_asks_with_a_shared_lock_where_an_exclusive_one_is_refused(lock_dir, monkeypatch):
    # Over NFS "in order to place an exclusive lock, the file must be opened for writing"
    # (flock(2)): LOCK_EX on a read-only descriptor fails with EBADF. Injected here.
    from proclock import _flock, _holder

    real = _flock.try_lock

    def nfs_try_lock(fd, op, path):
        if op == _flock.EX:
            raise OSError(errno.EBADF, "Bad file descriptor", path)
        return real(fd, op, path)

    path = Path(lock_path("job"))
    path.touch()
    monkeypatch.setattr(_flock, "try_lock", nfs_try_lock)
    assert _holder._probe(str(path)) is None  # free
    holder = flock_holding(path)
    try:
        assert _holder._probe(str(path)) is False  # a writer refuses LOCK_SH: held
    finally:
        done(holder)


def test_an_unreadable_record_leaves_the_kernels_answer(lock_dir, monkeypatch):
    # Over SMB a file locked through another descriptor refuses reads with EACCES
    # (flock(2), CIFS details): holder() names the holder from the kernel all the same.
    path = Path(lock_path("job"))
    path.touch()
    holder = flock_holding(path)
    try:
        write_record(path, pid=holder.pid, start=proc_start(holder.pid), argv=["rec"])

        def smb_pread(fd, size, offset):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(os, "pread", smb_pread)
        found = ProcessLock("job").holder()
        monkeypatch.undo()
    finally:
        done(holder)
    assert found.pid == holder.pid
    assert found.argv[0] == "flock"
