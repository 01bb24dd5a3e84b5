"""Where locks live: resolution order, per-call resolution, and vetting of the directory."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from conftest import lock_file
from proclock import ProcessLock, UnsafeLockPathError, process_locked

OTHER_UID = 12345


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """No lock directory configured: XDG_RUNTIME_DIR and PROCLOCK_DIR unset, a private TMPDIR."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    xdg = tmp_path / "run-user"
    xdg.mkdir(mode=0o700)
    monkeypatch.delenv("PROCLOCK_DIR", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # gettempdir() caches its answer
    return {"tmp": tmp, "xdg": xdg, "root": tmp_path}


def umask(mask: int):
    class Umask:
        def __enter__(self):
            self.old = os.umask(mask)

        def __exit__(self, *exc):
            os.umask(self.old)

    return Umask()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def listing(path: Path) -> list[str] | None:
    try:
        return sorted(os.listdir(path))
    except (NotADirectoryError, FileNotFoundError):
        return None


# -- resolution order -------------------------------------------------------------------------


def test_lock_dir_argument_comes_first(env, monkeypatch):
    monkeypatch.setenv("PROCLOCK_DIR", str(env["root"] / "env"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(env["xdg"]))
    arg = env["root"] / "arg"
    assert lock_file("x", lock_dir=arg).parent == arg
    assert ProcessLock("x", lock_dir=arg).path == str(lock_file("x", lock_dir=arg))


def test_proclock_dir_comes_before_xdg_runtime_dir(env, monkeypatch):
    monkeypatch.setenv("PROCLOCK_DIR", str(env["root"] / "env"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(env["xdg"]))
    assert lock_file("x").parent == env["root"] / "env"


def test_xdg_runtime_dir_comes_before_the_tempdir(env, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(env["xdg"]))
    assert lock_file("x").parent == env["xdg"] / "proclock"


def test_tempdir_is_the_last_resort(env):
    assert lock_file("x").parent == env["tmp"] / f"proclock-{os.geteuid()}"


def test_directory_is_resolved_at_each_call(env, monkeypatch):
    first, second = env["root"] / "first", env["root"] / "second"
    lock = ProcessLock("x")

    @process_locked("x")
    def where():
        return sorted(p.name for p in env["root"].iterdir() if p.is_dir() and any(p.iterdir()))

    monkeypatch.setenv("PROCLOCK_DIR", str(first))
    assert lock_file("x").parent == first
    assert Path(lock.path).parent == first
    with lock:
        assert Path(lock.path).parent == first
    assert where() == ["first"]

    monkeypatch.setenv("PROCLOCK_DIR", str(second))
    assert lock_file("x").parent == second
    assert Path(lock.path).parent == second
    with lock:
        assert Path(lock.path).parent == second
    assert where() == ["first", "second"]

    monkeypatch.delenv("PROCLOCK_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(env["xdg"]))
    assert Path(lock.path).parent == env["xdg"] / "proclock"


# -- default directories: created private, refused unless private -----------------------------

DEFAULTS = [pytest.param("xdg", id="xdg-runtime-dir"), pytest.param("tmp", id="tempdir")]


def default_dir(env, kind: str, monkeypatch) -> Path:
    if kind == "xdg":
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(env["xdg"]))
        return env["xdg"] / "proclock"
    return env["tmp"] / f"proclock-{os.geteuid()}"


@pytest.mark.parametrize("kind", DEFAULTS)
def test_default_directory_is_created_0700(env, kind, monkeypatch):
    expected = default_dir(env, kind, monkeypatch)
    with umask(0):
        path = lock_file("x")
    assert path.parent == expected
    assert stat.S_ISDIR(os.lstat(expected).st_mode)
    assert mode_of(expected) == 0o700
    assert not path.exists()  # lock_path vets the directory, never creates the file


@pytest.mark.parametrize("kind", DEFAULTS)
def test_default_directory_is_used_by_locks(env, kind, monkeypatch):
    expected = default_dir(env, kind, monkeypatch)
    with ProcessLock("x") as lock:
        assert Path(lock.path).parent == expected
        assert Path(lock.path).is_file()
    assert mode_of(expected) == 0o700


def plant_foreign(d: Path, sidecar: Path) -> None:
    d.mkdir(mode=0o700)
    os.chown(d, OTHER_UID, OTHER_UID)


def plant_group_writable(d: Path, sidecar: Path) -> None:
    d.mkdir()
    d.chmod(0o770)


def plant_world_writable(d: Path, sidecar: Path) -> None:
    d.mkdir()
    d.chmod(0o777)


def plant_sticky_world_writable(d: Path, sidecar: Path) -> None:
    d.mkdir()
    d.chmod(0o1777)


def plant_symlink(d: Path, sidecar: Path) -> None:
    sidecar.mkdir(mode=0o700)  # a private directory of ours: only the symlink is wrong
    d.symlink_to(sidecar)


def plant_dangling_symlink(d: Path, sidecar: Path) -> None:
    d.symlink_to(sidecar)


def plant_file(d: Path, sidecar: Path) -> None:
    d.write_text("not a directory\n")


UNSAFE_DEFAULTS = [
    pytest.param(plant_foreign, id="other-uid"),
    pytest.param(plant_group_writable, id="0770"),
    pytest.param(plant_world_writable, id="0777"),
    pytest.param(plant_sticky_world_writable, id="1777"),
    pytest.param(plant_symlink, id="symlink"),
    pytest.param(plant_dangling_symlink, id="dangling-symlink"),
    pytest.param(plant_file, id="file"),
]


@pytest.mark.parametrize("plant", UNSAFE_DEFAULTS)
@pytest.mark.parametrize("kind", DEFAULTS)
def test_unsafe_default_directory_is_refused_and_untouched(env, kind, plant, monkeypatch):
    d = default_dir(env, kind, monkeypatch)
    sidecar = env["root"] / "elsewhere"
    plant(d, sidecar)
    before = (listing(d), listing(sidecar), os.lstat(d))

    def attempts():
        yield lambda: lock_file("x")
        yield lambda: ProcessLock("x").acquire()
        yield lambda: ProcessLock("x", blocking=False).acquire()
        yield lambda: ProcessLock("x").path
        yield process_locked("x")(lambda: None)

    for attempt in attempts():
        with pytest.raises(UnsafeLockPathError) as info:
            attempt()
        assert isinstance(info.value, PermissionError)
        assert str(d) in str(info.value)
    after = (listing(d), listing(sidecar), os.lstat(d))
    assert before[:2] == after[:2]  # nothing written there (nor through the symlink)
    assert before[2].st_mode == after[2].st_mode
    assert (before[2].st_uid, before[2].st_ino) == (after[2].st_uid, after[2].st_ino)
    assert not sidecar.exists() or sidecar.is_dir()  # a dangling target is never created


# -- directories the user names ---------------------------------------------------------------

NAMED = [pytest.param("argument", id="lock_dir"), pytest.param("env", id="PROCLOCK_DIR")]


def named(d: Path, how: str, monkeypatch) -> dict:
    if how == "env":
        monkeypatch.setenv("PROCLOCK_DIR", str(d))
        return {}
    return {"lock_dir": d}


@pytest.mark.parametrize("how", NAMED)
def test_named_directory_is_created_0700_if_missing(env, how, monkeypatch):
    d = env["root"] / "made" / "for" / "locks"
    kwargs = named(d, how, monkeypatch)
    with umask(0):
        path = lock_file("x", **kwargs)
    assert path.parent == d
    assert mode_of(d) == 0o700
    assert not path.exists()
    with ProcessLock("x", **kwargs) as lock:
        assert Path(lock.path).parent == d


def shared_group_dir(d: Path) -> None:
    d.mkdir()
    os.chown(d, OTHER_UID, OTHER_UID)
    d.chmod(0o2770)


SHARED = [
    pytest.param(lambda d: (d.mkdir(), d.chmod(0o770)), id="0770"),
    pytest.param(lambda d: (d.mkdir(), d.chmod(0o1777)), id="1777-sticky"),
    pytest.param(shared_group_dir, id="other-owner-setgid-0770"),
    pytest.param(lambda d: (d.mkdir(), d.chmod(0o755)), id="0755"),
]


@pytest.mark.parametrize("make", SHARED)
@pytest.mark.parametrize("how", NAMED)
def test_named_directory_may_be_shared(env, how, make, monkeypatch):
    d = env["root"] / "shared"
    make(d)
    before = os.lstat(d)
    kwargs = named(d, how, monkeypatch)
    with ProcessLock("x", **kwargs) as lock:
        assert Path(lock.path).parent == d
        assert Path(lock.path).is_file()
    assert os.lstat(d).st_mode == before.st_mode  # never chmod-ed to suit us


UNSAFE_NAMED = [
    pytest.param(plant_symlink, id="symlink"),
    pytest.param(plant_dangling_symlink, id="dangling-symlink"),
    pytest.param(plant_file, id="file"),
    pytest.param(plant_world_writable, id="0777"),
]


@pytest.mark.parametrize("plant", UNSAFE_NAMED)
@pytest.mark.parametrize("how", NAMED)
def test_unsafe_named_directory_is_refused(env, how, plant, monkeypatch):
    d = env["root"] / "named"
    sidecar = env["root"] / "elsewhere"
    plant(d, sidecar)
    kwargs = named(d, how, monkeypatch)
    before = (listing(d), listing(sidecar), os.lstat(d).st_mode)
    for attempt in (
        lambda: lock_file("x", **kwargs),
        lambda: ProcessLock("x", **kwargs).acquire(),
        process_locked("x", **kwargs)(lambda: None),
    ):
        with pytest.raises(UnsafeLockPathError) as info:
            attempt()
        assert isinstance(info.value, PermissionError)
        assert str(d) in str(info.value)
    assert (listing(d), listing(sidecar), os.lstat(d).st_mode) == before
    assert not sidecar.exists() or sidecar.is_dir()


def test_lock_path_creates_the_directory_but_not_the_file(env):
    d = env["tmp"] / f"proclock-{os.geteuid()}"
    assert not d.exists()
    path = lock_file("x")
    assert d.is_dir()
    assert os.listdir(d) == []
    assert path.parent == d


@pytest.mark.parametrize("kind", DEFAULTS)
def test_existing_private_default_directory_is_used_as_is(env, kind, monkeypatch):
    # Readable by others is fine: only write access lets someone plant or swap lock files.
    d = default_dir(env, kind, monkeypatch)
    d.mkdir()
    d.chmod(0o755)
    with ProcessLock("x") as lock:
        assert Path(lock.path).parent == d
    assert mode_of(d) == 0o755
