"""The packer: writes a cache's blobs from the store into a snapshot volume.

Raw blobs (already-compressed layers) are copied by worker threads at offsets known
from their sizes while the rest is compressed into zstd frames behind them; the
format is described in ``builder.volume.format``.

A volume is written under ``<name>.partial`` in the same directory, fsynced and
renamed into place only when complete; every blob's bytes are hashed as they are
copied from the store and checked against their digest. Any failure (an exception,
Ctrl-C) removes the partial file, so a volume is either complete and verified, or
absent.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import zstandard

from builder import faults
from builder.digest import Digest, Verifier
from builder.errors import CapacityError, DigestMismatchError, StoreError, ValidationError
from builder.home import PARTIAL_SUFFIX, open_unlinked, partial_of
from builder.oci import Descriptor, layer_compression
from builder.store import Store, fsync_dir, start_writeback
from builder.volume.format import (
    CHUNK_SIZE,
    HEADER,
    INDEX_JSON,
    INDEX_ZSTD,
    MAGIC,
    RAW,
    TRAILER,
    VERSION,
    ZSTD,
    PackProgress,
    ProgressCallback,
    Volume,
    VolumeEntry,
    iso_time,
)

ZSTD_LEVEL = 3
_COPY_CHUNK = 4 << 20  # raw copies: big reads, each hashed, then written by the writer thread
_COPY_BUFFERS = 3  # per raw copy: one being read and hashed, up to two queued for writing
_INLINE_COMPRESS = 256 << 10  # blobs this small are compressed in the calling thread
_WORKERS = max(1, min(2, os.cpu_count() or 1))
_PROGRESS_EVERY = 0.1  # seconds between progress reports while waiting for workers


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
            verifier = _store_verifier(desc)
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
                    at = offset + verifier.count
                    verifier.update(view)
                    writer.submit(view, at, lambda b=buf: free.put(b))
                    self._count(n)
            for _ in range(_COPY_BUFFERS):  # every buffer back: this blob's writes are done
                free.get()
            verifier.verify()
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
        verifier = _store_verifier(desc)
        chunks: list[tuple[int, int, int]] = []
        inflight: deque[tuple[int, Future[bytes]]] = deque()
        pos = offset

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
                    copied = verifier.count
                    verifier.update(data)
                    if desc.size <= _INLINE_COMPRESS:
                        done: Future[bytes] = Future()
                        done.set_result(self._compress(data))
                        inflight.append((copied, done))
                    else:
                        inflight.append((copied, pool.submit(self._compress, data)))
                    while inflight and (len(inflight) > _WORKERS + 1 or inflight[0][1].done()):
                        flush_oldest()
            verifier.verify()
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
        pos = HEADER.size
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


def _store_verifier(desc: Descriptor) -> Verifier:
    return Verifier(desc.digest, desc.size, f"blob {desc.digest} in the store")


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
    images' unpacked size against it is the caller's part (see ``Store.unpacked_size``).
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
    partial = partial_of(path)
    created_s = int(time.time())
    fd = _claim_partial(partial)
    try:
        try:
            _write_all(fd, HEADER.pack(MAGIC, VERSION, created_s, capacity), 0)
            packer = _Packer(store, descs, fd, on_progress)
            entries, pos = packer.run()
            index = json.dumps({"imcVolume": VERSION, "created": iso_time(created_s), "capacity": capacity,
                                "chunkSize": CHUNK_SIZE, "meta": meta,
                                "blobs": [e.to_json() for e in entries]}, separators=(",", ":")).encode()
            stored, encoding = zstandard.ZstdCompressor(level=10).compress(index), INDEX_ZSTD
            if len(stored) >= len(index):
                stored, encoding = index, INDEX_JSON
            _write_all(fd, stored, pos)
            _write_all(fd, TRAILER.pack(pos, len(stored), encoding, hashlib.sha256(stored).digest(),
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
        raise StoreError(f"volume {partial.name.removesuffix(PARTIAL_SUFFIX)} is being written by another process") from None
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
