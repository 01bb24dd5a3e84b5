"""Semaphores: proclock's ProcessSemaphore beside portalocker's BoundedSemaphore, in one run.

    python bench/semaphore.py            # the full run (about a minute)
    python bench/semaphore.py --quick    # a smoke run

1. Wake latency: µs from a holder's release of a slot to the return of a waiter in another
   process (the semaphore full until then), p50/p99, beside raw flock(2)'s and proclock's own
   lock handoff measured the same way in the same run.
2. Uncontended: one owner acquiring and releasing, beside a lock and portalocker.
3. Throughput and fairness: N = 8 processes loop acquire / a ~2 µs section / release on one
   semaphore of limit 2 and 4: ops/s, fewest and most acquisitions of one process, and the
   longest single wait.

Results go to bench/results/semaphore.json (and semaphore-quick.json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SPAWN = multiprocessing.get_context("spawn")
sys.path.insert(0, str(HERE))

import impls  # noqa: E402

KINDS = ["proclock", "proclock-timeout", "portalocker", "portalocker-10ms"]
if impls._postgres_reachable():  # noqa: SLF001
    KINDS.append("proclock-postgres")
if impls._redis_reachable():  # noqa: SLF001
    KINDS.append("proclock-redis")


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class Sem:
    """One holder of at most one slot, whatever the implementation."""

    def __init__(self, kind: str, d: str, name: str, limit: int) -> None:
        self.kind, self.name = kind, name
        if kind.startswith("proclock"):
            from proclock import ProcessSemaphore

            timeout = 30 if kind == "proclock-timeout" else None
            if kind == "proclock-postgres":
                from proclock.backends import PostgresBackend

                backend = PostgresBackend(impls.POSTGRES_URL, namespace="proclock-bench")
                self.sem = ProcessSemaphore(name, limit=limit, backend=backend)
            elif kind == "proclock-redis":
                from proclock.backends import RedisBackend

                redis_backend = RedisBackend(impls.REDIS_URL, namespace="proclock-bench")
                self.sem = ProcessSemaphore(name, limit=limit, backend=redis_backend)
            else:
                self.sem = ProcessSemaphore(name, limit=limit, lock_dir=d, timeout=timeout)
            self.slot: Any = None
        else:
            import portalocker

            interval = 0.01 if kind == "portalocker-10ms" else 0.25  # 0.25: its default
            self.sem = portalocker.BoundedSemaphore(
                limit, name=name, directory=d, timeout=30, check_interval=interval
            )

    def acquire(self) -> None:
        if self.kind.startswith("proclock"):
            self.slot = self.sem.acquire()
        else:
            self.sem.acquire()

    def release(self) -> None:
        if self.kind.startswith("proclock"):
            self.slot.release()
            self.slot = None
        else:
            self.sem.release()

    def waited_on(self) -> bool:
        """A waiter is blocked on the slot this one holds (in the kernel, or the server)."""
        if self.kind == "proclock-postgres":
            return bool(_pg_queued())
        if self.kind == "proclock-redis":  # a waiter queued for the held slot
            import redis

            client = redis.Redis.from_url(impls.REDIS_URL)
            try:
                slot = f"{self.name}\x1fslot-{self.slot.index}"
                queue = self.sem.backend.inner.queue_key(slot)
                return bool(client.zcard(queue))
            finally:
                client.close()
        if self.kind.startswith("proclock"):
            return bool(impls._blocked_waiters(str(self.slot.handle.location)))  # noqa: SLF001
        return bool(impls._blocked_waiters(str(self.sem.lock.filename)))  # noqa: SLF001


def _pg_queued() -> int:
    import psycopg

    conn = impls._admin.get("conn")  # noqa: SLF001
    if conn is None:
        conn = impls._admin["conn"] = psycopg.connect(impls.POSTGRES_URL, autocommit=True)  # noqa: SLF001
    row = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    ).fetchone()
    return int(row[0]) if row else 0


# -- 1. wake latency ------------------------------------------------------------------------------


def _waiter(kind: str, d: str, name: str, limit: int, count: int, conn: Any) -> None:
    sem = Sem(kind, d, name, limit)
    for _ in range(count):
        conn.recv()  # "go": the parent holds every slot
        conn.send("waiting")
        sem.acquire()
        t1 = time.perf_counter_ns()
        sem.release()
        conn.send(t1)


def wake_latency(kind: str, d: str, limit: int, count: int) -> list[float]:
    """µs from the release of a slot (the semaphore full) to a waiting process's return."""
    name = f"wake-{kind}"
    # Every slot but one is held by a thread of this process for the whole run.
    others = [Sem(kind, d, name, limit) for _ in range(limit - 1)]
    held, done = threading.Barrier(limit), threading.Event()

    def keep(sem: Sem) -> None:
        sem.acquire()
        held.wait()
        done.wait()
        sem.release()

    threads = [threading.Thread(target=keep, args=(s,)) for s in others]
    for t in threads:
        t.start()
    held.wait()
    mine = Sem(kind, d, name, limit)
    parent, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=_waiter, args=(kind, d, name, limit, count, child))
    proc.start()
    out = []
    polls = kind.startswith("portalocker")
    try:
        for _ in range(count):
            mine.acquire()
            parent.send("go")
            parent.recv()
            # Let the waiter reach its wait: blocked in the kernel on our slot (its parked
            # helper, visible in /proc/locks); a polling waiter gets 2 ms to go to sleep.
            end = time.monotonic() + (0.002 if polls else 0.5)
            while time.monotonic() < end:
                if not polls and mine.waited_on():
                    break
                time.sleep(0.0001)
            t0 = time.perf_counter_ns()
            mine.release()
            t1 = parent.recv()
            out.append((t1 - t0) / 1000)
    finally:
        proc.join(60)
        done.set()
        for t in threads:
            t.join(30)
    return out


# -- 2. throughput and fairness -------------------------------------------------------------------


def _worker(kind: str, d: str, name: str, limit: int, seconds: float, barrier: Any, q: Any) -> None:
    sem = Sem(kind, d, name, limit)
    barrier.wait()
    ops, longest = 0, 0.0
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        if t0 > deadline:
            break
        sem.acquire()
        t1 = time.perf_counter()
        x = 0
        for i in range(40):  # the section: ~2 µs
            x += i
        sem.release()
        longest = max(longest, t1 - t0)
        ops += 1
    q.put((ops, longest))


def throughput(kind: str, d: str, limit: int, nproc: int, seconds: float) -> dict[str, Any]:
    name = f"tp-{kind}-{limit}"
    barrier = SPAWN.Barrier(nproc)
    q = SPAWN.Queue()
    procs = [
        SPAWN.Process(target=_worker, args=(kind, d, name, limit, seconds, barrier, q))
        for _ in range(nproc)
    ]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    ops = sorted(r[0] for r in results)
    return {
        "ops_per_s": sum(ops) / seconds,
        "min_ops": ops[0],
        "max_ops": ops[-1],
        "fairness": ops[0] / ops[-1] if ops[-1] else 0.0,
        "longest_wait_ms": max(r[1] for r in results) * 1000,
        "ops": ops,
    }


def uncontended(d: str, quick: bool) -> dict[str, float]:
    """One owner taking and giving back, again and again: the semaphore beside a lock."""
    from proclock import ProcessLock

    lock = ProcessLock("uncontended-lock", lock_dir=d)
    makers: dict[str, Any] = {"proclock lock": lock}
    for kind in ("proclock", "portalocker"):
        sem = Sem(kind, d, f"uncontended-{kind}", 2)
        makers[f"{kind} semaphore, limit 2"] = sem
    ops, rounds = (1_000, 3) if quick else (10_000, 7)
    samples: dict[str, list[float]] = {k: [] for k in makers}
    for _ in range(rounds):
        for label, obj in makers.items():
            start = time.perf_counter_ns()
            for _ in range(ops):
                obj.acquire()
                obj.release()
            samples[label].append((time.perf_counter_ns() - start) / ops / 1000)
    return {label: statistics.median(v) for label, v in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args()
    quick = args.quick
    import portalocker

    print(
        f"# semaphore bench: Python {platform.python_version()}, {os.cpu_count()} cores, "
        f"portalocker {portalocker.__version__}, {'quick' if quick else 'full'} run"
    )
    results: dict[str, Any] = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "quick": quick}
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o700)
        os.environ["PROCLOCK_DIR"] = d
        print("\n## 1. Wake latency, limit 2 (µs from a slot's release to a waiter's return)\n")
        print("| what | p50 | p99 | n |")
        print("|---|---|---|---|")
        wake: dict[str, Any] = {}
        plain = ["raw", "proclock"]
        plain += [k for k in KINDS if k in ("proclock-postgres", "proclock-redis")]
        for kind in plain:  # the plain lock's handoff, measured the same way
            lat = impls.run_handoffs(kind, d, 30 if quick else 300)
            wake[f"lock:{kind}"] = lat
        for kind in KINDS:
            polling = kind.startswith("portalocker")
            count = (5 if polling else 30) if quick else (30 if polling else 300)
            wake[kind] = wake_latency(kind, d, 2, count)
        for key, lat in wake.items():
            label = f"{key[5:]} lock handoff" if key.startswith("lock:") else f"{key} semaphore"
            print(f"| {label} | {pct(lat, 0.5):,.0f} | {pct(lat, 0.99):,.0f} | {len(lat)} |")
        results["wake"] = {
            k: {"p50": pct(v, 0.5), "p99": pct(v, 0.99), "n": len(v)} for k, v in wake.items()
        }
        print("\n## 2. Uncontended acquire + release (µs, median of interleaved rounds)\n")
        print("| what | µs |")
        print("|---|---|")
        results["uncontended"] = uncontended(d, quick)
        for label, us in results["uncontended"].items():
            print(f"| {label} | {us:.1f} |")
        seconds = 0.5 if quick else 3.0
        print(f"\n## 3. N = 8 processes, {seconds:g} s each: throughput and fairness\n")
        print("| limit / semaphore | ops/s | fewest / most ops (ratio) | longest wait ms |")
        print("|---|---|---|---|")
        tp: dict[str, Any] = {}
        for limit in (2, 4):
            for kind in KINDS:
                r = throughput(kind, d, limit, 8, seconds)
                tp[f"{kind}@{limit}"] = r
                print(
                    f"| {limit} {kind} | {r['ops_per_s']:,.0f} | {r['min_ops']} / "
                    f"{r['max_ops']} ({r['fairness']:.2f}) | {r['longest_wait_ms']:,.1f} |"
                )
        results["throughput"] = tp
        results["median_wake_us"] = {k: statistics.median(v) for k, v in wake.items() if v}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("semaphore-quick.json" if quick else "semaphore.json")
    out.write_text(json.dumps(results, indent=2))
    print(f"\nfigures written to {out.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
