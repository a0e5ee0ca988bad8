"""A scripted registry for faults a real registry cannot be made to produce.

``FaultServer`` speaks just enough of the OCI distribution API (``/v2/``, manifests and
blobs of one repository) over HTTP/1.1 with Content-Length, on 127.0.0.1 and a port
the OS picks. Each request path can be scripted to misbehave: answer with an error
status a number of times, cut a blob short and drop the connection (``Truncate``) or
reset it (``Reset``: a TCP RST), reset it before any answer (``Abort``: what a load
balancer with no backend left does), stop sending mid-body (``Stall``), send the body a
byte at a time (``Trickle``), send corrupt bytes
or a wrong ``Docker-Content-Digest``, redirect to another server, ignore ``Range``,
or wait for a test's signal. Every request is recorded (method, path, headers, and
``at``, its ``time.monotonic()`` arrival) so tests can assert on what the client
actually sent, and when.

It deliberately does not import ``builder``: the fixture computes its own digests so
that a bug in the code under test cannot hide itself in the fixture.

Example::

    with FaultServer() as srv:
        image = srv.add_image([b"layer-1", b"layer-2"], tag="v1")
        srv.script(srv.blob_path(image.layers[0].digest), Truncate(after=3))
        ...  # pull srv.endpoint + "/test/app:v1"
        assert srv.ranges(srv.blob_path(image.layers[0].digest)) == [None, "bytes=3-"]

Scripting model: ``script(path, *faults)`` queues faults for ``path``; each request
that reaches the content handler (i.e. passed the auth check, if any) consumes the next
one. When the queue is empty the ``always(path, fault)`` fault applies, if set, else
the request is answered normally.

Auth: ``require_basic(user, password)`` answers 401 with a Basic challenge to requests
without those credentials; ``require_bearer(...)`` makes the server its own token
realm (``/token``), recording every token issued in ``tokens``. Faults are consumed
only by requests that passed the auth check, so a 401 round trip does not use one up.

Blobs honour ``Range: bytes=K-`` (206 with Content-Range; 416 when K is past the end,
as registries do) unless the fault is ``IgnoreRange``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import struct
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"


def sha256(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- faults --------------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    """Answer with ``code`` (and ``headers``) instead of the content.

    The body is a distribution-style JSON error unless ``body`` is given.
    """

    code: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None


@dataclass(frozen=True)
class Truncate:
    """Announce the full Content-Length, send only ``after`` body bytes, then close."""

    after: int


@dataclass(frozen=True)
class Corrupt:
    """Send the content with one byte flipped (same length, same headers)."""

    position: int = 0


@dataclass(frozen=True)
class WrongDigest:
    """Send the right bytes with a ``Docker-Content-Digest`` of other bytes."""


@dataclass(frozen=True)
class NoDigest:
    """Send the content without a ``Docker-Content-Digest`` header (registries may omit it)."""


@dataclass(frozen=True)
class IgnoreRange:
    """Answer 200 with the whole content even when the request asked for a Range."""


@dataclass(frozen=True)
class NoLength:
    """Send the body without Content-Length and close the connection to end it."""


@dataclass(frozen=True)
class Redirect:
    """Answer ``status`` with a Location on ``target`` (another FaultServer).

    ``host`` is the name used in the Location; the default ``localhost`` makes the
    netloc differ from the registry's ``127.0.0.1:port`` even though both are loopback.
    """

    target: FaultServer
    host: str = "localhost"
    status: int = 307


@dataclass(frozen=True)
class Hold:
    """Wait until ``event`` is set (at most ``timeout`` seconds), then answer normally."""

    event: threading.Event
    timeout: float = 10.0


@dataclass(frozen=True)
class Reset:
    """Send the headers and ``after`` body bytes, then reset the connection (TCP RST)."""

    after: int = 0


@dataclass(frozen=True)
class Abort:
    """Reset the connection (TCP RST) without answering: the request is recorded, so
    a test counts the connections a client made to a host it cannot reach."""


@dataclass(frozen=True)
class Stall:
    """Send the headers and ``after`` body bytes, then nothing until ``event`` is set
    (at most ``timeout`` seconds), then close: a server that stops answering mid-body."""

    event: threading.Event
    after: int = 0
    timeout: float = 30.0


@dataclass(frozen=True)
class Trickle:
    """Send the headers, then the body one byte at a time, one every ``every`` seconds
    (the first at once), until the body ends, the client goes away or ``event`` is set:
    a server that keeps making progress, too slowly to finish."""

    event: threading.Event
    every: float


Fault = (Status | Truncate | Corrupt | WrongDigest | NoDigest | IgnoreRange | NoLength | Redirect | Hold | Reset | Abort
         | Stall | Trickle)


# -- records and content -----------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One request as received. ``headers`` has lower-cased names."""

    method: str
    path: str
    headers: dict[str, str]
    at: float = 0.0  # time.monotonic() when it arrived

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass(frozen=True)
class Token:
    """A bearer token ``/token`` issued: for which scope, and the Authorization it was asked with."""

    value: str
    scope: str
    service: str
    authorization: str | None
    revoked: bool = False


def _basic_header(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


@dataclass(frozen=True)
class Blob:
    """Content the server holds, with its digest (``sha256:<hex>``)."""

    digest: str
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self, media_type: str) -> dict:
        return {"mediaType": media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Image:
    """What ``add_image`` published: the manifest's bytes and digest, config and layers."""

    tag: str | None
    manifest: Blob
    media_type: str
    config: Blob
    layers: tuple[Blob, ...]

    @property
    def blobs(self) -> tuple[Blob, ...]:
        return (self.config, *self.layers)


_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, owner: FaultServer) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output clean

    def do_GET(self) -> None:
        self.server.owner._handle(self, "GET")

    def do_HEAD(self) -> None:
        self.server.owner._handle(self, "HEAD")


class FaultServer:
    """A one-repository registry on ``127.0.0.1:<port>`` that misbehaves on demand.

    Use it as a context manager (or call ``start``/``stop``). ``endpoint`` is the
    ``host:port`` to give the client; ``requests`` lists every request received.
    """

    def __init__(self, repository: str = "test/app") -> None:
        self.repository = repository
        self.requests: list[Request] = []
        self._manifests: dict[str, tuple[bytes, str]] = {}  # tag or digest -> (raw, media type)
        self._blobs: dict[str, bytes] = {}
        self._queues: dict[str, deque[Fault]] = defaultdict(deque)
        self._always: dict[str, Fault] = {}
        self._basic: str | None = None
        self._bearer: dict | None = None  # service, expires_in, basic header wanted (or None)
        self.tokens: list[Token] = []
        self._lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> FaultServer:
        self._httpd = _HTTPServer(self)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"faultserver-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            assert self._thread is not None
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:<port>``, the registry endpoint for the client."""
        return f"127.0.0.1:{self.port}"

    @property
    def reference(self) -> str:
        """``<endpoint>/<repository>``; append ``:tag`` or ``@digest``."""
        return f"{self.endpoint}/{self.repository}"

    # -- content -----------------------------------------------------------------------

    def add_blob(self, data: bytes) -> Blob:
        """Serve ``data`` at ``/v2/<repo>/blobs/<digest>``."""
        blob = Blob(sha256(data), data)
        with self._lock:
            self._blobs[blob.digest] = data
        return blob

    def add_manifest(self, raw: bytes, media_type: str = OCI_MANIFEST, tag: str | None = None) -> Blob:
        """Serve ``raw`` by its digest, and by ``tag`` if given, with ``media_type``."""
        blob = Blob(sha256(raw), raw)
        with self._lock:
            self._manifests[blob.digest] = (raw, media_type)
            if tag is not None:
                self._manifests[tag] = (raw, media_type)
        return blob

    def add_image(self, layers: list[bytes], tag: str | None = "v1", docker: bool = False,
                  platform: tuple[str, str] = ("linux", "amd64")) -> Image:
        """Publish a single-platform image (OCI, or Docker v2 with ``docker=True``)."""
        config_doc = {"architecture": platform[1], "os": platform[0],
                      "rootfs": {"type": "layers", "diff_ids": [sha256(layer) for layer in layers]},
                      "config": {}}
        config = self.add_blob(json.dumps(config_doc, sort_keys=True).encode())
        layer_blobs = tuple(self.add_blob(data) for data in layers)
        media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
        doc = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": config.descriptor(DOCKER_CONFIG if docker else OCI_CONFIG),
            "layers": [b.descriptor(DOCKER_LAYER if docker else OCI_LAYER) for b in layer_blobs],
        }
        manifest = self.add_manifest(json.dumps(doc, indent=2).encode(), media_type, tag)
        return Image(tag, manifest, media_type, config, layer_blobs)

    def copy_blobs_to(self, other: FaultServer) -> None:
        """Make ``other`` serve every blob this server holds (for redirect targets)."""
        with self._lock:
            blobs = dict(self._blobs)
        with other._lock:
            other._blobs.update(blobs)

    def blob_path(self, digest: str | object) -> str:
        return f"/v2/{self.repository}/blobs/{digest}"

    def manifest_path(self, identifier: str | object) -> str:
        return f"/v2/{self.repository}/manifests/{identifier}"

    # -- scripting -----------------------------------------------------------------------

    def script(self, path: str, *faults: Fault) -> None:
        """Queue ``faults`` for ``path``: the next requests get them, one each, in order."""
        with self._lock:
            self._queues[path].extend(faults)

    def fail(self, path: str, status: int, times: int = 1, headers: dict[str, str] | None = None) -> None:
        """Answer ``status`` (with ``headers``) to the next ``times`` requests for ``path``."""
        self.script(path, *[Status(status, dict(headers or {}))] * times)

    def always(self, path: str, fault: Fault | None) -> None:
        """Apply ``fault`` to every request for ``path`` once its queue is empty (None clears)."""
        with self._lock:
            if fault is None:
                self._always.pop(path, None)
            else:
                self._always[path] = fault

    def redirect_blobs(self, target: FaultServer, host: str = "localhost", status: int = 307) -> None:
        """Redirect every blob GET to ``target`` (which gets a copy of the blobs)."""
        self.copy_blobs_to(target)
        with self._lock:
            digests = list(self._blobs)
        for digest in digests:
            self.always(self.blob_path(digest), Redirect(target, host, status))

    def require_basic(self, username: str, password: str) -> None:
        """Answer 401 with a Basic challenge unless the request carries these credentials."""
        self._basic = _basic_header(username, password)

    def require_bearer(self, service: str = "faultserver", expires_in: int | None = 60,
                       credentials: tuple[str, str] | None = None) -> None:
        """Require a bearer token from this server's own ``/token`` realm.

        ``/token`` issues ``token-<n>`` for the ``scope`` asked (anonymously, or only with
        Basic ``credentials`` if given). A ``/v2/<repo>/...`` request needs a live token
        whose scope names the repository; otherwise it gets a 401 Bearer challenge with
        realm, service and scope (and ``error="invalid_token"`` when a token was sent).
        """
        self._bearer = {"service": service, "expires_in": expires_in,
                        "basic": _basic_header(*credentials) if credentials else None}

    def revoke_tokens(self) -> None:
        """Make every token issued so far invalid (as if it expired server-side)."""
        with self._lock:
            self.tokens = [Token(t.value, t.scope, t.service, t.authorization, revoked=True) for t in self.tokens]

    # -- what was seen ---------------------------------------------------------------------

    def requests_to(self, path: str, method: str | None = "GET") -> list[Request]:
        """The requests received for ``path`` (of ``method``; None for any)."""
        with self._lock:
            return [r for r in self.requests if r.path == path and (method is None or r.method == method)]

    def count(self, path: str, method: str | None = "GET") -> int:
        return len(self.requests_to(path, method))

    def ranges(self, path: str) -> list[str | None]:
        """The ``Range`` header of each GET for ``path`` (None where there was none)."""
        return [r.header("Range") for r in self.requests_to(path)]

    def authorizations(self) -> list[str | None]:
        """The ``Authorization`` header of every request received, in order."""
        with self._lock:
            return [r.header("Authorization") for r in self.requests]

    # -- serving -------------------------------------------------------------------------

    def _next_fault(self, path: str) -> Fault | None:
        with self._lock:
            queue = self._queues.get(path)
            if queue:
                return queue.popleft()
            return self._always.get(path)

    def _handle(self, h: _Handler, method: str) -> None:
        path = urlsplit(h.path).path
        headers = {k.lower(): v for k, v in h.headers.items()}
        with self._lock:
            self.requests.append(Request(method, path, headers, time.monotonic()))
        if self._bearer is not None and path == "/token":
            self._issue_token(h, method, headers)
            return
        if self._basic is not None and headers.get("authorization") != self._basic:
            self._error(h, method, 401, "UNAUTHORIZED", "authentication required",
                        {"WWW-Authenticate": 'Basic realm="faultserver"'})
            return
        if self._bearer is not None and not self._bearer_ok(path, headers.get("authorization")):
            sent = headers.get("authorization", "").startswith("Bearer ")
            challenge = (f'Bearer realm="http://{self.endpoint}/token",service="{self._bearer["service"]}"'
                         f',scope="repository:{self.repository}:pull"'
                         + (',error="invalid_token"' if sent else ""))
            self._error(h, method, 401, "UNAUTHORIZED", "authentication required",
                        {"WWW-Authenticate": challenge})
            return
        fault = self._next_fault(path)
        if isinstance(fault, Hold):
            fault.event.wait(fault.timeout)
            fault = None
        if isinstance(fault, Abort):
            h.close_connection = True
            sock = socket.socket(fileno=h.connection.detach())
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            return
        if isinstance(fault, Status):
            if fault.body is not None:
                self._send(h, method, fault.code, fault.body, dict(fault.headers))
            else:
                code = {429: "TOOMANYREQUESTS", 401: "UNAUTHORIZED", 403: "DENIED"}.get(fault.code, "UNKNOWN")
                self._error(h, method, fault.code, code, f"scripted {fault.code}", dict(fault.headers))
            return
        if isinstance(fault, Redirect):
            location = f"http://{fault.host}:{fault.target.port}{h.path}"
            self._send(h, method, fault.status, b"", {"Location": location})
            return

        if path == "/v2/" or path == "/v2":
            self._send(h, method, 200, b"{}", {"Content-Type": "application/json"})
            return
        prefix = f"/v2/{self.repository}/"
        kind, _, ident = path[len(prefix):].partition("/") if path.startswith(prefix) else ("", "", "")
        with self._lock:
            if kind == "manifests" and ident in self._manifests:
                data, content_type = self._manifests[ident]
            elif kind == "blobs" and ident in self._blobs:
                data, content_type = self._blobs[ident], "application/octet-stream"
            else:
                data = None
        if data is None:
            code = {"manifests": "MANIFEST_UNKNOWN", "blobs": "BLOB_UNKNOWN"}.get(kind, "NAME_UNKNOWN")
            self._error(h, method, 404, code, f"{path} unknown")
            return

        digest = sha256(data)
        if isinstance(fault, WrongDigest):
            digest = sha256(data + b"\0")
        if isinstance(fault, Corrupt):
            flipped = bytearray(data)
            flipped[fault.position] ^= 0xFF
            data = bytes(flipped)
        out_headers = {"Content-Type": content_type, "Docker-Content-Digest": digest, "Accept-Ranges": "bytes"}
        if isinstance(fault, NoDigest):
            del out_headers["Docker-Content-Digest"]
        status = 200
        wanted = headers.get("range")
        if wanted and kind == "blobs" and not isinstance(fault, IgnoreRange):
            m = _RANGE_RE.match(wanted.strip())
            if not m:
                self._error(h, method, 416, "RANGE_INVALID", f"bad range {wanted!r}",
                            {"Content-Range": f"bytes */{len(data)}"})
                return
            first = int(m.group(1))
            last = int(m.group(2)) if m.group(2) else len(data) - 1
            if first >= len(data) or last < first:
                self._error(h, method, 416, "RANGE_INVALID", f"range {wanted!r} not satisfiable",
                            {"Content-Range": f"bytes */{len(data)}"})
                return
            last = min(last, len(data) - 1)
            out_headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
            data = data[first:last + 1]
            status = 206
        if isinstance(fault, Truncate):
            self._send(h, method, status, data, out_headers, cut_after=fault.after)
        elif isinstance(fault, Reset):
            self._send(h, method, status, data, out_headers, cut_after=fault.after)
            h.close_connection = True
            sock = socket.socket(fileno=h.connection.detach())  # the handler's own close is now a no-op
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # linger 0: the kernel answers with RST, never a FIN
        elif isinstance(fault, Stall):
            self._send(h, method, status, data, out_headers, cut_after=fault.after)
            fault.event.wait(fault.timeout)
        elif isinstance(fault, Trickle):
            self._send(h, method, status, data, out_headers, cut_after=0)
            try:
                for i in range(len(data)):
                    h.wfile.write(data[i:i + 1])
                    h.wfile.flush()
                    if fault.event.wait(fault.every):
                        break
            except OSError:
                pass  # the client gave up on us
        elif isinstance(fault, NoLength):
            self._send(h, method, status, data, out_headers, with_length=False)
        else:
            self._send(h, method, status, data, out_headers)

    def _bearer_ok(self, path: str, authorization: str | None) -> bool:
        if not authorization or not authorization.startswith("Bearer "):
            return False
        value = authorization[len("Bearer "):]
        with self._lock:
            token = next((t for t in self.tokens if t.value == value), None)
        if token is None or token.revoked:
            return False
        if path.startswith(f"/v2/{self.repository}/"):
            return token.scope.startswith(f"repository:{self.repository}:")
        return True

    def _issue_token(self, h: _Handler, method: str, headers: dict[str, str]) -> None:
        assert self._bearer is not None
        query = parse_qs(urlsplit(h.path).query)
        authorization = headers.get("authorization")
        if self._bearer["basic"] is not None and authorization != self._bearer["basic"]:
            self._error(h, method, 401, "UNAUTHORIZED", "bad credentials for the token service")
            return
        with self._lock:
            token = Token(f"token-{len(self.tokens) + 1}", query.get("scope", [""])[0],
                          query.get("service", [""])[0], authorization)
            self.tokens.append(token)
        body = {"token": token.value}
        if self._bearer["expires_in"] is not None:
            body["expires_in"] = self._bearer["expires_in"]
        self._send(h, method, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _error(self, h: _Handler, method: str, status: int, code: str, message: str,
               headers: dict[str, str] | None = None) -> None:
        body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
        self._send(h, method, status, body, {"Content-Type": "application/json", **(headers or {})})

    @staticmethod
    def _send(h: _Handler, method: str, status: int, body: bytes, headers: dict[str, str],
              cut_after: int | None = None, with_length: bool = True) -> None:
        h.send_response(status)
        for name, value in headers.items():
            h.send_header(name, value)
        if with_length:
            h.send_header("Content-Length", str(len(body)))
        else:
            h.send_header("Connection", "close")
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(body if cut_after is None else body[:cut_after])
        h.wfile.flush()
        if cut_after is not None or not with_length:
            h.close_connection = True
