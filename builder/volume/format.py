"""The snapshot volume format and its reader.

A volume packs an image cache (manifests, indexes, configs, layers) into a single
file, so that registry pulls served from it verify against the original digests. A
reader finds any blob by reading the trailer and the index only.

File format, version 1 (all integers big-endian)::

    0             header, 64 bytes
                    magic     6s  b"IMCVOL"
                    version   H   1
                    created   Q   creation time, Unix seconds, UTC
                    capacity  Q   the declared capacity in bytes: a recorded number,
                                  never preallocated (the file is as big as its content)
                    reserved  40 zero bytes
    64            blob data, back to back without padding, in one of two encodings:
                    raw   the original bytes, for already-compressed layers (gzip, zstd
                          layer media types): a server can sendfile() them as they are
                    zstd  independent zstd frames of 4 MiB of original bytes each (the
                          last one shorter), each with its content size and checksum,
                          so a byte range is served by decompressing only the frames
                          it touches; used for everything else
    index_offset  the index: UTF-8 JSON, zstd-compressed when the trailer says so
                    {"imcVolume": 1, "created": "2026-05-09T12:00:00Z",
                     "capacity": N, "chunkSize": 4194304,
                     "meta": {...the caller's dict: cache name, id, images...},
                     "blobs": [{"digest": "sha256:...", "size": N,
                                "mediaType": "...", "encoding": "raw" | "zstd",
                                "offset": N, "length": N,
                                "chunks": [[uoff, soff, slen], ...]}, ...]}
                  ``offset``/``length`` locate a blob's stored bytes in the file; each
                  chunk (zstd only) is a frame: ``uoff`` its start in the original
                  bytes, ``soff`` its start relative to the blob's ``offset``, ``slen``
                  its stored length
    size - 64     trailer, 64 bytes
                    index_offset    Q
                    index_length    Q
                    index_encoding  B   0 plain JSON, 1 zstd
                    reserved        7 zero bytes
                    index_sha256    32s of the index bytes as stored
                    magic           6s  b"IMCVOL"
                    version         H   1

The packer that writes this format is ``builder.volume.packer``.
"""

from __future__ import annotations

import bisect
import datetime
import hashlib
import io
import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import zstandard

from builder.digest import Digest, Verifier
from builder.errors import BadReferenceError, DigestMismatchError, NotFoundLocalError, StoreError, ValidationError
from builder.store import pread_exact

MAGIC = b"IMCVOL"
VERSION = 1
CHUNK_SIZE = 4 << 20
"""Original bytes per zstd frame: small enough that a range request decompresses
little it does not send, large enough that the frame overhead is negligible."""
RAW = "raw"
ZSTD = "zstd"

HEADER = struct.Struct(">6sHQQ40x")
TRAILER = struct.Struct(">QQB7x32s6sH")
INDEX_JSON, INDEX_ZSTD = 0, 1
_READ_CHUNK = 1 << 20  # raw range reads
_MAX_INDEX = 256 << 20  # refuse to decompress an index bigger than this: it is damage

# -- public types --------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeEntry:
    """Where one blob lives in a volume and how it is encoded.

    ``chunks`` (zstd only) lists each frame as (original offset, stored offset relative
    to ``offset``, stored length), which is what serving a byte range needs.
    """

    digest: Digest
    size: int
    media_type: str
    encoding: str
    offset: int
    length: int
    chunks: tuple[tuple[int, int, int], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The entry as the index stores it."""
        out: dict[str, Any] = {"digest": str(self.digest), "size": self.size, "mediaType": self.media_type,
                               "encoding": self.encoding, "offset": self.offset, "length": self.length}
        if self.encoding == ZSTD:
            out["chunks"] = [list(c) for c in self.chunks]
        return out


@dataclass
class PackProgress:
    """Counts reported while packing (and verifying): blobs and original bytes done."""

    blobs_done: int
    blobs_total: int
    bytes_done: int
    bytes_total: int


@dataclass
class VolumeVerifyReport:
    """What ``Volume.verify`` found: blobs rehashed, and the digests whose bytes are wrong."""

    checked: int = 0
    bytes: int = 0
    corrupt: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.corrupt


ProgressCallback = Callable[[PackProgress], None]


# -- reading -------------------------------------------------------------------------


def iso_time(seconds: int) -> str:
    """Unix seconds as the index's UTC timestamp."""
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Volume:
    """An open snapshot volume: its index in memory, blob bytes read on demand.

    Reads open the file per call (or per ``open_blob`` reader), so one ``Volume`` can
    serve many threads at once and needs no closing.
    """

    def __init__(self, path: Path, capacity: int, created: str, meta: dict,
                 entries: dict[Digest, VolumeEntry]) -> None:
        self.path = path
        self.capacity = capacity
        self.created = created
        self.meta = meta
        self.entries = entries

    # -- opening -------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path) -> Volume:
        """Read and check the header, trailer and index; the blob data is not read.

        Raises ``StoreError("volume X is damaged: …")`` for anything that does not
        hold together, and ``StoreError`` when the file cannot be read at all.
        """
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise StoreError(f"volume {path} cannot be read: {e.strerror}") from None
        try:
            return cls._load(path, fd)
        except OSError as e:
            raise StoreError(f"volume {path} cannot be read: {e.strerror}") from None
        finally:
            os.close(fd)

    @classmethod
    def _load(cls, path: Path, fd: int) -> Volume:
        def damaged(why: str) -> StoreError:
            return StoreError(f"volume {path} is damaged: {why}")

        size = os.fstat(fd).st_size
        if size < HEADER.size + TRAILER.size:
            raise damaged(f"{size} bytes is too short for a volume")
        header = pread_exact(fd, 0, HEADER.size, f"volume {path} is damaged")
        magic, version, created_s, capacity = HEADER.unpack(header)
        if magic != MAGIC:
            raise damaged("not an imc volume (bad magic)")
        if version != VERSION:
            raise StoreError(f"volume {path} has format version {version}; this imc reads version {VERSION}")
        trailer = pread_exact(fd, size - TRAILER.size, TRAILER.size, f"volume {path} is damaged")
        index_offset, index_length, encoding, index_sha, tmagic, tversion = TRAILER.unpack(trailer)
        if tmagic != MAGIC or tversion != VERSION:
            raise damaged("no trailer at the end (truncated, or still being written)")
        if index_offset < HEADER.size or index_offset + index_length != size - TRAILER.size:
            raise damaged("the trailer points outside the file")
        raw = pread_exact(fd, index_offset, index_length, f"volume {path} is damaged")
        if hashlib.sha256(raw).digest() != index_sha:
            raise damaged("the index checksum does not match")
        try:
            if encoding == INDEX_ZSTD:
                raw = zstandard.ZstdDecompressor().decompress(raw, max_output_size=_MAX_INDEX)
            elif encoding != INDEX_JSON:
                raise damaged(f"unknown index encoding {encoding}")
            doc = json.loads(raw)
        except (zstandard.ZstdError, ValueError) as e:
            raise damaged(f"the index does not parse: {e}") from None
        try:
            entries = cls._parse_index(doc, index_offset, created_s, capacity)
        except (KeyError, TypeError, ValueError, BadReferenceError) as e:
            raise damaged(f"malformed index: {e}") from None
        return cls(path, capacity, doc["created"], doc["meta"], entries)

    @staticmethod
    def _parse_index(doc: Any, data_end: int, created_s: int, capacity: int) -> dict[Digest, VolumeEntry]:
        """Every entry, checked to lie inside the data area and to chain its chunks."""
        if not isinstance(doc, dict) or doc.get("imcVolume") != VERSION:
            raise ValueError("not a version 1 index")
        if doc.get("created") != iso_time(created_s) or doc.get("capacity") != capacity:
            raise ValueError("header and index disagree")
        if not isinstance(doc.get("meta"), dict):
            raise TypeError("meta is not an object")
        chunk_size = doc.get("chunkSize")
        if chunk_size != CHUNK_SIZE:
            raise ValueError(f"chunk size {chunk_size!r}, this imc reads {CHUNK_SIZE}")
        entries: dict[Digest, VolumeEntry] = {}
        for obj in doc["blobs"]:
            digest = Digest.parse(obj["digest"])
            size, offset, length = int(obj["size"]), int(obj["offset"]), int(obj["length"])
            encoding = obj["encoding"]
            if size < 0 or offset < HEADER.size or length < 0 or offset + length > data_end:
                raise ValueError(f"blob {digest} lies outside the data area")
            chunks: tuple[tuple[int, int, int], ...] = ()
            if encoding == RAW:
                if length != size:
                    raise ValueError(f"raw blob {digest} has {length} stored bytes for {size}")
            elif encoding == ZSTD:
                chunks = tuple((int(u), int(s), int(n)) for u, s, n in obj["chunks"])
                want_u = want_s = 0
                for u, s, n in chunks:
                    if u != want_u or s != want_s or n <= 0:
                        raise ValueError(f"blob {digest} has a broken chunk table")
                    want_u, want_s = u + chunk_size, s + n
                if want_s != length or not (want_u - chunk_size < size <= want_u or (size == 0 and not chunks)):
                    raise ValueError(f"blob {digest} has a broken chunk table")
            else:
                raise ValueError(f"blob {digest} has unknown encoding {encoding!r}")
            entries[digest] = VolumeEntry(digest, size, str(obj.get("mediaType", "")), encoding, offset, length,
                                          chunks)
        return entries

    # -- lookups -------------------------------------------------------------------

    def has(self, digest: Digest) -> bool:
        """True when the volume holds the blob."""
        return digest in self.entries

    def entry(self, digest: Digest) -> VolumeEntry:
        """The blob's index entry; ``NotFoundLocalError`` if the volume does not hold it."""
        try:
            return self.entries[digest]
        except KeyError:
            raise NotFoundLocalError(f"blob {digest} is not in volume {self.path.name}") from None

    @property
    def content_bytes(self) -> int:
        """The volume file's size: what it takes on disk (capacity is not preallocated)."""
        try:
            return os.stat(self.path).st_size
        except OSError as e:
            raise StoreError(f"volume {self.path} cannot be read: {e.strerror}") from None

    @property
    def blob_bytes(self) -> int:
        """The sum of the blobs' original sizes."""
        return sum(e.size for e in self.entries.values())

    def raw_extent(self, digest: Digest) -> tuple[int, int] | None:
        """(file offset, length) of a raw blob's bytes, for ``os.sendfile``; None for zstd."""
        e = self.entry(digest)
        return (e.offset, e.length) if e.encoding == RAW else None

    # -- reading -------------------------------------------------------------------

    def _open_fd(self) -> int:
        try:
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise StoreError(f"volume {self.path} cannot be read: {e.strerror}") from None

    def _frame(self, fd: int, e: VolumeEntry, i: int) -> bytes:
        """Chunk ``i`` of a zstd blob, decompressed and checked against the chunk table."""
        u, s, n = e.chunks[i]
        want = min(CHUNK_SIZE, e.size - u)
        what = f"volume {self.path} is damaged: blob {e.digest} chunk {i}"
        frame = pread_exact(fd, e.offset + s, n, what)
        try:
            data = zstandard.ZstdDecompressor().decompress(frame, max_output_size=CHUNK_SIZE)
        except zstandard.ZstdError as err:
            raise StoreError(f"{what} does not decompress: {err}") from None
        if len(data) != want:
            raise StoreError(f"{what} holds {len(data)} bytes, not {want}")
        return data

    def _ranges(self, fd: int, e: VolumeEntry, start: int, end: int) -> Iterator[bytes]:
        """Original bytes [start, end) of an entry, reading only what they need."""
        if e.encoding == RAW:
            pos = start
            while pos < end:
                n = min(_READ_CHUNK, end - pos)
                yield pread_exact(fd, e.offset + pos, n, f"volume {self.path} is damaged: blob {e.digest}")
                pos += n
            return
        i = bisect.bisect_right(e.chunks, (start, 1 << 62, 0)) - 1
        while start < end:
            data = self._frame(fd, e, i)
            u = e.chunks[i][0]
            piece = data[start - u:min(end - u, len(data))]
            yield piece
            start += len(piece)
            i += 1

    def read_range(self, digest: Digest, start: int, end: int) -> Iterator[bytes]:
        """The blob's original bytes [start, end), in pieces, decompressing only the
        frames the range touches (what an HTTP Range request needs)."""
        e = self.entry(digest)
        if not 0 <= start <= end <= e.size:
            raise ValidationError(f"range [{start}, {end}) is outside blob {digest} of {e.size} bytes")
        return self._range_iter(e, start, end)

    def _range_iter(self, e: VolumeEntry, start: int, end: int) -> Iterator[bytes]:
        fd = self._open_fd()
        try:
            yield from self._ranges(fd, e, start, end)
        except OSError as err:
            raise StoreError(f"volume {self.path} cannot be read: {err.strerror}") from None
        finally:
            os.close(fd)

    def read_bytes(self, digest: Digest) -> bytes:
        """A whole blob's original bytes; meant for small ones (manifests, configs)."""
        e = self.entry(digest)
        return b"".join(self._range_iter(e, 0, e.size))

    def open_blob(self, digest: Digest) -> BinaryIO:
        """A seekable file object streaming the blob's original bytes (zstd frames are
        decompressed as reading reaches them); close it when done."""
        e = self.entry(digest)
        return cast(BinaryIO, io.BufferedReader(_BlobReader(self, e, self._open_fd()), buffer_size=1 << 20))

    def verify(self, on_progress: ProgressCallback | None = None) -> VolumeVerifyReport:
        """Rehash every blob's original bytes; report (never raise for) corrupt ones.

        A blob is corrupt when its bytes do not hash to its digest, or when its
        frames no longer decompress.
        """
        report = VolumeVerifyReport()
        total = self.blob_bytes
        done_bytes = 0
        fd = self._open_fd()
        try:
            for n, e in enumerate(self.entries.values()):
                verifier = Verifier(e.digest, e.size)
                try:
                    for piece in self._ranges(fd, e, 0, e.size):
                        verifier.update(piece)
                        done_bytes += len(piece)
                        if on_progress:
                            on_progress(PackProgress(n, len(self.entries), done_bytes, total))
                    good = verifier.matches()
                except (StoreError, DigestMismatchError, OSError):
                    good = False
                report.checked += 1
                report.bytes += e.size
                if not good:
                    report.corrupt.append(str(e.digest))
                if on_progress:
                    on_progress(PackProgress(n + 1, len(self.entries), report.bytes, total))
        finally:
            os.close(fd)
        return report


class _BlobReader(io.RawIOBase):
    """One blob's original bytes as a seekable raw stream over its own descriptor."""

    def __init__(self, volume: Volume, entry: VolumeEntry, fd: int) -> None:
        super().__init__()
        self._volume = volume
        self._entry = entry
        self._fd = fd
        self._pos = 0
        self._cached: tuple[int, bytes] | None = None  # (chunk number, decompressed bytes)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._entry.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, b: Any) -> int:
        e = self._entry
        n = min(len(b), e.size - self._pos)
        if n <= 0:
            return 0
        view = memoryview(b).cast("B")
        if e.encoding == RAW:
            got = os.preadv(self._fd, [view[:n]], e.offset + self._pos)
            if got <= 0:
                raise StoreError(f"volume {self._volume.path} is damaged: blob {e.digest} is truncated")
        else:
            i = self._pos // CHUNK_SIZE
            if self._cached is None or self._cached[0] != i:
                self._cached = (i, self._volume._frame(self._fd, e, i))
            data = self._cached[1]
            start = self._pos - i * CHUNK_SIZE
            got = min(n, len(data) - start)
            view[:got] = data[start:start + got]
        self._pos += got
        return got

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
            self._cached = None
        super().close()
