"""Snapshot volumes: packing, reading back byte-exact, damage, archive export, unpacked sizes."""

from __future__ import annotations

import errno
import fcntl
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import zstandard

from builder import compression
from builder.digest import Digest
from builder.errors import (
    CapacityError,
    DigestMismatchError,
    NotFoundLocalError,
    StoreError,
    ValidationError,
)
from builder.export import export_archive, repo_tag, stream_archive
from builder.oci import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
)
from builder.store import Store
from builder.volume import (
    CHUNK_SIZE,
    PackProgress,
    Volume,
    pack,
)

OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
GIB = 1 << 30


# -- realistic content -----------------------------------------------------------------


def _text_tar(seed: int, target: int) -> bytes:
    """A tar of text files (prose-like words, some binary-ish config) of about ``target`` bytes."""
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 10))) for _ in range(3000)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        i = 0
        while buf.tell() < target:
            body = b" ".join(rng.choices(words, k=rng.randint(2000, 60000))) + b"\n"
            if i % 7 == 3:
                body += rng.randbytes(rng.randint(1000, 50000))
            info = tarfile.TarInfo(f"usr/share/doc/pkg{i // 10}/file{i}.txt")
            info.size, info.mtime, info.mode = len(body), 1700000000, 0o644
            tar.addfile(info, io.BytesIO(body))
            i += 1
    return buf.getvalue()


def _config(diff_ids: list[bytes], media_type: str = OCI_CONFIG) -> bytes:
    return json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [str(Digest.of(t)) for t in diff_ids]},
        "history": [{"created_by": "test"} for _ in diff_ids],
    }, indent=2).encode()


def _manifest(media_type: str, config: Descriptor, layers: list[Descriptor]) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": media_type,
        "config": config.to_json(), "layers": [layer.to_json() for layer in layers],
    }, indent=3).encode()


class Image:
    """Blobs put in a store, with the manifest descriptor that ties them together."""

    def __init__(self, store: Store, manifest_type: str, config_type: str, layers: list[tuple[str, bytes, bytes]]):
        self.layers = [self._put(store, mt, data) for mt, data, _ in layers]
        self.config = self._put(store, config_type, _config([tar for _, _, tar in layers]))
        self.manifest = self._put(store, manifest_type, _manifest(manifest_type, self.config, self.layers))

    @staticmethod
    def _put(store: Store, media_type: str, data: bytes) -> Descriptor:
        digest = Digest.of(data)
        store.put_bytes(digest, data)
        return Descriptor(media_type, digest, len(data))

    @property
    def blobs(self) -> list[Descriptor]:
        return [self.manifest, self.config, *self.layers]


@pytest.fixture(scope="module")
def content() -> dict[str, bytes]:
    """Layer bodies shared by the module's tests (built once: they take a moment)."""
    small = _text_tar(1, 600_000)
    big = _text_tar(2, 9_800_000)  # > 9 MiB: three zstd frames
    return {
        "small_tar": small,
        "gzip": gzip.compress(small, compresslevel=1, mtime=0),
        "zstd": zstandard.ZstdCompressor(level=3).compress(_text_tar(3, 300_000)),
        "zstd_tar": _text_tar(3, 300_000),
        "big_tar": big,
    }


@pytest.fixture(scope="module")
def packed(tmp_path_factory, content):
    """A store holding an OCI image (gzip, zstd and plain tar layers) and a
    Docker-typed image, and a volume packed from it."""
    root = tmp_path_factory.mktemp("packed")
    store = Store(root / "home")
    oci = Image(store, OCI_MANIFEST, OCI_CONFIG, [
        (OCI_GZIP, content["gzip"], content["small_tar"]),
        (OCI_ZSTD, content["zstd"], content["zstd_tar"]),
        (OCI_TAR, content["big_tar"], content["big_tar"]),
    ])
    docker = Image(store, DOCKER_MANIFEST, DOCKER_CONFIG, [(DOCKER_GZIP, content["gzip"], content["small_tar"])])
    meta = {"name": "cache-a", "id": "c0ffee", "images": [
        {"name": "127.0.0.1:5000/fixtures/app:1.0", "digest": str(oci.manifest.digest),
         "mediaType": OCI_MANIFEST, "index": None},
        {"name": "127.0.0.1:5000/fixtures/docker-app:2.0", "digest": str(docker.manifest.digest),
         "mediaType": DOCKER_MANIFEST, "index": None},
    ]}
    progress: list[PackProgress] = []
    path = root / "cache-a.imcvol"
    volume = pack(store, [*oci.blobs, *docker.blobs, oci.layers[0]], path, 64 * GIB, meta, progress.append)
    return {"store": store, "oci": oci, "docker": docker, "meta": meta, "volume": volume, "path": path,
            "progress": progress, "root": root}


def _damaged_copy(packed, tmp_path: Path) -> Path:
    copy = tmp_path / "copy.imcvol"
    shutil.copyfile(packed["path"], copy)
    return copy


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith((".imcvol", ".partial")))


# -- packing and reading back ----------------------------------------------------------


def test_round_trip_every_encoding(packed):
    store, volume = packed["store"], Volume.open(packed["path"])
    oci, docker = packed["oci"], packed["docker"]
    expect = {
        oci.layers[0].digest: "raw",  # gzip layer
        oci.layers[1].digest: "raw",  # zstd layer
        oci.layers[2].digest: "zstd",  # plain tar
        oci.config.digest: "zstd",
        oci.manifest.digest: "zstd",
        docker.manifest.digest: "zstd",
        docker.config.digest: "zstd",
    }
    assert len(volume.entries) == 7  # the shared gzip layer and the repeated one once
    for digest, encoding in expect.items():
        entry = volume.entry(digest)
        original = store.read_blob(digest)
        assert (entry.encoding, entry.size) == (encoding, len(original))
        assert volume.has(digest)
        assert volume.read_bytes(digest) == original
        with volume.open_blob(digest) as f:
            pieces = []
            while piece := f.read(1_000_003):
                pieces.append(piece)
        assert b"".join(pieces) == original
    assert volume.entry(oci.layers[0].digest).media_type == OCI_GZIP
    assert volume.meta == packed["meta"]
    assert volume.capacity == 64 * GIB
    assert volume.created.endswith("Z")
    assert volume.blob_bytes == sum(len(store.read_blob(d)) for d in expect)
    big = volume.entry(oci.layers[2].digest)
    assert len(big.chunks) == 3 and big.length < big.size  # text compresses
    last = packed["progress"][-1]
    assert (last.blobs_done, last.blobs_total, last.bytes_done) == (7, 7, volume.blob_bytes)


def test_absent_digest_is_not_found(packed):
    volume = packed["volume"]
    stranger = Digest.of(b"not packed")
    assert not volume.has(stranger)
    for call in (volume.entry, volume.open_blob, volume.read_bytes, volume.raw_extent):
        with pytest.raises(NotFoundLocalError):
            call(stranger)


def test_read_range_slices_equal_the_original(packed, content, monkeypatch):
    volume = packed["volume"]
    big = content["big_tar"]
    digest = packed["oci"].layers[2].digest
    size = len(big)
    ranges = [(0, size), (0, 0), (size, size), (size - 1, size), (CHUNK_SIZE - 10, CHUNK_SIZE + 10),
              (CHUNK_SIZE, 2 * CHUNK_SIZE), (CHUNK_SIZE - 1, 2 * CHUNK_SIZE + 1), (5, size - 5),
              (2 * CHUNK_SIZE - 3, 2 * CHUNK_SIZE + 3)]
    rng = random.Random(42)
    for _ in range(25):
        a = rng.randrange(size)
        ranges.append((a, min(size, a + rng.choice((1, 100, 70_000, CHUNK_SIZE, 6_000_000)))))
    for start, end in ranges:
        assert b"".join(volume.read_range(digest, start, end)) == big[start:end], (start, end)
    gz = content["gzip"]
    gz_digest = packed["oci"].layers[0].digest
    for start, end in [(0, len(gz)), (17, 40_000), (len(gz) - 1, len(gz))]:
        assert b"".join(volume.read_range(gz_digest, start, end)) == gz[start:end]
    with pytest.raises(ValidationError):
        volume.read_range(digest, 10, size + 1)
    with pytest.raises(ValidationError):
        volume.read_range(digest, 10, 5)

    touched: list[int] = []
    frame = Volume._frame
    monkeypatch.setattr(Volume, "_frame", lambda self, fd, e, i: (touched.append(i), frame(self, fd, e, i))[1])
    assert b"".join(volume.read_range(digest, CHUNK_SIZE + 5, CHUNK_SIZE + 50)) == big[CHUNK_SIZE + 5:CHUNK_SIZE + 50]
    assert touched == [1]  # only the frame the range lies in is decompressed


def test_open_blob_seeks(packed, content):
    volume = packed["volume"]
    big = content["big_tar"]
    with volume.open_blob(packed["oci"].layers[2].digest) as f:
        f.seek(CHUNK_SIZE * 2 + 7)
        assert f.read(100) == big[CHUNK_SIZE * 2 + 7:CHUNK_SIZE * 2 + 107]
        f.seek(-5, os.SEEK_END)
        assert f.read() == big[-5:]
        f.seek(3)
        assert f.read(CHUNK_SIZE) == big[3:CHUNK_SIZE + 3]


def test_raw_extent_is_the_blob_in_the_file(packed, content):
    volume = packed["volume"]
    for layer, body in ((packed["oci"].layers[0], content["gzip"]), (packed["oci"].layers[1], content["zstd"])):
        extent = volume.raw_extent(layer.digest)
        assert extent is not None
        offset, length = extent
        with open(packed["path"], "rb") as f:
            f.seek(offset)
            assert f.read(length) == body
    assert volume.raw_extent(packed["oci"].layers[2].digest) is None  # zstd-encoded


def test_file_takes_its_content_not_its_capacity(packed):
    volume = packed["volume"]
    on_disk = os.stat(packed["path"]).st_blocks * 512
    assert volume.content_bytes == os.path.getsize(packed["path"])
    assert volume.content_bytes < volume.blob_bytes  # the big text tar compressed
    assert on_disk < volume.blob_bytes + (1 << 20) and volume.capacity == 64 * GIB


def test_pack_refuses_what_does_not_fit(tmp_path):
    store = Store(tmp_path / "home")
    data = b"x" * 1000
    store.put_bytes(Digest.of(data), data)
    desc = Descriptor(OCI_CONFIG, Digest.of(data), len(data))
    with pytest.raises(CapacityError):
        pack(store, [desc], tmp_path / "v.imcvol", 999, {})
    with pytest.raises(CapacityError):
        pack(store, [desc], tmp_path / "v.imcvol", 0, {})
    assert _leftovers(tmp_path) == []


def test_empty_blob_and_empty_volume(tmp_path):
    store = Store(tmp_path / "home")
    store.put_bytes(Digest.of(b""), b"")
    volume = pack(store, [Descriptor("application/octet-stream", Digest.of(b""), 0)], tmp_path / "v.imcvol", 1, {})
    assert volume.read_bytes(Digest.of(b"")) == b""
    assert volume.verify().ok
    assert pack(store, [], tmp_path / "empty.imcvol", 1, {"images": []}).entries == {}


# -- failures leave nothing behind -----------------------------------------------------


def test_pack_missing_blob_leaves_nothing(packed, tmp_path):
    absent = Descriptor(OCI_GZIP, Digest.of(b"never stored"), 12)
    with pytest.raises(NotFoundLocalError):
        pack(packed["store"], [*packed["oci"].blobs, absent], tmp_path / "v.imcvol", GIB, {})
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("which", ["raw", "zstd"])
def test_pack_corrupt_store_blob_fails_and_leaves_nothing(tmp_path, content, which):
    store = Store(tmp_path / "home")
    img = Image(store, OCI_MANIFEST, OCI_CONFIG, [(OCI_GZIP, content["gzip"], content["small_tar"]),
                                                  (OCI_TAR, content["big_tar"], content["big_tar"])])
    victim = img.layers[0] if which == "raw" else img.layers[1]
    path = store.blob_path(victim.digest)
    os.chmod(path, 0o644)
    _flip(path, victim.size - 100)  # same size, different bytes: only the hash can tell
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DigestMismatchError, match=str(victim.digest)):
        pack(store, img.blobs, out / "v.imcvol", GIB, {})
    assert _leftovers(out) == []


def test_pack_interrupted_leaves_nothing(packed, tmp_path):
    def interrupt(progress: PackProgress) -> None:
        if progress.bytes_done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pack(packed["store"], packed["oci"].blobs, tmp_path / "v.imcvol", GIB, {}, interrupt)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("fail_at", [1, 3])  # the first blob write, or a later one
def test_pack_out_of_space_fails_cleanly(packed, tmp_path, monkeypatch, fail_at):
    calls = []
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) > fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(StoreError, match="no space left"):
        pack(packed["store"], packed["oci"].blobs, tmp_path / "v.imcvol", GIB, {})
    monkeypatch.undo()
    assert _leftovers(tmp_path) == []


def test_pack_replaces_an_older_volume_only_when_done(packed, tmp_path):
    path = tmp_path / "v.imcvol"
    pack(packed["store"], packed["docker"].blobs, path, GIB, {"gen": 1})
    absent = Descriptor(OCI_GZIP, Digest.of(b"never stored"), 12)
    with pytest.raises(NotFoundLocalError):
        pack(packed["store"], [absent], path, GIB, {"gen": 2})
    assert Volume.open(path).meta == {"gen": 1}


def test_a_second_pack_of_the_same_volume_fails_at_once(packed, tmp_path):
    partial = tmp_path / "v.imcvol.partial"
    partial.write_bytes(b"another process is writing this")
    with open(partial, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(StoreError, match="being written by another process"):
            pack(packed["store"], packed["docker"].blobs, tmp_path / "v.imcvol", GIB, {})
    assert partial.read_bytes() == b"another process is writing this"  # not truncated, not removed
    pack(packed["store"], packed["docker"].blobs, tmp_path / "v.imcvol", GIB, {})  # a stale partial is reused
    assert _leftovers(tmp_path) == ["v.imcvol"]


# -- damage ----------------------------------------------------------------------------


def test_open_rejects_a_truncated_file(packed, tmp_path):
    copy = _damaged_copy(packed, tmp_path)
    size = copy.stat().st_size
    for keep in (size - 1, size - 70, size // 2, 70, 10, 0):
        with open(copy, "r+b") as f:
            f.truncate(keep)
        with pytest.raises(StoreError, match="is damaged"):
            Volume.open(copy)


def test_open_rejects_a_flipped_byte_in_the_index(packed, tmp_path):
    copy = _damaged_copy(packed, tmp_path)
    size = copy.stat().st_size
    with open(copy, "rb") as f:
        f.seek(size - 64)
        index_offset = int.from_bytes(f.read(8), "big")
    _flip(copy, index_offset + (size - 64 - index_offset) // 2)
    with pytest.raises(StoreError, match=r"volume .* is damaged: the index checksum"):
        Volume.open(copy)


def test_open_rejects_other_files(tmp_path):
    not_volume = tmp_path / "notes.txt"
    not_volume.write_bytes(b"hello " * 100)
    with pytest.raises(StoreError, match="is damaged"):
        Volume.open(not_volume)
    with pytest.raises(StoreError, match="cannot be read"):
        Volume.open(tmp_path / "absent.imcvol")


def test_verify_reports_flipped_bytes_in_blob_data(packed, tmp_path):
    assert packed["volume"].verify().ok
    copy = _damaged_copy(packed, tmp_path)
    volume = Volume.open(copy)
    raw = volume.entry(packed["oci"].layers[1].digest)
    compressed = volume.entry(packed["oci"].layers[2].digest)
    _flip(copy, raw.offset + raw.length // 2)
    _flip(copy, compressed.offset + compressed.chunks[1][1] + 1000)
    progress: list[PackProgress] = []
    report = volume.verify(progress.append)
    assert sorted(report.corrupt) == sorted([str(raw.digest), str(compressed.digest)])
    assert not report.ok and report.checked == 7
    assert progress[-1].blobs_done == 7
    with pytest.raises(StoreError, match="does not decompress"):
        b"".join(volume.read_range(compressed.digest, CHUNK_SIZE, CHUNK_SIZE + 10))


# -- OCI archive export, checked with skopeo --------------------------------------------

needs_skopeo = pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")


def _skopeo(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    policy = tmp / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    return subprocess.run(["skopeo", "--policy", str(policy), *args], capture_output=True, text=True,
                          check=True, timeout=60, env={**os.environ, "TMPDIR": str(tmp)})


@pytest.fixture(scope="module")
def archive(packed):
    out = packed["root"] / "export.tar"
    export_archive(packed["volume"], "oci-archive", out)
    return out


def test_export_layout(packed, archive):
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        index = json.loads(tar.extractfile("index.json").read())
        assert json.loads(tar.extractfile("oci-layout").read()) == {"imageLayoutVersion": "1.0.0"}
        for digest in packed["volume"].entries:
            member = tar.extractfile(f"blobs/sha256/{digest.hex}")
            assert hashlib.sha256(member.read()).hexdigest() == digest.hex
        refs = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in index["manifests"]}
        assert set(refs) == {i["name"] for i in packed["meta"]["images"]}
        oci_entry = refs["127.0.0.1:5000/fixtures/app:1.0"]
        assert oci_entry["digest"] == str(packed["oci"].manifest.digest)  # OCI images keep their digest
        docker_entry = refs["127.0.0.1:5000/fixtures/docker-app:2.0"]
        assert docker_entry["mediaType"] == OCI_MANIFEST
        assert docker_entry["digest"] != str(packed["docker"].manifest.digest)
        converted = json.loads(tar.extractfile(f"blobs/sha256/{docker_entry['digest'][7:]}").read())
        assert f"blobs/sha256/{docker_entry['digest'][7:]}" in names
    assert converted["config"]["mediaType"] == OCI_CONFIG
    assert [layer["mediaType"] for layer in converted["layers"]] == [OCI_GZIP]
    assert [layer["digest"] for layer in converted["layers"]] == [str(d.digest) for d in packed["docker"].layers]
    assert not list(archive.parent.glob("*.partial"))


@needs_skopeo
@pytest.mark.parametrize("image", ["oci", "docker"])
def test_export_is_accepted_by_skopeo(packed, archive, tmp_path, image):
    name = {"oci": "127.0.0.1:5000/fixtures/app:1.0", "docker": "127.0.0.1:5000/fixtures/docker-app:2.0"}[image]
    layers = [str(d.digest) for d in packed[image].layers]
    inspected = json.loads(_skopeo("inspect", f"oci-archive:{archive}:{name}", tmp=tmp_path).stdout)
    assert inspected["Layers"] == layers
    dest = tmp_path / "copy"
    # --preserve-digests: skopeo would otherwise compress the plain tar layer on the way.
    _skopeo("copy", "-q", "--preserve-digests", f"oci-archive:{archive}:{name}", f"oci:{dest}:x", tmp=tmp_path)
    with tarfile.open(archive) as tar:
        index = json.loads(tar.extractfile("index.json").read())
    exported = next(m["digest"] for m in index["manifests"]
                    if m["annotations"]["org.opencontainers.image.ref.name"] == name)
    copied = {p.name for p in (dest / "blobs" / "sha256").iterdir()}
    assert copied == {d[7:] for d in layers} | {packed[image].config.digest.hex, exported[7:]}


def test_export_refuses_a_name_skopeo_would_reject(packed, tmp_path):
    volume = Volume.open(packed["path"])
    volume.meta = {**volume.meta, "images": [{**volume.meta["images"][0], "name": "bad name"}]}
    with pytest.raises(ValidationError):
        export_archive(volume, "oci-archive", tmp_path / "x.tar")
    assert list(tmp_path.iterdir()) == []


def test_export_rehashes_and_leaves_nothing_on_damage(packed, tmp_path):
    copy = _damaged_copy(packed, tmp_path)
    volume = Volume.open(copy)
    raw = volume.entry(packed["oci"].layers[0].digest)
    _flip(copy, raw.offset + 10)
    with pytest.raises(DigestMismatchError):
        export_archive(volume, "oci-archive", tmp_path / "x.tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.imcvol"]


# -- docker-archive export, and writing archives -------------------------------------------


def test_docker_archive_lists_each_image_with_its_tag_and_each_blob_once(packed, tmp_path):
    out = tmp_path / "d.tar"
    assert export_archive(packed["volume"], "docker-archive", out) == [i["name"] for i in packed["meta"]["images"]]
    with tarfile.open(out) as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile("manifest.json").read())
        for name in names:
            if name.startswith("blobs/sha256/") and not name.endswith("/"):
                assert hashlib.sha256(tar.extractfile(name).read()).hexdigest() == name.rsplit("/", 1)[1]
    assert len(names) == len(set(names))
    expected = []
    for key, image in (("oci", packed["meta"]["images"][0]), ("docker", packed["meta"]["images"][1])):
        expected.append({"Config": f"blobs/sha256/{packed[key].config.digest.hex}", "RepoTags": [image["name"]],
                         "Layers": [f"blobs/sha256/{d.digest.hex}" for d in packed[key].layers]})
    assert manifest == expected
    # the gzip layer both images share is there once; the manifests are not there at all
    blobs = {n.rsplit("/", 1)[1] for n in names if n.startswith("blobs/sha256/") and not n.endswith("/")}
    assert blobs == {d.digest.hex for key in ("oci", "docker") for d in (packed[key].config, *packed[key].layers)}


def test_stream_and_file_exports_are_the_same_bytes(packed, tmp_path):
    sink = io.BytesIO()
    assert stream_archive(packed["volume"], "docker-archive", sink, ["127.0.0.1:5000/fixtures/docker-app:2.0"]) == [
        "127.0.0.1:5000/fixtures/docker-app:2.0"]
    export_archive(packed["volume"], "docker-archive", tmp_path / "d.tar", ["127.0.0.1:5000/fixtures/docker-app:2.0"])
    assert sink.getvalue() == (tmp_path / "d.tar").read_bytes()
    assert len(sink.getvalue()) % tarfile.RECORDSIZE == 0


@pytest.mark.parametrize(("name", "tag"), [
    ("127.0.0.1:5000/fixtures/app:1.0", "127.0.0.1:5000/fixtures/app:1.0"),
    ("alpine", "alpine:latest"),
    ("docker.io/library/alpine:3.19@sha256:" + "a" * 64, "docker.io/library/alpine:3.19"),
    ("ghcr.io/o/r@sha256:" + "a" * 64, None),
])
def test_repo_tag(name, tag):
    assert repo_tag(name) == tag


def test_export_of_an_image_the_volume_lacks_writes_nothing(packed, tmp_path):
    with pytest.raises(NotFoundLocalError, match="is not in cache"):
        export_archive(packed["volume"], "docker-archive", tmp_path / "x.tar", ["127.0.0.1:5000/fixtures/nope:1"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tmpfile", [True, False], ids=["O_TMPFILE", "named-partial"])
def test_a_failing_write_leaves_the_old_archive_and_nothing_else(packed, tmp_path, monkeypatch, tmpfile):
    if not tmpfile:  # a file system without O_TMPFILE: a hidden partial file stands in
        real_open = os.open

        def no_tmpfile(path, flags, *args, **kw):
            if flags & os.O_TMPFILE == os.O_TMPFILE:
                raise OSError(errno.EOPNOTSUPP, "Operation not supported")
            return real_open(path, flags, *args, **kw)

        monkeypatch.setattr(os, "open", no_tmpfile)
    out = tmp_path / "x.tar"
    out.write_bytes(b"previous")
    writes = 0
    real_fdopen = os.fdopen

    class Failing(io.BufferedWriter):
        def write(self, data):
            nonlocal writes
            writes += 1
            if writes > 20:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    monkeypatch.setattr(os, "fdopen", lambda fd, mode, buffering: Failing(io.FileIO(fd, "w"), buffering))
    with pytest.raises(StoreError, match="no space left"):
        export_archive(packed["volume"], "docker-archive", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tar"] and out.read_bytes() == b"previous"
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    export_archive(packed["volume"], "docker-archive", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tar"]
    with tarfile.open(out) as tar:
        assert "manifest.json" in tar.getnames()


# -- unpacked sizes --------------------------------------------------------------------


def _layer(store: Store, media_type: str, data: bytes) -> Descriptor:
    store.put_bytes(Digest.of(data), data)
    return Descriptor(media_type, Digest.of(data), len(data))


def _cached(store: Store, desc: Descriptor) -> Path:
    return store.home.unpacked_record(desc.digest)


def test_unpacked_size_of_every_kind(tmp_path, content):
    store = Store(tmp_path / "home")
    small = content["small_tar"]
    assert store.unpacked_size(_layer(store, OCI_GZIP, content["gzip"])) == len(small)
    assert store.unpacked_size(_layer(store, DOCKER_GZIP, content["gzip"])) == len(small)
    assert store.unpacked_size(_layer(store, OCI_ZSTD, content["zstd"])) == len(content["zstd_tar"])
    tar = _layer(store, OCI_TAR, small)
    assert store.unpacked_size(tar) == len(small)
    assert not _cached(store, tar).exists()  # nothing to decompress, nothing to cache
    config = _layer(store, OCI_CONFIG, b'{"os": "linux"}')
    assert store.unpacked_size(config) == config.size


def test_unpacked_size_of_multi_member_gzip_and_multi_frame_zstd(tmp_path):
    store = Store(tmp_path / "home")
    a, b = b"first member\n" * 5000, os.urandom(300_000)
    members = gzip.compress(a, mtime=0) + gzip.compress(b, mtime=0) + b"\0" * 16  # zero padding is allowed
    assert store.unpacked_size(_layer(store, OCI_GZIP, members)) == len(a) + len(b)
    cctx = zstandard.ZstdCompressor(level=1)
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    frames = cctx.compress(a) + skippable + cctx.compress(b)
    assert store.unpacked_size(_layer(store, OCI_ZSTD, frames)) == len(a) + len(b)
    chunked = io.BytesIO()
    with zstandard.ZstdCompressor(level=1).stream_writer(chunked, closefd=False) as w:  # no content size
        w.write(a)
    assert store.unpacked_size(_layer(store, OCI_ZSTD, chunked.getvalue())) == len(a)


def test_unpacked_size_is_cached_per_digest(tmp_path, content):
    store = Store(tmp_path / "home")
    desc = _layer(store, OCI_GZIP, content["gzip"])
    first = store.unpacked_size(desc)
    assert _cached(store, desc).read_text() == str(first)
    os.unlink(store.blob_path(desc.digest))  # the answer no longer needs the blob
    assert store.unpacked_size(desc) == first
    other = Descriptor(OCI_GZIP, Digest.of(b"gone"), 4)
    with pytest.raises(NotFoundLocalError):
        store.unpacked_size(other)


def test_unpacked_size_limit_bounds_a_bomb(tmp_path):
    store = Store(tmp_path / "home")
    bomb = _layer(store, OCI_GZIP, gzip.compress(bytes(50 << 20), compresslevel=1, mtime=0))
    started = time.monotonic()
    count = store.unpacked_size(bomb, limit=1 << 20)
    assert (1 << 20) < count < (50 << 20)
    assert time.monotonic() - started < 1.0
    assert not _cached(store, bomb).exists()  # a truncated count is never remembered
    zbomb = _layer(store, OCI_ZSTD, zstandard.ZstdCompressor(level=1).compress(bytes(50 << 20)))
    assert (1 << 20) < store.unpacked_size(zbomb, limit=1 << 20) < (50 << 20)
    assert not _cached(store, zbomb).exists()
    assert store.unpacked_size(bomb, limit=100 << 20) == 50 << 20  # under the limit: exact, and cached
    assert _cached(store, bomb).exists()


@pytest.mark.parametrize("kind", ["gzip garbage", "gzip truncated", "zstd garbage", "zstd truncated"])
def test_unpacked_size_of_corrupt_layers(tmp_path, content, kind):
    store = Store(tmp_path / "home")
    data = {
        "gzip garbage": b"\x1f\x8b" + os.urandom(5000),
        "gzip truncated": content["gzip"][:-100],
        "zstd garbage": os.urandom(5000),
        "zstd truncated": content["zstd"][:-100],
    }[kind]
    desc = _layer(store, OCI_GZIP if kind.startswith("gzip") else OCI_ZSTD, data)
    with pytest.raises(StoreError, match=f"layer {desc.digest} does not decompress"):
        store.unpacked_size(desc)
    assert not _cached(store, desc).exists()


def test_unpacked_size_notices_a_corrupt_store_blob(tmp_path, content):
    store = Store(tmp_path / "home")
    desc = _layer(store, OCI_GZIP, content["gzip"])
    path = store.blob_path(desc.digest)
    os.chmod(path, 0o644)
    path.write_bytes(gzip.compress(b"something else", mtime=0))
    with pytest.raises(DigestMismatchError):
        store.unpacked_size(desc)


def test_zstd_walker_follows_frames():
    walker = compression.ZstdFrameWalker()
    data = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(os.urandom(200_000) + bytes(300_000))
    for i in range(0, len(data), 7):  # headers split across feeds
        walker.feed(data[i:i + 7])
    assert walker.complete and walker.frames == 1
