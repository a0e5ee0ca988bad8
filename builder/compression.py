"""Counting what a compressed layer decompresses to, with bounded memory.

The counts are made over an iterator of compressed chunks, never holding a layer
whole; a truncated stream raises ``zlib.error`` (for zstd too: the stream readers
return a truncated stream's prefix without complaint, so the frames are followed),
and a caller's ``limit`` stops the work early (``LimitReached``), which bounds what a
decompression bomb can cost. The store keeps the results (``Store.unpacked_size``).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import zstandard

READ_SIZE = 1 << 20
_OUT_SIZE = 4 << 20


class LimitReached(Exception):
    """Decompression passed the caller's limit; the count so far is the answer."""


def gunzip_count(chunks: Iterator[bytes], limit: int | None) -> int:
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
            out = d.decompress(data, _OUT_SIZE)
            count += len(out)
            if limit is not None and count > limit:
                raise LimitReached(count)
            if d.eof:
                data, between = d.unused_data, True
                continue
            data = d.unconsumed_tail
            if not data and len(out) < _OUT_SIZE:  # a full output may leave more inside zlib
                break
    if not between:
        raise zlib.error("the gzip stream is truncated")
    return count


class ZstdFrameWalker:
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


def unzstd_count(chunks: Iterator[bytes], limit: int | None) -> int:
    """Bytes a (multi-frame) zstd stream decompresses to, with bounded memory."""
    walker = ZstdFrameWalker()

    class _Source:
        def __init__(self) -> None:
            self._it = chunks

        def read(self, n: int = -1) -> bytes:
            data = next(self._it, b"")
            walker.feed(data)
            return data

    reader = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(
        _Source(), read_size=READ_SIZE, read_across_frames=True)
    count = 0
    while out := reader.read(_OUT_SIZE):
        count += len(out)
        if limit is not None and count > limit:
            raise LimitReached(count)
    if not walker.complete:
        raise zlib.error("the zstd stream is truncated")
    return count


def unpacked_count(compression: str, chunks: Iterator[bytes], limit: int | None) -> int:
    """Bytes a ``"gzip"`` or ``"zstd"`` stream decompresses to (see the module's docstring)."""
    return (gunzip_count if compression == "gzip" else unzstd_count)(chunks, limit)
