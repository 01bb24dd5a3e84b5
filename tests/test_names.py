"""Lock names: the name -> file mapping, and names derived from functions and programs."""

from __future__ import annotations

import json
import operator
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import proclock
from conftest import lock_file
from proclock import LockNameError, ProcessLock, process_locked

# Names that look like absolute paths are the point here; ProcessLock warns about them once.
pytestmark = pytest.mark.filterwarnings("ignore:the lock name .* looks like a file path")


SAFE_BASENAME = re.compile(r"[A-Za-z0-9._-]+\.lock")
NAME_MAX = 255

# Any code point, lone surrogates included (names may come from os.fsdecode of raw bytes).
_CHARS = st.one_of(
    st.characters(exclude_categories=()),
    st.integers(0xD800, 0xDFFF).map(chr),
    st.sampled_from("/\\.:-_ \t\n~*?AaZz09"),
)
_SHORT = st.text(_CHARS, min_size=1, max_size=40)
NAMES = st.one_of(
    _SHORT,
    st.builds(operator.mul, _SHORT, st.integers(5, 40)),  # long: past any prefix bound
    st.sampled_from(
        ["..", ".", "../x", "/etc/passwd", "a/../../b", "\\..\\x", "~root", "-", ".lock", "...."]
    ),
).filter(lambda s: "\x00" not in s)
HYPOTHESIS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def inside(path: Path, directory: Path) -> bool:
    return (
        path.parent == directory
        and os.path.dirname(os.path.realpath(path)) == os.path.realpath(directory)
        and path.name not in {"", ".", ".."}
        and "/" not in path.name
    )


# -- the file name mapping --------------------------------------------------------------------


@HYPOTHESIS
@given(names=st.lists(NAMES, min_size=2, max_size=12, unique=True))
@example(names=["a/b", "a_b", "a b", "a\\b"])
@example(names=["A", "a"])
@example(names=["x" * 1000, "x" * 1000 + "y", "x" * 999])
@example(names=[".x", "x", "..x"])
@example(names=["a\udcff", "a\udcfe", "a\ufffd"])
@example(names=["é", "e", "e\u0301"])
def test_distinct_names_never_share_a_file(lock_dir, names):
    paths = [lock_file(n) for n in names]
    assert len(set(paths)) == len(names)
    # Not even on a case-insensitive file system (macOS): "A" and "a" differ by more than case.
    assert len({p.name.casefold() for p in paths}) == len(names)


@HYPOTHESIS
@given(name=NAMES)
@example(name="../x")
@example(name="/etc/passwd")
@example(name="..")
@example(name=".")
@example(name="\udcff/../\ud800")
@example(name="日本語/ロック" * 40)
@example(name="x" * 100_000)
def test_file_name_is_safe_bounded_and_inside_the_directory(lock_dir, name):
    path = lock_file(name)
    assert inside(path, lock_dir)
    assert len(os.fsencode(path.name)) <= NAME_MAX
    assert SAFE_BASENAME.fullmatch(path.name), path.name
    assert path == Path(ProcessLock(name).path)


@pytest.mark.parametrize(
    "name", ["billing-export", "sync_42", "My.Job-1"], ids=["dash", "underscore", "dots"]
)
def test_file_name_starts_with_the_readable_name(lock_dir, name):
    assert lock_file(name).name.startswith(name)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "..", ".", "\udcff", "a/b/c"])
def test_awkward_names_lock_a_file_inside_the_directory(lock_dir, name):
    with ProcessLock(name) as lock:
        assert inside(Path(lock.path), lock_dir)
        assert os.listdir(lock_dir) == [Path(lock.path).name]


def test_lock_path_does_not_depend_on_pythonhashseed(lock_dir):
    names = ["sync-1", "a/b", "Ünïcode", "x" * 500]
    code = (
        "import json, os, sys, proclock\n"
        "print(json.dumps([os.path.basename(proclock.lock_path(n)) for n in sys.argv[1:]]))"
    )
    outputs = []
    for seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run(
            [sys.executable, "-c", code, *names],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        outputs.append(json.loads(proc.stdout))
    assert outputs[0] == outputs[1] == [lock_file(n).name for n in names]


def test_process_lock_and_lock_path_agree(lock_dir):
    assert ProcessLock("sync-1").path == str(lock_file("sync-1"))
    assert ProcessLock("sync-1", lock_dir=lock_dir / "other").path == str(
        lock_file("sync-1", lock_dir=lock_dir / "other")
    )


def test_template_lock_is_the_named_lock(lock_dir):
    @process_locked("sync-{account_id}")
    def sync(account_id, dry_run=False):
        holder = ProcessLock("sync-1").holder()
        return holder is not None and holder.pid == os.getpid()

    assert sync(1) is True


# -- invalid names ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "a\x00b", "\x00"], ids=["empty", "nul-inside", "nul"])
@pytest.mark.parametrize(
    "use",
    [
        pytest.param(ProcessLock, id="ProcessLock"),
        pytest.param(proclock.lock_path, id="lock_path"),
        pytest.param(lambda n: process_locked(n)(print), id="process_locked"),
        pytest.param(lambda n: process_locked(name=n)(print), id="process_locked-name"),
    ],
)
def test_empty_or_nul_name_is_a_lock_name_error(lock_dir, name, use):
    with pytest.raises(LockNameError) as info:
        use(name)
    assert isinstance(info.value, ValueError)
    assert repr(name) in str(info.value)
    assert os.listdir(lock_dir) == []


def test_lambda_without_a_name_is_refused_at_decoration(lock_dir):
    with pytest.raises(LockNameError, match="lambda") as info:
        process_locked(lambda: None)
    assert isinstance(info.value, ValueError)
    with pytest.raises(LockNameError, match="lambda"):
        process_locked(timeout=1)(lambda: None)
    assert process_locked("named-lambda")(lambda: 7)() == 7


# -- derived names ----------------------------------------------------------------------------


def held_by_me(name: str) -> bool:
    holder = ProcessLock(name).holder()
    return holder is not None and holder.pid == os.getpid()


@process_locked
def module_function():
    return held_by_me(f"{__name__}.module_function")


class Service:
    @process_locked
    def method(self):
        return held_by_me(f"{__name__}.Service.method")

    @process_locked
    @classmethod
    def klass(cls):
        return held_by_me(f"{__name__}.Service.klass")

    @process_locked
    @staticmethod
    def static():
        return held_by_me(f"{__name__}.Service.static")


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(module_function, id="function"),
        pytest.param(lambda: Service().method(), id="method"),
        pytest.param(Service.klass, id="classmethod"),
        pytest.param(Service.static, id="staticmethod"),
    ],
)
def test_derived_name_is_module_dot_qualname(lock_dir, call):
    assert call() is True


def make_closure(tag):
    def inner(peer=None):
        # Only the shared name is held: the tag does not enter it.
        mine = held_by_me(f"{__name__}.make_closure.<locals>.inner")
        if peer is None:
            return mine, tag
        result = []
        thread = threading.Thread(target=lambda: result.append(peer()))
        thread.start()
        thread.join(10)
        return mine, result

    return process_locked(blocking=False, on_contention="skip")(inner)


def test_closures_of_the_same_code_share_one_lock(lock_dir):
    first, second = make_closure("first"), make_closure("second")
    assert second() == (True, "second")
    # While `first` runs, `second` (another closure of the same code) is busy: skipped.
    assert first(peer=second) == (True, [None])
    assert len(os.listdir(lock_dir)) == 1


# -- __main__: the program's identity ---------------------------------------------------------

HELD = """\
import os, sys
import proclock

def held():
    d = os.environ["PROCLOCK_DIR"]
    out = []
    for n in sorted(os.listdir(d)):
        h = proclock.ProcessLock(path=os.path.join(d, n)).holder()
        if h is not None and h.pid == os.getpid():
            out.append(n)
    return out
"""
SCRIPT = (
    HELD
    + """
@proclock.{decorator}
def main():
    print(*held(), flush=True)
    if "--wait" in sys.argv:
        sys.stdin.readline()

main()
"""
)


def write_script(path: Path, decorator: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(SCRIPT.format(decorator=decorator))
    return path


def run(args, lock_dir: Path, cwd: Path) -> str:
    env = {**os.environ, "PROCLOCK_DIR": str(lock_dir)}
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_script_functions_are_named_after_the_scripts_absolute_path(tmp_path, relative):
    script = write_script(tmp_path / "bin" / "job.py", "process_locked(blocking=False)")
    locks = tmp_path / "locks"
    arg = "job.py" if relative else str(script)
    out = run([arg], locks, cwd=script.parent)
    assert out == lock_file(f"{script}.main", lock_dir=locks).name


def test_singleton_script_is_named_after_the_scripts_absolute_path(tmp_path):
    script = write_script(tmp_path / "bin" / "tool.py", "singleton_process")
    locks = tmp_path / "locks"
    out = run([str(script)], locks, cwd=tmp_path)
    assert out == lock_file(str(script), lock_dir=locks).name


def test_python_dash_m_package_singleton_is_named_after_the_package(tmp_path):
    pkg = tmp_path / "root" / "mypkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    write_script(pkg / "__main__.py", "singleton_process")
    locks = tmp_path / "locks"
    out = run(["-m", "mypkg"], locks, cwd=pkg.parent)
    assert out == lock_file("mypkg", lock_dir=locks).name


def test_python_dash_m_module_function_is_named_after_the_module(tmp_path):
    write_script(tmp_path / "root" / "mymod.py", "process_locked(blocking=False)")
    locks = tmp_path / "locks"
    out = run(["-m", "mymod"], locks, cwd=tmp_path / "root")
    assert out == lock_file("mymod.main", lock_dir=locks).name


@pytest.mark.parametrize("decorator", ["process_locked(blocking=False)", "singleton_process"])
def test_two_scripts_defining_main_do_not_collide(tmp_path, decorator):
    first = write_script(tmp_path / "a" / "main.py", decorator)
    second = write_script(tmp_path / "b" / "main.py", decorator)
    locks = tmp_path / "locks"
    env = {**os.environ, "PROCLOCK_DIR": str(locks)}
    holder = subprocess.Popen(
        [sys.executable, str(first), "--wait"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        first_lock = holder.stdout.readline().strip()  # printed while it holds
        assert first_lock
        # The second script runs to completion (blocking=False) while the first still holds.
        second_lock = run([str(second)], locks, cwd=tmp_path)
        assert second_lock
        assert first_lock != second_lock
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0
