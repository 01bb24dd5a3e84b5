"""Lock primitives behind ProcessLock and the decorators: flock(2) is the default.

`PostgresBackend` (extra `proclock[postgres]`) and `RedisBackend` (extra `proclock[redis]`) are
imported on first use, so that `import proclock` never pays for a database driver; `Backend`
(the protocol, on `typing`) likewise.
"""

from __future__ import annotations

from ._base import Handle
from .flock import FLOCK, FlockBackend

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._protocol import Backend

__all__ = [
    "FLOCK",
    "Backend",
    "FlockBackend",
    "Handle",
    "PostgresBackend",
    "RedisBackend",
    "resolve",
]

_LAZY = {
    "PostgresBackend": ("postgres", "postgres"),
    "RedisBackend": ("redis", "redis"),
    "Backend": ("_protocol", None),
}
_SCHEMES = {
    "postgresql": "PostgresBackend",
    "postgres": "PostgresBackend",
    "redis": "RedisBackend",
    "rediss": "RedisBackend",
    "unix": "RedisBackend",
}
_BY_URL: dict[str, Any] = {}
_METHODS = ("location", "try_acquire", "acquire", "acquire_async", "release", "holder")


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        msg = f"module 'proclock.backends' has no attribute {name!r}"
        raise AttributeError(msg)
    module, extra = _LAZY[name]
    import importlib  # noqa: PLC0415

    try:
        mod = importlib.import_module(f".{module}", __name__)
    except ImportError as exc:
        msg = f"{name} needs its driver: pip install 'proclock[{extra}]' ({exc})"
        raise ImportError(msg) from exc
    value = getattr(mod, name)
    globals()[name] = value
    return value


def resolve(backend: object) -> Backend:
    """A Backend from a Backend object or a URL ("postgresql://...", "redis://...")."""
    if isinstance(backend, str):
        found = _BY_URL.get(backend)
        if found is not None:
            return found  # type: ignore[no-any-return]
        scheme = backend.split("://", 1)[0].lower() if "://" in backend else ""
        cls_name = _SCHEMES.get(scheme)
        if cls_name is None:
            msg = (
                f"backend={backend!r}: unknown URL scheme {scheme or '(none)'!r}; use "
                "postgresql://... or redis://..., or pass a backend object"
            )
            raise ValueError(msg)
        found = __getattr__(cls_name)(backend)
        _BY_URL[backend] = found
        return found  # type: ignore[no-any-return]
    missing = [m for m in _METHODS if not callable(getattr(backend, m, None))]
    capabilities = getattr(backend, "capabilities", None)
    if not isinstance(capabilities, frozenset):
        missing.append("capabilities (a frozenset)")
    if missing:
        msg = (
            f"backend={backend!r} is not a lock backend (it lacks {', '.join(missing)}); pass "
            "a URL, PostgresBackend(...), RedisBackend(...), or None for flock(2)"
        )
        raise TypeError(msg)
    return backend  # type: ignore[return-value]
