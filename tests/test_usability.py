"""Issue 11's library items: lock_of(), path-like names, lock directory errors, lock_path's type."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import pytest

import proclock
from proclock import (
    LockNameError,
    ProcessLock,
    lock_of,
    lock_path,
    process_locked,
    singleton_process,
)

# -- lock_of() --------------------------------------------------------------------------------


@process_locked
def refresh_cache() -> int:
    return 1


@process_locked("sync-{account_id}")
def sync(account_id: int, dry_run: bool = False) -> int:
    return account_id


@process_locked(name=lambda job: f"job-{job}")
def run_job(job: str) -> str:
    return job


class Account:
    def __init__(self, ident: int) -> None:
        self.id = ident

    @process_locked("account-{self.id}")
    def refresh(self) -> int:
        return self.id

    @process_locked
    def fixed(self) -> int:
        return self.id


def test_lock_of_a_fixed_name_is_the_lock_the_call_takes(lock_dir):
    lock = lock_of(refresh_cache)
    assert isinstance(lock, ProcessLock)
    assert lock.name == f"{__name__}.refresh_cache"
    assert lock.path == lock_path(lock.name)
    assert lock.holder() is None
    seen = []

    @process_locked
    def inside() -> None:
        me = lock_of(inside)
        holder = me.holder()
        seen.append((me.locked, holder.pid if holder else None))

    inside()
    assert seen == [(True, os.getpid())]  # the very lock the call holds
    assert lock_of(refresh_cache, "ignored", x=1) is lock  # arguments only fill names


def test_lock_of_a_template_takes_the_calls_arguments(lock_dir):
    assert lock_of(sync, 42).name == "sync-42"
    assert lock_of(sync, account_id=7, dry_run=True).name == "sync-7"
    assert lock_of(sync, 42).path == lock_path("sync-42")
    with pytest.raises(TypeError, match=r"sync depends on its arguments.*'sync-\{account_id\}'"):
        lock_of(sync)
    assert lock_of(run_job, "nightly").name == "job-nightly"


def test_lock_of_methods_through_the_instance_and_the_class(lock_dir):
    account = Account(3)
    assert lock_of(account.refresh).name == "account-3"
    assert lock_of(Account.refresh, Account(4)).name == "account-4"
    assert lock_of(account.fixed).name == f"{__name__}.Account.fixed"


def test_lock_of_a_singleton_is_the_programs_lock(lock_dir):
    @singleton_process
    def main() -> int:
        return 0

    @singleton_process("my-tool")
    def tool() -> int:
        return 0

    assert lock_of(tool).name == "my-tool"
    assert lock_of(main).name == proclock._names.program_name(main)


def test_lock_of_refuses_what_proclock_did_not_decorate():
    with pytest.raises(TypeError, match="decorated with @process_locked or @singleton_process"):
        lock_of(print)
    with pytest.raises(TypeError, match="decorated"):
        lock_of(lambda: None)


def test_lock_of_a_template_that_cannot_be_filled(lock_dir):
    @process_locked("job-{job[name]}")
    def job(job: dict[str, str]) -> None: ...

    with pytest.raises(LockNameError):
        lock_of(job, {})


# -- a name that looks like a file path -------------------------------------------------------


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(proclock._lock, "_warned_names", set())


def test_a_path_like_name_warns_once_with_the_path_spelling(lock_dir, fresh_warnings):
    with pytest.warns(UserWarning, match=r"path='/tmp/app\.lock'") as record:
        lock = ProcessLock("/tmp/app.lock")
    assert record[0].filename == __file__  # points at the caller's line, not into proclock
    assert lock.path != "/tmp/app.lock"
    assert Path(lock.path).parent == lock_dir
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ProcessLock("/tmp/app.lock")  # once per name


def test_a_decorator_given_a_path_like_name_warns_at_the_decoration(lock_dir, fresh_warnings):
    with pytest.warns(UserWarning, match="looks like a file path") as record:

        @process_locked("/var/run/export.pid")
        def export() -> None: ...

    assert record[0].filename == __file__


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"name": "billing/export"}, id="relative"),
        pytest.param({"name": "/billing"}, id="one-slash-word"),
        pytest.param({"path": "/tmp/proclock-usability-app.lock"}, id="path="),
    ],
)
def test_no_warning_where_the_name_is_not_a_file_path(lock_dir, fresh_warnings, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ProcessLock(**kwargs)


def test_a_scripts_derived_name_does_not_warn(lock_dir, fresh_warnings, tmp_path):
    script = tmp_path / "tool.py"
    script.write_text(
        "import warnings, proclock\n"
        "warnings.simplefilter('error')\n"
        "@proclock.singleton_process\n"
        "def main():\n"
        "    print(proclock.lock_of(main).name)\n"
        "main()\n"
    )
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.strip() == str(script)  # an absolute path, derived: no warning


# -- lock directory errors ---------------------------------------------------------------------


def test_an_unusable_lock_dir_names_the_lock_the_directory_and_its_source(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError) as info:
        ProcessLock("billing-export", lock_dir=blocker / "locks").acquire()
    message = str(info.value)
    assert "'billing-export'" in message
    assert str(blocker / "locks") in message
    assert "(from lock_dir=)" in message
    assert "PROCLOCK_DIR" in message
    assert info.value.errno is not None
    assert pickle.loads(pickle.dumps(info.value)).args == info.value.args  # noqa: S301


def test_the_environment_is_named_as_the_source(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PROCLOCK_DIR", str(blocker / "locks"))
    with pytest.raises(NotADirectoryError, match=r"\(from \$PROCLOCK_DIR\)"):
        ProcessLock("billing-export").acquire()
    with pytest.raises(NotADirectoryError, match=r"lock 'x'.*\(from \$PROCLOCK_DIR\)"):
        lock_path("x")
    with pytest.raises(NotADirectoryError, match=r"\(from \$PROCLOCK_DIR\)"):
        _ = ProcessLock("y").path


def test_permission_denied_keeps_its_type_and_explains(lock_dir, monkeypatch):
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(proclock._flock.os, "open", refuse)
    with pytest.raises(PermissionError) as info:
        ProcessLock("billing-export").acquire()
    assert not isinstance(info.value, proclock.UnsafeLockPathError)
    assert info.value.errno == 13
    assert info.value.filename == lock_path("billing-export")
    assert "Permission denied: lock 'billing-export' cannot use its lock directory" in str(
        info.value
    )
    assert "(from lock_dir=)" not in str(info.value)  # the fixture sets $PROCLOCK_DIR


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid in a child")
def test_a_real_eacces_from_another_user(tmp_path):
    shared = tmp_path / "root-owned"
    shared.mkdir(mode=0o755)
    tmp_path.chmod(0o755)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                ProcessLock("billing-export", lock_dir=shared).acquire()
                report = "acquired"
            except PermissionError as exc:
                report = str(exc)
            os.write(write, report.encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    report = os.read(read, 4096).decode()
    os.close(read)
    assert status == 0
    assert report.startswith("[Errno 13] Permission denied: lock 'billing-export'")
    assert f"cannot use its lock directory {shared} (from lock_dir=)" in report


# -- lock_path() and ProcessLock.path ---------------------------------------------------------


def test_lock_path_and_process_lock_path_are_the_same_str(lock_dir, tmp_path):
    assert type(lock_path("x")) is str
    assert type(ProcessLock("x").path) is str
    assert lock_path("x") == ProcessLock("x").path
    (lock_dir / "sub").mkdir()
    other_spelling = f"{lock_dir}/sub/.."
    assert lock_path("x", lock_dir=other_spelling) == ProcessLock("x", lock_dir=other_spelling).path
    assert lock_path("x", lock_dir=other_spelling) == lock_path("x")  # one directory, one path


# -- a holder on another machine, as a lock server reports it ---------------------------------


def test_a_redis_holder_on_another_host_has_no_local_pid(redis_url):
    import json
    import uuid

    import redis

    from proclock.backends import RedisBackend

    backend = RedisBackend(redis_url, namespace=f"usability-{uuid.uuid4().hex}")
    client = redis.Redis.from_url(redis_url)
    try:
        value = {"token": "t", "host": "build-7", "pid": 1, "argv": ["backup"], "fence": 1}
        client.set(backend.key("job"), json.dumps(value), px=30_000)
        holder = ProcessLock("job", backend=backend).holder()
        assert holder is not None
        assert (holder.pid, holder.own_pid, holder.elsewhere) == (None, 1, "machine")
        assert holder.describe() == "pid 1 on another machine, host build-7 (backup)"
        value["host"] = os.uname().nodename  # this host: its pid is one of ours
        client.set(backend.key("job"), json.dumps(value), px=30_000)
        holder = ProcessLock("job", backend=backend).holder()
        assert holder is not None
        assert (holder.pid, holder.own_pid, holder.elsewhere) == (1, None, None)
    finally:
        client.delete(backend.key("job"))
        client.close()


def test_lock_of_a_limited_function_is_its_semaphore(lock_dir):
    from proclock import ProcessSemaphore, process_limited

    @process_limited("export-{tenant}", limit=2)
    def export(tenant: str) -> None: ...

    @process_limited("gpu", limit=3)
    def infer() -> None: ...

    templated = lock_of(export, "acme")
    assert isinstance(templated, ProcessSemaphore)
    assert (templated.name, templated.limit) == ("export-acme", 2)
    assert isinstance(lock_of(infer), ProcessSemaphore)
    assert lock_of(infer).limit == 3
