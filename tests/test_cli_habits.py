"""The command line's flock(1) habits, its lock directory rules and its JSON, with real processes.

Every test drives `python -m proclock` (or the console script) in a subprocess; holders are real
processes (flock(1) or proclock itself) that say "ready" once they hold the lock.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from proclock import _names

PY = sys.executable
FLOCK = shutil.which("flock") or "/usr/bin/flock"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
# Holds whatever lock it was started under until its stdin closes; says "ready" first.
READY = "import sys; print('ready', flush=True); sys.stdin.read()"


def proclock(*args: str, env: dict[str, str] | None = None, timeout: float = 20):
    return subprocess.run(
        [PY, "-m", "proclock", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


def path_of(name: str) -> str:
    out = proclock("path", name)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


class Held:
    """A process holding a lock: `flock FILE python -c READY`, or `proclock run ...`."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            [*argv, PY, "-c", READY],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == "ready\n"

    def release(self) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=20) == 0
        self.proc.stdout.close()


def one_line(text: str) -> str:
    assert text.count("\n") == 1, text
    assert "Traceback" not in text
    return text


# -- -c STRING -----------------------------------------------------------------------------------


def test_c_runs_one_shell_string_under_the_lock_with_its_status(lock_dir):
    path = path_of("job")
    # Inside STRING the lock is held: flock(1) on the same file finds it busy.
    string = f'flock -n "{path}" true || echo busy; echo a b | tr a-z A-Z; exit 7'
    out = proclock("run", "job", "-c", string)
    assert out.returncode == 7, out.stderr
    assert out.stdout.splitlines() == ["busy", "A B"]
    long_form = proclock("run", "--command", "echo long", "job")  # and before NAME
    assert (long_form.returncode, long_form.stdout) == (0, "long\n")
    with_options = proclock("run", "-n", "-E", "0", "--path", path, "-c", "echo path")
    assert (with_options.returncode, with_options.stdout) == (0, "path\n")


@pytest.mark.parametrize(
    ("shell", "expected"),
    [
        pytest.param("/bin/sh", "/bin/sh", id="SHELL"),
        pytest.param("", "/bin/sh", id="empty-SHELL"),
        pytest.param(None, "/bin/sh", id="no-SHELL"),
    ],
)
def test_c_uses_SHELL_or_bin_sh_as_flock1_does(lock_dir, shell, expected):  # noqa: N802
    env = dict(os.environ)
    env.pop("SHELL", None)
    if shell is not None:
        env["SHELL"] = shell
    ours = proclock("run", "job", "-c", 'echo "$0"', env=env)
    assert (ours.returncode, ours.stdout) == (0, f"{expected}\n"), ours.stderr
    theirs = subprocess.run(
        [FLOCK, path_of("job"), "-c", 'echo "$0"'],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert theirs.stdout == ours.stdout  # what util-linux flock(1) runs, we run


def test_c_runs_the_shell_named_by_SHELL(lock_dir, tmp_path):  # noqa: N802
    fake = tmp_path / "myshell"
    fake.write_text('#!/bin/sh\necho "myshell got: $1 $2"\n')
    fake.chmod(0o755)
    out = proclock("run", "job", "-c", "true", env=dict(os.environ, SHELL=str(fake)))
    assert (out.returncode, out.stdout) == (0, "myshell got: -c true\n")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        pytest.param(["run", "job", "-c", "echo x", "--", "true"], "not both", id="c-and-command"),
        pytest.param(["run", "job", "-c", "echo x", "--"], "not both", id="c-and-dashdash"),
        pytest.param(["run", "job", "-c", "echo", "x"], "exactly one STRING", id="c-two-words"),
        pytest.param(["run", "job", "-c"], "expected one argument", id="c-no-string"),
    ],
)
def test_c_misused_is_one_line_and_status_2(lock_dir, tmp_path, args, says):
    marker = tmp_path / "ran"
    out = proclock(*[a.replace("echo x", f"touch {marker}") for a in args])
    assert out.returncode == 2
    assert says in one_line(out.stderr)
    assert not marker.exists()


# -- -n with -w ----------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [["-n", "-w", "60"], ["-w", "60", "-n"]], ids=["n-w", "w-n"])
def test_n_with_w_is_one_try_as_flock1_makes_it(lock_dir, order):
    path = path_of("job")
    held = Held([FLOCK, path])
    try:
        # util-linux flock(1) exits at once with the conflict status: -n wins over -w (its
        # flock(2) call has LOCK_NB; the -w timer never fires). A 60 s wait would time out here.
        theirs = subprocess.run([FLOCK, *order, "-E", "5", path, "true"], timeout=20, check=False)
        assert theirs.returncode == 5
        ours = proclock("run", *order, "-E", "5", "job", "--", "true", timeout=20)
        assert ours.returncode == 5
        assert "is held by pid" in one_line(ours.stderr)
        assert "gave up after" not in ours.stderr  # a -n refusal, not an expired wait
        retried = proclock(
            "run", *order, "--retry", "2", "--retry-delay", "0", "job", "--", "true", timeout=20
        )
        assert retried.returncode == 1
    finally:
        held.release()
    free = proclock("run", *order, "job", "-c", "echo ran")
    assert (free.returncode, free.stdout) == (0, "ran\n")


def test_n_with_a_bad_w_is_still_a_usage_error(lock_dir):
    out = proclock("run", "-n", "-w", "soon", "job", "--", "true")
    assert out.returncode == 2
    assert "soon" in one_line(out.stderr)


# -- what proclock refuses, and says why -------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "option"),
    [
        pytest.param(["-u", "9"], "-u", id="u-descriptor"),
        pytest.param(["--unlock", "job"], "--unlock", id="unlock-name"),
        pytest.param(["-F", "job", "--", "touch", "{marker}"], "-F", id="F"),
        pytest.param(["--no-fork", "job", "-c", "touch {marker}"], "--no-fork", id="no-fork"),
        pytest.param(["--fcntl", "job", "--", "touch", "{marker}"], "--fcntl", id="fcntl"),
        pytest.param(["--start", "0", "job", "--", "true"], "--start", id="start"),
        pytest.param(["--length", "1", "job", "--", "true"], "--length", id="length"),
    ],
)
def test_flock1_options_proclock_lacks_are_refused_in_one_line_saying_why(
    lock_dir, tmp_path, args, option
):
    marker = tmp_path / "ran"
    out = proclock("run", *[a.replace("{marker}", str(marker)) for a in args])
    assert out.returncode == 2
    line = one_line(out.stderr)
    assert "unrecognized" not in line
    assert f"{option} is not supported:" in line
    assert "proclock path --mkdir" in line  # what to use instead: flock(1) on our file
    assert not marker.exists()  # nothing ran


def test_the_remedy_names_the_lock_when_there_is_one(lock_dir):
    assert '"$(proclock path --mkdir job)"' in proclock("run", "-F", "job", "--", "true").stderr
    assert '"$(proclock path --mkdir NAME)"' in proclock("run", "-u", "9").stderr


@pytest.mark.parametrize("args", [["9"], ["-n", "9"], ["-s", "-w", "1", "12"]])
def test_the_descriptor_form_is_refused_in_one_line(lock_dir, args):
    out = proclock("run", *args)
    assert out.returncode == 2
    line = one_line(out.stderr)
    assert "descriptor form" in line
    assert "proclock path --mkdir" in line
    assert "-- COMMAND" in line  # how to use a lock that is really named so


def test_a_lock_named_by_digits_works_with_a_command(lock_dir):
    out = proclock("run", "9", "--", "sh", "-c", "echo held")
    assert (out.returncode, out.stdout) == (0, "held\n")
    assert proclock("run", "9", "-c", "exit 4").returncode == 4
    assert json.loads(proclock("status", "--json", "9").stdout)[0]["name"] == "9"


def test_flock1_long_option_spellings_are_accepted(lock_dir):
    path = path_of("job")
    held = Held([FLOCK, path])
    try:
        for opt in ("--nonblocking", "--nb", "--nonblock"):
            assert proclock("run", opt, "job", "--", "true").returncode == 1, opt
        assert proclock("run", "--wait", "0", "job", "--", "true").returncode == 1
    finally:
        held.release()
    assert proclock("run", "-e", "job", "--", "true").returncode == 0


# -- status, path and gc never create the lock directory -----------------------------------------


LOOKERS = [
    pytest.param(["status"], id="status"),
    pytest.param(["status", "--json"], id="status-json"),
    pytest.param(["status", "job"], id="status-name"),
    pytest.param(["gc"], id="gc"),
    pytest.param(["gc", "--dry-run"], id="gc-dry-run"),
    pytest.param(["path", "job"], id="path"),
]


@pytest.mark.parametrize("args", LOOKERS)
def test_a_missing_dir_given_is_an_error_and_never_created(tmp_path, monkeypatch, args):
    monkeypatch.delenv("PROCLOCK_DIR", raising=False)
    top = tmp_path / "nowhere"
    nested = top / "a" / "b"  # as root, --dir could otherwise create this anywhere
    out = proclock(*args, "--dir", str(nested))
    assert out.returncode == 73
    line = one_line(out.stderr)
    assert f"{nested} (--dir) does not exist" in line
    assert out.stdout == ""
    assert not top.exists()


@pytest.mark.parametrize("args", LOOKERS)
def test_a_missing_PROCLOCK_DIR_is_an_error_and_never_created(tmp_path, monkeypatch, args):  # noqa: N802
    top = tmp_path / "nowhere"
    monkeypatch.setenv("PROCLOCK_DIR", str(top / "locks"))
    out = proclock(*args)
    assert out.returncode == 73
    assert f"{top / 'locks'} ($PROCLOCK_DIR) does not exist" in one_line(out.stderr)
    assert not top.exists()


@pytest.fixture
def default_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An environment whose default lock directory (<TMPDIR>/proclock-<uid>) does not exist."""
    monkeypatch.delenv("PROCLOCK_DIR", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    return tmp / f"proclock-{os.geteuid()}"


def test_a_missing_default_dir_shows_no_locks_says_so_and_is_not_created(default_env):
    table = proclock("status")
    assert table.returncode == 0
    assert table.stdout.split() == ["NAME", "STATE", "PID", "SINCE", "WAITERS", "COMMAND"]
    assert f"{default_env} (the default) does not exist yet" in one_line(table.stderr)
    listing = proclock("status", "--json")
    assert (listing.returncode, json.loads(listing.stdout)) == (0, [])
    named = proclock("status", "--json", "job")
    (row,) = json.loads(named.stdout)
    assert (row["name"], row["state"], row["exists"]) == ("job", "free", False)
    for args in (["gc"], ["gc", "--dry-run"]):
        out = proclock(*args)
        assert (out.returncode, out.stdout, out.stderr) == (0, "", "")  # quiet, for cron
    assert not default_env.exists()


def test_path_reports_a_missing_default_dir_and_mkdir_creates_it(default_env):
    out = proclock("path", "job")
    assert (out.returncode, out.stdout) == (73, "")
    assert "add --mkdir" in one_line(out.stderr)
    assert not default_env.exists()
    made = proclock("path", "--mkdir", "job")
    assert made.returncode == 0, made.stderr
    assert default_env.is_dir()
    assert default_env.stat().st_mode & 0o777 == 0o700
    # The very file the library locks, and flock(1) can use it now.
    library = subprocess.run(
        [PY, "-c", "import proclock; print(proclock.ProcessLock('job').path)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert made.stdout == library.stdout
    assert subprocess.run([FLOCK, "-n", made.stdout.strip(), "true"], check=False).returncode == 0
    assert proclock("path", "job").stdout == made.stdout  # no --mkdir needed any more


def test_path_mkdir_creates_a_nested_dir_given(tmp_path, monkeypatch):
    monkeypatch.delenv("PROCLOCK_DIR", raising=False)
    nested = tmp_path / "a" / "b"
    out = proclock("path", "--mkdir", "--dir", str(nested), "job")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(nested / _names.file_name("job"))
    assert nested.stat().st_mode & 0o777 == 0o700


def test_run_still_creates_a_missing_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("PROCLOCK_DIR", raising=False)
    nested = tmp_path / "a" / "b"
    assert proclock("run", "--dir", str(nested), "job", "--", "true").returncode == 0
    assert (nested / _names.file_name("job")).exists()


# -- status --json -------------------------------------------------------------------------------


def documented_keys() -> list[tuple[str, str]]:
    """(key, meaning) of each row of docs/cli.md's `status --json` table, in order."""
    text = DOCS.read_text()
    section = text.split("### `status --json`", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|", section, re.MULTILINE)
    assert rows, "no key table in docs/cli.md"
    return rows


def test_status_json_times_are_iso8601_with_an_offset_and_keys_are_documented(lock_dir):
    documented = documented_keys()
    times = [key for key, meaning in documented if "ISO 8601" in meaning]
    assert times == ["acquired_at"]
    before = datetime.now().astimezone()
    exclusive = Held([PY, "-m", "proclock", "run", "held", "--"])
    shared = Held([PY, "-m", "proclock", "run", "-s", "reader", "--"])
    flocked = Held([FLOCK, path_of("by-flock")])
    try:
        assert proclock("run", "idle", "--", "true").returncode == 0
        # In a time zone 5:30 east of UTC: JSON stays in UTC, the table shows local time.
        india = dict(os.environ, TZ="IST-5:30")
        out = proclock("status", "--json", env=india)
        assert out.returncode == 0, out.stderr
        rows = {row["name"]: row for row in json.loads(out.stdout)}
        table = proclock("status", env=india).stdout
    finally:
        for holder in (exclusive, shared, flocked):
            holder.release()
    assert set(rows) == {"held", "reader", "by-flock", "idle"}
    for row in rows.values():
        assert list(row) == [key for key, _ in documented]  # the doc cannot drift
    assert rows["held"]["pid"] == exclusive.proc.pid
    at = datetime.fromisoformat(rows["held"]["acquired_at"])
    assert at.tzinfo is not None
    assert at.utcoffset() == timedelta(0)  # UTC, so that the strings sort as the times do
    assert before - timedelta(seconds=1) <= at <= datetime.now().astimezone()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", rows["held"]["acquired_at"]
    )
    for row in rows.values():
        for key in times:
            if row[key] is not None:
                assert datetime.fromisoformat(row[key]).tzinfo is not None
    assert rows["idle"]["acquired_at"] is None
    # The table, for people, shows the same instant in local time.
    local = (at + timedelta(hours=5, minutes=30)).strftime("%Y-%m-%d %H:%M:%S")
    assert local in next(line for line in table.splitlines() if line.startswith("held "))


def test_status_table_command_is_one_line_with_control_characters_escaped(lock_dir):
    held = Held([PY, "-m", "proclock", "run", "odd", "--", "env", "X=a\nb"])
    try:
        out = proclock("status", "odd")
    finally:
        held.release()
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stdout
    assert "X=a\\nb" in lines[1]


# -- start-up ------------------------------------------------------------------------------------


def test_path_does_not_import_importlib_metadata(lock_dir):
    # -X importtime lists every module imported, on stderr; --version is the only reader.
    out = subprocess.run(
        [PY, "-X", "importtime", "-m", "proclock", "path", "x"],
        capture_output=True,
        text=True,
        check=True,
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()}
    assert "proclock._cli" in imported
    assert "importlib.metadata" not in imported
    assert "subprocess" not in imported  # only `run` needs it
    assert out.stdout.strip() == str(lock_dir / _names.file_name("x"))
    version = subprocess.run(
        [PY, "-X", "importtime", "-m", "proclock", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "importlib.metadata" in version.stderr
