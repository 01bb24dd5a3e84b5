"""proclock's Redis lock beside redis-py's `Lock` and python-redis-lock, in one run.

    python bench/network_redis.py [--url redis://127.0.0.1:6379/0] [--quick]

For each lock, on the same server:

- round trip: the median of an uncontended acquire + release (and, once, a bare PING);
- handoff with 50 waiters: every waiter process queued behind a holder; the time from one
  holder's release to the next holder's return from acquire (p50 / p99), and what each
  acquisition cost: client round trips (writes to the socket, counted by wrapping redis-py's
  `Connection.send_packed_command` in each process) and, for proclock, acquire attempts;
- round trips per handoff with 20 waiters, counted the same way;
- N=4 processes incrementing a counter in a file under the lock for a few seconds (ops/s),
  checked for lost updates.

A peer that is not installed is skipped, saying so (`pip install -e '.[bench-network]'`).
The server is shared: other clients' load shows in the figures; run it twice.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import typing
import uuid
from typing import Any

SPAWN = multiprocessing.get_context("spawn")
TTL = 10.0


def available(kind: str) -> str | None:
    """None if `kind` can run, else why not."""
    try:
        if kind == "python-redis-lock":
            import redis_lock  # noqa: F401
        else:
            import redis  # noqa: F401
    except ImportError as exc:
        return f"not installed ({exc}): pip install -e '.[bench-network]'"
    return None


class Counted:
    """Counts the writes of redis-py connections in this process (one per round trip)."""

    sends = 0
    tries = 0
    stamps: typing.ClassVar[list[float]] = []  # when each send left (monotonic)

    @classmethod
    def install(cls) -> None:
        import redis.connection

        real = redis.connection.AbstractConnection.send_packed_command

        def send_packed_command(self: Any, *args: Any, **kwargs: Any) -> Any:
            cls.sends += 1
            cls.stamps.append(time.monotonic())
            return real(self, *args, **kwargs)

        redis.connection.AbstractConnection.send_packed_command = send_packed_command  # type: ignore[method-assign]


def make_lock(kind: str, url: str, name: str) -> tuple[Any, Any]:
    """(acquire, release) callables of a blocking lock of `kind` on `name`."""
    if kind == "proclock":
        from proclock import ProcessLock
        from proclock.backends import RedisBackend

        backend = RedisBackend(url, namespace="bench-net", ttl=TTL)
        backend._connect()  # noqa: SLF001
        real = backend._scripts[0]  # noqa: SLF001

        def counting(*args: Any, **kwargs: Any) -> Any:
            Counted.tries += 1
            return real(*args, **kwargs)

        backend._scripts = (counting, *backend._scripts[1:])  # noqa: SLF001
        lock = ProcessLock(name, backend=backend)
        return lock.acquire, lock.release
    import redis

    client = redis.Redis.from_url(url)
    if kind == "redis-py":
        lk = client.lock(f"bench-net-redispy:{name}", timeout=TTL)
        return (lambda: lk.acquire(blocking=True)), lk.release
    import redis_lock

    pl = redis_lock.Lock(client, f"bench-net-prl:{name}", expire=int(TTL))
    return (lambda: pl.acquire(blocking=True)), pl.release


# -- handoff ---------------------------------------------------------------------------------


def _waiter(
    kind: str, url: str, name: str, rounds: int, ready: Any, go: Any, finish: Any, out: Any
) -> None:
    Counted.install()
    acquire, release = make_lock(kind, url, name)
    acquire()  # connect and warm up (the parent does not hold yet)
    release()
    ready.put(1)
    times, sends, tries = [], 0, 0
    for round_ in range(rounds):
        go[round_].wait()  # the parent holds the lock now
        Counted.sends = Counted.tries = 0
        Counted.stamps = []
        acquire()
        got = time.monotonic()
        released = time.monotonic()
        release()
        times.append((got, released, [t for t in Counted.stamps if t <= got]))
        sends += Counted.sends
        tries += Counted.tries
    out.put((times, sends, tries))
    finish.wait(300)  # nobody exits (a CPU-heavy teardown) while others still hand off


def handoff(kind: str, url: str, waiters: int, rounds: int) -> dict[str, float]:
    name = f"handoff-{uuid.uuid4().hex[:8]}"
    acquire, release = make_lock(kind, url, name)
    # Events and queues, not multiprocessing.Barrier: with 51 parties it deadlocked here once.
    ready, out = SPAWN.Queue(), SPAWN.Queue()
    go = [SPAWN.Event() for _ in range(rounds)]
    finish = SPAWN.Event()
    procs = [
        SPAWN.Process(target=_waiter, args=(kind, url, name, rounds, ready, go, finish, out))
        for _ in range(waiters)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=300)
    gaps: list[float] = []
    critical: list[int] = []
    starts = []
    results = []
    for round_ in range(rounds):
        acquire()
        go[round_].set()
        time.sleep(0.5 if waiters <= 20 else 1.0)  # every waiter queued behind us
        starts.append(time.monotonic())
        release()
        if round_ == rounds - 1:
            results = [out.get(timeout=300) for _ in procs]
        else:  # every waiter done with this round before the next one starts
            time.sleep(1.0 if waiters > 20 else 0.5)
    finish.set()
    for proc in procs:
        proc.join(60)
    sends = sum(r[1] for r in results) + rounds  # + our releases
    tries = sum(r[2] for r in results)
    for round_ in range(rounds):
        chain = sorted(r[0][round_] for r in results)
        previous = starts[round_]
        for got, released, stamps in chain:
            gaps.append(got - previous)
            # The release's round trip, and the next holder's after it: the critical path.
            critical.append(1 + sum(1 for t in stamps if t > previous))
            previous = released
    gaps.sort()
    n = waiters * rounds
    return {
        "p50": statistics.median(gaps) * 1000,
        "p99": gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))] * 1000,
        "sends": sends / n,
        "critical": statistics.mean(critical),
        "tries": tries / n,
    }


# -- counter ---------------------------------------------------------------------------------


def _incrementer(kind: str, url: str, name: str, path: str, seconds: float, out: Any) -> None:
    acquire, release = make_lock(kind, url, name)
    acquire()
    release()
    done = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        acquire()
        try:
            with open(path, "r+") as f:
                value = int(f.read() or 0)
                f.seek(0)
                f.write(str(value + 1))
                f.truncate()
        finally:
            release()
        done += 1
    out.put(done)


def counter(kind: str, url: str, procs_n: int, seconds: float) -> tuple[float, bool]:
    name = f"counter-{uuid.uuid4().hex[:8]}"
    with tempfile.NamedTemporaryFile("w", delete=False) as f:
        f.write("0")
        path = f.name
    out = SPAWN.Queue()
    procs = [
        SPAWN.Process(target=_incrementer, args=(kind, url, name, path, seconds, out))
        for _ in range(procs_n)
    ]
    for proc in procs:
        proc.start()
    total = sum(out.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(30)
    with open(path) as f:
        final = int(f.read())
    os.unlink(path)
    return total / seconds, final == total


# -- round trip ------------------------------------------------------------------------------


def round_trip(kind: str, url: str, n: int) -> float:
    acquire, release = make_lock(kind, url, f"rt-{uuid.uuid4().hex[:8]}")
    acquire()
    release()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        acquire()
        release()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def ping(url: str, n: int) -> float:
    import redis

    client = redis.Redis.from_url(url)
    client.ping()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        client.ping()
        samples.append(time.perf_counter() - start)
    client.close()
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--url", default=os.environ.get("PROCLOCK_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--quick", action="store_true", help="fewer waiters and rounds")
    args = parser.parse_args()
    url = args.url
    waiters50, waiters20, rounds, seconds = (10, 5, 1, 1.0) if args.quick else (50, 20, 2, 3.0)
    print(f"Redis {url}; PING median {ping(url, 500):.0f} µs; python {sys.version.split()[0]}")
    header = (
        f"| lock | acquire+release | handoff p50 / p99 ({waiters50} waiters) | N=4 ops/s | "
        f"round trips per handoff, release to return ({waiters20} waiters) | all round trips "
        f"per acquisition ({waiters20}) |"
    )
    print(header)
    print("|---|---|---|---|---|---|")
    for kind in ("proclock", "redis-py", "python-redis-lock"):
        why = available(kind)
        if why is not None:
            print(f"| {kind} | skipped: {why} |")
            continue
        rt = round_trip(kind, url, 500)
        h50 = handoff(kind, url, waiters50, rounds)
        ops, exact = counter(kind, url, 4, seconds)
        h20 = handoff(kind, url, waiters20, 1)
        tries = f" ({h20['tries']:.2f} attempts)" if kind == "proclock" else ""
        print(
            f"| {kind} | {rt:.0f} µs | {h50['p50']:.2f} / {h50['p99']:.2f} ms | "
            f"{ops:,.0f}{'' if exact else ' (LOST UPDATES)'} | {h20['critical']:.2f} | "
            f"{h20['sends']:.2f}{tries} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
