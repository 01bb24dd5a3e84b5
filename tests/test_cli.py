"""The `proclock` command line, driven through the real console script with subprocess."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from proclock import _holder, _names

PROCLOCK = str(Path(sys.executable).parent / "proclock")
if not os.access(PROCLOCK, os.X_OK):  # pragma: no cover - an install without the venv layout
    PROCLOCK = shutil.which("proclock") or PROCLOCK
FLOCK = shutil.which("flock") or "/usr/bin/flock"
PY = sys.executable

# A COMMAND that reports on stdout: "ready" once its signal handlers are installed, the name of
# any forwarded signal it gets (then exits 3), and otherwise exits 0 when its stdin closes.
SCRIPT = """\
import os, signal, sys
def got(signum, frame):
    sys.stdout.write(signal.Signals(signum).name + "\\n")
    sys.stdout.flush()
    os._exit(3)
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, got)
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "cmd.py"
    path.write_text(SCRIPT)
    return str(path)


def proclock(*args, **kwargs):
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("timeout", 20)
    return subprocess.run([PROCLOCK, *args], check=False, **kwargs)


def path_of(name):
    out = proclock("path", name)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


class Holder:
    """`proclock run [opts] NAME -- python SCRIPT`, running until release()."""

    def __init__(self, script, name, *opts, stderr=subprocess.PIPE):
        self.proc = subprocess.Popen(
            [PROCLOCK, "run", *opts, name, "--", PY, script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        assert self.proc.stdout.readline() == "ready\n"

    @property
    def pid(self):
        return self.proc.pid

    def release(self):
        self.proc.stdin.close()
        assert self.proc.wait(timeout=20) == 0
        self.proc.stdout.close()
        if self.proc.stderr:
            self.proc.stderr.close()


def free(path):
    return subprocess.run([FLOCK, "-n", path, "true"], check=False).returncode == 0


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        time.sleep(0.005)


def waiters(path):
    return _holder.lock_state(path)[1]


# -- exit status ---------------------------------------------------------------------------------


def test_exit_status_is_commands(lock_dir):
    assert proclock("run", "job", "--", "sh", "-c", "exit 7").returncode == 7
    assert proclock("run", "job", "--", "true").returncode == 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_signal_that_kills_command_is_128_plus_n(lock_dir, sig):
    out = proclock("run", "job", "--", "sh", "-c", f"kill -{sig.name[3:]} $$")
    assert out.returncode == 128 + sig


def test_conflict_exits_with_the_conflict_code_and_one_line_naming_the_holder(lock_dir, script):
    holder = Holder(script, "nightly")
    try:
        busy = proclock("run", "-n", "nightly", "--", "true")
        assert busy.returncode == 1
        lines = busy.stderr.splitlines()
        assert len(lines) == 1, busy.stderr
        assert "'nightly'" in lines[0]
        assert f"pid {holder.pid} (" in lines[0]
        assert "proclock run nightly" in lines[0]  # the holder's command
        assert " since 20" in lines[0]  # since when (a date)
        assert proclock("run", "-n", "-E", "42", "nightly", "--", "true").returncode == 42
        timed = proclock("run", "-w", "0.2", "-E", "5", "nightly", "--", "true")
        assert timed.returncode == 5
        assert len(timed.stderr.splitlines()) == 1
        assert "gave up after" in timed.stderr
        retried = proclock(
            "run", "-n", "--retry", "2", "--retry-delay", "0.01", "nightly", "--", "true"
        )
        assert retried.returncode == 1
        quiet = proclock("run", "-n", "-q", "nightly", "--", "true")
        assert (quiet.returncode, quiet.stderr) == (1, "")
        cron = proclock("run", "-n", "-q", "-E", "0", "nightly", "--", "true")  # the README's
        assert (cron.returncode, cron.stderr) == (0, "")
    finally:
        holder.release()
    assert proclock("run", "-n", "nightly", "--", "true").returncode == 0


def test_command_not_found_is_127_and_not_executable_is_126(lock_dir, tmp_path):
    missing = proclock("run", "job", "--", "no-such-command-xyz")
    assert missing.returncode == 127
    assert missing.stderr.count("\n") == 1
    assert "no-such-command-xyz" in missing.stderr
    plain = tmp_path / "plain.txt"
    plain.write_text("not a program\n")
    plain.chmod(0o644)
    denied = proclock("run", "job", "--", str(plain))
    assert denied.returncode == 126
    assert denied.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["run", "--bogus", "job", "--", "true"], id="unknown-option"),
        pytest.param(["run", "job", "true"], id="missing-dashdash"),
        pytest.param(["run", "job", "--"], id="missing-command"),
        pytest.param(["run", "--", "true"], id="missing-name"),
        pytest.param(["run", "-s", "-x", "job", "--", "true"], id="s-and-x"),
        pytest.param(["run", "--retry", "3", "job", "--", "true"], id="retry-unbounded"),
        pytest.param(["run", "-E", "300", "job", "--", "true"], id="bad-exit-code"),
        pytest.param(["run", "", "--", "true"], id="empty-name"),
        pytest.param(["gc", "--older-than", "soon"], id="bad-duration"),
        pytest.param(["frobnicate"], id="unknown-subcommand"),
        pytest.param([], id="no-subcommand"),
    ],
)
def test_bad_usage_is_one_line_and_status_2(lock_dir, args):
    out = proclock(*args)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1, out.stderr
    assert "error:" in out.stderr
    assert "Traceback" not in out.stderr


def test_an_unusable_directory_is_one_line_and_status_73(tmp_path, monkeypatch):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    monkeypatch.setenv("PROCLOCK_DIR", str(not_a_dir))
    for args in (["run", "job", "--", "true"], ["path", "job"], ["status"], ["gc"]):
        out = proclock(*args)
        assert out.returncode == 73, (args, out.stderr)
        assert out.stderr.count("\n") == 1
        assert str(not_a_dir) in out.stderr
        assert "Traceback" not in out.stderr


# -- signals -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signals_sent_to_proclock_reach_command(lock_dir, script, sig):
    holder = Holder(script, "job")
    os.kill(holder.pid, sig)
    assert holder.proc.stdout.readline() == f"{sig.name}\n"
    assert holder.proc.wait(timeout=20) == 3  # COMMAND's status
    holder.proc.stdin.close()
    holder.proc.stdout.close()
    holder.proc.stderr.close()


# -- inheritance ---------------------------------------------------------------------------------


@pytest.mark.timeout(20)
@pytest.mark.parametrize("close", [False, True], ids=["inherit", "close"])
def test_forked_grandchild_keeps_the_lock_unless_close(lock_dir, close):
    path = path_of("job")
    opts = ["-o"] if close else []
    # COMMAND backgrounds a grandchild that keeps every inherited descriptor, then exits.
    out = proclock("run", *opts, "job", "--", "sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!")
    assert out.returncode == 0, out.stderr
    grandchild = int(out.stdout)
    try:
        assert Path(f"/proc/{grandchild}").exists()
        if close:
            assert free(path)  # only proclock held it, and proclock is gone
        else:
            assert not free(path)  # flock(1) semantics: the grandchild holds it now
            assert proclock("run", "-n", "job", "--", "true").returncode == 1
    finally:
        os.kill(grandchild, signal.SIGKILL)
    # The kernel frees it when the grandchild's descriptor closes: flock -w waits for that.
    assert subprocess.run([FLOCK, "-w", "10", path, "true"], check=False).returncode == 0


# -- flock(1) interop ----------------------------------------------------------------------------


def test_flock1_and_proclock_exclude_each_other_on_proclock_path(lock_dir, script):
    path = path_of("shared-job")
    # flock(1) holds it: proclock sees it busy, and names flock's pid.
    held = subprocess.Popen(
        [FLOCK, path, PY, script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert held.stdout.readline() == "ready\n"
    busy = proclock("run", "-n", "shared-job", "--", "true")
    assert busy.returncode == 1
    assert f"pid {held.pid} (" in busy.stderr
    explicit = proclock("run", "-n", "--path", path, "--", "true")
    assert explicit.returncode == 1
    held.stdin.close()
    assert held.wait(timeout=20) == 0
    held.stdout.close()
    # proclock holds it: flock(1) finds it busy until proclock's COMMAND exits.
    holder = Holder(script, "shared-job")
    assert not free(path)
    holder.release()
    assert free(path)


# -- the wait message ----------------------------------------------------------------------------


def _read_pty(master, until=None, deadline=15.0):
    """Read the pty master until `until` appears (or EOF); returns what was read."""
    data = b""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        ready, _, _ = select.select([master], [], [], 0.1)
        if not ready:
            continue
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: every slave end is closed
            break
        if not chunk:
            break
        data += chunk
        if until is not None and until in data:
            break
    return data


@pytest.mark.timeout(20)
def test_waiting_on_a_terminal_shows_who_holds_the_lock(lock_dir, script):
    holder = Holder(script, "nightly-backup")
    master, slave = pty.openpty()
    try:
        waiter = subprocess.Popen(
            [PROCLOCK, "run", "nightly-backup", "--", "true"],
            stderr=slave,
            stdin=subprocess.DEVNULL,
        )
        os.close(slave)
        want = f"waiting for lock 'nightly-backup' held by pid {holder.pid} (".encode()
        seen = _read_pty(master, until=want)
        assert want in seen
        assert b"s..." in seen
        assert seen.startswith(b"\r")
        holder.release()
        assert waiter.wait(timeout=20) == 0
        rest = _read_pty(master)
        assert (seen + rest).endswith(b"\r\x1b[K")  # the line is cleared once the lock is ours
    finally:
        os.close(master)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("where", ["tty-quiet", "pipe"])
def test_no_wait_message_with_q_or_on_a_non_tty(lock_dir, script, where):
    holder = Holder(script, "job")
    path = path_of("job")
    master, slave = pty.openpty()
    try:
        opts = ["-q"] if where == "tty-quiet" else []
        waiter = subprocess.Popen(
            [PROCLOCK, "run", *opts, "job", "--", "true"],
            stdin=subprocess.DEVNULL,
            stderr=slave if where == "tty-quiet" else subprocess.PIPE,
        )
        os.close(slave)
        wait_until(lambda: waiters(path) >= 1)  # blocked in the kernel
        holder.release()
        assert waiter.wait(timeout=20) == 0
        if where == "pipe":
            assert waiter.stderr.read() == b""
            waiter.stderr.close()
        else:
            assert _read_pty(master, deadline=2.0) == b""
    finally:
        os.close(master)


# -- status --------------------------------------------------------------------------------------


def test_status_while_held_shows_holder_in_table_and_json(lock_dir, script):
    holder = Holder(script, "nightly")
    reader = Holder(script, "cache", "-s")
    try:
        proclock("run", "idle", "--", "true")
        table = proclock("status")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["NAME", "STATE", "PID", "SINCE", "WAITERS", "COMMAND"]
        rows = {line.split()[0]: line for line in lines[1:]}
        assert rows["nightly"].split()[1:3] == ["held", str(holder.pid)]
        assert "proclock run nightly" in rows["nightly"]
        assert rows["cache"].split()[1:3] == ["shared", str(reader.pid)]
        assert rows["idle"].split()[1] == "free"
        data = {row["name"]: row for row in json.loads(proclock("status", "--json").stdout)}
        assert set(data) == {"nightly", "cache", "idle"}
        assert data["nightly"]["state"] == "held"
        assert data["nightly"]["pid"] == holder.pid
        assert "proclock run nightly" in data["nightly"]["command"]
        at = datetime.fromisoformat(data["nightly"]["acquired_at"])
        assert at.timestamp() <= time.time()
        assert data["nightly"]["waiters"] == 0
        assert data["idle"]["state"] == "free"
        assert data["idle"]["pid"] is None
        only = json.loads(proclock("status", "--json", "nightly").stdout)
        assert [r["name"] for r in only] == ["nightly"]
    finally:
        holder.release()
        reader.release()
    after = json.loads(proclock("status", "--json", "nightly").stdout)
    assert after[0]["state"] == "free"


def test_status_counts_waiters(lock_dir, script):
    holder = Holder(script, "job")
    path = path_of("job")
    waiter = subprocess.Popen([PROCLOCK, "run", "job", "--", "true"], stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: waiters(path) >= 1)
        (row,) = json.loads(proclock("status", "--json", "job").stdout)
        assert (row["state"], row["waiters"]) == ("held", 1)
    finally:
        holder.release()
        assert waiter.wait(timeout=20) == 0


def test_status_shows_files_whose_name_cannot_be_recovered_by_file(lock_dir):
    # Lock files created by flock(1): no metadata. "plain" is recovered from the file name;
    # "a/b" is not (its prefix is "a_b"), nor is a file proclock did not name.
    for name in ("plain", "a/b"):
        subprocess.run([FLOCK, "-n", path_of(name), "true"], check=True)
    (lock_dir / "other.lock").write_text("garbage")
    rows = json.loads(proclock("status", "--json").stdout)
    by_file = {r["file"]: r for r in rows}
    assert by_file[_names.file_name("plain")]["name"] == "plain"
    assert by_file[_names.file_name("a/b")]["name"] is None
    assert by_file["other.lock"]["name"] is None
    assert all(r["state"] == "free" for r in rows)
    table = proclock("status").stdout
    assert f"<{_names.file_name('a/b')}>" in table
    assert "<other.lock>" in table


# -- path, gc ------------------------------------------------------------------------------------


def test_path_prints_lock_path_and_honours_dir(lock_dir, tmp_path):
    assert path_of("x") == str(lock_dir / _names.file_name("x"))
    other = tmp_path / "elsewhere"
    other.mkdir()
    out = proclock("path", "--dir", str(other), "x")
    assert out.stdout.strip() == str(other / _names.file_name("x"))
    module = subprocess.run(
        [PY, "-m", "proclock", "path", "x"], capture_output=True, text=True, check=True
    )
    assert module.stdout.strip() == path_of("x")


def test_gc_deletes_only_free_files_and_never_disturbs_a_holder_or_its_waiter(lock_dir, script):
    for name in ("old", "fresh"):
        assert proclock("run", name, "--", "true").returncode == 0
    old, fresh, busy = path_of("old"), path_of("fresh"), path_of("busy")
    (lock_dir / "notours.lock").write_text("")  # not a name proclock makes: left alone
    week_ago = time.time() - 8 * 86400
    os.utime(old, (week_ago, week_ago))
    holder = Holder(script, "busy")
    waiter = subprocess.Popen([PROCLOCK, "run", "busy", "--", "true"], stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: waiters(busy) >= 1)
        inode = os.stat(busy).st_ino
        dry = proclock("gc", "--dry-run")
        assert dry.stdout.splitlines() == sorted([f"would remove {fresh}", f"would remove {old}"])
        assert os.path.exists(old)
        assert os.path.exists(fresh)
        aged = proclock("gc", "--older-than", "7d")
        assert aged.stdout.splitlines() == [f"removed {old}"]
        assert not os.path.exists(old)
        assert os.path.exists(fresh)
        rest = proclock("gc")
        assert rest.stdout.splitlines() == [f"removed {fresh}"]
        assert os.stat(busy).st_ino == inode  # held: never touched
        assert (lock_dir / "notours.lock").exists()
        assert waiter.poll() is None
    finally:
        holder.release()
    assert waiter.wait(timeout=20) == 0


@pytest.mark.timeout(20)
def test_a_waiter_whose_file_gc_removed_holds_the_file_now_at_the_path(lock_dir, script):
    path = path_of("job")
    holder = Holder(script, "job")
    waiter = subprocess.Popen(
        [PROCLOCK, "run", "job", "--", PY, script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: waiters(path) >= 1)  # the waiter has the old file open, in flock(2)
        # Stop the waiter so that gc wins the lock the holder releases: the waiter then
        # obtains the old inode only after gc unlinked it and closed it.
        os.kill(waiter.pid, signal.SIGSTOP)
        holder.release()
        gone = proclock("gc")
        assert gone.stdout.splitlines() == [f"removed {path}"]
        assert not os.path.exists(path)
        os.kill(waiter.pid, signal.SIGCONT)
        assert waiter.stdout.readline() == "ready\n"  # it runs COMMAND...
        assert os.path.exists(path)  # ...holding the new file at the path, not the orphan
        assert not free(path)
        (row,) = json.loads(proclock("status", "--json", "job").stdout)
        assert (row["state"], row["pid"]) == ("held", waiter.pid)
    finally:
        os.kill(waiter.pid, signal.SIGCONT)
        waiter.stdin.close()
        assert waiter.wait(timeout=20) == 0
        waiter.stdout.close()
        waiter.stderr.close()
    assert free(path)


# -- help ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sub", ["run", "status", "path", "gc"])
def test_help_of_every_subcommand_has_examples(sub):
    out = proclock(sub, "--help")
    assert out.returncode == 0
    assert "examples:" in out.stdout
    assert f"  proclock {sub}" in out.stdout.split("examples:", 1)[1]


def test_top_level_help_has_the_exit_status_table():
    out = proclock("--help")
    assert out.returncode == 0
    for code in ("126", "127", "128+N", "73"):
        assert code in out.stdout


def test_verbose_reports_acquisition_command_and_release(lock_dir):
    out = proclock("run", "-v", "-o", "job", "--", "true")
    assert out.returncode == 0
    text = out.stderr
    assert "acquired exclusive lock 'job'" in text
    assert "exited with status 0" in text
    assert "released lock 'job'" in text


def test_import_proclock_does_not_load_the_cli():
    code = "import sys, proclock; assert 'proclock._cli' not in sys.modules"
    subprocess.run([PY, "-c", code], check=True)
