"""Volume benchmarks: packing a snapshot volume against ``tar | zstd -T0``.

- Throughput: ``builder.volume.pack`` (in-process, fsync included) of an image's
  blobs into a volume, against ``tar -cf - <the blob files> | zstd -T0 -q -o OUT``
  over the same files: the obvious way to put a set of blobs in one compressed file.
  Both are timed as wall time after ``os.sync()``, alternating, median of ROUNDS,
  after one untimed warm-up run of each.
- Size: the volume file against the ``.tar.zst`` on disk.

``packing()`` is what ``bench/run.py`` calls on the large fixture's blobs. Run this file
directly to try it on generated blobs: ``python bench/volume_bench.py [--mb 400]``.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from harness import Run, SideBySide, Table, fresh_dir, mb, side_by_side

from builder.digest import Digest, hash_file
from builder.oci import Descriptor
from builder.store import Store
from builder.volume import pack

ROUNDS = 3


def _timed(fn: object) -> Run:
    """Wall time of ``fn()`` after flushing dirty pages, so one run's writeback does
    not land in the next one's time."""
    os.sync()
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return Run(time.perf_counter() - start, 0)


def packing(store_home: Path, blobs: list[Descriptor], work: Path, table: Table) -> None:
    """Add the packing throughput row and the on-disk size row for ``blobs``."""
    store = Store(store_home)
    unique = list({d.digest: d for d in blobs}.values())
    size = sum(d.size for d in unique)
    out = fresh_dir(work / "volume-bench")
    volume_path, tzst_path = out / "bench.imcvol", out / "bench.tar.zst"
    members = " ".join(shlex.quote(f"{d.digest.algorithm}/{d.digest.hex}") for d in unique)
    peer_cmd = (f"tar -cf - -C {shlex.quote(str(store.home.blobs))} {members} "
                f"| zstd -T0 -q -o {shlex.quote(str(tzst_path))}")

    def run_imc() -> None:
        pack(store, unique, volume_path, capacity=max(size, 1) * 4, meta={"name": "bench", "images": []})

    def run_peer() -> None:
        subprocess.run(["bash", "-o", "pipefail", "-c", peer_cmd], check=True)

    def reset() -> None:
        for p in (volume_path, tzst_path):
            p.unlink(missing_ok=True)

    # One untimed run of each first: both then read the blobs from a warm page cache.
    run_imc()
    run_peer()
    reset()
    result: SideBySide = side_by_side(f"pack {mb(size)}", ROUNDS, imc=lambda: _timed(run_imc),
                                      peer=lambda: _timed(run_peer), reset=reset)
    # side_by_side resets before each run, so the last round's two outputs are both here.
    imc_rate, peer_rate = size / result.imc_median, size / result.peer_median
    table.add(f"pack a volume of {mb(size)}",
              f"{imc_rate / 1e6:.0f} MB/s ({result.imc_median:.2f} s)",
              f"{peer_rate / 1e6:.0f} MB/s ({result.peer_median:.2f} s)",
              f"**{imc_rate / peer_rate:.2f}x** throughput")
    if not volume_path.exists():
        run_imc()
    if not tzst_path.exists():
        run_peer()
    imc_bytes, peer_bytes = volume_path.stat().st_size, tzst_path.stat().st_size
    table.add("volume file on disk (vs the .tar.zst)", mb(imc_bytes), mb(peer_bytes),
              f"{imc_bytes / peer_bytes:.2f}x size")
    reset()


# -- standalone run on generated blobs -------------------------------------------------

_GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
_TAR_LAYER = "application/vnd.oci.image.layer.v1.tar"


def _put_file(store: Store, path: Path, media_type: str) -> Descriptor:
    """Move a generated file into the store under its digest."""
    digest, size = hash_file(str(path))
    os.replace(path, store.blob_path(digest))
    return Descriptor(media_type, digest, size)


def _synthetic(store: Store, total_mb: int, tar_share: float, scratch: Path) -> list[Descriptor]:
    """Blobs shaped like the large fixture: incompressible "gzip" layers in the
    fixture's proportions, plus (``tar_share`` of the bytes) an uncompressed text tar."""
    rng = random.Random(7)
    shares = (100, 70, 60, 50, 50, 40, 30)
    blobs: list[Descriptor] = []
    for i, share in enumerate(shares):
        n = int(total_mb * (1 - tar_share) * share / sum(shares)) << 20
        path = scratch / f"layer{i}"
        with path.open("wb") as f:
            left = n
            while left:
                k = min(left, 8 << 20)
                f.write(rng.randbytes(k))
                left -= k
        blobs.append(_put_file(store, path, _GZIP_LAYER))
    if tar_share > 0:
        words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]
        path = scratch / "text.tar"
        target = int(total_mb * tar_share) << 20
        with tarfile.open(path, "w") as tar:
            i = written = 0
            while written < target:
                body = b" ".join(rng.choices(words, k=60000)) + b"\n"
                info = tarfile.TarInfo(f"usr/share/doc/file{i}.txt")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
                written += len(body)
                i += 1
        blobs.append(_put_file(store, path, _TAR_LAYER))
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    store.put_bytes(Digest.of(config), config)
    blobs.append(Descriptor("application/vnd.oci.image.config.v1+json", Digest.of(config), len(config)))
    return blobs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=400, help="total size of the generated blobs")
    parser.add_argument("--tar-share", type=float, default=0.0,
                        help="fraction of the bytes in an uncompressed text tar layer (zstd-encoded)")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imc-volume-bench-", dir=args.work) as tmp:
        work = Path(tmp)
        store = Store(work / "home")
        blobs = _synthetic(store, args.mb, args.tar_share, work)
        table = Table("Volume: imc pack against tar + zstd -T0", ["benchmark", "imc", "tar + zstd -T0", "ratio"])
        print(table.title, flush=True)
        packing(store.home, blobs, work, table)
        print(table.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
