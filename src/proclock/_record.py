"""A frozen record base: what dataclass(frozen=True) gives, without its ~6 ms of import time."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Frozen:
    """Immutable, compared and hashed by its public `__slots__` fields, picklable, with a repr.

    Slots whose names start with "_" are private memos (a cache), not fields: they take no
    part in equality, hashing, pickling or the repr, and start unset.
    """

    __slots__: tuple[str, ...] = ()
    _fields: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._fields = tuple(s for s in cls.__dict__.get("__slots__", ()) if not s.startswith("_"))

    def _init(self, **values: Any) -> None:
        for field, value in values.items():
            object.__setattr__(self, field, value)

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f) for f in self._fields)

    def __setattr__(self, field: str, value: object) -> None:
        msg = f"{type(self).__name__} is immutable: cannot assign to {field!r}"
        raise AttributeError(msg)

    def __delattr__(self, field: str) -> None:
        msg = f"{type(self).__name__} is immutable: cannot delete {field!r}"
        raise AttributeError(msg)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._values()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}({fields})"

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), dict(zip(self._fields, self._values(), strict=True)))


def _rebuild(cls: type[Frozen], values: dict[str, Any]) -> Frozen:
    obj = object.__new__(cls)
    obj._init(**values)
    return obj
