"""LockSpec: a lock's options, validated once into a frozen value that backends receive."""

from __future__ import annotations

import os

from . import _names, _policy
from ._record import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._dirs import StrPath
    from ._policy import Retry


class LockSpec(Frozen):
    """What to lock and how, as validated when a lock or decorator is made.

    Backends get this and nothing else of the caller's: `name` or `path` (exactly one is
    set), `lock_dir` (an absolute directory, or None for the environment's, read at each
    acquisition), `shared`, `blocking`, `timeout`, `retry`, `reentrant` and `mode`.
    """

    __slots__ = (  # noqa: RUF023  (field order is the constructor's)
        "name",
        "path",
        "lock_dir",
        "shared",
        "blocking",
        "timeout",
        "retry",
        "reentrant",
        "mode",
        "_where",  # the flock backend's memo of the resolved file (not a field)
    )
    name: str | None
    path: str | None
    lock_dir: str | None
    shared: bool
    blocking: bool
    timeout: float | None
    retry: Retry
    reentrant: bool
    mode: int
    _where: Any  # the flock backend's memo: (environment key, located file)

    @property
    def label(self) -> str:
        """The lock's name, or its file for a lock made with path=: for messages."""
        return self.name if self.name is not None else str(self.path)

    def replace(self, **changes: Any) -> LockSpec:
        """A copy with some fields changed (already validated by the caller)."""
        values = dict(zip(self._fields, self._values(), strict=True))
        values.update(changes)
        spec = object.__new__(LockSpec)
        spec._init(**values, _where=None)
        return spec


def _bool(option: str, value: object) -> bool:
    if not isinstance(value, bool):
        msg = f"{option} must be True or False, not {value!r}"
        raise TypeError(msg)
    return value


def _path(option: str, value: object) -> str:
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        msg = f"{option} must be a path (a str or os.PathLike), not {type(value).__name__}"
        raise TypeError(msg)
    text = os.fspath(value)
    if not isinstance(text, str):
        msg = f"{option} must be a str path, not {type(text).__name__}"
        raise TypeError(msg)
    if not text:
        msg = f"{option}='' is an empty path; give a file (path=) or directory (lock_dir=)"
        raise ValueError(msg)
    if "\x00" in text:
        msg = f"{option}={text!r} contains a NUL byte"
        raise ValueError(msg)
    return text


def real_parent(path: str) -> str:
    """`path` made absolute, its directory resolved (symlinks, `..`), the last component kept.

    The directory may not exist yet (it is created at the first acquisition): realpath
    resolves what exists.
    """
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(head), tail)


def make_spec(
    name: object,
    *,
    path: StrPath | None,
    blocking: object,
    timeout: object,
    retry: object,
    shared: object,
    lock_dir: StrPath | None,
    mode: object,
    reentrant: object,
) -> LockSpec:
    """Validate every option once; each refusal names the option at fault and the remedy."""
    if name is None and path is None:
        msg = "a lock needs a name, or path= for an explicit lock file"
        raise TypeError(msg)
    if name is not None and path is not None:
        msg = f"give a name or path=, not both (name={name!r}, path={path!r})"
        raise ValueError(msg)
    if path is not None and lock_dir is not None:
        msg = f"path={path!r} already names the file: lock_dir= cannot apply to it"
        raise ValueError(msg)
    checked_name = _names.check_name(name) if name is not None else None
    checked_path = real_parent(_path("path", path)) if path is not None else None
    # An explicit lock_dir is made absolute now, against the current directory, as path= is;
    # the environment ($PROCLOCK_DIR, $XDG_RUNTIME_DIR) is read at each acquisition.
    directory = os.path.abspath(_path("lock_dir", lock_dir)) if lock_dir is not None else None
    checked_timeout = _policy.check_timeout(timeout)
    checked_retry = _policy.check_retry(retry)
    _policy.check_wait(blocking=blocking, timeout=checked_timeout, retry=checked_retry)
    spec = object.__new__(LockSpec)
    spec._init(
        name=checked_name,
        path=checked_path,
        lock_dir=directory,
        shared=_bool("shared", shared),
        blocking=blocking,
        timeout=checked_timeout,
        retry=checked_retry,
        reentrant=_bool("reentrant", reentrant),
        mode=_policy.check_mode(mode),
        _where=None,
    )
    return spec
