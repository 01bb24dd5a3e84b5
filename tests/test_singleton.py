"""singleton_process, through real programs started twice."""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from typing import TYPE_CHECKING, Any

import pytest

from proclock import LockHeldError, ProcessLock, lock_path
from proclock._holder import lock_state

if TYPE_CHECKING:
    from pathlib import Path

# The program holds its instance lock, says "ready", and finishes when told to (a line on
# stdin): no sleeps anywhere.
PROGRAM = """\
import sys
from proclock import AlreadyRunningError, singleton_process

@singleton_process({options})
def main():
    print("ready", flush=True)
    sys.stdin.readline()
    print("done", flush=True)

if __name__ == "__main__":
    try:
        main()
    except AlreadyRunningError as error:
        print(f"already running: {{error.holder.pid}}", flush=True)
        sys.exit(7)
"""


def write_program(path, options=""):
    path.write_text(PROGRAM.format(options=options))
    return path


class Running:
    """A first instance, started and holding its lock until `finish()`."""

    def __init__(self, *command, cwd=None):
        self.process = subprocess.Popen(
            [sys.executable, *command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
        )
        line = self.process.stdout.readline()
        assert line == "ready\n", (line, self.process.stderr.read())

    @property
    def pid(self):
        return self.process.pid

    def finish(self):
        out, err = self.process.communicate("go\n", timeout=30)
        assert self.process.returncode == 0, err
        assert out == "done\n"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.process.returncode is None:
            self.finish()


def run(*command, cwd=None):
    """A second instance, expected to end by itself (told to finish if it gets to run)."""
    return subprocess.run(
        [sys.executable, *command],
        input="go\n",
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        check=False,
    )


def test_second_instance_exits_with_code_1_and_one_line(lock_dir, tmp_path):
    script = write_program(tmp_path / "prog.py")
    with Running(str(script)) as first:
        second = run(str(script))
        assert second.returncode == 1
        assert second.stdout == ""  # main() never ran
        lines = second.stderr.splitlines()
        assert len(lines) == 1, second.stderr
        assert f"pid {first.pid}" in lines[0]
        assert str(script) in lines[0]  # the holder's command line
    # Once the first has finished, the program runs again.
    again = run(str(script))
    assert again.returncode == 0, again.stderr
    assert again.stdout == "ready\ndone\n"


def test_exit_code_is_respected(lock_dir, tmp_path):
    script = write_program(tmp_path / "prog3.py", "exit_code=3")
    with Running(str(script)):
        second = run(str(script))
    assert second.returncode == 3
    assert len(second.stderr.splitlines()) == 1


def test_on_contention_raise_raises_already_running(lock_dir, tmp_path):
    script = write_program(tmp_path / "raising.py", "on_contention='raise'")
    with Running(str(script)) as first:
        second = run(str(script))
    assert second.returncode == 7, second.stderr
    assert second.stdout == f"already running: {first.pid}\n"


def test_timeout_waits_for_the_first_instance(lock_dir, tmp_path):
    script = write_program(tmp_path / "patient.py", "timeout=5")
    first = Running(str(script))
    second = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    path = str(lock_path(str(script)))
    # The second instance waits in the kernel: /proc/locks shows it blocked on the file.
    deadline = time.monotonic() + 30
    while lock_state(path)[1] < 1:
        assert second.poll() is None, second.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert lock_state(path)[0].pid == first.pid
    first.finish()
    out, err = second.communicate("go\n", timeout=30)
    assert second.returncode == 0, err
    assert out == "ready\ndone\n"


def test_timeout_expiring_exits(lock_dir, tmp_path):
    script = write_program(tmp_path / "expires.py", "timeout=0.05")
    with Running(str(script)) as first:
        second = run(str(script))
    assert second.returncode == 1
    assert f"pid {first.pid}" in second.stderr


def test_name_is_the_program_so_two_scripts_do_not_collide(lock_dir, tmp_path):
    one = write_program(tmp_path / "one.py")
    two = write_program(tmp_path / "two.py")
    with Running(str(one)) as first:
        # Both define main(); the lock is the program's (its absolute path), not main's.
        with Running(str(two)) as other:
            assert program_lock(two).holder().pid == other.pid
        assert program_lock(one).holder().pid == first.pid
        with pytest.raises(LockHeldError):
            program_lock(one, blocking=False).acquire()


def test_same_script_by_a_relative_path_collides(lock_dir, tmp_path):
    script = write_program(tmp_path / "rel.py")
    with Running(str(script)):
        second = run("rel.py", cwd=tmp_path)
    assert second.returncode == 1


def test_python_m_package_is_named_after_the_package(lock_dir, tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    write_program(pkg / "__main__.py")
    with Running("-m", "mypkg", cwd=tmp_path) as first:
        assert ProcessLock("mypkg").holder().pid == first.pid
        with pytest.raises(LockHeldError):
            ProcessLock("mypkg", blocking=False).acquire()
        second = run("-m", "mypkg", cwd=tmp_path)
        assert second.returncode == 1
        assert f"pid {first.pid}" in second.stderr


def test_python_m_module_is_named_after_the_module(lock_dir, tmp_path):
    write_program(tmp_path / "tool.py")
    with Running("-m", "tool", cwd=tmp_path) as first:
        assert ProcessLock("tool").holder().pid == first.pid
        # Run as a script instead, it is another program name (its absolute path).
        as_script = run(str(tmp_path / "tool.py"))
        assert as_script.returncode == 0, as_script.stderr


def test_explicit_name(lock_dir, tmp_path):
    a = write_program(tmp_path / "a.py", "'shared-name'")
    b = write_program(tmp_path / "b.py", "name='shared-name'")
    with Running(str(a)) as first:
        second = run(str(b))
        assert second.returncode == 1
        assert f"pid {first.pid}" in second.stderr
        assert ProcessLock("shared-name").holder().pid == first.pid


def program_lock(script: Path, **options: Any) -> ProcessLock:
    """The lock of a script's singleton, named by its absolute path (warned about in user code)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return ProcessLock(str(script), **options)
