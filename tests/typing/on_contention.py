"""What on_contention does to a decorated function's type: checked by mypy and pyright (strict).

Each `# type: ignore[...]` / `# pyright: ignore[...]` below marks an error the checkers must
report: both run with unused-ignore reporting on, so an error that went missing fails CI.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator

from typing_extensions import assert_type

from proclock import (
    LockHeldError,
    ProcessLock,
    lock_of,
    process_limited,
    process_locked,
    singleton_process,
)


@process_locked(blocking=False, on_contention="skip")
def maybe_compact() -> int:
    return 1


@process_locked("jobs", timeout=1, on_contention="raise")
def must_run() -> int:
    return 1


@process_locked
def bare() -> int:
    return 1


@process_locked("jobs-{n}", on_contention="skip")
async def maybe_async(n: int) -> int:
    return n


@process_locked(on_contention="skip")
def maybe_gen() -> Generator[int, None, str]:
    yield 1
    return "done"


@process_locked(on_contention="skip")
async def maybe_agen() -> AsyncGenerator[int, None]:
    yield 1


def busy(error: LockHeldError) -> str:
    return f"busy: {error.path}"


@process_locked(blocking=False, on_contention=busy)
def or_message(n: int) -> int:
    return n


@singleton_process
def main() -> int:
    return 0


@singleton_process(on_contention="skip")
def main_or_none() -> int:
    return 0


async def checks() -> None:
    assert_type(maybe_compact(), "int | None")
    assert_type(must_run(), int)
    assert_type(bare(), int)
    assert_type(await maybe_async(1), "int | None")
    assert_type(or_message(1), "int | str")
    assert_type(main(), int)
    assert_type(main_or_none(), "int | None")
    assert_type(maybe_gen(), "Generator[int, None, str | None]")
    async for item in maybe_agen():
        assert_type(item, int)
    for item in maybe_gen():
        assert_type(item, int)
    lock: ProcessLock = lock_of(maybe_compact)
    assert lock.name
    sure: int = must_run()
    assert sure


def errors_the_checkers_must_report() -> None:
    x: int = maybe_compact()  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
    y: int = or_message(1)  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
    coroutine = maybe_async("one")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    coroutine.close()
    process_locked(on_contention="skp")  # type: ignore[call-overload]  # pyright: ignore[reportCallIssue, reportArgumentType]
    assert x + y


@process_limited("gpu", limit=2, blocking=False, on_contention="skip")
def maybe_infer() -> int:
    return 1


@process_limited("gpu", limit=2, timeout=5)
def infer() -> int:
    return 1


def semaphore_checks() -> None:
    assert_type(maybe_infer(), "int | None")
    assert_type(infer(), int)
    z: int = maybe_infer()  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
    assert z
