"""The contract suite's backend descriptions and child-process targets (importable under spawn).

A `Target` is a picklable description of one backend under test (its kind, the URL, the
namespace, the lock directory for flock); a child process receives it and builds the backend
itself, so that nothing of the parent's (a connection, a renewal thread) crosses over.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time

import proclock

_BUILT: dict[Target, object] = {}
_BUILT_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Target:
    """One backend under test, as a value a child process can rebuild it from."""

    kind: str  # "flock", "postgres" or "redis"
    url: str | None = None
    namespace: str | None = None
    lock_dir: str | None = None  # flock: the test's private lock directory
    options: tuple[tuple[str, object], ...] = ()  # the backend's constructor options

    def __repr__(self):
        return self.kind

    def backend(self):
        """This process's backend object for the target (built once per process)."""
        if self.kind == "flock":
            from proclock.backends import FLOCK

            return FLOCK
        with _BUILT_LOCK:
            built = _BUILT.get(self)
            if built is None:
                built = _BUILT[self] = self._build()
            return built

    def _build(self):
        options = dict(self.options)
        if self.kind == "postgres":
            from proclock.backends import PostgresBackend

            return PostgresBackend(self.url, namespace=self.namespace, **options)
        from proclock.backends import RedisBackend

        return RedisBackend(self.url, namespace=self.namespace, **options)

    def where(self):
        """The keyword arguments that direct a lock or decorator to this backend."""
        if self.kind == "flock":
            return {"lock_dir": self.lock_dir}
        return {"backend": self.backend()}

    def lock(self, name, **options):
        return proclock.ProcessLock(name, **self.where(), **options)

    def locked(self, name, **options):
        """`process_locked(name, ...)` on this backend, as a decorator."""
        return proclock.process_locked(name, **self.where(), **options)

    def close(self):
        """Close this process's backend, if it was built and can be closed."""
        with _BUILT_LOCK:
            built = _BUILT.pop(self, None)
        close = getattr(built, "close", None)
        if close is not None:
            close()


# -- the counter: a read-modify-write that loses updates unless every caller is excluded -------


def bump(path):
    with open(path) as f:
        value = int(f.read())
    time.sleep(0.0002)  # widen the window a lost update needs
    with open(path, "w") as f:
        f.write(str(value + 1))


async def bump_async(path):
    # Blocking file I/O in the loop on purpose: the read-modify-write is what the lock protects.
    with open(path) as f:  # noqa: ASYNC230
        value = int(f.read())
    await asyncio.sleep(0)  # let another task of this loop run inside the window
    with open(path, "w") as f:  # noqa: ASYNC230
        f.write(str(value + 1))


def count(target, name, path, iterations, start):
    """Four owners bump `path` `iterations` times each, all under the lock `name`.

    A thread and a task through one shared ProcessLock (`with`, `async with`; with a timeout,
    so that waits are parked), a thread and a task through `@process_locked` (a function, a
    coroutine function; waiting without a timeout).
    """
    lock = target.lock(name, timeout=30)

    def with_lock():
        with lock:
            bump(path)

    async def with_lock_async():
        async with lock:
            await bump_async(path)

    @target.locked(name)
    def decorated():
        bump(path)

    @target.locked(name)
    async def decorated_async():
        await bump_async(path)

    errors = []

    def run(one):
        try:
            for _ in range(iterations):
                one()
        except BaseException as exc:
            errors.append(exc)

    async def run_tasks():
        async def task(one):
            for _ in range(iterations):
                await one()

        await asyncio.gather(task(with_lock_async), task(decorated_async))

    workers = [threading.Thread(target=run, args=(one,)) for one in (with_lock, decorated)]
    start.wait(30)  # a Barrier: raises BrokenBarrierError on timeout
    for worker in workers:
        worker.start()
    try:
        asyncio.run(run_tasks())
    finally:
        for worker in workers:
            worker.join(30)
    if errors:
        raise errors[0]


# -- holders and waiters ----------------------------------------------------------------------


def hold(target, name, locked, release, report=None, shared=False):  # noqa: PLR0917
    """Hold `name` until `release` is set: send (pid, lock.path) to `report`, set `locked`."""
    with target.lock(name, shared=shared) as lock:
        if report is not None:
            report.send((os.getpid(), lock.path))
        locked.set()
        if not release.wait(30):
            raise SystemExit(3)


def hold_forever(target, name, locked):
    """Hold `name` until killed."""
    with target.lock(name):
        locked.set()
        while True:
            time.sleep(60)


def wait_for(target, name, waiting, acquired, timeout):
    """Check that `name` is busy, set `waiting`, wait for it, set `acquired`, release it.

    Exit code 4: the lock was free when it should have been held.
    """
    lock = target.lock(name)
    try:
        lock.acquire(blocking=False)
    except proclock.LockHeldError:
        pass
    else:
        lock.release()
        raise SystemExit(4)
    waiting.set()
    with lock.acquire(timeout=timeout):
        acquired.set()


def fence(target, name, path, iterations, start):
    """Append each hold's fencing token to `path`, under the lock: the order they were taken."""
    lock = target.lock(name)
    start.wait(30)
    for _ in range(iterations):
        with lock, open(path, "a") as f:
            f.write(f"{os.getpid()} {lock.fencing_token}\n")
