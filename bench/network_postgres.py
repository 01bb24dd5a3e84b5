"""proclock's PostgreSQL lock side by side with pals, tooz and a plain pg_advisory_lock, one run.

    python bench/network_postgres.py                  # the machine's server (127.0.0.1:5432/test)
    python bench/network_postgres.py --url URL --quick

Measured for each lock, on one server, in one run (the machine is shared and noisy: compare the
rows of one run, not runs):

- round trip: the median of an uncontended acquire + release, in µs;
- handoff p50 / p99: two processes take turns (each holds 2 ms, so that the other is queued);
  from the holder's release call to the waiter's return, on the machine's monotonic clock;
- handoff p50 / p99, 50 waiters: 50 processes take the lock twice each (holding 1 ms), all
  queued behind one another; from one holder's release call to the next holder's return;
- N=4 ops/s: four processes increment a counter file under the lock;
- round trips per handoff, 20 waiters: 20 processes take the lock 5 times each through a
  counting proxy; every ReadyForQuery the server sends counts (acquire, release, heartbeat,
  connection setup), divided by the handoffs.

The peers (pals, tooz's PostgreSQL driver) come with `pip install 'proclock[bench-network]'`;
one that is missing is skipped with a note. Results: bench/results/network_postgres.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import socket
import statistics
import struct
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SPAWN = multiprocessing.get_context("spawn")
URL = os.environ.get("PROCLOCK_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
KINDS = ("proclock", "pals", "tooz", "plain")
clock = time.monotonic


# -- the locks, behind one interface ----------------------------------------------------------


class _Plain:
    """pg_advisory_lock / pg_advisory_unlock on one psycopg connection: the floor."""

    def __init__(self, url: str, name: str) -> None:
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True)
        digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
        self.key = int.from_bytes(digest, "big", signed=True)

    def acquire(self) -> None:
        self.conn.execute("SELECT pg_advisory_lock(%s)", (self.key,))

    def release(self) -> None:
        self.conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))

    def close(self) -> None:
        self.conn.close()


class _Proclock:
    def __init__(self, url: str, name: str) -> None:
        from proclock import ProcessLock
        from proclock.backends.postgres import PostgresBackend

        self.backend = PostgresBackend(url, namespace="bench")
        self.lock = ProcessLock(name, backend=self.backend)

    def acquire(self) -> None:
        self.lock.acquire()

    def release(self) -> None:
        self.lock.release()

    def close(self) -> None:
        self.backend.close()


class _Pals:
    def __init__(self, url: str, name: str) -> None:
        import pals

        # SQLAlchemy picks psycopg2 for postgresql://; say psycopg (3) where only it is there.
        self.locker = pals.Locker("bench", url.replace("postgresql://", "postgresql+psycopg://"))
        self.lock = self.locker.lock(name)

    def acquire(self) -> None:
        assert self.lock.acquire(blocking=True, acquire_timeout=60_000)  # noqa: S101

    def release(self) -> None:
        self.lock.release()

    def close(self) -> None:
        self.locker.engine.dispose()


class _Tooz:
    def __init__(self, url: str, name: str) -> None:
        from tooz import coordination

        self.coordinator = coordination.get_coordinator(url, uuid.uuid4().hex.encode())
        self.coordinator.start()
        self.lock = self.coordinator.get_lock(name.encode())

    def acquire(self) -> None:
        assert self.lock.acquire(blocking=True)  # noqa: S101

    def release(self) -> None:
        self.lock.release()

    def close(self) -> None:
        self.coordinator.stop()


def make(kind: str, url: str, name: str) -> Any:
    return {"proclock": _Proclock, "pals": _Pals, "tooz": _Tooz, "plain": _Plain}[kind](url, name)


def available(kind: str, url: str) -> str | None:
    """None if `kind` can run here, else why not."""
    try:
        lock = make(kind, url, f"probe-{uuid.uuid4().hex}")
    except ImportError as exc:
        return f"not installed ({exc}; pip install 'proclock[bench-network]')"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        lock.acquire()
        lock.release()
    finally:
        lock.close()
    return None


# -- the measurements -------------------------------------------------------------------------


def round_trip(kind: str, url: str, rounds: int) -> float:
    lock = make(kind, url, f"rt-{uuid.uuid4().hex}")
    try:
        for _ in range(20):
            lock.acquire()
            lock.release()
        times = []
        for _ in range(rounds):
            start = clock()
            lock.acquire()
            lock.release()
            times.append(clock() - start)
    finally:
        lock.close()
    return statistics.median(times) * 1e6


def _take_turns(kind, url, name, turns, start, out):
    lock = make(kind, url, name)
    events = []
    start.wait(60)
    for _ in range(turns):
        lock.acquire()
        events.append(("acq", clock(), os.getpid()))
        time.sleep(0.002)  # the other process queues meanwhile
        events.append(("rel", clock(), os.getpid()))
        lock.release()
    lock.close()
    out.put(events)


def handoff(kind: str, url: str, turns: int) -> tuple[float, float]:
    name = f"handoff-{uuid.uuid4().hex}"
    out, start = SPAWN.Queue(), SPAWN.Barrier(2)
    procs = [
        SPAWN.Process(target=_take_turns, args=(kind, url, name, turns, start, out))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    events = sorted(out.get(timeout=300) + out.get(timeout=300), key=lambda e: e[1])
    for p in procs:
        p.join(60)
    samples = [
        b[1] - a[1]
        for a, b in itertools.pairwise(events)
        if a[0] == "rel" and b[0] == "acq" and a[2] != b[2]
    ]
    samples.sort()
    return statistics.median(samples) * 1e3, samples[int(len(samples) * 0.99)] * 1e3


def _increment(kind, url, name, counter, n, start, out):
    lock = make(kind, url, name)
    start.wait(60)
    for _ in range(n):
        lock.acquire()
        path = Path(counter)
        path.write_text(str(int(path.read_text()) + 1))
        lock.release()
    lock.close()
    out.put(os.getpid())


def throughput(kind: str, url: str, n: int, tmp: Path) -> float:
    name = f"counter-{uuid.uuid4().hex}"
    counter = tmp / f"{name}.txt"
    counter.write_text("0")
    out, start = SPAWN.Queue(), SPAWN.Barrier(5)
    procs = [
        SPAWN.Process(target=_increment, args=(kind, url, name, str(counter), n, start, out))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    start.wait(60)
    began = clock()
    for _ in procs:
        out.get(timeout=300)
    took = clock() - began
    for p in procs:
        p.join(60)
    assert int(counter.read_text()) == 4 * n, "lost updates"  # noqa: S101
    return 4 * n / took


_SSL_REQUEST = struct.pack("!I", 80877103)
_GSS_REQUEST = struct.pack("!I", 80877104)


class CountingProxy:
    """A TCP proxy that counts the ReadyForQuery messages the server sends (round trips)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.count = 0
        self.mutex = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._client, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._server, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _client(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            # Refuse SSL and GSS encryption ourselves (answer 'N'), so that the server's
            # messages stay readable: an SSLRequest or GSSENCRequest is 8 bytes.
            while True:
                head = src.recv(8, socket.MSG_PEEK)
                if len(head) == 8 and head[4:] in (_SSL_REQUEST, _GSS_REQUEST):
                    src.recv(8)
                    src.sendall(b"N")
                    continue
                break
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _server(self, src: socket.socket, dst: socket.socket) -> None:
        buffer = b""
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
                buffer += data
                # Server messages: a type byte and a length (which counts itself).
                while len(buffer) >= 5:
                    (length,) = struct.unpack("!I", buffer[1:5])
                    if len(buffer) < 1 + length:
                        break
                    if buffer[:1] == b"Z":
                        with self.mutex:
                            self.count += 1
                    buffer = buffer[1 + length :]
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()


def _queue_up(kind, url, name, times, start, out):
    """Take the lock `times` times, holding it 1 ms; report each hold's (start, end)."""
    lock = make(kind, url, name)
    start.wait(120)
    holds = []
    for _ in range(times):
        lock.acquire()
        got = clock()
        time.sleep(0.001)
        holds.append((got, clock()))
        lock.release()
    lock.close()
    out.put(holds)


def _queued(kind: str, url: str, waiters: int, times: int, begin: Any = None) -> list[Any]:
    """`waiters` processes queued on one lock (`_queue_up`); every hold, in time order.

    `begin` is called once they all have connected, as they start taking the lock.
    """
    name = f"queue-{uuid.uuid4().hex}"
    out, start = SPAWN.Queue(), SPAWN.Barrier(waiters + 1)
    procs = [
        SPAWN.Process(target=_queue_up, args=(kind, url, name, times, start, out))
        for _ in range(waiters)
    ]
    for p in procs:
        p.start()
    start.wait(120)
    if begin is not None:
        begin()
    holds = sorted(h for _ in procs for h in out.get(timeout=600))
    for p in procs:
        p.join(60)
    return holds


def crowd_handoff(kind: str, url: str, waiters: int, times: int) -> tuple[float, float]:
    """Handoff p50 / p99 in ms with `waiters` processes queued on one lock."""
    holds = _queued(kind, url, waiters, times)
    gaps = sorted(b[0] - a[1] for a, b in itertools.pairwise(holds))
    return statistics.median(gaps) * 1e3, gaps[int(len(gaps) * 0.99)] * 1e3


def round_trips_per_handoff(kind: str, url: str, waiters: int, times: int) -> float:
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(url)
    proxy = CountingProxy(str(params.get("host", "127.0.0.1")), int(params.get("port", 5432)))
    proxied = "postgresql://{user}@127.0.0.1:{port}/{dbname}".format(
        user=params.get("user", "postgres"), port=proxy.port, dbname=params.get("dbname", "")
    )

    def begin() -> None:
        with proxy.mutex:
            proxy.count = 0  # connection setup done before the barrier is not counted

    _queued(kind, proxied, waiters, times, begin)
    proxy.close()
    return proxy.count / (waiters * times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=URL)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke test)")
    parser.add_argument("--kinds", default=",".join(KINDS))
    args = parser.parse_args()
    rounds, turns, n, times = (100, 50, 50, 2) if args.quick else (500, 300, 250, 5)
    import tempfile

    results: dict[str, Any] = {"url": args.url.split("@")[-1], "rows": {}, "skipped": {}}
    kinds = args.kinds.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            why = available(kind, args.url)
            if why is not None:
                results["skipped"][kind] = why
                print(f"{kind}: skipped: {why}", flush=True)
                continue
            handoff_ms: tuple[float, float] = handoff(kind, args.url, turns)
            row: dict[str, Any] = {
                "round_trip_us": round_trip(kind, args.url, rounds),
                "handoff_ms": handoff_ms,
                "ops_per_s_n4": throughput(kind, args.url, n, Path(tmp)),
                "round_trips_per_handoff_20": round_trips_per_handoff(kind, args.url, 20, times),
                "handoff_ms_50": crowd_handoff(kind, args.url, 50, 2),
            }
            results["rows"][kind] = row
            p50, p99 = handoff_ms
            print(
                f"{kind:9} round trip {row['round_trip_us']:7.0f} µs | handoff p50 {p50:.2f} ms"
                f" p99 {p99:.2f} ms | N=4 {row['ops_per_s_n4']:6.0f} ops/s"
                f" | {row['round_trips_per_handoff_20']:.1f} round trips/handoff (20 waiters)"
                f" | handoff p50 {row['handoff_ms_50'][0]:.2f} ms p99 {row['handoff_ms_50'][1]:.2f}"
                " ms (50 waiters)",
                flush=True,
            )
    rows = results["rows"]
    if "proclock" in rows and "plain" in rows:
        ratio = rows["proclock"]["handoff_ms"][0] / rows["plain"]["handoff_ms"][0]
        results["handoff_p50_vs_plain"] = ratio
        print(f"proclock handoff p50 / plain pg_advisory_lock's: {ratio:.2f}x (goal: 1.5x at most)")
    results["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["python"] = sys.version.split()[0]
    if not args.quick:
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "network_postgres.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
