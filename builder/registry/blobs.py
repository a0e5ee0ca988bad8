"""Blobs: streamed into a sink with resume, and asked about with HEAD.

A download that loses its connection goes on with ``Range`` from the bytes the sink
already holds; a server that ignores Range makes the sink start over. The sink hashes:
this module only guarantees that exactly ``size`` bytes were delivered in order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from builder.digest import Digest
from builder.errors import DigestMismatchError, NotFoundError, RegistryError, TransportError
from builder.registry.transport import READ_ERRORS, RegistryTransport

CHUNK = 1 << 20


class BlobSink(Protocol):
    """Where a blob's bytes go: the store's ingest file, which hashes as it writes."""

    @property
    def offset(self) -> int:
        """Bytes already held, from which a download resumes."""

    def write(self, data: memoryview | bytes) -> None:
        """Append bytes."""

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
        raw = resp.raw
        # Whole CHUNKs are read with read(), which fills them in C: fast, but a
        # connection that stalls or dies mid-chunk loses that chunk's bytes, so a
        # resume refetches at most CHUNK. A tail shorter than CHUNK (and so any small
        # blob) is read with read1, which hands over what has arrived: nothing is lost.
        # read1 costs a Python call per TLS record, too slow for the bulk of a layer.
        read1 = getattr(raw, "read1", None) or raw.read

        def receive(n: int) -> bytes:
            try:
                return raw.read(n, decode_content=False) if n >= CHUNK else read1(n, decode_content=False)
            except READ_ERRORS as e:
                raise TransportError(f"{endpoint}: connection lost during blob {digest.short} at "
                                     f"{sink.offset} of {size} bytes ({type(e).__name__})") from None

        while sink.offset < size:
            transport.retrier.check_deadline(f"{endpoint}: blob {digest.short} at {sink.offset} of {size} bytes")
            chunk = receive(min(CHUNK, size - sink.offset))
            if not chunk:
                break
            sink.write(chunk)  # an OSError here is the local disk's (full?): the store reports it
            if on_bytes:
                on_bytes(len(chunk))
        if sink.offset == size and receive(1):
            raise DigestMismatchError(f"blob {digest}: registry sent more than the {size} bytes "
                                      "its descriptor declares")
    if sink.offset < size:
        raise TransportError(f"{endpoint}: blob {digest.short} truncated at {sink.offset} of {size} bytes")


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
