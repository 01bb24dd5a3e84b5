"""A private PostgreSQL cluster and a private PgBouncer for the fault tests.

    with Cluster() as cluster:                  # initdb + pg_ctl start on a free port
        url = cluster.url()                     # postgresql://postgres@127.0.0.1:<port>/postgres
        cluster.restart(mode="fast")            # pg_ctl restart (same port, same data)
        with Bouncer(cluster, pool_size=1) as bouncer:   # pool_mode=transaction
            url = bouncer.url()

Never the machine's own server: the cluster lives in a fresh directory of /tmp on a free port of
127.0.0.1, with its Unix socket in that directory, and both are stopped and deleted afterwards.
initdb, postgres and pgbouncer refuse to run as root: as root, they run as the `postgres` user
(`runuser`), in a directory it owns. `fsync=off`: a crash of the *server process* (what the tests
do) loses nothing the kernel has; only a power loss would, and no test does that.

Missing programs (initdb, pgbouncer) make `Cluster`/`Bouncer` raise `Unavailable`, which the
fixtures turn into a skip (or a failure in CI, PROCLOCK_REQUIRE_SERVICES=1).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self

__all__ = ["Bouncer", "Cluster", "Unavailable", "free_port"]


class Unavailable(Exception):  # noqa: N818
    """A program the private servers need is missing or refused to start."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bindir() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if versions:
        return Path(versions[-1]).parent
    msg = "PostgreSQL's server programs (initdb, pg_ctl) are not installed"
    raise Unavailable(msg)


def _owner() -> tuple[list[str], int | None, int | None]:
    """(command prefix, uid, gid) to run the servers as: `postgres` when we are root."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        msg = "running as root and there is no 'postgres' user to run the private servers as"
        raise Unavailable(msg) from None
    return ["runuser", "-u", "postgres", "--"], entry.pw_uid, entry.pw_gid


def _private_dir(prefix: str) -> Path:
    _, uid, gid = _owner()
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if uid is not None and gid is not None:
        os.chown(path, uid, gid)
    path.chmod(0o700)
    return path


def _wait_port(port: int, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if time.monotonic() > deadline:
            text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            msg = f"{what} did not listen on 127.0.0.1:{port} within {timeout}s: {text}"
            raise Unavailable(msg)
        time.sleep(0.02)


class Cluster:
    """A private PostgreSQL cluster (initdb) on a free port, started at once."""

    def __init__(self, **settings: str) -> None:
        self._bin = _bindir()
        self._as, _, _ = _owner()
        self.dir = _private_dir("proclock-pg-")
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.port = free_port()
        self.settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.dir}'",
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "60",
            "shared_buffers": "16MB",
            "logging_collector": "off",
            **settings,
        }
        try:
            self._run(
                "initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust",
                "-E", "UTF8", "--no-sync", "--no-instructions",
            )  # fmt: skip
            with (self.data / "postgresql.conf").open("a") as conf:
                conf.writelines(f"{k} = {v}\n" for k, v in self.settings.items())
            self.start()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _run(self, program: str, *args: str) -> None:
        command = [*self._as, str(self._bin / program), *args]
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
        if done.returncode != 0:
            msg = f"{' '.join(command)} failed ({done.returncode}): {done.stderr or done.stdout}"
            raise Unavailable(msg)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "60")

    def restart(self, mode: str = "fast") -> None:
        """pg_ctl restart: every session ends, the data stays (`immediate`: a crash)."""
        self._run(
            "pg_ctl", "restart", "-D", str(self.data), "-m", mode, "-l", str(self.log),
            "-w", "-t", "60",
        )  # fmt: skip

    def close(self) -> None:
        with contextlib.suppress(Unavailable, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Bouncer:
    """A private PgBouncer in front of `cluster` (trust auth), pool_mode and pool size chosen."""

    def __init__(self, cluster: Cluster, *, pool_size: int, pool_mode: str = "transaction") -> None:
        program = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer")
        if not os.path.exists(program):
            msg = "pgbouncer is not installed (apt-get install -y pgbouncer)"
            raise Unavailable(msg)
        prefix, uid, gid = _owner()
        self.dir = _private_dir("proclock-pgbouncer-")
        self.port = free_port()
        self.log = self.dir / "pgbouncer.log"
        self.pidfile = self.dir / "pgbouncer.pid"
        users = self.dir / "users.txt"
        users.write_text('"postgres" ""\n')
        ini = self.dir / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={cluster.port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {users}\n"
            f"pool_mode = {pool_mode}\n"
            f"default_pool_size = {pool_size}\n"
            "min_pool_size = 0\n"
            "reserve_pool_size = 0\n"
            "max_client_conn = 200\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            f"logfile = {self.log}\n"
            f"pidfile = {self.pidfile}\n"
        )
        for path in (users, ini):
            if uid is not None and gid is not None:
                os.chown(path, uid, gid)
        done = subprocess.run(
            [*prefix, program, "-d", str(ini)],
            capture_output=True, text=True, check=False, timeout=30,
        )  # fmt: skip
        if done.returncode != 0:
            shutil.rmtree(self.dir, ignore_errors=True)
            msg = f"pgbouncer did not start ({done.returncode}): {done.stderr or done.stdout}"
            raise Unavailable(msg)
        try:
            _wait_port(self.port, 30, "pgbouncer", self.log)
        except BaseException:
            self.close()
            raise

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def close(self) -> None:
        pid = None
        deadline = time.monotonic() + 10
        while pid is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                pid = int(self.pidfile.read_text().split()[0])
            if pid is None:
                time.sleep(0.02)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # the daemon we started (its own pidfile)
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.02)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
