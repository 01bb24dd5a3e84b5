"""Waiting for any one of several flock(2) locks at once, woken by the kernel: no polling.

A semaphore's head waiter waits for whichever of its N slot files frees first. flock(2) has no
"wait for any", so each file gets a parked wait of its own (the flock backend's helper threads,
`flock._start_parked`), all of them waking the one waiter through one notifier. The first
grant found is taken; every other wait is given up exactly as a lock's waiter gives up its
parked wait: still blocked in the kernel, it is left for the next waiter of this process on the
same file to adopt; already granted, it is unlocked at once.

What this module guarantees, on top of what `flock` guarantees of each parked wait:

- At most one of the files is returned held; an exception at any point (Ctrl-C,
  cancellation, a failed wait) leaves none of them held by this call.
- A grant is never missed: the notifier is re-armed before the waits' states are read, so a
  grant that lands while they are read wakes the next wait at once.
- Past `flock.PARKED_MAX` helpers in the kernel, the wait falls back to the flock backend's
  documented bounded back-off (LOCK_NB tries of every file), as a lock's timed wait does.
"""

from __future__ import annotations

import os
import threading
import time

from . import flock as _fl
from ._base import Handle

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable, Sequence
    from typing import Any

    from .._spec import LockSpec
    from ._protocol import Backend

_clock = time.monotonic


def _start_all(
    specs: Sequence[LockSpec],
    notify: Callable[[], None],
    loop: Any,
    attempts: list[_fl._Attempt | None],
) -> bool:
    """A parked wait per file, all notifying `notify`, each recorded in `attempts` first.

    The caller's list, made before anything starts and given up by the caller's `finally`: an
    interruption anywhere (Ctrl-C lands at any call) leaves no wait running for nobody, which
    would hold its slot once granted. False (every wait given up) past the helpers' bound.
    """
    for spec in specs:
        attempt = _fl._Attempt()
        attempts.append(attempt)
        if not _fl._start_parked(spec, _fl.FLOCK.locate(spec), notify, attempt, loop):
            _give_up_all(attempts)
            attempts.clear()
            return False
    return True


def _give_up_all(attempts: Sequence[_fl._Attempt | None], keep: int = -1) -> None:
    """Give up every wait but `keep`'s (an exception in one still gives up the others)."""
    error: BaseException | None = None
    for i, attempt in enumerate(attempts):
        if attempt is None or i == keep:
            continue
        try:
            _fl._give_up(attempt)
        except BaseException as exc:  # noqa: BLE001  (re-raised once all are given up)
            error = error or exc
    if error is not None:
        raise error


def _finish(attempts: list[_fl._Attempt | None], got: tuple[int, Handle] | None) -> None:
    """Give up every wait but the winner's; interrupted, give the winner's grant back too."""
    try:
        _give_up_all(attempts, -1 if got is None else got[0])
    except BaseException:
        if got is not None:
            _fl.FLOCK.release(got[1])  # nobody would own it: the caller sees the exception
        raise


def _collect(
    specs: Sequence[LockSpec], attempts: list[_fl._Attempt | None], loop: Any
) -> tuple[int, Handle] | None:
    """The first granted wait, taken; a wait whose file was replaced is started anew.

    Raises what a failed wait failed with.
    """
    for i, attempt in enumerate(attempts):
        parked = attempt.parked if attempt is not None else None
        if parked is None or parked.state not in (_fl.GRANTED, _fl.FAILED):
            continue  # still waiting (GRANTED and FAILED are set by the helper, and final)
        spec = specs[i]
        located = _fl.FLOCK.locate(spec)
        handle = _fl._settle(attempt, spec, located[0])  # type: ignore[arg-type]
        if handle is not None:
            return i, handle
        # Granted on a file that was replaced meanwhile: wait on the new one.
        notify = parked.notify
        fresh = _fl._Attempt()
        attempts[i] = fresh
        if not _fl._start_parked(spec, located, notify, fresh, loop):
            attempts[i] = None  # past the bound: the other files are still waited on
    return None


def try_any(specs: Sequence[LockSpec]) -> tuple[int, Handle] | None:
    """One LOCK_NB try of each file in order: the first that is free, held; else None."""
    for i, spec in enumerate(specs):
        handle = _fl.FLOCK.try_acquire(spec)
        if handle is not None:
            return i, handle
    return None


def wait_any(specs: Sequence[LockSpec], deadline: float | None) -> tuple[int, Handle] | None:
    """Wait until one of the files is ours (index, handle), or None once `deadline` passed."""
    event = threading.Event()
    attempts: list[_fl._Attempt | None] = []
    got = None
    try:
        if not _start_all(specs, event.set, None, attempts):
            return _fl.poll(lambda: try_any(specs), deadline)
        while True:
            event.clear()  # re-armed before the states are read: no grant is missed
            got = _collect(specs, attempts, None)
            if got is not None:
                return got
            if not any(a is not None for a in attempts):
                return _fl.poll(lambda: try_any(specs), deadline)
            if deadline is None:
                event.wait()
            else:
                remaining = deadline - _clock()
                if remaining <= 0:
                    return None
                event.wait(remaining)
    finally:
        _finish(attempts, got)


async def wait_any_async(
    specs: Sequence[LockSpec], deadline: float | None
) -> tuple[int, Handle] | None:
    """`wait_any` for coroutines: the event loop never blocks; cancellation leaves none held."""
    import asyncio  # noqa: PLC0415
    import weakref  # noqa: PLC0415  (asyncio has imported it already)

    loop = asyncio.get_running_loop()
    # The helpers hold the current future weakly (through its cell), as a lock's parked wait
    # does: a task whose event loop was closed before it took a grant must be garbage, so
    # that closing its coroutine gives the grant back.
    cell = _Cell((loop.create_future(),))
    ref = weakref.ref(cell)

    def notify() -> None:
        # From a helper thread; RuntimeError (nobody will take it) if the loop is closed or
        # the waiting task is gone, as for a lock's parked wait.
        held = ref()
        if held is None:
            msg = "the waiting task is gone"
            raise RuntimeError(msg)
        loop.call_soon_threadsafe(_resolve, held)

    attempts: list[_fl._Attempt | None] = []
    got = None
    try:
        if not _start_all(specs, notify, loop, attempts):
            return await _fl.poll_async(lambda: try_any(specs), deadline, asyncio)
        while True:
            cell[0] = loop.create_future()  # re-armed before the states are read
            got = _collect(specs, attempts, loop)
            if got is not None:
                return got
            if not any(a is not None for a in attempts):
                return await _fl.poll_async(lambda: try_any(specs), deadline, asyncio)
            remaining = None if deadline is None else deadline - _clock()
            if remaining is not None and remaining <= 0:
                return None
            # asyncio.wait neither raises on timeout nor cancels the future it watches.
            await asyncio.wait((cell[0],), timeout=remaining)
    finally:
        _finish(attempts, got)


class _Cell(list):  # type: ignore[type-arg]
    """The future an async waiter awaits now, re-armed each round; weakly referenceable."""

    __slots__ = ("__weakref__",)


def _resolve(cell: list[asyncio.Future[None]]) -> None:
    future = cell[0]
    if not future.done():
        future.set_result(None)


# -- any backend that declares "wait-any" (PostgreSQL): one wait of its own per lock --------------
#
# Such a backend's acquire_async waits without polling (the server queues and wakes it) and is
# cancellable, leaving nothing held. Waiting for any of N locks is then N of those waits at
# once, the first grant kept and the others cancelled (a grant that lands during the
# cancellation is given back).


async def wait_any_backend_async(
    backend: Backend, specs: Sequence[LockSpec], deadline: float | None
) -> tuple[int, Handle] | None:
    """Wait until one of the locks is ours (index, handle), or None once `deadline` passed.

    The other waits are cancelled, and reaped in the background (a grant that lands during
    their cancellation is given back there): the winner does not wait for the server to
    confirm each cancellation.
    """
    import asyncio  # noqa: PLC0415

    tasks: list[Any] = []
    got: tuple[int, Handle] | None = None
    try:
        for spec in specs:  # recorded as each starts: the `finally` cancels what started
            tasks.append(asyncio.ensure_future(backend.acquire_async(spec, deadline)))  # noqa: PERF401  (one by one, on purpose)
        pending = set(tasks)
        while pending and got is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for i, task in enumerate(tasks):
                if task in done and got is None:
                    handle = task.result()  # a failed wait's error is raised (after cleanup)
                    if handle is not None:
                        got = (i, handle)
        return got
    finally:
        others = [t for i, t in enumerate(tasks) if got is None or i != got[0]]
        for task in others:
            task.cancel()
        reaper = asyncio.ensure_future(_reap(backend, others))
        _reapers.add(reaper)  # a strong reference until it is done
        reaper.add_done_callback(_reapers.discard)


_reapers: set[Any] = set()


async def _reap(backend: Backend, tasks: list[Any]) -> None:
    """Wait for cancelled waits to end; give back any grant they got meanwhile."""
    import asyncio  # noqa: PLC0415

    for result in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(result, Handle):
            backend.release(result)


async def try_any_async(backend: Backend, specs: Sequence[LockSpec]) -> tuple[int, Handle] | None:
    """One attempt at each lock in order, without blocking the event loop on the network."""
    for i, spec in enumerate(specs):
        # A past deadline: the backend's async wait makes its one attempt and gives up.
        handle = await backend.acquire_async(spec, _clock())
        if handle is not None:
            return i, handle
    return None


_loop: Any = None  # the private event loop of sync waits (a daemon thread runs it)
_loop_lock = threading.Lock()


def _private_loop() -> Any:
    global _loop  # noqa: PLW0603
    with _loop_lock:
        if _loop is None:
            import asyncio  # noqa: PLC0415

            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="proclock-wait-any", daemon=True).start()
            _loop = loop
        return _loop


def _forget_loop() -> None:
    global _loop, _loop_lock
    _loop, _loop_lock = None, threading.Lock()  # its thread does not exist in a forked child


os.register_at_fork(after_in_child=_forget_loop)


def wait_any_backend(
    backend: Backend, specs: Sequence[LockSpec], deadline: float | None
) -> tuple[int, Handle] | None:
    """`wait_any_backend_async` for a thread: run on a private event loop, waited for here.

    Interrupted (Ctrl-C), the wait is cancelled, and a grant that arrives anyway is given back.
    """
    import asyncio  # noqa: PLC0415

    future = asyncio.run_coroutine_threadsafe(
        wait_any_backend_async(backend, specs, deadline), _private_loop()
    )
    try:
        return future.result()
    except BaseException:
        future.cancel()

        def give_back(done: Any) -> None:
            if not done.cancelled() and done.exception() is None and done.result() is not None:
                backend.release(done.result()[1])

        future.add_done_callback(give_back)
        raise


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking call (a network round trip) without blocking the event loop."""
    import asyncio  # noqa: PLC0415

    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
