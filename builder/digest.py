"""Content digests: parsing, and hashing while bytes stream to disk.

A digest is the only name content has in imc, so it is validated strictly (the OCI
image spec's grammar, with the registered algorithms' exact hex lengths) before it is
ever used as a file name or sent to a registry.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from builder.errors import BadReferenceError, DigestMismatchError

_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"^(sha256|sha512):([a-f0-9]+)\Z")  # \Z: "$" would accept a trailing newline


@dataclass(frozen=True, order=True)
class Digest:
    """A validated ``algorithm:hex`` content digest."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``text`` or raise ``BadReferenceError`` naming what is wrong."""
        m = _DIGEST_RE.match(text)
        if not m:
            raise BadReferenceError(f"invalid digest {text!r}: want sha256:<64 hex digits>")
        algorithm, hexpart = m.groups()
        if len(hexpart) != _HEX_LENGTHS[algorithm]:
            raise BadReferenceError(
                f"invalid digest {text!r}: {algorithm} takes {_HEX_LENGTHS[algorithm]} hex digits"
            )
        return cls(algorithm, hexpart)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """The digest of ``data``."""
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        """A fresh hash object of this digest's algorithm."""
        return hashlib.new(self.algorithm)

    @property
    def short(self) -> str:
        """The first 12 hex digits, as listings show them."""
        return self.hex[:12]

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def verify_bytes(data: bytes, expected: Digest, what: str = "content") -> None:
    """Raise ``DigestMismatchError`` unless ``data`` hashes to ``expected``."""
    verifier = Verifier(expected, what=what)
    verifier.update(data)
    verifier.verify()


class Verifier:
    """The one check that content is what its digest (and size) say, for bytes that
    stream by in pieces: every download, copy and export feeds one of these, so a
    blob is judged the same way wherever it travels.

    With ``size``, a piece that would run past it raises at once: bytes beyond the
    declared size can never become the blob, and stopping early bounds what a hostile
    source can make imc write.
    """

    def __init__(self, expected: Digest, size: int | None = None, what: str | None = None) -> None:
        self.expected = expected
        self.size = size
        self.what = what or f"blob {expected}"
        self.count = 0
        self._hash = expected.hasher()
        self._pending: Future[None] | None = None

    def _take(self, n: int) -> None:
        if self.size is not None and self.count + n > self.size:
            raise DigestMismatchError(f"{self.what} is longer than its {self.size} bytes")
        self.count += n

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._take(len(data))
        self.wait()
        self._hash.update(data)

    def update_later(self, data: bytearray | memoryview) -> None:
        """Hash ``data`` on a hashing thread while the caller goes on receiving.

        The caller must leave ``data`` untouched until its next call here (or to
        ``wait``): that call returns only once these bytes are hashed. So a receiver
        that alternates two buffers always fills one while the other is hashed. The
        count (and the size check) moves at once; the digest follows in order.
        """
        self._take(len(data))
        self.wait()
        self._pending = _hashers().submit(self._hash.update, data)

    def wait(self) -> None:
        """Return once every byte handed over is hashed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def reset(self) -> None:
        """Start again from no bytes (a download restarting from the beginning)."""
        self.wait()
        self.count = 0
        self._hash = self.expected.hasher()

    def actual(self) -> Digest:
        """The digest of the bytes seen so far."""
        self.wait()
        return Digest(self.expected.algorithm, self._hash.hexdigest())

    def matches(self) -> bool:
        """True when the bytes seen are the whole content and hash to its digest."""
        return (self.size is None or self.count == self.size) and self.actual() == self.expected

    def verify(self) -> None:
        """Raise ``DigestMismatchError`` unless :meth:`matches`, naming what is wrong."""
        if self.size is not None and self.count != self.size:
            raise DigestMismatchError(f"{self.what}: got {self.count} bytes, expected {self.size}")
        actual = self.actual()
        if actual != self.expected:
            raise DigestMismatchError(f"{self.what} digest mismatch: expected {self.expected}, got {actual}")


_HASHERS: ThreadPoolExecutor | None = None
_HASHERS_LOCK = threading.Lock()


def _hashers() -> ThreadPoolExecutor:
    """The threads that hash beside the receivers: hashlib lets go of the GIL while it
    hashes a large buffer, so they run on other cores. One per core is all hashing can use."""
    global _HASHERS
    with _HASHERS_LOCK:
        if _HASHERS is None:
            _HASHERS = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1), thread_name_prefix="imc-hash")
        return _HASHERS


def hash_file(path: str, algorithm: str = "sha256", chunk: int = 1 << 20) -> tuple[Digest, int]:
    """Hash a file by streaming it; returns its digest and size."""
    h = hashlib.new(algorithm)
    size = 0
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return Digest(algorithm, h.hexdigest()), size
