"""gc sweeps what a crash leaves beside the store's files, and nothing a writer still uses."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from builder.errors import StoreError
from builder.store import STALE_TEMP_SECONDS, Store, pread_exact


def test_gc_removes_stale_temporary_files_and_keeps_fresh_ones(tmp_path: Path) -> None:
    store = Store(tmp_path)
    meta = tmp_path / "meta" / "unpacked"
    meta.mkdir(parents=True)
    stale, fresh = meta / ".sha256-aa.x1.tmp", meta / ".sha256-bb.x2.tmp"
    for path in (stale, fresh):
        path.write_text("123")
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(stale, (old, old))
    blob_tmp = store.home.blobs / "sha256" / ".abc.x3.tmp"  # left by a write_atomic killed under pinning
    blob_tmp.write_text("half")
    report = store.gc()
    assert not stale.exists() and fresh.exists() and not blob_tmp.exists()
    assert report.partials_removed == 2


def test_pread_exact_reads_across_short_reads_and_names_a_truncated_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(range(100)))
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, offset: real(fd, min(n, 7), offset))  # short reads
    fd = os.open(path, os.O_RDONLY)
    try:
        assert pread_exact(fd, 10, 50, "f") == bytes(range(10, 60))
        with pytest.raises(StoreError, match=r"^volume f: the file ends early"):
            pread_exact(fd, 90, 20, "volume f")
    finally:
        os.close(fd)
