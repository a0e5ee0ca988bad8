"""The content-addressed store: one OCI image layout that every pull and cache shares.

It keeps, under imc's home (``builder.home`` draws the tree): ``store/``, an OCI
image layout (oci-layout, index.json, blobs/<alg>/<hex>); ``ingest/``, partial
downloads, resumable, never visible under blobs/; ``locks/``, one flock per blob being
fetched, the index and gc; ``quarantine/``, blobs that failed verification;
``meta/``, each compressed layer's unpacked size, counted once.

A blob appears under ``blobs/`` only by an atomic rename after its size and digest
were checked, so whatever is there is complete and verified. One download per digest
holds across threads and processes through a per-digest ``flock``; a crashed process
releases its locks, and its partial file is resumed by the next pull.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import shutil
import stat
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, cast

import zstandard

from builder import compression, faults
from builder.digest import Digest, Verifier, hash_file, verify_bytes
from builder.errors import NotFoundLocalError, StoreError
from builder.home import Home, open_unlinked
from builder.oci import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    Descriptor,
    Index,
    Manifest,
    layer_compression,
    parse_manifest,
)

REF_NAME = "org.opencontainers.image.ref.name"
INDEX_ANNOTATION = "dev.imc.index.digest"
LAYOUT_VERSION = {"imageLayoutVersion": "1.0.0"}
_HASH_CHUNK = 1 << 20
RECEIVE_BUFFER = 1 << 20
WRITEBACK_EVERY = 8 << 20
STALE_TEMP_SECONDS = 3600


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range (Linux), which the os module does not expose."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], fn)


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a file range to disk now, without waiting (Linux; advisory).

    Writeback that starts as data arrives overlaps the disk with the network and the
    hashing, so the fsync before a rename has almost nothing left to wait for.
    """
    if _sync_file_range is not None and length:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # errors are moot: fsync follows


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a small file so that readers see the old content or the new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def flocked(path: Path, shared: bool = False, blocking: bool = True) -> Iterator[bool]:
    """Hold an flock on ``path``; yields False (and holds nothing) if not blocking and busy."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        flags = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(fd, flags | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def pread_exact(fd: int, offset: int, n: int, what: str) -> bytes:
    """Exactly ``n`` bytes at ``offset`` (``os.pread`` may return fewer); a file that
    ends first raises ``StoreError("<what>: the file ends early (truncated)")``."""
    data = os.pread(fd, n, offset)
    while len(data) < n:
        more = os.pread(fd, n - len(data), offset + len(data))
        if not more:
            raise StoreError(f"{what}: the file ends early (truncated)")
        data += more
    return data


def _copy_into(buf: memoryview, data: memoryview) -> int:
    n = min(len(buf), len(data))
    buf[:n] = data[:n]
    return n


def _open_partial(path: Path) -> BinaryIO:
    """Open (or create) a partial download to append to and reread."""
    return os.fdopen(open_unlinked(path, os.O_RDWR | os.O_APPEND), "a+b", buffering=0)


class Ingest:
    """A blob being written: hashes as it goes and resumes from a partial file.

    This is the ``BlobSink`` the registry client streams into. It lends the reader
    one of two buffers to fill (``receive``), writes the bytes to the partial file
    and hands them to a hashing thread, then lends the other buffer: receiving and
    writing one MiB overlaps hashing the one before, with no copy in between.
    """

    def __init__(self, path: Path, digest: Digest, size: int) -> None:
        self.path = path
        self.digest = digest
        self.size = size
        self._verifier = Verifier(digest, size)
        self._file: BinaryIO = _open_partial(path)
        self._resume()
        self._flushed = self._verifier.count
        self._buffers: tuple[memoryview, ...] = ()

    def _resume(self) -> None:
        """Rehash what an earlier attempt left, so the download continues after it."""
        held = os.fstat(self._file.fileno()).st_size
        if held > self.size:
            self.reset()
            return
        self._file.seek(0)
        buf = bytearray(_HASH_CHUNK)
        view = memoryview(buf)
        while n := self._file.readinto(buf):
            self._verifier.update(view[:n])
        self._file.seek(0, os.SEEK_END)
        if self._verifier.count == self.size and not self._verifier.matches():
            self.reset()  # complete but wrong: these bytes can never become this blob

    @property
    def offset(self) -> int:
        return self._verifier.count

    def receive(self, read: Callable[[memoryview], int]) -> int:
        """Let ``read`` fill a buffer (it returns how many bytes it put there, 0 at
        the end), then write and hash those bytes; returns the count."""
        if not self._buffers:
            self._buffers = (memoryview(bytearray(RECEIVE_BUFFER)), memoryview(bytearray(RECEIVE_BUFFER)))
        # The other buffer may still be hashing; this one was hashed before it was handed over.
        view = self._buffers[0]
        self._buffers = self._buffers[::-1]
        n = read(view)
        if n:
            self._take(view[:n])
        return n

    def write(self, data: memoryview | bytes) -> None:
        """Append bytes the caller holds (hashed before this returns)."""
        view = memoryview(data)
        while view:
            n = self.receive(lambda buf, view=view: _copy_into(buf, view))
            view = view[n:]

    def _take(self, data: memoryview) -> None:
        self._verifier.update_later(data)  # first: bytes beyond the declared size are refused before they are written
        fd = self._file.fileno()
        while data:
            data = data[os.write(fd, data):]
        offset = self._verifier.count
        if offset - self._flushed >= WRITEBACK_EVERY:
            start_writeback(fd, self._flushed, offset - self._flushed)
            self._flushed = offset

    def reset(self) -> None:
        self._file.truncate(0)
        self._file.seek(0)
        self._verifier.reset()
        self._flushed = 0

    def commit(self, final: Path) -> None:
        """Check size and digest, make the bytes durable, and rename into place."""
        if self._verifier.count == self.size and not self._verifier.matches():
            self.discard()  # complete but wrong: these bytes can never become this blob
        self._verifier.verify()
        os.fsync(self._file.fileno())
        os.fchmod(self._file.fileno(), 0o444)  # the file written, not whatever the path names now
        self._file.close()
        os.replace(self.path, final)

    def discard(self) -> None:
        """Forget the partial bytes: they can never become this blob."""
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class StoredImage:
    """An image the store holds: its reference name and top-level manifest descriptor."""

    name: str
    descriptor: Descriptor
    index_digest: Digest | None = None


@dataclass
class VerifyReport:
    """What ``verify`` found: blobs checked, corrupt ones quarantined, missing ones."""

    checked: int = 0
    bytes: int = 0
    corrupt: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.missing


@dataclass
class GcReport:
    """What ``gc`` removed."""

    blobs_removed: int = 0
    bytes_freed: int = 0
    partials_removed: int = 0


class Store:
    """The content-addressed blob store and its image index (an OCI image layout)."""

    def __init__(self, home: Path | Home) -> None:
        self.home = Home(home)
        self._ensure_layout()

    def _ensure_layout(self) -> None:
        home = self.home
        try:
            for d in (home.blob_dir("sha256"), home.ingest, home.locks, home.quarantine):
                d.mkdir(parents=True, exist_ok=True)
            if not home.oci_layout.exists():
                write_atomic(home.oci_layout, json.dumps(LAYOUT_VERSION).encode())
            if not home.image_index.exists():
                with flocked(home.index_lock):
                    if not home.image_index.exists():
                        self._write_index([])
        except OSError as e:
            raise StoreError(f"cannot create the store under {self.home}: {e.strerror}") from None

    # -- blobs ---------------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        """Where a blob lives (whether or not it is there)."""
        return self.home.blob(digest)

    def _stat(self, digest: Digest) -> os.stat_result | None:
        """The blob file's status, or None. Only a regular file is a stored blob: a
        symbolic link there (whatever it points at) is not, and is never followed."""
        try:
            st = os.lstat(self.blob_path(digest))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st if stat.S_ISREG(st.st_mode) else None

    def has(self, digest: Digest, size: int | None = None) -> bool:
        """True when the blob is stored (and, if given, has ``size`` bytes)."""
        st = self._stat(digest)
        return st is not None and (size is None or st.st_size == size)

    def size(self, digest: Digest) -> int:
        """The stored blob's size, or NotFoundLocalError."""
        st = self._stat(digest)
        if st is None:
            raise NotFoundLocalError(f"blob {digest} is not in the store")
        return st.st_size

    def open_blob(self, digest: Digest) -> BinaryIO:
        """Open a stored blob for reading (never through a symbolic link)."""
        try:
            fd = os.open(self.blob_path(digest), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundLocalError(f"blob {digest} is not in the store") from None
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise NotFoundLocalError(f"blob {digest} is not in the store: its path is a symbolic link "
                                     "(imc layers verify quarantines it)") from None
        return os.fdopen(fd, "rb")

    def read_blob(self, digest: Digest) -> bytes:
        """A small blob's bytes (manifests, configs)."""
        with self.open_blob(digest) as f:
            return f.read()

    def put_bytes(self, digest: Digest, data: bytes) -> bool:
        """Store small verified content; False if it was already there."""
        if self.has(digest, len(data)):
            return False
        verify_bytes(data, digest, f"blob {digest}")
        try:
            write_atomic(self.blob_path(digest), data, 0o444)
        except OSError as e:
            raise StoreError(f"cannot write blob {digest.short}: {e.strerror}") from None
        return True

    def ensure_blob(self, digest: Digest, size: int, download: Callable[[Ingest], None]) -> bool:
        """Make sure the blob is stored, downloading it at most once across processes.

        Returns True if this call fetched it, False if it was already there (perhaps
        fetched by another thread or process while this one waited for the lock).
        Call it inside ``pinning()``: gc relies on that to know no fetch is running.
        """
        if self.has(digest, size):
            return False
        with flocked(self.home.blob_lock(digest)):
            if self.has(digest, size):
                return False
            try:
                ingest = Ingest(self.home.ingest_partial(digest), digest, size)
            except OSError as e:
                raise StoreError(f"cannot write to the store's ingest area: {e.strerror}") from None
            try:
                download(ingest)
                ingest.commit(self.blob_path(digest))
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    ingest.discard()
                    raise StoreError(f"no space left in {self.home} while storing blob {digest.short}") from None
                raise StoreError(f"cannot store blob {digest.short}: {e.strerror}") from None
            finally:
                ingest.close()
        return True

    def pinning(self) -> contextlib.AbstractContextManager[bool]:
        """Hold off gc while blobs are fetched but not yet referenced by an image."""
        return flocked(self.home.gc_lock, shared=True)

    # -- the image index -----------------------------------------------------------

    def _read_index(self) -> list[dict]:
        try:
            doc = json.loads(self.home.image_index.read_bytes())
        except (OSError, ValueError) as e:
            raise StoreError(f"the store's index.json is unreadable: {e}") from None
        return list(doc.get("manifests") or [])

    def _write_index(self, entries: list[dict]) -> None:
        doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}
        write_atomic(self.home.image_index, json.dumps(doc, indent=1).encode())

    def images(self) -> list[StoredImage]:
        """Every image the store holds, in the order they were added."""
        out = []
        for entry in self._read_index():
            desc = Descriptor.from_json(entry)
            name = desc.annotations.get(REF_NAME)
            if not name:
                continue
            index = desc.annotations.get(INDEX_ANNOTATION)
            out.append(StoredImage(name, desc, Digest.parse(index) if index else None))
        return out

    def add_image(self, name: str, descriptor: Descriptor, index_digest: Digest | None = None) -> None:
        """Point ``name`` at a manifest whose blobs are all stored (replacing any old entry)."""
        annotations = {REF_NAME: name}
        if index_digest:
            annotations[INDEX_ANNOTATION] = str(index_digest)
        entry = Descriptor(descriptor.media_type, descriptor.digest, descriptor.size, descriptor.platform,
                           annotations).to_json()
        with flocked(self.home.index_lock):
            entries = [e for e in self._read_index() if (e.get("annotations") or {}).get(REF_NAME) != name]
            entries.append(entry)
            self._write_index(entries)

    # -- blobs pull-through fetched on their own ----------------------------------------

    def record_pulled(self, digest: Digest) -> None:
        """Note that ``imc serve --pull-through`` fetched (or just served) this blob on
        its own, with no image naming it: the record's mtime is its last use, which
        decides how long gc keeps it (``gc(pulled_since=…)``)."""
        record = self.home.pulled_record(digest)
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            os.close(open_unlinked(record, os.O_WRONLY))
            os.utime(record, follow_symlinks=False)
        except OSError as e:
            raise StoreError(f"cannot record pulled blob {digest.short}: {e.strerror}") from None

    def pulled(self, since: float | None = None) -> set[Digest]:
        """Blobs pull-through fetched on their own (used at or after ``since``, a Unix
        time, if given) that the store still holds."""
        out: set[Digest] = set()
        for record, digest in self.home.pulled_records().items():
            try:
                st = record.lstat()
            except OSError:
                continue
            if (digest is not None and stat.S_ISREG(st.st_mode) and (since is None or st.st_mtime >= since)
                    and self.has(digest)):
                out.add(digest)
        return out

    def manifest(self, digest: Digest) -> Manifest | Index:
        """A stored manifest or index, parsed."""
        return parse_manifest(self.read_blob(digest))

    def closure(self, digest: Digest) -> set[Digest]:
        """The digest and every blob it references, recursively (index → manifests → blobs)."""
        out = {digest}
        if not self.has(digest):
            return out
        try:
            node = self.manifest(digest)
        except Exception:
            return out
        if isinstance(node, Index):
            for child in node.manifests:
                if child.media_type in (*MANIFEST_TYPES, *INDEX_TYPES) and self.has(child.digest):
                    out |= self.closure(child.digest)
        else:
            out |= {d.digest for d in node.blobs()}
        return out

    def referenced(self) -> set[Digest]:
        """Every blob some stored image needs."""
        live: set[Digest] = set()
        for image in self.images():
            live |= self.closure(image.descriptor.digest)
            if image.index_digest:
                live.add(image.index_digest)
        return live

    # -- unpacked sizes: metadata kept per layer digest ---------------------------

    def unpacked_size(self, desc: Descriptor, limit: int | None = None) -> int:
        """The uncompressed size of a layer (a non-layer blob's or plain tar's own size).

        Decompresses a gzip or zstd layer once ever: the answer is kept in the home's
        metadata (``Home.unpacked_record``). With ``limit``, decompression stops as soon
        as the count passes it and that count (> limit) is returned unrecorded, which
        bounds the work a decompression bomb can cause. Data that does not decompress
        raises ``StoreError``; a blob whose bytes do not match its digest,
        ``DigestMismatchError``.
        """
        kind = layer_compression(desc.media_type)
        if kind not in ("gzip", "zstd"):
            return desc.size
        record = self.home.unpacked_record(desc.digest)
        with contextlib.suppress(OSError, ValueError):
            return int(record.read_bytes())
        verifier = Verifier(desc.digest, desc.size, f"layer {desc.digest} in the store")

        def chunks(src: BinaryIO) -> Iterator[bytes]:
            while data := src.read(compression.READ_SIZE):
                verifier.update(data)
                yield data

        try:
            with self.open_blob(desc.digest) as src:
                count = compression.unpacked_count(kind, chunks(src), limit)
        except compression.LimitReached as stop:
            return int(stop.args[0])
        except (zlib.error, zstandard.ZstdError) as e:
            raise StoreError(f"layer {desc.digest} does not decompress: {e}") from None
        except OSError as e:
            raise StoreError(f"cannot read layer {desc.digest}: {e.strerror}") from None
        verifier.verify()
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(record, str(count).encode())
        except OSError as e:
            raise StoreError(f"cannot record the unpacked size of {desc.digest}: {e.strerror}") from None
        return count

    def declared_unpacked_size(self, desc: Descriptor) -> int:
        """What a layer says its uncompressed size is, without decompressing it.

        The gzip ISIZE trailer (exact below 4 GiB) or the first zstd frame's content
        size; a layer already counted by ``unpacked_size`` answers from that record. It
        is an estimate a crafted layer can lie in, so it only gates what can be checked
        fast (a flash cache's early readiness); ``unpacked_size`` is the real count.
        """
        kind = layer_compression(desc.media_type)
        if kind not in ("gzip", "zstd"):
            return desc.size
        with contextlib.suppress(OSError, ValueError):
            return int(self.home.unpacked_record(desc.digest).read_bytes())
        try:
            with self.open_blob(desc.digest) as f:
                if kind == "gzip":
                    f.seek(-4, os.SEEK_END)
                    return max(int.from_bytes(f.read(4), "little"), desc.size)
                params = zstandard.get_frame_parameters(f.read(18))
        except (OSError, zstandard.ZstdError):
            return desc.size
        declared = params.content_size
        return max(declared, desc.size) if declared not in (0, zstandard.CONTENTSIZE_UNKNOWN) else desc.size

    # -- maintenance -------------------------------------------------------------

    def all_blobs(self) -> Iterator[tuple[Digest, Path]]:
        """Every blob file present, as (digest, path)."""
        for algo_dir in sorted(self.home.blobs.iterdir()):
            if algo_dir.is_symlink() or not algo_dir.is_dir():
                continue  # a linked directory holds files outside the store: never verify or remove them
            for p in sorted(algo_dir.iterdir()):
                try:
                    yield Digest.parse(f"{algo_dir.name}:{p.name}"), p
                except Exception:
                    continue

    # -- maintenance ---------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Rehash every blob; move corrupt ones to quarantine; report missing references."""
        report = VerifyReport()
        for digest, path in self.all_blobs():
            if path.is_symlink() or not path.is_file():
                self._quarantine(digest, path)
                report.corrupt.append(str(digest))
                continue
            actual, size = hash_file(str(path), digest.algorithm)
            report.checked += 1
            report.bytes += size
            if actual != digest:
                self._quarantine(digest, path)
                report.corrupt.append(str(digest))
        for digest in sorted(self.referenced()):
            if not self.has(digest):
                report.missing.append(str(digest))
        return report

    def _quarantine(self, digest: Digest, path: Path) -> None:
        target = self.home.quarantined(digest)
        try:
            os.replace(path, target)
        except OSError:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    def _live(self, pinned: set[Digest], pulled_since: float | None) -> set[Digest]:
        """Every blob gc keeps: what stored images need, the closures of ``pinned``, and
        blobs pull-through fetched that were used at or after ``pulled_since``."""
        live = self.referenced()
        for digest in pinned:
            live |= self.closure(digest)
        return live | self.pulled(pulled_since)

    def unneeded(self, pinned: set[Digest], pulled_since: float | None = None) -> list[tuple[Digest, int]]:
        """The blobs ``gc`` would remove now, with their sizes, reading only (``imc gc
        --dry-run``)."""
        live = self._live(pinned, pulled_since)
        out = []
        for digest, path in self.all_blobs():
            if digest not in live:
                with contextlib.suppress(FileNotFoundError):  # a gc running now took it
                    out.append((digest, path.lstat().st_size))
        return out

    def gc(self, pinned: Callable[[], set[Digest]] | None = None, pulled_since: float | None = None) -> GcReport:
        """Remove blobs no image needs, nor any manifest that ``pinned()`` names (with
        everything they reference), and abandoned partials. A blob pull-through fetched
        on its own is kept while it was used at or after ``pulled_since`` (a Unix time;
        None keeps every one), and its record goes with it.

        Runs under the exclusive gc lock, so no pull is between fetching a blob and
        recording what needs it; ``pinned`` is asked only once the lock is held, so it
        sees every such record.
        """
        report = GcReport()
        with flocked(self.home.gc_lock):
            faults.checkpoint("gc-locked")
            live = self._live(pinned() if pinned else set(), pulled_since)
            for digest, path in self.all_blobs():
                if digest in live:
                    continue
                size = path.lstat().st_size
                path.unlink(missing_ok=True)
                report.blobs_removed += 1
                report.bytes_freed += size
            # Every fetch runs under ``pinning()``, so none is in progress now: partials
            # are abandoned and per-blob lock files are free to go.
            # Small blobs are written by write_atomic under pinning too: a temporary
            # file left beside the blobs is a crash's leftover.
            for partial in [*self.home.ingest_partials(), *self.home.blobs.glob("*/.*.tmp")]:
                partial.unlink(missing_ok=True)
                report.partials_removed += 1
            # Metadata (unpacked sizes) is written outside pinning: only a temporary
            # file old enough to belong to no running writer is a crash's leftover.
            stale = time.time() - STALE_TEMP_SECONDS
            for tmp in self.home.meta.glob("*/.*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    if tmp.lstat().st_mtime < stale:
                        tmp.unlink()
                        report.partials_removed += 1
            for lock in self.home.blob_locks():
                lock.unlink(missing_ok=True)
            for record, pulled in self.home.pulled_records().items():
                if pulled not in live:
                    record.unlink(missing_ok=True)
        return report


@dataclass
class LayerUse:
    """A stored layer, its descriptor, and the names of the images that use it."""

    descriptor: Descriptor
    images: list[str]
    present: bool


def layer_usage(store: Store) -> dict[Digest, LayerUse]:
    """Every layer of every stored image, with the images that share it."""
    out: dict[Digest, LayerUse] = {}
    for image in store.images():
        try:
            node = store.manifest(image.descriptor.digest)
        except NotFoundLocalError:
            continue
        if not isinstance(node, Manifest):
            continue
        for layer in node.layers:
            use = out.setdefault(layer.digest, LayerUse(layer, [], store.has(layer.digest)))
            if image.name not in use.images:
                use.images.append(image.name)
    return out
