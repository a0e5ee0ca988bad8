"""``imc serve``: one HTTP server for the registry endpoint and the ImageCache API.

Threads, one per connection, with keep-alive: a pull is a handful of long blob
transfers, and blob bodies leave through ``socket.sendfile`` (no copy through
Python) whenever their bytes lie in a file as they are. The server binds to
loopback unless told otherwise, sweeps expired caches periodically, and checks the
caches' tags for drift every ``drift_interval``. Given a certificate and key it
speaks HTTPS only, the handshake done in the connection's own thread so that a
client that never completes one holds up no other.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qsl, urlsplit

from requests.structures import CaseInsensitiveDict

from builder import __version__
from builder.build import Builder
from builder.caches import BuildLease, Caches
from builder.drift import DriftCheck
from builder.errors import ImcError, ValidationError
from builder.imagecache import STALE_CONDITION, ImageCache
from builder.pull import Puller
from builder.server import accesslog
from builder.server.api import MAX_BODY_BYTES, BuildRunner, ImageCacheAPI
from builder.server.hits import Hits
from builder.server.metrics import Metrics
from builder.server.registry import RegistryEndpoint, Reply, error

log = logging.getLogger(__name__)

SOCKET_TIMEOUT = 120.0
DRIFT_INTERVAL = 600.0
"""Seconds between drift checks by default (10 minutes)."""
MAX_CONNECTIONS = 256
"""Connections served at once by default, watches included; each holds one thread."""
RETRY_AFTER_SECONDS = 1
REFUSED_DRAIN_SECONDS = 2.0
REFUSED_PENDING = 1024
"""Refused connections still being drained; past it, one is closed at once."""
LINGER_BYTES = 64 << 20
LINGER_SECONDS = 2.0
HANDSHAKE_SECONDS = 10.0
"""How long a connection may take to complete its TLS handshake before it is closed."""
TLS_BLOCK = 1 << 20
HITS_FLUSH_SECONDS = 5.0
"""How often the hits counted in memory are looked at; each cache's are written at most once a minute."""


def parse_listen(text: str, allow_remote: bool) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) to bind; refuses non-loopback unless allowed."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValidationError(f"--listen {text!r}: want host:port, e.g. 127.0.0.1:5050")
    host = host.strip("[]") or "127.0.0.1"
    try:
        address = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
    except ValueError:
        raise ValidationError(f"--listen {text!r}: the host must be an IP address") from None
    if not address.is_loopback and not allow_remote:
        raise ValidationError(f"--listen {text!r} is not a loopback address; pass --allow-remote to serve "
                              "other machines")
    return host, int(port)


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The server's TLS context: TLS 1.2 or later, the default ciphers, ``cert`` (a PEM
    chain, leaf first) with its unencrypted private ``key``. Checked before listening."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            path.open("rb").close()
        except OSError as e:
            raise ValidationError(f"{flag} {path}: cannot read it: {e.strerror}") from None

    def no_password() -> bytes:
        # Without a callback OpenSSL would prompt on the terminal for the passphrase.
        raise ValidationError(f"--tls-key {key}: the key is encrypted; give an unencrypted key")

    try:
        context.load_cert_chain(cert, key, password=no_password)
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e):
            raise ValidationError(f"--tls-key {key} does not match --tls-cert {cert}") from None
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cert)
        except ssl.SSLError:
            raise ValidationError(f"--tls-cert {cert}: no PEM certificate in it") from None
        raise ValidationError(f"--tls-key {key}: no PEM private key in it") from None
    return context


def _send_encrypted(conn: ssl.SSLSocket, source: BinaryIO, offset: int, count: int) -> int:
    """A file extent through TLS, where ``sendfile`` cannot go: in 1 MiB blocks, since
    ``socket.sendfile``'s own fallback sends 8 KiB at a time and is bound by that loop."""
    source.seek(offset)
    block = memoryview(bytearray(min(TLS_BLOCK, count) or 1))
    sent = 0
    while sent < count:
        n = source.readinto(block[:min(len(block), count - sent)])
        if not n:
            break
        conn.sendall(block[:n])
        sent += n
    return sent


def _request_kind(path: str) -> str:
    """The duration histogram's label: manifest, blob, or other (tags, the ping)."""
    if "/manifests/" in path:
        return "manifest"
    return "blob" if "/blobs/" in path else "other"


class _Chunked:
    """HTTP/1.1 chunked framing of a stream of byte strings, ending with the last chunk.
    ``close`` closes the stream, also one never started (a client gone before the body)."""

    def __init__(self, stream: Iterable[bytes]) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[bytes]:
        for data in self.stream:
            if data:
                yield b"%x\r\n%s\r\n" % (len(data), data)
        yield b"0\r\n\r\n"

    def close(self) -> None:
        close = getattr(self.stream, "close", None)
        if close is not None:
            close()


class _Refuser:
    """Closes refused connections without losing their 503, in one thread for all of them.

    The answer is written at once (it fits any socket buffer); closing with the client's
    request unread would reset the connection and could destroy the answer, so each
    socket is read and dropped until the client closes or a short deadline passes.
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._deadlines: dict[socket.socket, float] = {}
        self._thread: threading.Thread | None = None

    def refuse(self, sock: socket.socket) -> None:
        body = error(503, "UNAVAILABLE", "too many connections; retry later").body
        head = (f"HTTP/1.1 503 Service Unavailable\r\nServer: imc/{__version__}\r\n"
                f"Retry-After: {RETRY_AFTER_SECONDS}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            sock.setblocking(False)
            sock.send(head + body)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        with self._lock:
            if len(self._deadlines) >= REFUSED_PENDING:
                sock.close()
                return
            self._deadlines[sock] = time.monotonic() + REFUSED_DRAIN_SECONDS
            self._selector.register(sock, selectors.EVENT_READ)
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, name="imc-refuse", daemon=True)
                self._thread.start()

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._deadlines:
                    self._thread = None
                    return
            for key, _ in self._selector.select(timeout=0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    done = not sock.recv(1 << 16)
                except BlockingIOError:
                    done = False
                except OSError:
                    done = True
                if done:
                    self._close(sock)
            now = time.monotonic()
            with self._lock:
                expired = [s for s, t in self._deadlines.items() if t <= now]
            for sock in expired:
                self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        with self._lock:
            if self._deadlines.pop(sock, None) is None:
                return
            self._selector.unregister(sock)
        sock.close()


class _HTTPServer(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections`` of them: past the cap a
    connection is answered 503 with ``Retry-After`` and closed, and starts no thread
    (over TLS it is closed unanswered: an answer would need a handshake first)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], app: Server, max_connections: int = MAX_CONNECTIONS,
                 tls: ssl.SSLContext | None = None) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.app = app
        self.tls = tls
        self.handshake_seconds = HANDSHAKE_SECONDS
        self.max_connections = max_connections
        self.connections = 0
        self._slots = threading.Condition()
        self._refuser = _Refuser()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._slots:
            admitted = self.connections < self.max_connections
            if admitted:
                self.connections += 1
                self._slots.notify_all()
        if not admitted:
            if self.tls is None:
                self._refuser.refuse(request)
            else:
                request.close()
            accesslog.record(client_address[0], "-", "-", 503, 0, 0.0)
            self.app.metrics.answered(503)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if self.tls is not None:
                request = self._handshake(self.tls, request, client_address)
            if request is not None:
                super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _handshake(self, tls: ssl.SSLContext, sock: socket.socket, client_address: Any) -> ssl.SSLSocket | None:
        """The TLS handshake, bounded in time; None (the socket closed) when it fails."""
        try:
            sock.settimeout(self.handshake_seconds)
            conn = tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except OSError:
            sock.close()
            return None
        try:
            conn.do_handshake()
        except OSError as e:  # ssl.SSLError and timeouts are OSErrors
            log.debug("%s: TLS handshake failed: %s", client_address[0], e)
            conn.close()
            return None
        return conn

    def _release(self) -> None:
        with self._slots:
            self.connections -= 1
            self._slots.notify_all()

    def wait_connections(self, predicate: Callable[[int], bool], timeout: float) -> bool:
        """Wait until the number of open connections satisfies ``predicate``."""
        with self._slots:
            return self._slots.wait_for(lambda: predicate(self.connections), timeout)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"imc/{__version__}"
    timeout = SOCKET_TIMEOUT
    server: _HTTPServer

    # A request line without a version is answered with a status line all the same.
    default_request_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """What the HTTP layer refuses by itself (bad syntax, a request line or header too
        long) is answered like everything else: a spec error body, or a Status on the API
        (never the stdlib's HTML page), and the connection is closed."""
        self.close_connection = True
        phrase = HTTPStatus(code).phrase if code in HTTPStatus._value2member_map_ else "Error"
        text = (message or phrase)[:200]
        if ImageCacheAPI.owns(getattr(self, "path", "")):
            body = json.dumps({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                               "message": text, "reason": phrase.replace(" ", ""), "code": code}).encode()
        else:
            body = error(code, "NAME_INVALID" if code == 414 else "UNSUPPORTED", text).body
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        accesslog.record(self.client_address[0], self.command or "-", getattr(self, "path", "") or "-", code,
                         0 if self.command == "HEAD" else len(body), 0.0)
        self.server.app.metrics.answered(code)

    def _linger(self) -> None:
        """Close after answering a request whose body was not read, without losing the answer.

        Closing with unread bytes makes the kernel reset the connection, which can destroy
        the answer before the client reads it. So: end our side (FIN after the answer),
        then read and drop what the client still sends, bounded in bytes and time.
        """
        self.close_connection = True
        deadline = time.monotonic() + LINGER_SECONDS
        left = LINGER_BYTES
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            while left > 0 and (remaining := deadline - time.monotonic()) > 0:
                self.connection.settimeout(remaining)
                chunk = self.connection.recv(min(1 << 16, left))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass  # reset, timed out, or gone: there is nothing more to save

    def _dispatch(self) -> None:
        self._unread_body = False
        self._sent = 0
        app = self.server.app
        started = time.monotonic()
        parts = urlsplit(self.path)
        try:
            if ImageCacheAPI.owns(parts.path):
                reply = self._api(app)
            elif parts.path == "/metrics" and self.command == "GET":
                exposition, content_type = app.metrics.render(self._headers().get("Accept", ""))
                reply = Reply(200, {"Content-Type": content_type}, exposition)
            elif parts.path.startswith("/v2"):
                reply = app.registry.handle(self.command, parts.path, dict(parse_qsl(parts.query)), self._headers())
            else:
                reply = error(404, "NOT_FOUND", "unknown route")
            if not ImageCacheAPI.owns(parts.path) and (
                    "Transfer-Encoding" in self.headers or (self.headers.get("Content-Length") or "0").strip() != "0"):
                self._unread_body = True  # never read: it must not be taken for the next request
        except ImcError as e:
            log.warning("request %s %s failed: %s", self.command, parts.path, e.message)
            reply = error(500, "UNKNOWN", "the server could not read the content")
        self._send(reply)
        if self._unread_body:
            self._linger()
        accesslog.record(self.client_address[0], self.command, self.path, reply.status, self._sent,
                         time.monotonic() - started)
        app.metrics.answered(reply.status)
        if reply.outcome is not None:
            app.metrics.record(reply.outcome)
        if parts.path.startswith("/v2/"):
            app.metrics.observe(_request_kind(parts.path), time.monotonic() - started)

    def _headers(self) -> CaseInsensitiveDict[str]:
        """Request headers, case-insensitive, repeated ones joined (clients send several Accept lines)."""
        return CaseInsensitiveDict({k: ", ".join(self.headers.get_all(k) or ()) for k in set(self.headers.keys())})

    def _api(self, app: Server) -> Reply:
        length = (self.headers.get("Content-Length") or "0").strip()
        # ASCII digits only: str.isdigit() accepts '²', and int() refuses more than 4300 digits.
        size = int(length) if length.isascii() and length.isdigit() and len(length) <= 18 else -1
        if size < 0 or size > MAX_BODY_BYTES or "Transfer-Encoding" in self.headers:
            body = b""  # the API refuses from the headers (413, 400, 411); the body is never read
            self._unread_body = True
        else:
            body = self.rfile.read(size) if size else b""
        answer = app.api.handle(self.command, self.path, self._headers(), body, peer=self.client_address[0])
        if answer.stream is not None:
            # A watch: chunked, each event sent as it comes; the connection ends with it.
            self.close_connection = True
            return Reply(answer.status, {"Content-Type": answer.content_type, "Transfer-Encoding": "chunked",
                                         **answer.headers}, stream=_Chunked(answer.stream))
        return Reply(answer.status, {"Content-Type": answer.content_type, **answer.headers}, answer.body)

    def _send(self, reply: Reply) -> None:
        source = None
        if reply.extent is not None and self.command != "HEAD":
            try:
                # Never through a symbolic link: one swapped in for a volume or a blob after
                # the index was read must not send the bytes of whatever it points at.
                fd = os.open(reply.extent[0], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                source = open(fd, "rb")  # noqa: SIM115 - closed in the finally below
            except OSError as e:
                log.warning("cannot serve %s: %s", reply.extent[0], e.strerror)
                reply = error(500, "UNKNOWN", "the server could not read the content")
        try:
            self._send_reply(reply, source)
        finally:
            if source is not None:
                source.close()
            if isinstance(reply.stream, _Chunked):
                reply.stream.close()

    def _send_reply(self, reply: Reply, source: BinaryIO | None) -> None:
        self.send_response(reply.status)
        headers = {"Docker-Distribution-API-Version": "registry/2.0", **reply.headers}
        if "Content-Length" not in headers and "Transfer-Encoding" not in headers:
            headers["Content-Length"] = str(len(reply.body))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        try:
            if reply.extent is not None and source is not None:
                _, offset, count = reply.extent
                if isinstance(self.connection, ssl.SSLSocket):
                    self._sent = _send_encrypted(self.connection, source, offset, count)
                else:
                    self._sent = self.connection.sendfile(source, offset, count)
            elif reply.stream is not None:
                for chunk in reply.stream:
                    self.wfile.write(chunk)
                    self._sent += len(chunk)
            elif reply.body:
                self.wfile.write(reply.body)
                self._sent = len(reply.body)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client went away mid-body

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch


class Server:
    """The registry endpoint, the API and the sweep, behind one listening socket."""

    def __init__(self, caches: Caches, listen: tuple[str, int], pull_through: Puller | None = None,
                 upstreams: Sequence[str] = (), sweep_interval: float = 3600.0, build_workers: int = 2,
                 api_token: str | None = None, max_connections: int = MAX_CONNECTIONS,
                 drift_interval: float = DRIFT_INTERVAL, tls: ssl.SSLContext | None = None,
                 hits_flush_interval: float = HITS_FLUSH_SECONDS, stale_if_error: bool = True,
                 offline: bool = False) -> None:
        self.caches = caches
        self.metrics = Metrics(stale=self._staleness)
        self.hits = Hits(caches)
        self.registry = RegistryEndpoint(caches, pull_through, upstreams, hits=self.hits,
                                         stale_if_error=stale_if_error, offline=offline)
        self.builds = BuildRunner(Builder(caches), workers=build_workers)
        self.api = ImageCacheAPI(caches, self.builds, token=api_token)
        self.sweep_interval = sweep_interval
        self.hits_flush_interval = hits_flush_interval
        self.drift_interval = drift_interval
        self.drift_rounds = 0
        self._drift_done = threading.Condition()
        self._httpd = _HTTPServer(listen, self, max_connections, tls)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"

    @property
    def url(self) -> str:
        """The base URL clients reach the server at: ``https://`` when it serves TLS."""
        return f"{'https' if self._httpd.tls else 'http'}://{self.address}"

    @property
    def connections(self) -> int:
        """Connections open now (each one a thread), watches included."""
        return self._httpd.connections

    def wait_connections(self, predicate: Callable[[int], bool], timeout: float = 30.0) -> bool:
        """Wait until the number of open connections satisfies ``predicate`` (tests, shutdown)."""
        return self._httpd.wait_connections(predicate, timeout)

    def start(self) -> Server:
        """Serve in background threads (tests, embedding); ``stop()`` ends it."""
        self._threads = [threading.Thread(target=self._httpd.serve_forever, name="imc-serve", daemon=True)]
        if self.hits_flush_interval > 0:
            self._threads.append(threading.Thread(target=self._flush_hits, name="imc-hits", daemon=True))
        if self.sweep_interval > 0:
            self._threads.append(threading.Thread(target=self._sweep, name="imc-sweep", daemon=True))
        if self.drift_interval > 0:
            self._threads.append(threading.Thread(target=self._drift, name="imc-drift", daemon=True))
        for t in self._threads:
            t.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted."""
        if self.hits_flush_interval > 0:
            threading.Thread(target=self._flush_hits, name="imc-hits", daemon=True).start()
        if self.sweep_interval > 0:
            threading.Thread(target=self._sweep, name="imc-sweep", daemon=True).start()
        if self.drift_interval > 0:
            threading.Thread(target=self._drift, name="imc-drift", daemon=True).start()
        try:
            self._httpd.serve_forever()
        finally:
            self.stop()

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self.builds.shutdown(wait=False)
        self.hits.flush(everything=True)

    def _flush_hits(self) -> None:
        """Write the hits counted in memory, each cache's at most once a minute."""
        while not self._stopping.wait(self.hits_flush_interval):
            self.hits.flush()

    def _sweep(self) -> None:
        """Delete expired caches and reclaim what nothing needs, every ``sweep_interval``."""
        while not self._stopping.wait(self.sweep_interval):
            try:
                report = self.caches.gc()
                if report.deleted:
                    log.info("sweep deleted image caches: %s", ", ".join(report.deleted))
            except ImcError as e:
                log.warning("sweep failed: %s", e.message)

    def _drift(self) -> None:
        """Check every cache's tags for drift, every ``drift_interval``."""
        while not self._stopping.wait(self.drift_interval):
            self.check_drift()

    def check_drift(self) -> None:
        """One round of the drift check over every cache; what it finds is recorded on
        the caches (and read by ``/metrics``). An update the on-drift policy starts
        runs on the API's build pool."""
        try:
            checks = DriftCheck(self.caches, self._start_build).check()
            stale = [c.cache for c in checks if c.stale]
            if stale:
                log.info("drift check: stale caches: %s", ", ".join(stale))
        except ImcError as e:
            log.warning("drift check failed: %s", e.message)
        finally:
            with self._drift_done:
                self.drift_rounds += 1
                self._drift_done.notify_all()

    def wait_drift_rounds(self, rounds: int, timeout: float = 60.0) -> bool:
        """Wait until at least ``rounds`` drift checks have ended (tests)."""
        with self._drift_done:
            return self._drift_done.wait_for(lambda: self.drift_rounds >= rounds, timeout)

    def _start_build(self, cache: ImageCache, lease: BuildLease) -> None:
        self.builds.submit(cache.name, lease)

    def _staleness(self) -> dict[str, bool]:
        """Whether each checked cache is stale, for ``imc_cache_stale``."""
        return {c.name: c.stale for c in self.caches.list() if c.condition(STALE_CONDITION) is not None}
