"""The decorators: `process_locked` and `singleton_process`, built on wrapt."""

from __future__ import annotations

import sys

from . import _core, _names
from ._errors import AlreadyRunningError, LockHeldError, LockNameError
from ._lock import ProcessLock
from ._logging import log as _log

TYPE_CHECKING = False  # typing costs ~3 ms of import time; mypy reads this as typing's
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Literal, TypeVar, overload

    from typing_extensions import ParamSpec, Unpack

    from ._dirs import StrPath
    from ._errors import LockLostError
    from ._policy import Retry
    from ._typing import Keeps, LockedOptions, OrElse, OrNone, SingletonOptions
    from .backends import Backend

    P = ParamSpec("P")
    OnContention = Literal["raise", "skip", "exit"] | Callable[[LockHeldError], Any]
    R = TypeVar("R")
    T = TypeVar("T")
else:

    def overload(func: object) -> object:
        """At run time the implementation, defined last, replaces the typed variants."""
        return func


_CO_GENERATOR = 0x20
_CO_COROUTINE = 0x80
_CO_ITERABLE_COROUTINE = 0x100
_CO_ASYNC_GENERATOR = 0x200
_OUTCOMES = ("raise", "skip", "exit")
_CACHE_MAX = 1024


def _code_flags(func: Any) -> int:
    func = getattr(func, "__func__", func)  # classmethod / staticmethod objects
    code = getattr(func, "__code__", None)
    return int(getattr(code, "co_flags", 0))


def _check_outcome(on_contention: object, exit_code: object) -> None:
    if not callable(on_contention) and on_contention not in _OUTCOMES:
        msg = (
            f"on_contention must be 'raise', 'skip', 'exit' or a callable taking the "
            f"LockHeldError, got {on_contention!r}"
        )
        raise ValueError(msg)
    if isinstance(exit_code, bool) or not isinstance(exit_code, int) or not 0 <= exit_code <= 255:  # noqa: PLR2004
        msg = f"exit_code must be an int from 0 to 255, got {exit_code!r}"
        raise ValueError(msg)


class _Namer:
    """Computes the lock for one call: a fixed lock, a template, or a callable."""

    __slots__ = ("_base", "_cache", "_kind", "_signature", "_template", "func_name")

    def __init__(self, base: ProcessLock, name: object, func: Any) -> None:
        self._base = base
        self._cache: dict[str, ProcessLock] = {}
        self._template = ""
        self._signature: Any = None
        self.func_name = getattr(getattr(func, "__func__", func), "__qualname__", repr(func))
        if callable(name):
            self._kind = "callable"
            return
        assert isinstance(name, str)  # noqa: S101
        fields = self._fields_of(name)
        if not fields:
            self._kind = "fixed"
            return
        import inspect  # noqa: PLC0415  (lazy: only templates need it)

        self._kind = "template"
        self._template = name
        self._signature = inspect.signature(getattr(func, "__func__", func))
        params = self._signature.parameters
        for root in fields:
            if root not in params:
                raise LockNameError(
                    name,
                    f"the template field {{{root}}} names no parameter of "
                    f"{self.func_name}{self._signature}; use one of: {', '.join(params)}",
                )

    @property
    def fixed(self) -> ProcessLock | None:
        """The one lock of every call, when the name does not depend on the call."""
        return self._base if self._kind == "fixed" else None

    @staticmethod
    def _fields_of(template: str) -> list[str]:
        import string  # noqa: PLC0415

        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise LockNameError(template, f"is not a valid template: {exc}") from None
        roots = []
        for _, field, _, _ in parsed:
            if field is None:
                continue
            root = field.split(".", 1)[0].split("[", 1)[0]
            if not root or root.isdigit():
                raise LockNameError(
                    template,
                    "template fields must name the function's parameters, such as "
                    "{account_id}; positional fields like {} or {0} are not supported",
                )
            roots.append(root)
        return roots

    def lock_for(self, name_or_fn: Any, wrapped: Any, args: Any, kwargs: Any) -> ProcessLock:
        if self._kind == "fixed":
            return self._base
        full_args = args
        bound_self = getattr(wrapped, "__self__", None)
        if bound_self is not None:
            full_args = (bound_self, *args)  # the function's own signature includes self/cls
        if self._kind == "callable":
            name = name_or_fn(*full_args, **kwargs)
            if not isinstance(name, str):
                raise LockNameError(
                    name, f"the name callable of {self.func_name} must return a str"
                )
        else:
            try:
                bound = self._signature.bind(*full_args, **kwargs)
            except TypeError as exc:
                msg = f"{self.func_name}() {exc}"
                raise TypeError(msg) from None
            bound.apply_defaults()
            try:
                name = self._template.format_map(bound.arguments)
            except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
                raise LockNameError(
                    self._template, f"cannot be filled from this call of {self.func_name}: {exc!r}"
                ) from None
        lock = self._cache.get(name)
        if lock is None:
            lock = self._base._renamed(name)  # noqa: SLF001
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[name] = lock
        return lock


class _Spec:
    """Everything a decorator application decided, validated once."""

    __slots__ = ("exit_code", "name", "namer", "on_contention", "singleton")

    def __init__(
        self,
        namer: _Namer,
        name: object,
        on_contention: Any,
        exit_code: int,
        *,
        singleton: bool,
    ) -> None:
        self.namer, self.name = namer, name
        self.on_contention, self.exit_code, self.singleton = on_contention, exit_code, singleton

    def contended(self, error: LockHeldError) -> Any:
        if self.singleton and not isinstance(error, AlreadyRunningError):
            error = AlreadyRunningError(error.path, error.name, error.holder, error.waited)
        outcome = self.on_contention
        if outcome == "raise":
            raise error
        if outcome == "skip":
            _log.debug("skipped a call: %s", error)
            return None
        if outcome == "exit":
            sys.stderr.write(f"proclock: {error}; exiting\n")
            sys.stderr.flush()
            raise SystemExit(self.exit_code) from error
        return outcome(error)


_WRAPPER: Any = None


def _wrapper_class() -> Any:
    """wrapt.FunctionWrapper, pickled by reference like the function it replaces.

    A decorated module-level function must cross process boundaries (ProcessPoolExecutor,
    Pool.map): pickle then stores `module.qualname` and the other side imports the decorated
    object from the module, lock included.
    """
    global _WRAPPER  # noqa: PLW0603
    if _WRAPPER is None:
        import wrapt  # noqa: PLC0415  (lazy: ~40 ms for wrapt 2.x, paid only by decorator users)

        class LockedFunction(wrapt.FunctionWrapper):  # type: ignore[type-arg]
            def __reduce_ex__(self, protocol: object) -> str:
                return str(self.__qualname__)

            def __reduce__(self) -> str:
                return str(self.__qualname__)

        _WRAPPER = LockedFunction
    return _WRAPPER


def _decorate(func: Any, spec: _Spec) -> Any:
    """Every call, whatever its kind, takes the lock through the core: take, run, give."""
    flags = _code_flags(func)
    namer, name = spec.namer, spec.name
    current_owner, take, give = _core.current_owner, _core.take, _core.give
    describe = spec.on_contention != "skip"  # a skipped call never reads who held the lock

    if flags & _CO_ASYNC_GENERATOR:

        def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:  # noqa: ARG001
            lock = namer.lock_for(name, wrapped, args, kwargs)
            return _locked_async_generator(lock, spec, wrapped(*args, **kwargs))

    elif flags & _CO_GENERATOR:

        def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:  # noqa: ARG001
            lock = namer.lock_for(name, wrapped, args, kwargs)
            return _locked_generator(lock, spec, wrapped(*args, **kwargs))

    elif flags & (_CO_COROUTINE | _CO_ITERABLE_COROUTINE):

        def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:  # noqa: ARG001
            lock = namer.lock_for(name, wrapped, args, kwargs)

            async def call() -> Any:
                try:
                    hold = await _core.take_async(
                        lock._spec,  # noqa: SLF001
                        lock._backend,  # noqa: SLF001
                        current_owner(),
                        lock._on_lost,  # noqa: SLF001
                        describe,
                    )
                except LockHeldError as error:
                    return spec.contended(error)
                try:
                    return await wrapped(*args, **kwargs)
                finally:
                    count = hold.count
                    try:
                        give(hold)
                    except BaseException:
                        _core.give_again(hold, count)  # Ctrl-C at give()'s first instruction
                        raise

            return call()

    else:
        fixed = namer.fixed

        def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:  # noqa: ARG001
            lock = fixed if fixed is not None else namer.lock_for(name, wrapped, args, kwargs)
            try:
                hold = take(
                    lock._spec,  # noqa: SLF001
                    lock._backend,  # noqa: SLF001
                    current_owner(),
                    lock._on_lost,  # noqa: SLF001
                    describe,
                )
            except LockHeldError as error:
                return spec.contended(error)
            try:
                return wrapped(*args, **kwargs)
            finally:
                count = hold.count
                try:
                    give(hold)
                except BaseException:
                    _core.give_again(hold, count)  # Ctrl-C at give()'s first instruction
                    raise

    decorated = _wrapper_class()(func, wrapper)
    # What lock_of() reads: wrapt keeps `_self_` attributes on the proxy, not the function.
    decorated._self_proclock = spec  # noqa: SLF001
    return decorated


def _locked_generator(lock: ProcessLock, spec: _Spec, gen: Any) -> Any:
    """Hold the lock from the first next() to exhaustion, close() or garbage collection.

    The hold belongs to the thread or task that started the generator (its recorded owner);
    a finalizer that closes an abandoned generator in another thread releases that hold.
    """
    try:
        hold = _core.take(
            lock._spec,  # noqa: SLF001
            lock._backend,  # noqa: SLF001
            _core.current_owner(),
            lock._on_lost,  # noqa: SLF001
        )
    except LockHeldError as error:
        gen.close()
        result = spec.contended(error)
        if result is not None:
            yield from result
        return None
    try:
        return (yield from gen)
    finally:
        try:
            gen.close()
        finally:
            count = hold.count
            try:
                _core.give(hold)
            except BaseException:
                _core.give_again(hold, count)  # Ctrl-C at give()'s first instruction
                raise


async def _locked_async_generator(lock: ProcessLock, spec: _Spec, agen: Any) -> Any:
    """As `_locked_generator`, for async generators (asend/athrow are passed through)."""
    try:
        hold = await _core.take_async(
            lock._spec,  # noqa: SLF001
            lock._backend,  # noqa: SLF001
            _core.current_owner(),
            lock._on_lost,  # noqa: SLF001
        )
    except LockHeldError as error:
        await agen.aclose()
        result = spec.contended(error)
        if result is not None:
            async for item in result:
                yield item
        return
    try:
        item = await agen.__anext__()
        while True:
            try:
                sent = yield item
            except GeneratorExit:
                raise
            except BaseException as exc:  # noqa: BLE001  (thrown in by the caller: pass it on)
                item = await agen.athrow(exc)
            else:
                item = await agen.asend(sent)
    except StopAsyncIteration:
        return
    finally:
        try:
            await agen.aclose()
        finally:
            count = hold.count
            try:
                _core.give(hold)
            except BaseException:
                _core.give_again(hold, count)  # Ctrl-C at give()'s first instruction
                raise


def check_decoratable(func: object, where: str) -> None:
    """Refuse a class or a non-callable, saying what to decorate instead.

    classmethod and staticmethod objects are not callable themselves; wrapt binds them (the
    decorator goes outside them).
    """
    if isinstance(func, type):
        msg = (
            f"proclock decorates functions and methods, not a class ({func.__qualname__}): "
            f"decorate the method that must run {where}, e.g. its run() or __call__()"
        )
        raise TypeError(msg)
    if not callable(func) and not isinstance(func, (classmethod, staticmethod)):
        msg = f"proclock decorates functions, not {type(func).__name__}"
        raise TypeError(msg)


def _build(
    func: Any,
    name: object,
    options: dict[str, Any],
    on_contention: Any,
    exit_code: int,
    *,
    singleton: bool,
) -> Any:
    check_decoratable(func, "under the lock")
    _check_outcome(on_contention, exit_code)
    path = options.get("path")
    if name is None and path is None:
        fixed: str | None = _names.program_name(func) if singleton else _names.derived_name(func)
    elif isinstance(name, str) or name is None:
        fixed = name
    elif callable(name):
        fixed = None
    else:
        msg = f"name must be a str, a template or a callable, not {type(name).__name__}"
        raise TypeError(msg)
    base_name = fixed if fixed is not None and not _Namer._fields_of(fixed) else None  # noqa: SLF001
    if base_name is None and path is None:
        base_name = "template"  # replaced per call; validates the options below
    if path is not None and name is not None:
        msg = f"give the decorator a name or path=, not both (name={name!r}, path={path!r})"
        raise ValueError(msg)
    if name is None and path is None and base_name is not None:
        # A derived name (a script's absolute path, for one) is not the user's: no warning.
        base = ProcessLock("derived", **options)._renamed(base_name)  # noqa: SLF001
    else:
        base = ProcessLock(base_name, **options)
    namer = _Namer(base, fixed if fixed is not None else name if callable(name) else "", func)
    spec = _Spec(namer, name, on_contention, exit_code, singleton=singleton)
    return _decorate(func, spec)


@overload
def process_locked(func: Callable[P, R], /) -> Callable[P, R]: ...


@overload
def process_locked(  # noqa: F811
    func: str | None = None,
    /,
    *,
    on_contention: Literal["raise", "exit"] = "raise",
    **options: Unpack[LockedOptions],
) -> Keeps: ...


@overload
def process_locked(  # noqa: F811
    func: str | None = None,
    /,
    *,
    on_contention: Literal["skip"],
    **options: Unpack[LockedOptions],
) -> OrNone: ...


@overload
def process_locked(  # noqa: F811
    func: str | None = None,
    /,
    *,
    on_contention: Callable[[LockHeldError], T],
    **options: Unpack[LockedOptions],
) -> OrElse[T]: ...


def process_locked(  # noqa: F811  (the implementation after the typed variants)
    func: Any = None,
    /,
    *,
    name: str | Callable[..., str] | None = None,
    blocking: bool = True,
    timeout: float | None = None,
    retry: Retry | int | None = None,
    on_contention: OnContention = "raise",
    exit_code: int = 1,
    shared: bool = False,
    lock_dir: StrPath | None = None,
    path: StrPath | None = None,
    mode: int = 0o600,
    reentrant: bool = True,
    backend: Backend | str | None = None,
    on_lost: Callable[[LockLostError], object] | None = None,
) -> Any:
    """Run the function holding a cross-process lock for the length of each call.

    `@process_locked` derives the name from the function (`<module>.<qualname>`);
    `@process_locked("name")` names it; `"sync-{account_id}"` fills a template from each
    call's bound arguments. Works on functions, methods, classmethods and staticmethods (put
    it outside `@classmethod`), coroutine functions (waiting never blocks the event loop) and
    generators (held from the first `next()` to exhaustion or `close()`). Options are
    validated here, when the decorator is applied, not at each call.

    Args:
        func: the function (bare `@process_locked`), or the name as first positional argument.
        name: a str, a template (`"sync-{account_id}"`, `"{self.id}"`), or a callable taking
            the call's arguments and returning the name.
        blocking: wait for the lock (default); False makes one attempt.
        timeout: seconds to wait at most; None waits forever; 0 is one attempt.
        retry: a `Retry`, or an int of attempts in all: after a failed attempt, sleep and try
            again (needs `blocking=False` or a timeout).
        on_contention: what a call does when the lock stays busy: "raise" (the default,
            `LockHeldError` or `LockTimeoutError`), "skip" (return None without calling),
            "exit" (one line on stderr, then `SystemExit(exit_code)`), or a callable taking
            the `LockHeldError`, whose result the call returns.
        exit_code: the status of "exit", 0 to 255 (default 1, as flock(1)).
        shared: take a shared (reader) lock; writers exclude readers and each other.
        lock_dir: the directory of the lock file (default: `$PROCLOCK_DIR`, else
            `$XDG_RUNTIME_DIR/proclock`, else `<tempdir>/proclock-<uid>`).
        path: an explicit lock file instead of a name (for other programs using that file).
        mode: permissions of a lock file proclock creates (default 0o600; must include it).
        reentrant: count re-entry by the same thread or task (default); False raises
            `ProcLockError` on re-entry instead.
        backend: None for flock(2), a URL ("postgresql://...", "redis://...") or a backend
            object (`proclock.backends.PostgresBackend`, `RedisBackend`).
        on_lost: called with the `LockLostError` the moment a held lock is lost (network
            backends; `LockLostError` is also raised when the call ends).

    Raises:
        TypeError, ValueError: at decoration, for an option that cannot be used (the message
            names it), a class instead of a function, or contradictory options (`blocking=False`
            with a timeout, `retry` with an unbounded wait).
        LockNameError: at decoration, a template field that names no parameter; at a call,
            a name the call cannot fill.
        LockHeldError, LockTimeoutError: at a call, the lock stayed busy (with "raise").
        UnsafeLockPathError: the lock directory or file could be subverted by another user.
        OSError: the lock directory or file cannot be used (EACCES, EROFS, ENOSPC), with the
            lock, the directory and what to do in the message; the function is not called.
        BackendUnavailableError, LockLostError: network backends only.
    """
    if isinstance(func, str):
        if name is not None:
            msg = f"the name was given twice: {func!r} and name={name!r}"
            raise TypeError(msg)
        name, func = func, None
    options = {
        "blocking": blocking,
        "timeout": timeout,
        "retry": retry,
        "shared": shared,
        "lock_dir": lock_dir,
        "path": path,
        "mode": mode,
        "reentrant": reentrant,
        "backend": backend,
        "on_lost": on_lost,
    }

    def decorator(f: Any) -> Any:
        return _build(f, name, options, on_contention, exit_code, singleton=False)

    if func is None:
        # Validate now, even before a function arrives: misuse fails where it is written.
        if name is not None and not callable(name) and not isinstance(name, str):
            msg = f"name must be a str, a template or a callable, not {type(name).__name__}"
            raise TypeError(msg)
        _check_outcome(on_contention, exit_code)
        ProcessLock(
            "validate" if path is None else None,
            **options,  # type: ignore[arg-type]
        )
        return decorator
    return decorator(func)


_UNSET_BLOCKING: Any = object()


@overload
def singleton_process(func: Callable[P, R], /) -> Callable[P, R]: ...


@overload
def singleton_process(  # noqa: F811
    func: str | None = None,
    /,
    *,
    on_contention: Literal["raise", "exit"] = "exit",
    **options: Unpack[SingletonOptions],
) -> Keeps: ...


@overload
def singleton_process(  # noqa: F811
    func: str | None = None,
    /,
    *,
    on_contention: Literal["skip"],
    **options: Unpack[SingletonOptions],
) -> OrNone: ...


@overload
def singleton_process(  # noqa: F811
    func: str | None = None,
    /,
    *,
    on_contention: Callable[[LockHeldError], T],
    **options: Unpack[SingletonOptions],
) -> OrElse[T]: ...


def singleton_process(  # noqa: F811  (the implementation after the typed variants)
    func: Any = None,
    /,
    *,
    name: str | Callable[..., str] | None = None,
    blocking: bool = _UNSET_BLOCKING,
    timeout: float | None = None,
    retry: Retry | int | None = None,
    on_contention: OnContention = "exit",
    exit_code: int = 1,
    lock_dir: StrPath | None = None,
    path: StrPath | None = None,
    mode: int = 0o600,
    reentrant: bool = True,
    backend: Backend | str | None = None,
    on_lost: Callable[[LockLostError], object] | None = None,
) -> Any:
    """Let one instance of this program run `func` at a time; a second one exits (status 1).

    The lock is named after the program, not the function: the `-m` module (`python -m pkg`
    is "pkg"), else the script's absolute path; so every entry point of one program excludes
    the others. The second instance prints one line naming the running one's pid and command
    on stderr and exits. It takes the options of `process_locked` except `shared`, with
    other defaults:

    Args:
        func: the function (bare `@singleton_process`), or the name as first positional argument.
        name: a name instead of the program's (a str, template or callable).
        blocking: default False (a second instance gives up at once); True waits for the
            first to finish. A `timeout` implies True: `timeout=5` waits up to 5 s.
        timeout: seconds to wait for the running instance; None waits forever when blocking.
        retry: a `Retry`, or an int of attempts in all.
        on_contention: default "exit"; "raise" raises `AlreadyRunningError` instead, "skip"
            returns None, a callable gets the `AlreadyRunningError` and its result is returned.
        exit_code: the exit status of "exit" (default 1).
        lock_dir: the directory of the lock file, as for `process_locked`.
        path: an explicit lock file (a pid-file path other tools look at, for instance).
        mode: permissions of a lock file proclock creates (default 0o600).
        reentrant: count re-entry (default True).
        backend: None for flock(2), a URL or a backend object: one instance across machines.
        on_lost: called with the `LockLostError` if a network backend loses the lock.

    Raises:
        TypeError, ValueError: at decoration, as for `process_locked`.
        AlreadyRunningError: with on_contention="raise", another instance holds the lock.
        SystemExit: with on_contention="exit" (the default), another instance holds it.
        OSError, UnsafeLockPathError: the lock directory or file cannot be used.
    """
    if blocking is _UNSET_BLOCKING:
        blocking = timeout is not None
    if isinstance(func, str):
        if name is not None:
            msg = f"the name was given twice: {func!r} and name={name!r}"
            raise TypeError(msg)
        name, func = func, None
    options = {
        "blocking": blocking,
        "timeout": timeout,
        "retry": retry,
        "lock_dir": lock_dir,
        "path": path,
        "mode": mode,
        "reentrant": reentrant,
        "backend": backend,
        "on_lost": on_lost,
    }

    def decorator(f: Any) -> Any:
        return _build(f, name, options, on_contention, exit_code, singleton=True)

    if func is None:
        _check_outcome(on_contention, exit_code)
        ProcessLock("validate" if path is None else None, **options)  # type: ignore[arg-type]
        return decorator
    return decorator(func)


def lock_of(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> ProcessLock:
    """The `ProcessLock` a function decorated by proclock takes, to inspect it.

    `lock_of(refresh_cache).path` is the file, `.holder()` who holds it, `.name` its name, so
    an operator never rebuilds `pkg.mod.func` by hand. For a name that depends on the call
    (a template or a name callable), pass the call's arguments:
    `lock_of(sync, account_id=42)` is the lock that `sync(42)` takes. Arguments are used only
    to fill the name; for a fixed name they make no difference.

    Raises:
        TypeError: `func` is not decorated by `process_locked` or `singleton_process`, or the
            name needs arguments that were not given.
        LockNameError: the arguments do not fill the template.
    """
    spec: _Spec | None = getattr(func, "_self_proclock", None)
    parent = getattr(func, "_self_parent", None)  # a method reached through its instance
    if spec is None and parent is not None:
        spec = getattr(parent, "_self_proclock", None)
    if not isinstance(spec, _Spec):
        msg = (
            f"lock_of() takes a function decorated with @process_locked or "
            f"@singleton_process, not {func!r}"
        )
        raise TypeError(msg)
    namer = spec.namer
    fixed = namer.fixed
    if fixed is not None:
        return fixed
    try:
        return namer.lock_for(spec.name, func, args, kwargs)
    except TypeError as exc:
        msg = (
            f"the lock name of {namer.func_name} depends on its arguments "
            f"({spec.name!r}): pass them as in the call, lock_of({namer.func_name}, ...) ({exc})"
        )
        raise TypeError(msg) from None
