"""The PostgreSQL backend under faults, against a private server (tests/pg_cluster.py).

Each test states a guarantee of docs/beyond-one-machine.md as its assertion: poolers refused
(PgBouncer, transaction mode, pool sizes 1 and 4: never two holders, never a lost update);
deadlines (a silent server, a blackholed idle connection, a release that cannot be confirmed);
the holder learns first (a blackholed holder's on_lost fires before anyone else acquires, and
before the server may free the lock); tokens increase across restarts and crashes; and, with a
kernel-level partition (a network namespace and a veth pair), the server frees a partitioned
holder's lock within SERVER_BOUND, only after the holder declared it lost.

Never the machine's PostgreSQL: a private cluster on a free port, stopped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import SPAWN, TESTS, require_module, unusable

psycopg = require_module("psycopg", "postgres")

from pg_cluster import Bouncer, Cluster, Unavailable  # noqa: E402
from proclock import (  # noqa: E402
    BackendUnavailableError,
    LockLostError,
    ProcessLock,
    ProcLockError,
)
from proclock.backends import postgres as pg  # noqa: E402
from proclock.backends.postgres import PostgresBackend  # noqa: E402
from tcp_proxy import TcpProxy  # noqa: E402

clock = time.monotonic


@pytest.fixture(scope="module")
def cluster():
    try:
        made = Cluster()
    except Unavailable as exc:
        unusable(f"no private PostgreSQL cluster: {exc}")
    with made:
        yield made


@pytest.fixture
def admin(cluster):
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        yield conn


@pytest.fixture
def proxy(cluster):
    with TcpProxy("127.0.0.1", cluster.port) as made:
        yield made


@pytest.fixture
def make():
    """PostgresBackend(...), each closed after the test (an idle connection left to the garbage
    collector would warn)."""
    made: list[PostgresBackend] = []

    def backend(url: str, **options) -> PostgresBackend:
        made.append(PostgresBackend(url, **options))
        return made[-1]

    yield backend
    for b in made:
        b.close()


def via(proxy: TcpProxy) -> str:
    return f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"


def name() -> str:
    return f"fault-{uuid.uuid4().hex[:12]}"


def holders(admin, backend, lock_name):
    key = backend.key(lock_name)
    return admin.execute(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
        " AND classid = %s::bigint::oid AND objid = %s::bigint::oid",
        ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF),
    ).fetchall()


# -- poolers --------------------------------------------------------------------------------


def count_through(url, counter, inside, iterations, start, out):  # noqa: PLR0917
    """Increment the counter file `iterations` times under the lock; report (done, error)."""
    lock = ProcessLock("counter", backend=PostgresBackend(url, heartbeat=0.2), timeout=20)
    start.wait(30)
    done, error = 0, None
    for _ in range(iterations):
        try:
            with lock:
                # Two holders at once would find the other's marker file.
                fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                try:
                    value = int(Path(counter).read_text())
                    Path(counter).write_text(str(value + 1))
                    done += 1
                finally:
                    os.close(fd)
                    os.unlink(inside)
        except FileExistsError:
            error = "OVERLAP: two holders at once"
            break
        except ProcLockError as exc:
            error = f"{type(exc).__name__}: {exc}"
            break
    out.put((os.getpid(), done, error))


@pytest.mark.parametrize("pool_size", [1, 4])
def test_pgbouncer_transaction_mode_is_refused_never_shared(cluster, tmp_path, pool_size):
    try:
        bouncer = Bouncer(cluster, pool_size=pool_size, pool_mode="transaction")
    except Unavailable as exc:
        unusable(f"no private PgBouncer: {exc}")
    counter, inside = tmp_path / "counter", tmp_path / "inside"
    counter.write_text("0")
    out, start = SPAWN.Queue(), SPAWN.Barrier(4)
    with bouncer:
        children = [
            SPAWN.Process(
                target=count_through,
                args=(bouncer.url(), str(counter), str(inside), 50, start, out),
            )
            for _ in range(4)
        ]
        for child in children:
            child.start()
        results = [out.get(timeout=60) for _ in children]
        for child in children:
            child.join(30)
            assert child.exitcode == 0
    done = sum(r[1] for r in results)
    errors = [r[2] for r in results if r[2] is not None]
    assert not [e for e in errors if "OVERLAP" in e], results
    assert int(counter.read_text()) == done, results  # never a lost update
    for error in errors:  # each refusal names the pooler and the remedy
        assert "PgBouncer" in error, error
        assert "session-mode pooler" in error, error
        assert "DuplicatePreparedStatement" not in error, error
    # Each process either did its 50 correctly or was refused with the error.
    assert all(r[1] == 50 or r[2] is not None for r in results), results
    print(f"pool {pool_size}: {[(r[1], (r[2] or '')[:60]) for r in results]}")


# -- deadlines ---------------------------------------------------------------------------------


def test_a_silent_server_is_unavailable_within_the_deadline(proxy, make):
    proxy.silent()  # accepts connections, never answers
    # timeout=0 connects within connect_timeout (2 s by default; 1.2 here, to keep the test short).
    backend = make(via(proxy), connect_timeout=1.2)
    for timeout, bound in ((0, 1.2), (1, 1.0), (0.1, pg.CONNECT_FLOOR)):
        lock = ProcessLock(name(), backend=backend, timeout=timeout)
        start = clock()
        with pytest.raises(BackendUnavailableError, match="no answer"):
            lock.acquire()
        took = clock() - start
        assert bound - 0.05 <= took < bound + 0.5, (timeout, took)
        print(f"silent server, timeout={timeout}: BackendUnavailableError after {took:.2f} s")


def test_a_blackholed_idle_connection_does_not_hang_a_timed_acquire(proxy, admin, make):
    backend = make(via(proxy), heartbeat=None)
    lock = ProcessLock(name(), backend=backend, timeout=1)
    lock.acquire().release()  # its connection is now idle in the pool
    assert len(backend._idle) == 1
    proxy.pause()
    start = clock()
    with pytest.raises(BackendUnavailableError, match="no answer"):
        lock.acquire()
    took = clock() - start
    assert took < 1 + pg.GRACE + 0.5, took  # today: hung for more than 70 s
    print(f"blackholed idle connection, timeout=1: BackendUnavailableError after {took:.2f} s")
    proxy.resume()


@pytest.mark.parametrize(
    ("heartbeat", "bound"),
    [
        pytest.param(None, 1.0, id="no-heartbeat"),  # connect_timeout: the unlock's deadline
        # A heartbeat in flight first, bounded by the lease (the table: never returned).
        pytest.param(0.2, pg.LEASE, id="heartbeat"),
    ],
)
def test_a_release_that_cannot_be_confirmed_is_lost_within_its_bound(
    proxy, admin, make, heartbeat, bound
):
    backend = make(via(proxy), heartbeat=heartbeat, connect_timeout=1)
    lock_name = name()
    lock = ProcessLock(lock_name, backend=backend)
    lock.acquire()
    proxy.pause()
    start = clock()
    with pytest.raises(LockLostError, match=r"did not confirm the release|no round trip"):
        lock.release()
    took = clock() - start
    assert took < bound + 0.5, took
    print(f"unconfirmed release (heartbeat {heartbeat}): LockLostError after {took:.2f} s")
    assert not lock.locked
    proxy.drop()  # the server sees the connection end and frees the lock
    deadline = clock() + 10
    while holders(admin, backend, lock_name):
        assert clock() < deadline
        time.sleep(0.01)


# -- the holder learns first -----------------------------------------------------------------


def test_a_blackholed_holder_learns_first_and_within_its_lease(cluster, proxy, admin, make):
    """The holder's on_lost fires within LEASE of the blackhole, before anyone else acquires.

    The proxy keeps the server's side of the connection alive (its kernel answers the
    keepalives), so the server frees the lock only when the test drops the connection, as it
    would after SERVER_BOUND on a real partition (that case: the network-namespace test).
    """
    lock_name = name()
    holder_backend = make(via(proxy), heartbeat=0.2)
    waiter_backend = make(cluster.url(), heartbeat=0.2)
    lost_at: list[float] = []
    lost = threading.Event()

    def on_lost(_error):
        lost_at.append(clock())
        lost.set()

    holder = ProcessLock(lock_name, backend=holder_backend, on_lost=on_lost)
    holder.acquire()
    acquired: queue.Queue[float] = queue.Queue()

    def wait():
        with ProcessLock(lock_name, backend=waiter_backend, timeout=30):
            acquired.put(clock())

    waiter = threading.Thread(target=wait)
    waiter.start()
    paused = clock()
    proxy.pause()
    assert lost.wait(pg.LEASE + 1), "on_lost never fired"
    assert lost_at[0] - paused <= pg.LEASE + 1.0  # the margin to SERVER_BOUND: 1.5 s
    assert acquired.empty()  # nobody got it before the holder knew
    proxy.drop()  # the server sees the holder's session end
    got = acquired.get(timeout=10)
    waiter.join(10)
    assert got > lost_at[0]
    print(f"blackholed holder: on_lost after {lost_at[0] - paused:.2f} s, waiter after it")
    with pytest.raises(LockLostError, match="no round trip reached the server"):
        holder.release()


# -- restarts and crashes --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_tokens_increase_across_a_restart_and_a_crash(cluster, mode, make):
    lock_name = name()
    backend = make(cluster.url())  # heartbeat 1 s: the holder learns from the socket
    tokens = []
    for _ in range(40):  # past the sequence's 32 values logged ahead
        with ProcessLock(lock_name, backend=backend) as lock:
            tokens.append(lock.fencing_token)
    lost = threading.Event()
    holder = ProcessLock(lock_name, backend=backend, on_lost=lambda _e: lost.set())
    holder.acquire()
    tokens.append(holder.fencing_token)
    began = clock()
    cluster.restart(mode=mode)  # every session ends: every lock is freed at once
    restarted = clock()
    # The server said goodbye on the holder's socket: the holder knew before the restarted
    # server took any connection (so before anyone else could acquire).
    assert lost.is_set(), "the holder was not told before the server came back"
    print(f"restart -m {mode}: on_lost during the restart ({restarted - began:.2f} s)")
    with pytest.raises(LockLostError):
        holder.release()
    with ProcessLock(lock_name, backend=backend, timeout=10) as lock:
        tokens.append(lock.fencing_token)
    assert tokens == sorted(set(tokens)), tokens  # strictly increasing


def test_the_sequence_starts_above_every_token_an_older_proclock_recorded(cluster, admin, make):
    # proclock 0.1 bumped a row per lock name; a store fenced with its tokens must never see a
    # smaller one after the upgrade.
    db = f"upgrade_{uuid.uuid4().hex[:8]}"
    admin.execute(f"CREATE DATABASE {db}")
    try:
        with psycopg.connect(cluster.url(db), autocommit=True) as conn:
            conn.execute(pg._CREATE_TABLE)
            conn.execute("INSERT INTO proclock_fencing VALUES ('proclock', 'old', 1000)")
        backend = make(cluster.url(db))
        with ProcessLock("old", backend=backend) as lock:
            assert lock.fencing_token > 1000
        backend.close()
    finally:
        admin.execute(f"DROP DATABASE {db} WITH (FORCE)")


# -- a kernel-level partition ---------------------------------------------------------------

HOLD_IN_NAMESPACE = """
import sys, time
from proclock import ProcessLock
from proclock.backends.postgres import PostgresBackend
lock = ProcessLock(sys.argv[2], backend=PostgresBackend(sys.argv[1], heartbeat=0.2),
                   on_lost=lambda e: print("lost", time.monotonic(), flush=True))
lock.acquire()
print("held", time.monotonic(), flush=True)
sys.stdin.readline()
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextlib.contextmanager
def network_namespace():
    """A namespace joined to this one by a veth pair: (namespace, host address, its address)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    tag = f"{os.getpid() % 100000}"
    ns, host_if, ns_if = f"plk{tag}", f"plkh{tag}", f"plkn{tag}"
    octet = os.getpid() % 200 + 20
    host_addr, ns_addr = f"10.213.{octet}.1", f"10.213.{octet}.2"
    try:
        _ip("netns", "add", ns)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no network namespaces here (ip netns add): {exc}")
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", ns)
        _ip("addr", "add", f"{host_addr}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns, "addr", "add", f"{ns_addr}/30", "dev", ns_if)
        _ip("-n", ns, "link", "set", ns_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        yield ns, ns_if, host_addr, ns_addr
    finally:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            _ip("link", "del", host_if)
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            _ip("netns", "del", ns)


def test_a_partitioned_holder_learns_first_and_the_server_frees_within_its_bound(tmp_path, make):
    with network_namespace() as (ns, ns_if, host_addr, ns_addr):
        try:
            made = Cluster(listen_addresses=f"'127.0.0.1,{host_addr}'")
        except Unavailable as exc:
            unusable(f"no private PostgreSQL cluster: {exc}")
        with made as cluster:
            with (cluster.data / "pg_hba.conf").open("a") as hba:
                hba.write(f"host all all {ns_addr}/32 trust\n")
            cluster.restart()
            lock_name = name()
            url = f"postgresql://postgres@{host_addr}:{cluster.port}/postgres"
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
            command = ["ip", "netns", "exec", ns, sys.executable, "-c", HOLD_IN_NAMESPACE]
            holder = subprocess.Popen(
                [*command, url, lock_name],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            )  # fmt: skip
            try:
                assert holder.stdout is not None
                line = holder.stdout.readline()
                assert line.startswith("held"), line
                waiter_backend = make(cluster.url(), heartbeat=0.2)
                acquired: queue.Queue[float] = queue.Queue()

                def wait():
                    with ProcessLock(lock_name, backend=waiter_backend, timeout=30):
                        acquired.put(clock())

                waiter = threading.Thread(target=wait)
                waiter.start()
                # The partition: the namespace's end goes down, and the packets of both
                # directions are dropped silently (the host end stays up, with no carrier).
                _ip("-n", ns, "link", "set", ns_if, "down")
                cut = clock()
                line = holder.stdout.readline()
                assert line.startswith("lost"), line
                lost_at = float(line.split()[1])
                got = acquired.get(timeout=pg.SERVER_BOUND + 5)
                waiter.join(10)
            finally:
                holder.kill()
                holder.wait(10)
                holder.stdin.close()  # type: ignore[union-attr]
                holder.stdout.close()  # type: ignore[union-attr]
            # Holder first, then the server, within its bound of the cut.
            assert lost_at - cut <= pg.LEASE + 1.0, lost_at - cut
            assert got > lost_at, (got, lost_at)
            assert got - cut <= pg.SERVER_BOUND + 1.5, got - cut
            print(f"partition: on_lost after {lost_at - cut:.2f} s, freed after {got - cut:.2f} s")
