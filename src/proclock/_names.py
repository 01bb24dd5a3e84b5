"""Lock names: deriving them from functions and programs, and mapping them to safe file names."""

from __future__ import annotations

import os
import sys

from ._errors import LockNameError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Bounded prefix: 64 readable bytes + "-" + 32 hex digits + ".lock" = 102 bytes, far below
# NAME_MAX (255), so even a directory that adds its own suffixes stays valid.
_PREFIX_MAX = 64
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_FILE_NAMES: dict[str, str] = {}
_MAIN_MODULES = ("__main__", "__mp_main__")
_DIGEST_HEX = 32
_FILE_NAMES_MAX = 4096


def check_name(name: object) -> str:
    """Return `name` if it can name a lock, else raise LockNameError."""
    if not isinstance(name, str):
        msg = f"lock name must be a str, not {type(name).__name__}"
        raise TypeError(msg)
    if not name:
        raise LockNameError(name, "a lock name cannot be empty")
    if "\x00" in name:
        raise LockNameError(name, "a lock name cannot contain a NUL byte")
    return name


def file_name(name: str) -> str:
    """Map a lock name to its file name: sanitised readable prefix + hash of the exact name.

    The hash (SHA-256, never Python's salted `hash()`) makes the map injective: `a/b` and `a_b`
    share a prefix but not a file. The prefix keeps `ls` readable and can never contain a
    separator, so nothing escapes the directory.
    """
    cached = _FILE_NAMES.get(name)
    if cached is not None:
        return cached
    import hashlib  # noqa: PLC0415  (lazy: ~2 ms of import time)

    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST_HEX]
    readable = "".join(c if c in _SAFE else "_" for c in name[: _PREFIX_MAX * 2])
    prefix = readable.lstrip(".")[:_PREFIX_MAX] or "lock"
    result = f"{prefix}-{digest}.lock"
    if len(_FILE_NAMES) >= _FILE_NAMES_MAX:
        _FILE_NAMES.clear()
    _FILE_NAMES[name] = result
    return result


def main_module_name(*, program: bool = False, namespace: Any = None) -> str | None:
    """The `-m` module name of `__main__`, else the script's absolute path.

    With `program=True`, `pkg.__main__` (what `python -m pkg` runs) names the program `pkg`.
    `namespace` is the main script's globals when known (a function's `__globals__`): in a
    `multiprocessing` spawn or forkserver child the script runs as `__mp_main__` while
    `sys.modules["__main__"]` is still the bootstrap's, which knows neither.
    """
    if namespace is not None:
        spec, file = namespace.get("__spec__"), namespace.get("__file__")
    else:
        main = sys.modules.get("__main__")
        if main is None:
            return None
        spec, file = getattr(main, "__spec__", None), getattr(main, "__file__", None)
    spec_name = getattr(spec, "name", None)
    if isinstance(spec_name, str) and spec_name:
        # `python -m pkg` runs `pkg.__main__`; the program is `pkg`. A function's derived
        # name keeps `pkg.__main__`, the module it would have if imported.
        return spec_name.removesuffix(".__main__") if program else spec_name
    if isinstance(file, str) and file:
        return os.path.abspath(file)
    return None


def _main_globals(func: Any) -> Any:
    """The globals of a function defined in the main script (run as __main__ or __mp_main__)."""
    if getattr(func, "__module__", None) in _MAIN_MODULES:
        namespace = getattr(func, "__globals__", None)
        if isinstance(namespace, dict):
            return namespace
    return None


def derived_name(func: Any) -> str:
    """`<module>.<qualname>` of a function, with `__main__` replaced by the program's identity."""
    func = getattr(func, "__func__", func)  # classmethod / staticmethod objects
    qualname = getattr(func, "__qualname__", None)
    module = getattr(func, "__module__", None)
    if not isinstance(qualname, str) or not qualname:
        raise LockNameError(repr(func), "cannot derive a name from it; pass name=")
    if qualname.rsplit(".", 1)[-1] == "<lambda>":
        raise LockNameError(
            qualname, "a lambda has no name to derive a lock from; pass name= explicitly"
        )
    if module in _MAIN_MODULES or module is None:
        # multiprocessing's spawn and forkserver children run the main script as `__mp_main__`:
        # it must derive the same name as the parent, or they exclude nobody.
        module = main_module_name(namespace=_main_globals(func)) or "__main__"
    return f"{module}.{qualname}"


def program_name(func: Any) -> str:
    """The name `singleton_process` uses: the program, not the decorated function."""
    namespace = _main_globals(getattr(func, "__func__", func))
    return main_module_name(program=True, namespace=namespace) or derived_name(func)


def is_lock_file_name(base: str) -> bool:
    """True for a file name proclock makes: `<prefix>-<32 hex digits>.lock`."""
    if not base.endswith(".lock") or len(base) < _DIGEST_HEX + 7:  # "x-" + digest + ".lock"
        return False
    stem = base[:-5]
    prefix, dash, digest = stem[: -_DIGEST_HEX - 1], stem[-_DIGEST_HEX - 1], stem[-_DIGEST_HEX:]
    return (
        dash == "-"
        and 0 < len(prefix) <= _PREFIX_MAX
        and all(c in _SAFE for c in prefix)
        and all(c in "0123456789abcdef" for c in digest)
    )


def recover_name(base: str, recorded: object) -> str | None:
    """The lock name behind the file name `base`, from its record or its readable prefix.

    A candidate is accepted only if it maps back to exactly `base`: a record copied from
    another file, or a prefix that was sanitised, is never shown as the name.
    """
    candidates = [recorded] if isinstance(recorded, str) else []
    if is_lock_file_name(base):
        candidates.append(base[: -_DIGEST_HEX - 6])
    for candidate in candidates:
        if candidate and "\x00" not in candidate and file_name(candidate) == base:
            return candidate
    return None
