"""Chunked uploads against a scripted registry that keeps its sessions server-side.

registry:2 cancels a session whose PATCH was cut mid-body (the integration tests cover
that: the part goes again). A registry that keeps sessions lets the upload go on from
the offset it reports (``GET`` on the upload URL, ``Range: 0-N``); that path needs a
server that keeps the bytes of the cut PATCH, which this one does.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from builder.digest import Digest
from builder.registry import uploads
from builder.registry.client import Registry
from builder.registry.hosts import HostPolicy
from builder.registry.retry import RetryPolicy

FAST = RetryPolicy(attempts=4, backoff=0.001, max_backoff=0.002, timeout=(5.0, 10.0))


@dataclass
class UploadState:
    """What the scripted registry holds and what it saw."""

    sessions: dict[str, bytearray] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    patches: list[tuple[int, int]] = field(default_factory=list)  # (start from Content-Range, bytes read)
    status_queries: int = 0
    drop_patch: int | None = None  # the n-th PATCH (1-based) is cut ...
    drop_after: int = 0  # ... after this many body bytes, which the session keeps
    forget_on_status: bool = False  # answer 404 to a status query, as a registry that lost the session
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _session(self) -> tuple[str | None, bytearray | None]:
        m = re.match(r"^/v2/r/blobs/uploads/([0-9a-f-]+)$", urlsplit(self.path).path)
        sid = m.group(1) if m else None
        return sid, self.server.state.sessions.get(sid) if sid else None

    def _range(self, data: bytearray) -> str:
        return f"0-{max(len(data) - 1, 0)}"  # as registry:2 writes it, 0-0 for an empty session too

    def do_HEAD(self) -> None:
        digest = urlsplit(self.path).path.rsplit("/", 1)[-1]
        found = digest in self.server.state.blobs
        self._answer(200 if found else 404, {"Docker-Content-Digest": digest} if found else {})

    def do_POST(self) -> None:
        sid = str(uuid.uuid4())
        self.server.state.sessions[sid] = bytearray()
        self._answer(202, {"Location": f"/v2/r/blobs/uploads/{sid}", "Range": "0-0"})

    def do_GET(self) -> None:
        state = self.server.state
        sid, data = self._session()
        state.status_queries += 1
        if data is None or state.forget_on_status:
            self._answer(404, {"Content-Type": "application/json"}, b'{"errors":[{"code":"BLOB_UPLOAD_UNKNOWN"}]}')
            return
        self._answer(204, {"Location": f"/v2/r/blobs/uploads/{sid}", "Range": self._range(data)})

    def do_PATCH(self) -> None:
        state = self.server.state
        sid, data = self._session()
        length = int(self.headers["Content-Length"])
        start = int(self.headers["Content-Range"].split("-")[0])
        if data is None:
            self.rfile.read(length)
            self._answer(404)
            return
        if start != len(data):
            self.rfile.read(length)
            self._answer(416, {"Content-Type": "application/json"}, b'{"errors":[{"code":"RANGE_INVALID"}]}')
            return
        with state.lock:
            state.patches.append((start, length))
            cut = len(state.patches) == state.drop_patch
        if cut:
            data += self.rfile.read(state.drop_after)
            state.patches[-1] = (start, state.drop_after)
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        data += self.rfile.read(length)
        self._answer(202, {"Location": f"/v2/r/blobs/uploads/{sid}", "Range": self._range(data)})

    def do_PUT(self) -> None:
        state = self.server.state
        sid, data = self._session()
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length) if length else b""
        if data is None:
            self._answer(404)
            return
        data += body
        digest = parse_qs(urlsplit(self.path).query)["digest"][0]
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            self._answer(400, {"Content-Type": "application/json"}, b'{"errors":[{"code":"DIGEST_INVALID"}]}')
            return
        state.blobs[digest] = bytes(data)
        del state.sessions[sid]
        self._answer(201, {"Docker-Content-Digest": digest, "Location": f"/v2/r/blobs/{digest}"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = UploadState()


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def client(srv: _Server) -> Registry:
    host = f"127.0.0.1:{srv.server_address[1]}"
    return Registry(host, HostPolicy(plain_http=frozenset({host})), retry=FAST, push=True)


DATA = os.urandom(1 << 20)
DIGEST = Digest.of(DATA)
CHUNK = 256 << 10


def read(offset: int, n: int) -> bytes:
    return DATA[offset:offset + n]


def test_a_cut_patch_goes_on_from_the_offset_the_registry_reports(server: _Server) -> None:
    server.state.drop_patch, server.state.drop_after = 2, 100_000  # the session keeps 100 000 bytes of it
    sent = client(server).upload_blob_chunked("r", DIGEST, len(DATA), read, CHUNK)
    state = server.state
    assert state.blobs[str(DIGEST)] == DATA
    assert state.status_queries == 1
    # Chunk 1 whole, chunk 2 cut at 100 000, then on from exactly there: nothing sent twice.
    assert [p[0] for p in state.patches[:3]] == [0, CHUNK, CHUNK + 100_000]
    assert sum(p[1] for p in state.patches) == len(DATA)
    assert sent < len(DATA) + CHUNK


def test_a_session_the_registry_forgot_starts_this_blob_again(server: _Server) -> None:
    server.state.drop_patch, server.state.drop_after = 3, 10
    server.state.forget_on_status = True
    client(server).upload_blob_chunked("r", DIGEST, len(DATA), read, CHUNK)
    assert server.state.blobs[str(DIGEST)] == DATA
    starts = [p[0] for p in server.state.patches]
    assert starts[:3] == [0, CHUNK, 2 * CHUNK] and starts[3] == 0  # a new session, from 0


def test_a_lost_answer_to_the_final_put_is_found_by_head(server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = client(server)
    real = uploads._finish
    calls = []

    def finish_then_lose_the_answer(*args: object, **kw: object) -> None:
        calls.append(1)
        real(*args, **kw)  # type: ignore[arg-type]
        if len(calls) == 1:
            from builder.errors import TransportError
            raise TransportError("connection lost reading the answer")

    monkeypatch.setattr(uploads, "_finish", finish_then_lose_the_answer)
    registry.upload_blob_chunked("r", DIGEST, len(DATA), read, CHUNK)
    assert len(calls) == 1 and server.state.blobs[str(DIGEST)] == DATA
    assert registry.blob_exists("r", DIGEST) and not registry.blob_exists("r", Digest.of(b"other"))


def test_source_bytes_that_do_not_match_the_digest_fail_after_the_retries(server: _Server) -> None:
    wrong = Digest.of(b"something else")
    with pytest.raises(Exception) as failed:
        client(server).upload_blob_chunked("r", wrong, len(DATA), read, CHUNK)
    assert getattr(failed.value, "status", None) == 400
    assert str(wrong) not in server.state.blobs


def test_push_scope_and_monolithic_upload(server: _Server) -> None:
    registry = client(server)
    assert registry.transport.scope("team/app") == "repository:team/app:pull,push"
    assert Registry("x:1").transport.scope("team/app") == "repository:team/app:pull"
    registry.upload_blob("r", Digest.of(b"config"), b"config")
    assert server.state.blobs[str(Digest.of(b"config"))] == b"config"
