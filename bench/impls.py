"""The locks under test, each as acquire/release, and the multi-process runners.

A module of its own so that children started with the spawn method can import it.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.metadata
import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Any

SPAWN = multiprocessing.get_context("spawn")
PEERS = ("filelock", "fasteners", "portalocker")
# Peers that wait by sleeping between non-blocking tries (fewer handoffs are measured: each
# one costs up to their poll interval).
POLLS = {
    "filelock": True,
    "filelock-timeout": True,
    "fasteners": True,
    "fasteners-timeout": True,
    "portalocker": True,
    "portalocker-timeout": True,
}


REDIS_URL = os.environ.get("PROCLOCK_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
_reachable: dict[str, bool] = {}
_redis_admin: dict[str, Any] = {}


def _redis_reachable() -> bool:
    """Whether the Redis server answers (once per run): its kinds are measured only then."""
    if "redis" not in _reachable:
        try:
            import redis

            client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5, socket_timeout=1)
            try:
                _reachable["redis"] = bool(client.ping())
            finally:
                client.close()
        except Exception:
            _reachable["redis"] = False
    return _reachable["redis"]


def _redis_kinds() -> list[str]:
    return ["proclock-redis"] if _redis_reachable() else []


def _has(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def peer_versions() -> dict[str, str]:
    out = {}
    for name in ("proclock", "wrapt", *PEERS):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


class Raw:
    """The floor: one descriptor kept open, blocking flock(2), LOCK_UN."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def acquire(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


class RawOpen:
    """What a naive lock costs: open, flock, unlock, close each time."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def acquire(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class Floor:
    """The syscalls proclock's fast path makes, from bare Python, with no bookkeeping at all.

    lseek (the descriptor is still ours), LOCK_NB, fstat (the file is still at the path: its
    ctime has not moved), lseek, LOCK_UN. The record write is amortised (once a second), and
    the path lookup is made only when the ctime moved: neither is in the steady state.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.magic = os.lseek(self.fd, (1 << 30) + 1, os.SEEK_SET)

    def acquire(self) -> None:
        if os.lseek(self.fd, 0, os.SEEK_CUR) != self.magic:
            raise AssertionError
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.fstat(self.fd)

    def release(self) -> None:
        if os.lseek(self.fd, 0, os.SEEK_CUR) != self.magic:
            raise AssertionError
        fcntl.flock(self.fd, fcntl.LOCK_UN)


class FloorBefore:
    """The previous design's syscalls: LOCK_NB, lstat(path), a pwrite of the record, LOCK_UN."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.record = b" " * 255 + b"\n"

    def acquire(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.lstat(self.path)
        os.pwrite(self.fd, self.record, 0)

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


class FloorVariant(Floor):
    """The floor with one of its amortisations undone, to show what each one buys.

    `record`: the holder record written at every acquisition (not once a second);
    `lstat`: the path looked up after every acquisition (not only when the ctime moved);
    `fstat-identity`: the descriptor's identity checked with fstat (not its offset, lseek).
    """

    def __init__(self, path: str, variant: str) -> None:
        super().__init__(path)
        self.variant = variant
        self.record = b" " * 255 + b"\n"
        self.ino = os.fstat(self.fd).st_ino

    def _ours(self) -> None:
        if self.variant == "fstat-identity":
            if os.fstat(self.fd).st_ino != self.ino:
                raise AssertionError
        elif os.lseek(self.fd, 0, os.SEEK_CUR) != self.magic:
            raise AssertionError

    def acquire(self) -> None:
        self._ours()
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.fstat(self.fd)
        if self.variant == "lstat":
            os.lstat(self.path)
        elif self.variant == "record":
            os.pwrite(self.fd, self.record, 0)

    def release(self) -> None:
        self._ours()
        fcntl.flock(self.fd, fcntl.LOCK_UN)


class Decorated:
    """A no-op function decorated with @process_locked; acquire() runs one call."""

    def __init__(self, name: str) -> None:
        from proclock import process_locked

        @process_locked(name)
        def noop() -> None:
            pass

        self.noop = noop

    def acquire(self) -> None:
        self.noop()

    def release(self) -> None:
        pass


POSTGRES_URL = os.environ.get(
    "PROCLOCK_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
_admin: dict[str, Any] = {}  # a connection of the bench's own, to watch pg_locks


def _postgres_reachable() -> bool:
    """proclock-postgres is measured only where the server answers (and psycopg is installed)."""
    if "postgres" not in _reachable:
        try:
            import psycopg

            psycopg.connect(POSTGRES_URL, connect_timeout=2).close()
        except Exception:
            _reachable["postgres"] = False
        else:
            _reachable["postgres"] = True
    return _reachable["postgres"]


def _postgres_kinds() -> list[str]:
    return ["proclock-postgres"] if _postgres_reachable() else []


def _postgres_waiters(name: str) -> int:
    """Sessions queued for the lock `name` in pg_locks (the server-side wait queue)."""
    import psycopg

    from proclock.backends.postgres import advisory_key

    key = advisory_key("proclock-bench", name)
    conn = _admin.get("conn")
    if conn is None:
        conn = _admin["conn"] = psycopg.connect(POSTGRES_URL, autocommit=True)
    row = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        " AND classid = %s::bigint::oid AND objid = %s::bigint::oid",
        ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF),
    ).fetchone()
    return int(row[0])


class Wrap:
    def __init__(self, acquire: Any, release: Any) -> None:
        self.acquire, self.release = acquire, release


def make_lock(kind: str, d: str, name: str = "bench") -> Any:
    """A fresh lock object of `kind` on the lock `name` in directory `d`."""
    path = str(Path(d, f"{name}.{kind.split('-', maxsplit=1)[0]}.lock"))
    if kind == "raw":
        return Raw(path)
    if kind == "raw-open":
        return RawOpen(path)
    if kind == "syscall-floor":
        return Floor(path)
    if kind == "syscall-floor-before":
        return FloorBefore(path)
    if kind.startswith("syscall-floor+"):
        return FloorVariant(path, kind.split("+", 1)[1])
    if kind in ("proclock", "proclock-timeout"):
        from proclock import ProcessLock

        return ProcessLock(name, timeout=30 if kind.endswith("timeout") else None)
    if kind == "proclock-decorated":
        return Decorated(name)
    if kind == "proclock-postgres":
        from proclock import ProcessLock
        from proclock.backends import PostgresBackend

        return ProcessLock(name, backend=PostgresBackend(POSTGRES_URL, namespace="proclock-bench"))
    if kind == "proclock-redis":
        from proclock import ProcessLock

        return ProcessLock(name, backend=REDIS_URL)
    if kind in ("filelock", "filelock-timeout"):
        import filelock

        lock = filelock.FileLock(path, timeout=30 if kind.endswith("timeout") else -1)
        return Wrap(lock.acquire, lock.release)
    if kind in ("fasteners", "fasteners-timeout"):
        import fasteners

        flock = fasteners.InterProcessLock(path)
        if kind.endswith("timeout"):
            return Wrap(lambda: flock.acquire(timeout=30), flock.release)
        return Wrap(flock.acquire, flock.release)
    if kind in ("portalocker", "portalocker-timeout"):
        import portalocker

        if kind.endswith("timeout"):
            plock = portalocker.Lock(path, timeout=30, fail_when_locked=False)
        else:
            plock = portalocker.Lock(path, fail_when_locked=False)
        return Wrap(plock.acquire, plock.release)
    msg = f"unknown lock kind {kind!r}"
    raise ValueError(msg)


def _peer_kinds(*, timeouts: bool) -> list[str]:
    kinds = []
    for peer in PEERS:
        if _has(peer):
            kinds.append(peer)
            if timeouts:
                kinds.append(f"{peer}-timeout")
    return kinds


def available_round_trip() -> list[str]:
    return [
        "raw",
        "raw-open",
        "syscall-floor",
        "syscall-floor+record",
        "syscall-floor+lstat",
        "syscall-floor+fstat-identity",
        "syscall-floor-before",
        "proclock",
        "proclock-timeout",
        "proclock-decorated",
        *_redis_kinds(),
        *_postgres_kinds(),
        *_peer_kinds(timeouts=True),
    ]


def available_handoff() -> list[str]:
    return [
        "raw",
        "proclock",
        "proclock-timeout",
        *_redis_kinds(),
        *_postgres_kinds(),
        *_peer_kinds(timeouts=True),
    ]


def available_throughput() -> list[str]:
    return ["raw", "proclock", "proclock-decorated", *_peer_kinds(timeouts=False)]


def round_trip(kind: str, d: str) -> Any:
    lock = make_lock(kind, d, f"rt-{kind}")

    def op() -> None:
        lock.acquire()
        lock.release()

    return op


# -- handoff --------------------------------------------------------------------------------


def _blocked_waiters(path: str) -> int:
    """flock waiters queued on `path` in /proc/locks (lines with '->')."""
    st = os.stat(path)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as f:
        return sum(1 for line in f if "->" in line and key in line)


def _handoff_waiter(kind: str, d: str, count: int, conn: Any) -> None:
    lock = make_lock(kind, d, "handoff")
    for _ in range(count):
        conn.recv()  # "go": the parent holds the lock
        conn.send("waiting")
        lock.acquire()
        t1 = time.perf_counter_ns()
        lock.release()
        conn.send(t1)


def run_handoffs(kind: str, d: str, count: int) -> list[float]:
    """Latencies (µs) of `count` handoffs from this process (holder) to a waiting child."""
    lock = make_lock(kind, d, "handoff")
    parent, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=_handoff_waiter, args=(kind, d, count, child))
    proc.start()
    path = _lock_file(kind, d, "handoff", lock)
    out = []
    try:
        for _ in range(count):
            lock.acquire()
            parent.send("go")
            parent.recv()  # the child is about to wait
            # Let it reach its wait: in the kernel (visible in /proc/locks) for blocking
            # locks; polling locks get 2 ms to make their first try and go to sleep.
            end = time.monotonic() + (0.002 if POLLS.get(kind) else 0.5)
            while time.monotonic() < end:
                if kind == "proclock-redis":
                    if _redis_subscribed(lock):  # then 2 ms for its retry: it sleeps after
                        end = min(end, time.monotonic() + 0.002)
                elif kind == "proclock-postgres":
                    if _postgres_waiters(lock.name):
                        break  # queued in the server: the release hands it over
                elif path and not POLLS.get(kind) and _blocked_waiters(path):
                    break
                time.sleep(0.0001)
            t0 = time.perf_counter_ns()
            lock.release()
            t1 = parent.recv()
            out.append((t1 - t0) / 1000)
    finally:
        proc.join(60)
    return out


def _redis_subscribed(lock: Any) -> bool:
    """A waiter is queued for the lock (ZCARD of its queue)."""
    from proclock.backends import resolve

    if "client" not in _redis_admin:
        import redis

        _redis_admin["client"] = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    queue = resolve(REDIS_URL).queue_key(lock.name)  # type: ignore[attr-defined]
    return int(_redis_admin["client"].zcard(queue)) > 0


def _lock_file(kind: str, d: str, name: str, lock: Any) -> str:
    if kind in ("proclock-redis", "proclock-postgres"):
        return ""
    if kind.startswith("proclock"):
        return str(lock.path)
    return str(Path(d, f"{name}.{kind.split('-', 1)[0]}.lock"))


# -- contended counter ----------------------------------------------------------------------


def _counter_worker(kind: str, d: str, counter: str, seconds: float, barrier: Any, q: Any) -> None:
    lock = make_lock(kind, d, "counter")
    fd = os.open(counter, os.O_RDWR)
    if kind == "proclock-decorated":
        from proclock import process_locked

        @process_locked("counter")
        def bump() -> None:
            value = int(os.pread(fd, 20, 0) or b"0")
            os.pwrite(fd, b"%020d" % (value + 1), 0)

    else:

        def bump() -> None:
            lock.acquire()
            try:
                value = int(os.pread(fd, 20, 0) or b"0")
                os.pwrite(fd, b"%020d" % (value + 1), 0)
            finally:
                lock.release()

    barrier.wait()
    ops, longest = 0, 0.0
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        if t0 > deadline:
            break
        bump()  # the wait is in here; the section itself takes ~2 µs
        longest = max(longest, time.perf_counter() - t0)
        ops += 1
    q.put((ops, longest))


def run_counter(kind: str, d: str, nproc: int, seconds: float) -> dict[str, Any]:
    counter = str(Path(d, f"counter-{kind}-{nproc}"))
    Path(counter).write_bytes(b"%020d" % 0)
    barrier = SPAWN.Barrier(nproc)
    q = SPAWN.Queue()
    procs = [
        SPAWN.Process(target=_counter_worker, args=(kind, d, counter, seconds, barrier, q))
        for _ in range(nproc)
    ]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    ops = [r[0] for r in results]
    final = int(Path(counter).read_bytes() or b"0")
    return {
        "ops_per_s": sum(ops) / seconds,
        "fairness": min(ops) / max(ops) if max(ops) else 0.0,
        "max_wait_ms": max(r[1] for r in results) * 1000,
        "lost": sum(ops) - final,
        "ops": ops,
    }


# -- steady state ---------------------------------------------------------------------------


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _hold(d: str, locked: Any, release: Any) -> None:
    from proclock import ProcessLock

    os.environ["PROCLOCK_DIR"] = d
    with ProcessLock("steady-busy"):
        locked.set()
        release.wait(600)


def _steady_child(d: str, ok: int, timed_out: int, q: Any) -> None:
    from proclock import LockTimeoutError, ProcessLock

    os.environ["PROCLOCK_DIR"] = d
    lock = ProcessLock("steady")
    for _ in range(1000):
        lock.acquire()
        lock.release()
    r: dict[str, Any] = {"fd0": _fds(), "rss0": _rss_kib(), "threads0": threading.active_count()}
    for _ in range(ok):
        lock.acquire()
        lock.release()
    r.update(fd1=_fds(), rss1=_rss_kib(), threads1=threading.active_count())
    locked, release = SPAWN.Event(), SPAWN.Event()
    holder = SPAWN.Process(target=_hold, args=(d, locked, release))
    holder.start()
    locked.wait(60)
    busy = ProcessLock("steady-busy", timeout=0.0005)
    for _ in range(10):  # warm-up: the kept descriptor and the helper thread now exist
        with contextlib.suppress(LockTimeoutError):
            busy.acquire()
    r.update(fdw=_fds(), rssw=_rss_kib(), threadsw=threading.active_count())
    failures = 0
    for _ in range(timed_out):
        with contextlib.suppress(LockTimeoutError):
            busy.acquire()
            busy.release()
            continue
        failures += 1
    r.update(fd2=_fds(), rss2=_rss_kib(), threads2=threading.active_count(), timeouts=failures)
    release.set()
    holder.join(60)
    q.put(r)


def run_steady(d: str, ok: int, timed_out: int) -> dict[str, Any]:
    q = SPAWN.Queue()
    p = SPAWN.Process(target=_steady_child, args=(d, ok, timed_out, q))
    p.start()
    r: dict[str, Any] = q.get(timeout=900)
    p.join(60)
    return r
