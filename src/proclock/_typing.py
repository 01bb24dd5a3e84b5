"""The decorators' static types: read by type checkers only, never imported at run time.

`on_contention` decides what a busy call returns, so it decides the decorated function's type:
"raise" and "exit" keep it, "skip" adds None, and a callable adds what the callable returns.
A coroutine function keeps returning a coroutine (it is its awaited value that may be None),
and a generator function keeps returning a generator (its return value may be None).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Coroutine, Generator
from typing import Any, Protocol, TypedDict, TypeVar, overload

from typing_extensions import ParamSpec

from ._dirs import StrPath
from ._errors import LockLostError
from ._policy import Retry
from .backends import Backend

P = ParamSpec("P")
R = TypeVar("R")
Y = TypeVar("Y")
S = TypeVar("S")
T_co = TypeVar("T_co", covariant=True)


class LimitedOptions(TypedDict, total=False):
    """The keyword options every decorator takes (`process_limited` takes these and limit)."""

    blocking: bool
    timeout: float | None
    retry: Retry | int | None
    exit_code: int
    lock_dir: StrPath | None
    mode: int
    reentrant: bool
    backend: Backend | str | None
    on_lost: Callable[[LockLostError], object] | None


class SingletonOptions(LimitedOptions, total=False):
    """The keyword options `singleton_process` shares with `process_locked`."""

    name: str | Callable[..., str] | None
    path: StrPath | None


class LockedOptions(SingletonOptions, total=False):
    """The keyword options of `process_locked` (all but on_contention)."""

    shared: bool


class Keeps(Protocol):
    """The decorator of on_contention="raise" or "exit": the function keeps its type."""

    def __call__(self, func: Callable[P, R], /) -> Callable[P, R]: ...


class OrNone(Protocol):
    """The decorator of on_contention="skip": a busy call returns (or awaits to) None."""

    @overload
    def __call__(
        self, func: Callable[P, Coroutine[Any, Any, R]], /
    ) -> Callable[P, Coroutine[Any, Any, R | None]]: ...

    @overload
    def __call__(
        self, func: Callable[P, Generator[Y, S, R]], /
    ) -> Callable[P, Generator[Y, S, R | None]]: ...

    @overload
    def __call__(
        self, func: Callable[P, AsyncGenerator[Y, S]], /
    ) -> Callable[P, AsyncGenerator[Y, S]]: ...

    @overload
    def __call__(self, func: Callable[P, R], /) -> Callable[P, R | None]: ...


class OrElse(Protocol[T_co]):
    """The decorator of a callable on_contention: a busy call returns what it returns."""

    @overload
    def __call__(
        self, func: Callable[P, Coroutine[Any, Any, R]], /
    ) -> Callable[P, Coroutine[Any, Any, R | T_co]]: ...

    @overload
    def __call__(
        self, func: Callable[P, Generator[Y, S, R]], /
    ) -> Callable[P, Generator[Y, S, R | None]]: ...

    @overload
    def __call__(
        self, func: Callable[P, AsyncGenerator[Y, S]], /
    ) -> Callable[P, AsyncGenerator[Y, S]]: ...

    @overload
    def __call__(self, func: Callable[P, R], /) -> Callable[P, R | T_co]: ...
