"""A private redis-server for fault tests: a free port, a temp dir, no persistence.

    with RedisServer() as server:   # RedisServer("--rename-command", "X", '""'): more options
        url = server.url            # redis://127.0.0.1:<port>/0
        server.restart()            # stop and start again on the same port: every key is gone
        server.kill()               # SIGKILL (a crash); start() brings it back, empty

Never the machine's 6379: the port is a free one of 127.0.0.1. `start()` returns once the
server logs "Ready to accept connections" (read from its output, no polling, no sleep), within
`ready_timeout` seconds, else RuntimeError. `available()` says whether redis-server is
installed (tests skip with that reason otherwise).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading
from typing import Self

__all__ = ["RedisServer", "available"]

_EXE = "redis-server"


def available() -> bool:
    return shutil.which(_EXE) is not None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One private redis-server process, restartable on its port without persistence."""

    def __init__(self, *options: str, ready_timeout: float = 10.0) -> None:
        self.port = _free_port()
        self._options = options  # more redis-server arguments (e.g. --rename-command)
        self._dir = tempfile.TemporaryDirectory(prefix="proclock-redis-")
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._ready_timeout = ready_timeout
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        if self._proc is not None:
            return
        proc = subprocess.Popen(
            [
                shutil.which(_EXE) or _EXE,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir.name,
                "--daemonize",
                "no",
                "--logfile",
                "",
                "--protected-mode",
                "no",
                *self._options,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        ready = threading.Event()
        log: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.append(line)
                if "Ready to accept connections" in line:
                    ready.set()
            ready.set()  # exited: start() reports it

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        self._reader = reader
        if not ready.wait(self._ready_timeout) or proc.poll() is not None:
            proc.kill()
            proc.wait()
            self._reap(proc)
            msg = f"redis-server on port {self.port} did not start:\n{''.join(log[-20:])}"
            raise RuntimeError(msg)
        self._proc = proc

    def stop(self) -> None:
        """SIGTERM and wait (no save: persistence is off)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self._reap(proc)

    def kill(self) -> None:
        """SIGKILL: a crash."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            self._reap(proc)

    def _reap(self, proc: subprocess.Popen[str]) -> None:
        """Close the output pipe once its reader has seen EOF (the process has exited)."""
        if self._reader is not None:
            self._reader.join(5)
        if proc.stdout is not None:
            proc.stdout.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            self._dir.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
