"""Blobs: streamed into a sink with resume, and asked about with HEAD.

A download that loses its connection goes on with ``Range`` from the bytes the sink
already holds; a server that ignores Range makes the sink start over. The sink hashes:
this module only guarantees that exactly ``size`` bytes were delivered in order.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import Any, Protocol

import requests

from builder.digest import Digest
from builder.errors import DeadlineError, DigestMismatchError, ImcError, NotFoundError, RegistryError, TransportError
from builder.registry.transport import READ_ERRORS, RegistryTransport

CHUNK = 1 << 20
HANDOVER_WAIT_MS = 50
"""How long a partly filled buffer waits for more bytes before it goes to the sink."""


class BlobSink(Protocol):
    """Where a blob's bytes go: the store's ingest file, which hashes as it writes."""

    @property
    def offset(self) -> int:
        """Bytes already held, from which a download resumes."""

    def receive(self, read: Callable[[memoryview], int]) -> int:
        """Lend ``read`` a buffer to fill, then take the bytes it reports (0: the end)."""

    def reset(self) -> None:
        """Drop what is held: the server would not resume, so start again."""


def fetch(
    transport: RegistryTransport, repository: str, digest: Digest, size: int, sink: BlobSink,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Stream a blob into ``sink``, resuming with Range after a dropped connection.

    Retries go on while bytes arrive; the retrier stops them after a stall (no byte
    for its ``stall`` limit), too many failures without progress, or the deadline.
    """
    transport.retrier.run(
        lambda timeout: _stream(transport, repository, digest, size, sink, on_bytes, timeout),
        progress=lambda: sink.offset,
    )


def _stream(transport: RegistryTransport, repository: str, digest: Digest, size: int, sink: BlobSink,
            on_bytes: Callable[[int], None] | None, timeout: tuple[float, float]) -> None:
    if sink.offset >= size:
        return  # already complete (an earlier run stopped before commit): a Range would get 416
    headers = {"Range": f"bytes={sink.offset}-"} if sink.offset else {}
    endpoint = transport.endpoint
    try:
        resp = transport.send("GET", f"/v2/{repository}/blobs/{digest}", repository, headers, stream=True,
                              timeout=timeout)
    except TransportError as e:
        if type(e) is not TransportError or not sink.offset:
            raise
        # A resumed download whose answer never came: say which blob stalled, and where,
        # whichever attempt happens to be the last one before the stall limit.
        raise TransportError(f"{endpoint}: connection lost during blob {digest.short} at {sink.offset} of "
                             f"{size} bytes ({e.message})", temporary=e.temporary) from None
    with resp:
        if sink.offset and resp.status_code != 206:
            if on_bytes:
                on_bytes(-sink.offset)
            sink.reset()
        elif resp.status_code == 206 and not resp.headers.get("Content-Range", "").startswith(
                f"bytes {sink.offset}-"):
            if on_bytes:
                on_bytes(-sink.offset)
            sink.reset()
            raise TransportError(f"{endpoint}: blob {digest.short} resumed at the wrong offset")
        body = _Body(resp, size - sink.offset, transport,
                     lambda got: f"blob {digest.short} at {sink.offset + got} of {size} bytes")
        while sink.offset < size:
            n = sink.receive(body.fill)  # an OSError here is the local disk's (full?): the store reports it
            if n and on_bytes:
                on_bytes(n)
            body.raise_pending()
            if not n:
                break
        if sink.offset == size and body.more():
            raise DigestMismatchError(f"blob {digest}: registry sent more than the {size} bytes "
                                      "its descriptor declares")
    if sink.offset < size:
        raise TransportError(f"{endpoint}: blob {digest.short} truncated at {sink.offset} of {size} bytes")


class _Body:
    """A blob response's bytes, read straight into the buffers a sink lends.

    ``fill`` keeps reading while bytes keep coming, until the buffer is full: over
    TLS each read returns one 16 KiB record, and a sink that gets whole MiBs writes
    and hashes them with one call each. When none come for ``HANDOVER_WAIT_MS``, it
    returns what it has, so a paused download's bytes are on disk. A body with a Content-Length is read from the socket straight into
    the sink's buffer, with no copy on the way (urllib3 and http.client would make
    two); other bodies (chunked) go through urllib3. If the connection fails or the
    deadline passes mid-buffer, ``fill`` returns what arrived and the error waits in
    ``raise_pending``, so no received byte is lost to a resume.
    """

    def __init__(self, resp: requests.Response, expected: int, transport: RegistryTransport,
                 where: Callable[[int], str]) -> None:
        self._transport = transport
        self._where = where
        self._pending: ImcError | None = None
        conn = getattr(resp.raw, "_fp", None)  # the http.client response under urllib3's
        reader = getattr(conn, "fp", None)
        length = getattr(conn, "length", None)
        if reader is not None and not getattr(conn, "chunked", True) and isinstance(length, int) and length >= 0:
            self._reader = reader
            self._readinto = self._first_readinto
            self._left = length  # what the Content-Length still promises; reads never go past it
        else:
            self._readinto = self._urllib3_readinto(resp.raw)
            self._left = -1
        self._expected = expected
        # Bytes held in a buffer are handed over as soon as no more are coming, so a
        # pause (or a kill) finds them in the partial file; poll says when that is.
        self._poll: select.poll | None = None
        try:
            fd = resp.raw.fileno()
        except (OSError, ValueError, AttributeError):
            fd = -1
        if fd >= 0:
            self._poll = select.poll()
            self._poll.register(fd, select.POLLIN)

    def _first_readinto(self, view: memoryview) -> int:
        # What arrived with the headers waits in the reader's buffer: read1 returns it
        # (or, if there is none, makes one read), and leaves that buffer empty for good,
        # so every later read goes straight from the socket into the sink's buffer.
        data = self._reader.read1(len(view))
        view[:len(data)] = data
        self._readinto = self._reader.raw.readinto
        return len(data)

    @staticmethod
    def _urllib3_readinto(raw: Any) -> Callable[[memoryview], int]:
        def readinto(view: memoryview) -> int:
            data = raw.read1(len(view), decode_content=False)
            view[:len(data)] = data
            return len(data)
        return readinto

    def fill(self, view: memoryview) -> int:
        want = min(len(view), self._expected)
        if self._left >= 0:
            want = min(want, self._left)
        got = 0
        deadline = self._transport.retrier.policy.deadline
        try:
            while got < want:
                if deadline is not None:
                    self._transport.retrier.check_deadline(f"{self._transport.endpoint}: {self._where(got)}")
                if got and self._poll is not None and not self._poll.poll(HANDOVER_WAIT_MS):
                    break  # nothing more within the wait: hand over what arrived
                n = self._readinto(view[got:want])
                if not n:
                    break
                got += n
        except READ_ERRORS as e:
            self._pending = TransportError(f"{self._transport.endpoint}: connection lost during {self._where(got)} "
                                           f"({type(e).__name__})")
        except DeadlineError as e:
            self._pending = e
        if got == 0 and self._pending is not None:
            self.raise_pending()
        self._expected -= got
        if self._left >= 0:
            self._left -= got
        return got

    def raise_pending(self) -> None:
        """Raise the error that ended the last fill early, if one did."""
        pending, self._pending = self._pending, None
        if pending is not None:
            raise pending from None

    def more(self) -> bool:
        """True when the response holds bytes beyond the blob's size."""
        if self._left >= 0:
            return self._left > 0
        probe = memoryview(bytearray(1))
        try:
            return self._readinto(probe) > 0
        except READ_ERRORS:
            return False


def size_of(transport: RegistryTransport, repository: str, digest: Digest) -> int:
    """HEAD a blob: its size, from Content-Length (NotFoundError if absent)."""
    resp = transport.request("HEAD", f"/v2/{repository}/blobs/{digest}", repository)
    resp.close()
    length = resp.headers.get("Content-Length", "")
    if not length.isdigit():
        raise RegistryError(f"{transport.endpoint}: no Content-Length for blob {digest.short}")
    return int(length)


def exists(transport: RegistryTransport, repository: str, digest: Digest) -> bool:
    """HEAD a blob: True when the registry holds it (a push skips it then)."""
    try:
        transport.request("HEAD", f"/v2/{repository}/blobs/{digest}", repository).close()
    except NotFoundError:
        return False
    return True
