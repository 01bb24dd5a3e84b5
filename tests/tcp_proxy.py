"""A small threaded TCP proxy for fault tests: pause, drop, refuse or go silent on command.

    with TcpProxy("127.0.0.1", 6379) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"   # clients connect here
        ...
        proxy.pause()    # blackhole: no byte passes either way; every connection stays open
        proxy.resume()   # bytes flow again (what was read while paused is forwarded then)
        proxy.drop()     # close every current connection (both sides); new ones still work
        proxy.refuse()   # close each new connection at once (as a dead server's RST/FIN would)
        proxy.silent()   # accept new connections but never answer them (a hung server)
        proxy.normal()   # undo refuse()/silent() for new connections

Per-connection controls: `proxy.connections()` lists the live `Link`s in accept order; each has
`pause()`, `resume()` and `drop()` of its own (e.g. blackhole only the holder's connection while
a waiter's passes), and `hold_replies()`: the server gets the client's bytes and runs its
commands, but its replies wait in the proxy until `resume()` (a reply late on the way back).
`proxy.accepted` counts the connections accepted so far, and `proxy.wait_accepted(n, timeout)`
waits (on a condition, no polling) until `n` were.

Guarantees: once `pause()` returns, no byte read afterwards is forwarded (a chunk a
forwarding thread had already let through may still land: at most one per direction);
`drop()` and `close()` return once the sockets are closed; no method sleeps. Threads: one
acceptor, two forwarders per connection, all daemons, all ended by `close()`. Listens on a
free port of 127.0.0.1 (`port`); forwards to (`host`, `target_port`), which `retarget()`
changes for new connections (e.g. to a restarted server on another port).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Self

__all__ = ["Link", "TcpProxy"]

_CHUNK = 65536
_NORMAL, _REFUSE, _SILENT = "normal", "refuse", "silent"


class Link:
    """One proxied connection: a client socket and its upstream socket."""

    def __init__(self, proxy: TcpProxy, client: socket.socket, upstream: socket.socket | None):
        self._proxy = proxy
        self.client, self.upstream = client, upstream
        self._gate = threading.Condition()
        self._paused = False
        self._holding = False  # replies (upstream to client) held; requests still forwarded
        self._closed = False
        self._held: dict[int, list[bytes]] = {}

    # -- controls --------------------------------------------------------------------------

    def pause(self) -> None:
        """Stop forwarding both ways; the sockets stay open (a blackhole)."""
        with self._gate:
            self._paused = True

    def hold_replies(self) -> None:
        """Stop forwarding the server's bytes to the client; the client's still reach it."""
        with self._gate:
            self._holding = True

    def resume(self) -> None:
        """Forward again, first whatever was read while paused (or held)."""
        with self._gate:
            self._paused = self._holding = False
            self._gate.notify_all()

    def drop(self) -> None:
        """Close both sockets now."""
        with self._gate:
            if self._closed:
                return
            self._closed = True
            self._gate.notify_all()
        for sock in (self.client, self.upstream):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
        self._proxy._forget(self)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- forwarding ------------------------------------------------------------------------

    def _start(self, paused: bool) -> None:
        self._paused = paused
        if self.upstream is None:  # silent: read and discard, never answer
            threading.Thread(target=self._swallow, daemon=True).start()
            return
        for src, dst in ((self.client, self.upstream), (self.upstream, self.client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _stopped(self, src: socket.socket) -> bool:
        return self._paused or (self._holding and src is self.upstream)

    def _swallow(self) -> None:
        # A blocking read: drop() shuts the socket down, which ends it.
        while not self._closed:
            try:
                if not self.client.recv(_CHUNK):
                    break
            except OSError:
                break
        self.drop()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(_CHUNK)
            except OSError:
                data = b""
            with self._gate:
                # Held while paused: forwarded on resume, or dropped with the connection.
                while self._stopped(src) and not self._closed:
                    self._gate.wait()
                if self._closed:
                    return
            if not data:
                break
            try:
                dst.sendall(data)
            except OSError:
                break
        self.drop()


class TcpProxy:
    """Listen on 127.0.0.1:<free port>, forward each connection to (host, target_port)."""

    def __init__(self, host: str, target_port: int) -> None:
        self.host, self.target_port = host, target_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port: int = self._listener.getsockname()[1]
        self._mode = _NORMAL
        self._paused = False
        self._links: list[Link] = []
        self._state = threading.Condition()
        self.accepted = 0
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="tcp-proxy", daemon=True)
        self._thread.start()

    @property
    def url_host(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- global controls -------------------------------------------------------------------

    def pause(self) -> None:
        """Blackhole every connection, current and new: bytes stop, sockets stay open."""
        with self._state:
            self._paused = True
            links = list(self._links)
        for link in links:
            link.pause()

    def resume(self) -> None:
        with self._state:
            self._paused = False
            links = list(self._links)
        for link in links:
            link.resume()

    def drop(self) -> None:
        """Close every current connection; new ones are served as the mode says."""
        with self._state:
            links = list(self._links)
        for link in links:
            link.drop()

    def refuse(self) -> None:
        """Close each new connection as soon as it is accepted."""
        self._mode = _REFUSE

    def silent(self) -> None:
        """Accept new connections but never answer (nothing is forwarded upstream)."""
        self._mode = _SILENT

    def normal(self) -> None:
        self._mode = _NORMAL

    def retarget(self, target_port: int, host: str | None = None) -> None:
        """Forward new connections to another port (and host)."""
        self.target_port = target_port
        if host is not None:
            self.host = host

    def connections(self) -> list[Link]:
        with self._state:
            return [link for link in self._links if not link.closed]

    def wait_accepted(self, n: int, timeout: float) -> bool:
        """Wait until at least `n` connections were accepted in all; False on timeout."""
        with self._state:
            return self._state.wait_for(lambda: self.accepted >= n, timeout)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        self.drop()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    def _forget(self, link: Link) -> None:
        with self._state, contextlib.suppress(ValueError):
            self._links.remove(link)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mode = self._mode
            if mode == _REFUSE:
                with contextlib.suppress(OSError):
                    client.close()
                self._count()
                continue
            upstream = None
            if mode == _NORMAL:
                try:
                    upstream = socket.create_connection((self.host, self.target_port), timeout=5)
                    upstream.settimeout(None)
                    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    with contextlib.suppress(OSError):
                        client.close()
                    self._count()
                    continue
            link = Link(self, client, upstream)
            with self._state:
                self._links.append(link)
                paused = self._paused
            link._start(paused)
            self._count()

    def _count(self) -> None:
        with self._state:
            self.accepted += 1
            self._state.notify_all()
