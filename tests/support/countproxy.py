"""An HTTP-aware TCP proxy in front of a real registry: counts, holds and cuts requests.

``CutProxy`` forwards raw bytes and cuts once by byte count; this proxy reads each
request head, so it can tell requests apart. It records every request (method, path,
headers, arrival time), and can

- hold requests matching a predicate at a ``Gate`` until the test opens it (the test
  sees how many are waiting, so "every build has started" is an observable condition);
- pause the response to one request after a number of bytes (``pause_response``):
  the test is told when the pause is reached, does what it wants (kill and restart the
  registry), then releases it, which closes the client's connection there, as the
  registry dying mid-response would.

The registry stays real (its bytes, its Range handling). Each client connection gets
its own upstream connection, opened at its first request; when the registry is down,
the client's connection is closed, which the client sees as a dropped connection.
It does not import ``builder``.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

Predicate = Callable[[str, str], bool]  # (method, path) -> bool

_BLOB_RE = re.compile(r"^/v2/.+/blobs/(sha256:[0-9a-f]{64})$")


@dataclass(frozen=True)
class ProxiedRequest:
    """One request as the proxy saw it; ``headers`` has lower-cased names."""

    method: str
    path: str
    headers: dict[str, str]
    at: float  # time.monotonic() on arrival

    @property
    def blob_digest(self) -> str | None:
        m = _BLOB_RE.match(self.path)
        return m.group(1) if m else None


class Gate:
    """Requests matching ``predicate`` wait here until ``open()``."""

    def __init__(self, predicate: Predicate) -> None:
        self.predicate = predicate
        self._opened = threading.Event()
        self._cond = threading.Condition()
        self.waiting = 0

    def _pass(self) -> None:
        with self._cond:
            self.waiting += 1
            self._cond.notify_all()
        self._opened.wait(120)  # bounded: a test that forgets to open does not hang forever
        with self._cond:
            self.waiting -= 1

    def wait_for(self, n: int, timeout: float) -> bool:
        """True once at least ``n`` requests are held (False after ``timeout`` seconds)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.waiting >= n, timeout)

    def open(self) -> None:
        self._opened.set()


@dataclass
class Pause:
    """The first response to a request matching ``predicate`` stops after ``after`` bytes."""

    predicate: Predicate
    after: int
    reached: threading.Event = field(default_factory=threading.Event)
    _release: threading.Event = field(default_factory=threading.Event)
    request: ProxiedRequest | None = None

    def release(self) -> None:
        """Let go: the paused connection is closed (the client saw ``after`` bytes)."""
        self._release.set()


class _Conn:
    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.pause: Pause | None = None  # armed for the response now flowing
        self.lock = threading.Lock()


class CountingProxy:
    """Forward 127.0.0.1:<port> to ``target`` (host, port), request by request."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.requests: list[ProxiedRequest] = []
        self.bytes_down = 0
        """Every byte the registry sent back through the proxy (heads and bodies)."""
        self.gate: Gate | None = None
        self._pauses: list[Pause] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[_Conn] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True, name="countproxy-accept")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- scripting ---------------------------------------------------------------------

    def hold(self, predicate: Predicate) -> Gate:
        """Hold matching requests until the returned gate is opened."""
        self.gate = Gate(predicate)
        return self.gate

    def pause_response(self, predicate: Predicate, after: int) -> Pause:
        """Pause the response to the next matching request after ``after`` bytes."""
        pause = Pause(predicate, after)
        with self._lock:
            self._pauses.append(pause)
        return pause

    # -- what was seen ---------------------------------------------------------------------

    def reset(self) -> None:
        """Forget what was seen so far: count the next step alone."""
        with self._lock:
            self.requests = []
            self.bytes_down = 0

    def blob_gets(self) -> dict[str, list[ProxiedRequest]]:
        """Blob GETs by digest (whatever the repository)."""
        out: dict[str, list[ProxiedRequest]] = {}
        with self._lock:
            for r in self.requests:
                if r.method == "GET" and r.blob_digest:
                    out.setdefault(r.blob_digest, []).append(r)
        return out

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> CountingProxy:
        self._accepter.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()
        if self.gate is not None:
            self.gate.open()
        with self._lock:
            for p in self._pauses:
                p.release()
            conns = list(self._conns)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self._listener.close()
        for c in conns:
            _close(c.client)
            if c.upstream is not None:
                _close(c.upstream)
        self._accepter.join(timeout=5)
        for t in list(self._threads):
            t.join(timeout=5)

    # -- forwarding ------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            conn = _Conn(client)
            with self._lock:
                self._conns.append(conn)
            t = threading.Thread(target=self._serve_client, args=(conn,), daemon=True, name="countproxy-client")
            self._threads.append(t)
            t.start()

    def _serve_client(self, conn: _Conn) -> None:
        """Client → registry: one request head at a time (GET and HEAD carry no body)."""
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.client.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = (lines[0].split(" ") + ["", ""])[:3]
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or 0)
                while len(buf) < length:
                    data = conn.client.recv(65536)
                    if not data:
                        return
                    buf += data
                body, buf = buf[:length], buf[length:]
                req = ProxiedRequest(method, target.split("?")[0], headers, time.monotonic())
                with self._lock:
                    self.requests.append(req)
                    pause = next((p for p in self._pauses if p.request is None and p.predicate(method, req.path)),
                                 None)
                    if pause is not None:
                        pause.request = req
                gate = self.gate
                if gate is not None and gate.predicate(method, req.path):
                    gate._pass()
                if conn.upstream is None:
                    try:
                        conn.upstream = socket.create_connection(self.target, timeout=30)
                    except OSError:
                        return  # the registry is down: the client sees its connection dropped
                    t = threading.Thread(target=self._pump_down, args=(conn,), daemon=True,
                                         name="countproxy-down")
                    self._threads.append(t)
                    t.start()
                with conn.lock:
                    conn.pause = pause
                conn.upstream.sendall(head + b"\r\n\r\n" + body)
        except OSError:
            pass
        finally:
            _close(conn.client)
            if conn.upstream is not None:
                _close(conn.upstream)

    def _pump_down(self, conn: _Conn) -> None:
        """Registry → client, pausing (then cutting) where a Pause says so."""
        sent = 0
        current: Pause | None = None
        assert conn.upstream is not None
        try:
            while data := conn.upstream.recv(65536):
                with conn.lock:
                    if conn.pause is not current:
                        current, sent = conn.pause, 0
                if current is not None and sent + len(data) >= current.after:
                    conn.client.sendall(data[: current.after - sent])
                    current.reached.set()
                    current._release.wait(120)
                    break  # the connection ends here, as if the registry had died
                conn.client.sendall(data)
                sent += len(data)
                with self._lock:
                    self.bytes_down += len(data)
        except OSError:
            pass
        finally:
            _close(conn.client)
            _close(conn.upstream)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
