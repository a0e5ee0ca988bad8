"""Snapshot volumes: one file holding every blob of a cache's images, byte-exact.

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

A volume is written under ``<name>.partial`` in the same directory, fsynced and
renamed into place only when complete; every blob's bytes are hashed as they are
copied from the store and checked against their digest. Any failure (an exception,
Ctrl-C) removes the partial file, so a volume is either complete and verified, or
absent.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime
import errno
import fcntl
import hashlib
import io
import json
import os
import queue
import re
import struct
import tarfile
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import zstandard

from builder import faults
from builder.digest import Digest
from builder.errors import (
    BadReferenceError,
    CapacityError,
    DigestMismatchError,
    NotFoundLocalError,
    StoreError,
    ValidationError,
)
from builder.oci import (
    DOCKER_CONFIG,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    layer_compression,
)
from builder.store import LAYOUT_VERSION, REF_NAME, Store, fsync_dir, open_unlinked, start_writeback, write_atomic

MAGIC = b"IMCVOL"
VERSION = 1
CHUNK_SIZE = 4 << 20
"""Original bytes per zstd frame: small enough that a range request decompresses
little it does not send, large enough that the frame overhead is negligible."""
ZSTD_LEVEL = 3
RAW = "raw"
ZSTD = "zstd"

_HEADER = struct.Struct(">6sHQQ40x")
_TRAILER = struct.Struct(">QQB7x32s6sH")
_INDEX_JSON, _INDEX_ZSTD = 0, 1
_COPY_CHUNK = 4 << 20  # raw copies: big reads, each hashed, then written by the writer thread
_COPY_BUFFERS = 3  # per raw copy: one being read and hashed, up to two queued for writing
_READ_CHUNK = 1 << 20  # raw range reads
_MAX_INDEX = 256 << 20  # refuse to decompress an index bigger than this: it is damage
_INLINE_COMPRESS = 256 << 10  # blobs this small are compressed in the calling thread
_WORKERS = max(1, min(2, os.cpu_count() or 1))
_PROGRESS_EVERY = 0.1  # seconds between progress reports while waiting for workers

_DOCKER_TO_OCI = {
    DOCKER_CONFIG: OCI_CONFIG,
    DOCKER_MANIFEST: OCI_MANIFEST,
    DOCKER_LIST: OCI_INDEX,
    "application/vnd.docker.image.rootfs.diff.tar": "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip":
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
}

# skopeo's (containers/image) rule for an OCI layout's ref.name annotation.
_REF_COMPONENT = r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*"
_REF_NAME_RE = re.compile(rf"^{_REF_COMPONENT}(?:/{_REF_COMPONENT})*\Z")


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


def _iso(seconds: int) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pread_exact(fd: int, n: int, offset: int, what: str) -> bytes:
    data = os.pread(fd, n, offset)
    while len(data) < n:
        more = os.pread(fd, n - len(data), offset + len(data))
        if not more:
            raise StoreError(f"{what}: the file ends early (truncated)")
        data += more
    return data


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
        if size < _HEADER.size + _TRAILER.size:
            raise damaged(f"{size} bytes is too short for a volume")
        header = _pread_exact(fd, _HEADER.size, 0, f"volume {path} is damaged")
        magic, version, created_s, capacity = _HEADER.unpack(header)
        if magic != MAGIC:
            raise damaged("not an imc volume (bad magic)")
        if version != VERSION:
            raise StoreError(f"volume {path} has format version {version}; this imc reads version {VERSION}")
        trailer = _pread_exact(fd, _TRAILER.size, size - _TRAILER.size, f"volume {path} is damaged")
        index_offset, index_length, encoding, index_sha, tmagic, tversion = _TRAILER.unpack(trailer)
        if tmagic != MAGIC or tversion != VERSION:
            raise damaged("no trailer at the end (truncated, or still being written)")
        if index_offset < _HEADER.size or index_offset + index_length != size - _TRAILER.size:
            raise damaged("the trailer points outside the file")
        raw = _pread_exact(fd, index_length, index_offset, f"volume {path} is damaged")
        if hashlib.sha256(raw).digest() != index_sha:
            raise damaged("the index checksum does not match")
        try:
            if encoding == _INDEX_ZSTD:
                raw = zstandard.ZstdDecompressor().decompress(raw, max_output_size=_MAX_INDEX)
            elif encoding != _INDEX_JSON:
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
        if doc.get("created") != _iso(created_s) or doc.get("capacity") != capacity:
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
            if size < 0 or offset < _HEADER.size or length < 0 or offset + length > data_end:
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
        frame = _pread_exact(fd, n, e.offset + s, what)
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
                yield _pread_exact(fd, n, e.offset + pos, f"volume {self.path} is damaged: blob {e.digest}")
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
                h = e.digest.hasher()
                try:
                    for piece in self._ranges(fd, e, 0, e.size):
                        h.update(piece)
                        done_bytes += len(piece)
                        if on_progress:
                            on_progress(PackProgress(n, len(self.entries), done_bytes, total))
                    good = h.hexdigest() == e.digest.hex
                except (StoreError, OSError):
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


# -- packing -------------------------------------------------------------------------


def _encoding_for(media_type: str) -> str:
    """raw for layers that are compressed already, zstd for everything else."""
    return RAW if layer_compression(media_type) in ("gzip", "zstd") else ZSTD


def _write_all(fd: int, data: Any, offset: int) -> None:
    """Write all of ``data`` at ``offset``, and start its writeback at once.

    Starting writeback as the data goes (sync_file_range, asynchronous) rather than
    leaving it all to the final fsync overlaps the disk writes with the hashing and
    compression: the fsync then has almost nothing left to wait for.
    """
    view = memoryview(data).cast("B")
    start, length = offset, len(view)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
    start_writeback(fd, start, length)


class _Cancelled(Exception):
    """A raw copy stopped because another part of the pack failed."""


class _Writer:
    """A thread that writes buffers at given offsets, so hashing the next buffer
    overlaps writing this one. The first write error is kept and later writes are
    skipped, but every buffer is handed back so no copy waits forever.

    It writes through its own duplicate of the descriptor, closed when the thread
    ends, so a write still queued when packing is torn down can never land in some
    other file that reused the descriptor's number.
    """

    def __init__(self, fd: int) -> None:
        self._fd = os.dup(fd)
        self._queue: queue.Queue[tuple[memoryview, int, Callable[[], None]] | None] = queue.Queue()
        self.error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="imc-volume-writer", daemon=True)
        self._thread.start()

    def submit(self, view: memoryview, offset: int, done: Callable[[], None]) -> None:
        self._queue.put((view, offset, done))

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                view, offset, done = item
                try:
                    if self.error is None:
                        _write_all(self._fd, view, offset)
                except BaseException as e:
                    self.error = e
                finally:
                    done()
        finally:
            os.close(self._fd)

    def close(self) -> None:
        """Wait for every queued write; raise the first write error."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
        if self.error is not None:
            raise self.error


class _Packer:
    """One pack: the plan, the shared counters, and the threads doing the work."""

    def __init__(self, store: Store, descs: list[Descriptor], fd: int, on_progress: ProgressCallback | None) -> None:
        self.store = store
        self.descs = descs
        self.fd = fd
        self.on_progress = on_progress
        self.total = sum(d.size for d in descs)
        self._lock = threading.Lock()
        self._bytes_done = 0
        self._blobs_done = 0
        self._reported: tuple[int, int] | None = None
        self.stop = threading.Event()  # set when any part fails: the others give up
        self._local = threading.local()

    # progress: counted by any thread, reported from the packing thread only

    def _count(self, nbytes: int, blobs: int = 0) -> None:
        with self._lock:
            self._bytes_done += nbytes
            self._blobs_done += blobs

    def report(self) -> None:
        if self.on_progress is None:
            return
        with self._lock:
            now = (self._blobs_done, self._bytes_done)
        if now != self._reported:
            self._reported = now
            self.on_progress(PackProgress(now[0], len(self.descs), now[1], self.total))
        if 0 < now[0] < len(self.descs):
            faults.checkpoint("pack-midway")

    # raw blobs: fixed offsets, copied by worker threads

    def copy_raw(self, desc: Descriptor, offset: int, writer: _Writer) -> VolumeEntry:
        """Copy a blob verbatim at ``offset``, hashing every buffer as it goes by."""
        try:
            free: queue.Queue[bytearray] = queue.Queue()
            for _ in range(_COPY_BUFFERS):
                free.put(bytearray(min(_COPY_CHUNK, max(desc.size, 1))))
            h = desc.digest.hasher()
            copied = 0
            with self.store.open_blob(desc.digest) as src:
                while True:
                    if self.stop.is_set():
                        raise _Cancelled
                    if writer.error is not None:
                        raise writer.error
                    buf = free.get()
                    n = src.readinto(buf)  # type: ignore[attr-defined]
                    if not n:
                        free.put(buf)
                        break
                    view = memoryview(buf)[:n]
                    if copied + n > desc.size:
                        raise DigestMismatchError(f"blob {desc.digest} in the store is longer than {desc.size} bytes")
                    writer.submit(view, offset + copied, lambda b=buf: free.put(b))
                    h.update(view)
                    copied += n
                    self._count(n)
            for _ in range(_COPY_BUFFERS):  # every buffer back: this blob's writes are done
                free.get()
            _check_copied(desc, copied, h)
            self._count(0, 1)
            return VolumeEntry(desc.digest, desc.size, desc.media_type, RAW, offset, desc.size)
        except BaseException:
            self.stop.set()
            raise

    # zstd blobs: read and hashed here, frames compressed by a pool, written in order

    def _compress(self, data: bytes) -> bytes:
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True,
                                                               write_checksum=True)
        return cctx.compress(data)

    def copy_zstd(self, desc: Descriptor, offset: int, pool: ThreadPoolExecutor) -> VolumeEntry:
        """Compress a blob into independent 4 MiB frames from ``offset`` on."""
        h = desc.digest.hasher()
        chunks: list[tuple[int, int, int]] = []
        inflight: deque[tuple[int, Future[bytes]]] = deque()
        pos = offset
        copied = 0

        def flush_oldest() -> None:
            nonlocal pos
            u, fut = inflight.popleft()
            frame = fut.result()
            _write_all(self.fd, frame, pos)
            chunks.append((u, pos - offset, len(frame)))
            pos += len(frame)
            self._count(min(CHUNK_SIZE, desc.size - u))
            self.report()

        try:
            with self.store.open_blob(desc.digest) as src:
                while data := src.read(CHUNK_SIZE):
                    if self.stop.is_set():
                        raise _Cancelled
                    if copied + len(data) > desc.size:
                        raise DigestMismatchError(f"blob {desc.digest} in the store is longer than {desc.size} bytes")
                    if desc.size <= _INLINE_COMPRESS:
                        done: Future[bytes] = Future()
                        done.set_result(self._compress(data))
                        inflight.append((copied, done))
                    else:
                        inflight.append((copied, pool.submit(self._compress, data)))
                    h.update(data)
                    copied += len(data)
                    while inflight and (len(inflight) > _WORKERS + 1 or inflight[0][1].done()):
                        flush_oldest()
            _check_copied(desc, copied, h)
            while inflight:
                flush_oldest()
        finally:
            for _, fut in inflight:
                fut.cancel()
        self._count(0, 1)
        return VolumeEntry(desc.digest, desc.size, desc.media_type, ZSTD, offset, pos - offset, tuple(chunks))

    def run(self) -> tuple[list[VolumeEntry], int]:
        """Write every blob after the header; returns the entries and where data ends.

        Raw blobs sit first, at offsets known from their sizes, so worker threads copy
        them in parallel (largest first) while this thread compresses the rest behind
        them; the index keeps the callers' order.
        """
        offsets: dict[Digest, int] = {}
        pos = _HEADER.size
        raw = [d for d in self.descs if _encoding_for(d.media_type) == RAW]
        for d in raw:
            offsets[d.digest] = pos
            pos += d.size
        entries: dict[Digest, VolumeEntry] = {}
        writer = _Writer(self.fd)
        copy_pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="imc-volume-copy")
        zstd_pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="imc-volume-zstd")
        futures: list[Future[VolumeEntry]] = []
        try:
            futures = [copy_pool.submit(self.copy_raw, d, offsets[d.digest], writer)
                       for d in sorted(raw, key=lambda d: -d.size)]
            try:
                for d in self.descs:
                    if d.digest not in offsets:
                        entry = self.copy_zstd(d, pos, zstd_pool)
                        entries[d.digest] = entry
                        pos += entry.length
                        self.report()
            except _Cancelled:
                pass  # a raw copy failed: its error is raised below
            pending = set(futures)
            while pending:
                _, pending = wait(pending, timeout=_PROGRESS_EVERY, return_when=FIRST_COMPLETED)
                self.report()
            for fut in futures:  # the first real failure, not the _Cancelled it caused
                if not isinstance(fut.exception(), _Cancelled):
                    entry = fut.result()
                    entries[entry.digest] = entry
            for fut in futures:
                fut.result()
            writer.close()
        except BaseException:
            self.stop.set()
            raise
        finally:
            copy_pool.shutdown(wait=True, cancel_futures=True)
            zstd_pool.shutdown(wait=True, cancel_futures=True)
            with contextlib.suppress(BaseException):
                writer.close()
        return [entries[d.digest] for d in self.descs], pos


def _check_copied(desc: Descriptor, copied: int, h: Any) -> None:
    if copied != desc.size:
        raise DigestMismatchError(f"blob {desc.digest} in the store has {copied} bytes, expected {desc.size}")
    actual = Digest(desc.digest.algorithm, h.hexdigest())
    if actual != desc.digest:
        raise DigestMismatchError(f"blob {desc.digest} in the store is corrupt: its bytes hash to {actual}")


def _plan(store: Store, blobs: Sequence[Descriptor]) -> list[Descriptor]:
    """The blobs to pack, first occurrence of each digest, all present in the store."""
    seen: set[Digest] = set()
    out: list[Descriptor] = []
    for d in blobs:
        if d.digest in seen:
            continue
        seen.add(d.digest)
        size = store.size(d.digest)  # NotFoundLocalError when absent
        if size != d.size:
            raise DigestMismatchError(f"blob {d.digest} in the store has {size} bytes, its descriptor says {d.size}")
        out.append(d)
    return out


def pack(store: Store, blobs: Sequence[Descriptor], path: Path, capacity: int, meta: dict,
         on_progress: ProgressCallback | None = None) -> Volume:
    """Write a volume holding ``blobs`` (duplicates ignored) at ``path``, atomically.

    Every blob must be in the store (``NotFoundLocalError`` otherwise) and hash to its
    digest as it is copied (``DigestMismatchError``). ``capacity`` is recorded, not
    allocated; the blobs' own bytes must fit it (``CapacityError``) — checking the
    images' unpacked size against it is the caller's part (see ``unpacked_size``).
    ``meta`` must be JSON-serialisable; it makes the volume self-describing. An
    existing file at ``path`` is replaced only once the new volume is complete.
    """
    path = Path(path)
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
        raise CapacityError(f"volume capacity must be a positive number of bytes, not {capacity!r}")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise ValidationError(f"volume meta is not JSON-serialisable: {e}") from None
    if not isinstance(meta, dict):
        raise ValidationError("volume meta must be a JSON object")
    descs = _plan(store, blobs)
    total = sum(d.size for d in descs)
    if total > capacity:
        raise CapacityError(f"the blobs take {total} bytes, more than the volume's capacity of {capacity} bytes")
    partial = path.with_name(path.name + ".partial")
    created_s = int(time.time())
    fd = _claim_partial(partial)
    try:
        try:
            _write_all(fd, _HEADER.pack(MAGIC, VERSION, created_s, capacity), 0)
            packer = _Packer(store, descs, fd, on_progress)
            entries, pos = packer.run()
            index = json.dumps({"imcVolume": VERSION, "created": _iso(created_s), "capacity": capacity,
                                "chunkSize": CHUNK_SIZE, "meta": meta,
                                "blobs": [e.to_json() for e in entries]}, separators=(",", ":")).encode()
            stored, encoding = zstandard.ZstdCompressor(level=10).compress(index), _INDEX_ZSTD
            if len(stored) >= len(index):
                stored, encoding = index, _INDEX_JSON
            _write_all(fd, stored, pos)
            _write_all(fd, _TRAILER.pack(pos, len(stored), encoding, hashlib.sha256(stored).digest(),
                                         MAGIC, VERSION), pos + len(stored))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, path)
        fsync_dir(path.parent)
        packer.report()
    except OSError as e:
        _remove(partial)
        if e.errno == errno.ENOSPC:
            raise StoreError(f"no space left in {path.parent} while writing volume {path.name}") from None
        raise StoreError(f"cannot write volume {path}: {e.strerror or e}") from None
    except BaseException:
        _remove(partial)
        raise
    return Volume.open(path)


def _claim_partial(partial: Path) -> int:
    """Open ``partial`` for writing under an exclusive flock, emptied.

    The lock comes before the truncation, so a second pack of the same volume fails
    at once instead of wiping the file the first one is writing; a partial left by a
    crashed process holds no lock and is simply reused. A symbolic link found there is
    removed, never written through.
    """
    try:
        fd = open_unlinked(partial, os.O_RDWR)
    except OSError as e:
        raise StoreError(f"cannot create volume {partial}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(f"volume {partial.name[:-len('.partial')]} is being written by another process") from None
    try:
        os.ftruncate(fd, 0)
    except OSError as e:
        os.close(fd)
        _remove(partial)
        raise StoreError(f"cannot write volume {partial}: {e.strerror}") from None
    return fd


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# -- OCI archive export --------------------------------------------------------------


class _HashingReader:
    """Passes a blob's bytes through to tarfile, hashing them on the way."""

    def __init__(self, src: BinaryIO, digest: Digest) -> None:
        self._src = src
        self.hash = digest.hasher()

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        self.hash.update(data)
        return data


def _convert_docker(volume: Volume, digest: Digest, media_type: str, extra: dict[Digest, bytes]) -> Descriptor:
    """The descriptor to list for a manifest or index: itself when OCI-typed, else an
    equivalent OCI document (added to ``extra``) with the same config and layer blobs.

    skopeo reads only OCI-typed manifests from an OCI layout, so a Docker-typed image
    is exported as an OCI manifest whose digest differs from the registry's.
    """
    if media_type not in (DOCKER_MANIFEST, DOCKER_LIST):
        return Descriptor(media_type, digest, volume.entry(digest).size)
    try:
        return _convert_docker_doc(volume, digest, media_type, json.loads(volume.read_bytes(digest)), extra)
    except (ValueError, KeyError, TypeError, AttributeError, BadReferenceError) as e:
        raise ValidationError(f"manifest {digest} cannot be exported as OCI: malformed ({e})") from None


def _convert_docker_doc(volume: Volume, digest: Digest, media_type: str, doc: Any,
                        extra: dict[Digest, bytes]) -> Descriptor:
    if media_type == DOCKER_MANIFEST:
        doc["config"]["mediaType"] = _DOCKER_TO_OCI.get(doc["config"].get("mediaType", ""),
                                                        doc["config"].get("mediaType", OCI_CONFIG))
        for layer in doc["layers"]:
            layer["mediaType"] = _DOCKER_TO_OCI.get(layer.get("mediaType", ""), layer.get("mediaType", ""))
    else:
        children = []
        for child in doc["manifests"]:
            child_digest = Digest.parse(child["digest"])
            child_type = child.get("mediaType", "")
            if child_type in _DOCKER_TO_OCI and volume.has(child_digest):
                new = _convert_docker(volume, child_digest, child_type, extra)
                child = {**child, "mediaType": new.media_type, "digest": str(new.digest), "size": new.size}
            children.append(child)
        doc["manifests"] = children
    doc["mediaType"] = _DOCKER_TO_OCI[media_type]
    data = json.dumps(doc, indent=3).encode()
    new_digest = Digest.of(data, digest.algorithm)
    extra[new_digest] = data
    return Descriptor(doc["mediaType"], new_digest, len(data))


def export_oci_archive(volume: Volume, out: Path) -> None:
    """Write the volume as an ``oci-archive`` tar that ``skopeo copy`` and ``podman
    load`` accept: an OCI image layout with every blob and one ``index.json`` entry
    per image, named by ``org.opencontainers.image.ref.name``.

    Docker-typed manifests are exported as equivalent OCI manifests (the same config
    and layer blobs under OCI media types), because skopeo reads only OCI-typed
    manifests from a layout: for those images the manifest digest differs from the
    registry's while every layer and config is byte-identical. Every blob is rehashed
    while it is written (``DigestMismatchError`` on damage); the archive appears at
    ``out`` only when complete.
    """
    out = Path(out)
    images = volume.meta.get("images") or []
    extra: dict[Digest, bytes] = {}
    index_entries = []
    for image in images:
        name = str(image.get("name", ""))
        if not _REF_NAME_RE.match(name):
            raise ValidationError(f"image name {name!r} cannot name an image in an OCI archive")
        digest = Digest.parse(str(image["digest"]))
        media_type = str(image.get("mediaType") or volume.entry(digest).media_type)
        if media_type not in (*MANIFEST_TYPES, *INDEX_TYPES):
            raise ValidationError(f"image {name} has media type {media_type!r}, not a manifest or index")
        desc = _convert_docker(volume, digest, media_type, extra)
        entry = desc.to_json()
        entry["annotations"] = {REF_NAME: name}
        index_entries.append(entry)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index_entries}
    mtime = int(datetime.datetime.strptime(volume.created, "%Y-%m-%dT%H:%M:%SZ")
                .replace(tzinfo=datetime.UTC).timestamp())
    partial = out.with_name(out.name + ".partial")

    def member(name: str, size: int, mode: int = 0o644, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime, info.type = size, mode, mtime, kind
        return info

    try:
        with open(partial, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                tar.copybufsize = 1 << 20
                for small_name, data in (("oci-layout", json.dumps(LAYOUT_VERSION).encode()),
                                         ("index.json", json.dumps(index, indent=1).encode())):
                    tar.addfile(member(small_name, len(data)), io.BytesIO(data))
                for dirname in ("blobs/", *sorted({f"blobs/{d.algorithm}/" for d in (*volume.entries, *extra)})):
                    tar.addfile(member(dirname, 0, 0o755, tarfile.DIRTYPE))
                for digest, e in volume.entries.items():
                    with volume.open_blob(digest) as src:
                        reader = _HashingReader(src, digest)
                        tar.addfile(member(f"blobs/{digest.algorithm}/{digest.hex}", e.size), reader)
                    if reader.hash.hexdigest() != digest.hex:
                        raise DigestMismatchError(f"blob {digest} in volume {volume.path.name} is corrupt")
                for digest, data in extra.items():
                    if digest not in volume.entries:
                        tar.addfile(member(f"blobs/{digest.algorithm}/{digest.hex}", len(data)), io.BytesIO(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, out)
        fsync_dir(out.parent)
    except OSError as e:
        _remove(partial)
        raise StoreError(f"cannot write OCI archive {out}: {e.strerror or e}") from None
    except BaseException:
        _remove(partial)
        raise


# -- unpacked layer sizes ------------------------------------------------------------

_UNPACK_IN = 1 << 20
_UNPACK_OUT = 4 << 20


class _LimitReached(Exception):
    """Decompression passed the caller's limit; the count so far is the answer."""


def _gunzip_count(chunks: Iterator[bytes], limit: int | None) -> int:
    """Bytes a (multi-member) gzip stream decompresses to, with bounded memory."""
    count = 0
    d = zlib.decompressobj(wbits=31)
    between = False  # after a member: only zero padding or another member may follow
    for data in chunks:
        while True:
            if between:
                data = data.lstrip(b"\0")
                if not data:
                    break
                d, between = zlib.decompressobj(wbits=31), False
            out = d.decompress(data, _UNPACK_OUT)
            count += len(out)
            if limit is not None and count > limit:
                raise _LimitReached(count)
            if d.eof:
                data, between = d.unused_data, True
                continue
            data = d.unconsumed_tail
            if not data and len(out) < _UNPACK_OUT:  # a full output may leave more inside zlib
                break
    if not between:
        raise zlib.error("the gzip stream is truncated")
    return count


class _ZstdFrameWalker:
    """Follows zstd frame and block headers over the compressed bytes, without
    decompressing, to tell whether the stream ends where a frame ends (zstandard's
    readers return a truncated stream's prefix without complaint)."""

    def __init__(self) -> None:
        self._buf = b""
        self._need = 4
        self._state = "magic"
        self._skip = 0
        self._checksum = False
        self.frames = 0

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._skip:
                n = min(self._skip, len(view))
                self._skip -= n
                view = view[n:]
                continue
            take = self._need - len(self._buf)
            self._buf += bytes(view[:take])
            view = view[take:]
            if len(self._buf) == self._need:
                head, self._buf = self._buf, b""
                self._step(head)

    def _step(self, head: bytes) -> None:
        if self._state == "magic":
            magic = int.from_bytes(head, "little")
            if magic == 0xFD2FB528:
                self._state, self._need = "fhd", 1
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._state, self._need = "skippable", 4
            else:
                raise zlib.error("not a zstd frame")
        elif self._state == "skippable":
            self._skip = int.from_bytes(head, "little")
            self._state, self._need = "magic", 4
            self.frames += 1
        elif self._state == "fhd":
            fhd = head[0]
            single = bool(fhd & 0x20)
            self._checksum = bool(fhd & 0x04)
            fcs = {0: 1 if single else 0, 1: 2, 2: 4, 3: 8}[fhd >> 6]
            self._skip = (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs
            self._state, self._need = "block", 3
        else:  # block header
            h = int.from_bytes(head, "little")
            last, kind, size = h & 1, (h >> 1) & 3, h >> 3
            if kind == 3:
                raise zlib.error("reserved zstd block type")
            self._skip = 1 if kind == 1 else size
            if last:
                self._skip += 4 if self._checksum else 0
                self._state, self._need = "magic", 4
                self.frames += 1

    @property
    def complete(self) -> bool:
        return self.frames > 0 and self._state == "magic" and not self._buf and not self._skip


def _unzstd_count(chunks: Iterator[bytes], limit: int | None) -> int:
    """Bytes a (multi-frame) zstd stream decompresses to, with bounded memory."""
    walker = _ZstdFrameWalker()

    class _Source:
        def __init__(self) -> None:
            self._it = chunks

        def read(self, n: int = -1) -> bytes:
            data = next(self._it, b"")
            walker.feed(data)
            return data

    reader = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(
        _Source(), read_size=_UNPACK_IN, read_across_frames=True)
    count = 0
    while out := reader.read(_UNPACK_OUT):
        count += len(out)
        if limit is not None and count > limit:
            raise _LimitReached(count)
    if not walker.complete:
        raise zlib.error("the zstd stream is truncated")
    return count


def _unpacked_cache(store: Store, digest: Digest) -> Path:
    return store.home / "meta" / "unpacked" / f"{digest.algorithm}-{digest.hex}"


def unpacked_size(store: Store, desc: Descriptor, limit: int | None = None) -> int:
    """The uncompressed size of a layer (a non-layer blob's or plain tar's own size).

    Decompresses a gzip or zstd layer once ever: the answer is cached under
    ``<home>/meta/unpacked`` by digest. With ``limit``, decompression stops as soon as
    the count passes it and that count (> limit) is returned uncached, which bounds the
    work a decompression bomb can cause. Data that does not decompress raises
    ``StoreError``; a blob whose bytes do not match its digest, ``DigestMismatchError``.
    """
    compression = layer_compression(desc.media_type)
    if compression not in ("gzip", "zstd"):
        return desc.size
    cache = _unpacked_cache(store, desc.digest)
    with contextlib.suppress(OSError, ValueError):
        return int(cache.read_bytes())
    h = desc.digest.hasher()
    size = 0

    def chunks(src: BinaryIO) -> Iterator[bytes]:
        nonlocal size
        while data := src.read(_UNPACK_IN):
            h.update(data)
            size += len(data)
            yield data

    try:
        with store.open_blob(desc.digest) as src:
            count = (_gunzip_count if compression == "gzip" else _unzstd_count)(chunks(src), limit)
    except _LimitReached as stop:
        return int(stop.args[0])
    except (zlib.error, zstandard.ZstdError) as e:
        raise StoreError(f"layer {desc.digest} does not decompress: {e}") from None
    except OSError as e:
        raise StoreError(f"cannot read layer {desc.digest}: {e.strerror}") from None
    if size != desc.size or h.hexdigest() != desc.digest.hex:
        raise DigestMismatchError(f"layer {desc.digest} in the store is corrupt")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache, str(count).encode())
    except OSError as e:
        raise StoreError(f"cannot record the unpacked size of {desc.digest}: {e.strerror}") from None
    return count


def declared_unpacked_size(store: Store, desc: Descriptor) -> int:
    """What a layer says its uncompressed size is, without decompressing it.

    The gzip ISIZE trailer (exact below 4 GiB) or the first zstd frame's content size;
    a layer already counted by ``unpacked_size`` answers from that cache. It is an
    estimate a crafted layer can lie in, so it only gates what can be checked fast
    (a flash cache's early readiness); ``unpacked_size`` is the real count.
    """
    compression = layer_compression(desc.media_type)
    if compression not in ("gzip", "zstd"):
        return desc.size
    with contextlib.suppress(OSError, ValueError):
        return int(_unpacked_cache(store, desc.digest).read_bytes())
    try:
        with store.open_blob(desc.digest) as f:
            if compression == "gzip":
                f.seek(-4, os.SEEK_END)
                return max(int.from_bytes(f.read(4), "little"), desc.size)
            params = zstandard.get_frame_parameters(f.read(18))
    except (OSError, zstandard.ZstdError):
        return desc.size
    declared = params.content_size
    return max(declared, desc.size) if declared not in (0, zstandard.CONTENTSIZE_UNKNOWN) else desc.size
