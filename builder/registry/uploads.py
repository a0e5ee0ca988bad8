"""Blob uploads: monolithic (POST, then PUT with the bytes) or chunked (PATCH with
``Content-Range``), each going on after a dropped connection.

A chunked upload that loses its connection asks the registry where the session stands
(GET on the upload URL answers ``Range: 0-N``) and goes on from there; a registry that
forgot or cancelled the session (registry:2 cancels one whose PATCH was cut mid-body:
its upload URL carries the offset in a signed ``_state``, which no longer matches) gets
a new session for that blob. We do not use oras-py for this: its single token is reused
across repositories and never refreshed, and its session is not thread-safe.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from urllib.parse import urlencode, urlsplit

from builder.digest import Digest
from builder.errors import (
    AuthError,
    DigestMismatchError,
    NotFoundError,
    RegistryError,
    StoreError,
    TLSError,
    TransportError,
)
from builder.registry import blobs
from builder.registry.transport import RegistryTransport

log = logging.getLogger(__name__)

UPLOAD_CHUNK = 16 << 20
"""Bytes per PATCH of a chunked upload: what a registry that keeps sessions loses at
most when a connection drops, against one round trip per chunk."""


def _recoverable(error: Exception) -> bool:
    """Whether an upload may go on after ``error``: a dropped connection, a temporary
    answer, or the registry refusing the session's state (unknown session, wrong
    range, bytes that did not hash to the digest) - never TLS or auth."""
    if isinstance(error, TLSError | AuthError):
        return False
    if isinstance(error, TransportError):
        return error.temporary
    if isinstance(error, DigestMismatchError):
        return True
    return isinstance(error, RegistryError) and (error.temporary or error.status in (400, 404, 416))


def _start(transport: RegistryTransport, repository: str) -> str:
    """POST a new upload session; its URL."""
    resp = transport.request("POST", f"/v2/{repository}/blobs/uploads/", repository)
    resp.close()
    if resp.status_code != 202:
        raise RegistryError(f"{transport.endpoint}: starting an upload to {repository} answered "
                            f"{resp.status_code}", resp.status_code)
    return transport.location(resp, "starting an upload")


def _with_digest(location: str, digest: Digest) -> str:
    parts = urlsplit(location)
    query = f"{parts.query}&" if parts.query else ""
    return parts._replace(query=query + urlencode({"digest": str(digest)})).geturl()


def _finish(transport: RegistryTransport, repository: str, location: str, digest: Digest,
            data: bytes | None) -> None:
    """PUT ``?digest=`` (with the last bytes, or none): the registry checks the digest
    and the blob exists from then on."""
    resp = transport.request("PUT", _with_digest(location, digest), repository,
                             {"Content-Type": "application/octet-stream"},
                             data=data if data is not None else b"", retry=False)
    resp.close()
    if resp.status_code not in (201, 204):
        raise RegistryError(f"{transport.endpoint}: completing blob {digest.short} answered {resp.status_code}",
                            resp.status_code)
    claimed = resp.headers.get("Docker-Content-Digest")
    if claimed and claimed.strip() != str(digest):
        raise DigestMismatchError(f"{transport.endpoint}: blob {digest.short} was stored as {claimed}")


def upload(transport: RegistryTransport, repository: str, digest: Digest, data: bytes) -> None:
    """A monolithic upload: for blobs small enough that sending them again costs less
    than a round trip per chunk."""
    lost = False

    def attempt(timeout: tuple[float, float]) -> None:
        nonlocal lost
        if lost and blobs.exists(transport, repository, digest):
            return  # the PUT landed; only its answer was lost
        lost = True
        _finish(transport, repository, _start(transport, repository), digest, data)

    transport.retrier.run(attempt, retryable=_recoverable)


def status(transport: RegistryTransport, location: str, repository: str) -> tuple[str, int]:
    """Where an upload session stands: its (fresh) URL and how many bytes it holds.

    The registry answers ``Range: 0-N`` for N+1 bytes; registry:2 also answers
    ``0-0`` for an empty session, so ``0-0`` is read as 0 and a PATCH at 0 that
    the registry refuses (416) starts a new session instead.
    """
    resp = transport.request("GET", location, repository)
    resp.close()
    text = resp.headers.get("Range", "").strip()
    start, sep, end = text.removeprefix("bytes=").partition("-")
    if not 200 <= resp.status_code < 300 or not sep or start != "0" or not end.isdigit():
        raise RegistryError(f"{transport.endpoint}: upload status answered {resp.status_code} with Range {text!r}",
                            resp.status_code)
    offset = int(end) + 1 if int(end) > 0 else 0
    return transport.location(resp, "upload status") if resp.headers.get("Location") else location, offset


class _ChunkedUpload:
    """The state of one chunked upload across its tries: the session, how far it got."""

    def __init__(self, transport: RegistryTransport, repository: str, digest: Digest, size: int,
                 read: Callable[[int, int], bytes], chunk_size: int, on_bytes: Callable[[int], None] | None) -> None:
        self.transport, self.repository, self.digest, self.size = transport, repository, digest, size
        self.read, self.chunk_size, self.on_bytes = read, chunk_size, on_bytes
        self.sent = self.offset = self.reached = 0
        self.location: str | None = None
        self.failed: Exception | None = None  # the last failure, until recovered from
        self.finishing = False

    def attempt(self, timeout: tuple[float, float]) -> int:
        try:
            return self._go_on(timeout)
        except Exception as e:
            self.failed = self.failed or e
            raise

    def _go_on(self, timeout: tuple[float, float]) -> int:
        transport, repository, digest, size = self.transport, self.repository, self.digest, self.size
        if self.failed is not None:
            if self.finishing and blobs.exists(transport, repository, digest):
                return self.sent  # the final PUT landed; only its answer was lost
            before = self.offset
            self.location, self.offset = self._resume_point(self.failed)
            self.failed = None
            if self.on_bytes and self.offset != before:
                self.on_bytes(self.offset - before)
            log.info("%s: upload of %s goes on at %d of %d bytes", transport.endpoint, digest.short, self.offset, size)
        if self.location is None:
            self.location = _start(transport, repository)
        self.finishing = False
        while self.offset < size:
            n = min(self.chunk_size, size - self.offset)
            data = self.read(self.offset, n)
            if len(data) != n:
                raise StoreError(f"blob {digest.short}: the source ended at {self.offset + len(data)} of "
                                 f"{size} bytes")
            self.sent += n
            resp = transport.send("PATCH", self.location, repository, {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{self.offset}-{self.offset + n - 1}",
            }, data=data, timeout=timeout)
            resp.close()
            if resp.status_code != 202:
                raise RegistryError(f"{transport.endpoint}: PATCH of blob {digest.short} answered "
                                    f"{resp.status_code}", resp.status_code, temporary=True)
            self.location = transport.location(resp, "PATCH")
            self.offset += n
            self.reached = max(self.reached, self.offset)  # new ground, not bytes sent again after a restart
            if self.on_bytes:
                self.on_bytes(n)
        self.finishing = True
        _finish(transport, repository, self.location, digest, None)
        return self.sent

    def _resume_point(self, error: Exception) -> tuple[str, int]:
        """Where to go on after a failure: the session's own offset if the registry still
        has it, else a new session from 0."""
        rejected = isinstance(error, DigestMismatchError) or (
            isinstance(error, RegistryError) and error.status in (400, 416))
        if self.location is not None and not rejected:
            try:
                return status(self.transport, self.location, self.repository)
            except NotFoundError:
                pass  # the registry forgot or cancelled the session
            except RegistryError as e:
                if isinstance(e, AuthError) or e.temporary:
                    raise
        return _start(self.transport, self.repository), 0


def upload_chunked(
    transport: RegistryTransport, repository: str, digest: Digest, size: int, read: Callable[[int, int], bytes],
    chunk_size: int = UPLOAD_CHUNK, on_bytes: Callable[[int], None] | None = None,
) -> int:
    """Upload ``size`` bytes (``read(offset, n)`` supplies them) in PATCH chunks.

    After a dropped connection or a temporary error, the registry is asked where the
    session stands and the upload goes on from that offset; a session the registry no
    longer knows, or one whose bytes it rejected at the end, is replaced by a new one
    for this blob. Gives up after the retrier's attempts in a row without reaching
    further into the blob than before. Returns the bytes sent (resends included).
    ``on_bytes`` hears each chunk accepted, and a negative count when a session is
    abandoned."""
    state = _ChunkedUpload(transport, repository, digest, size, read, chunk_size, on_bytes)
    return transport.retrier.run(state.attempt, retryable=_recoverable, progress=lambda: state.reached)
