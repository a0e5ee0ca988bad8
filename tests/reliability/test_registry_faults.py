"""Registry faults, end to end: each one through a cache build, ``imc pull`` or a pull
into a store, and then a look at what was left behind.

The real registry:2 produces the faults it can (being killed mid-blob and restarted on
the same port); the scripted fault server the rest (resets, truncation, stalls, corrupt
bytes, wrong digests, 429/500, redirects, oversized manifests, decompression bombs).
Single-request faults at the client level are in ``tests/unit/test_client_faults.py``;
here each fault must also leave the store clean: no partial download, no blob that
did not verify, no volume for a failed cache.

Nothing here sleeps to synchronise: a held response is waited for through an event,
and delays the client must honour are measured from the server's request times.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from support.countproxy import CountingProxy
from support.faultserver import (
    OCI_MANIFEST,
    Corrupt,
    FaultServer,
    NoLength,
    Reset,
    Stall,
    Truncate,
    WrongDigest,
    sha256,
)

from builder.build import Builder
from builder.caches import Caches
from builder.digest import Digest
from builder.imagecache import CacheSpec, ImageCache
from builder.pull import Puller
from builder.reference import parse
from builder.registry.hosts import HostPolicy
from builder.registry.retry import RetryPolicy
from builder.store import Store
from builder.volume import Volume

IMC = [sys.executable, "-m", "builder"]
ZSTD_LAYER = "application/vnd.oci.image.layer.v1.tar+zstd"


# -- helpers ---------------------------------------------------------------------------------


def layer(size: int, seed: int) -> bytes:
    """A valid gzip layer of about ``size`` incompressible bytes (so it packs and counts)."""
    return gzip.compress(random.Random(seed).randbytes(size), compresslevel=1, mtime=0)


def build_from(home: Path, srv: FaultServer, tag: str = "v1", name: str = "c", **kw: Any) -> ImageCache:
    caches = Caches(home)
    _, lease = caches.create(name, CacheSpec(images=[f"{srv.reference}:{tag}"], plain_http=[srv.endpoint],
                                                   **kw))
    return Builder(caches).build(name, lease)


def partials(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for d in ("ingest", "volumes") if (home / d).is_dir()
                  for p in (home / d).iterdir() if p.name.endswith(".partial"))


def volume_files(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "volumes").iterdir()) if (home / "volumes").is_dir() else []


def stored(home: Path) -> set[str]:
    return {f"sha256:{p.name}" for p in (home / "store" / "blobs" / "sha256").iterdir()}


def assert_ready_and_clean(home: Path, result: ImageCache, blobs: list[Any]) -> None:
    """Ready, every blob in the volume verified, no partial anywhere."""
    assert result.phase == "Ready", result.message
    vol = Volume.open(Path(result.volume.path))
    assert vol.verify().corrupt == []
    for blob in blobs:
        assert b"".join(vol.read_range(Digest.parse(blob.digest), 0, blob.size)) == blob.data
    assert partials(home) == []
    assert Store(home).verify().ok


def assert_failed_and_clean(home: Path, result: ImageCache, bad_digest: str, reason: str) -> None:
    """Failed with ``reason`` in its last event; the bad content nowhere; nothing left after gc."""
    assert result.phase == "Failed", result.message
    assert reason in result.message and reason in result.events[-1].message
    assert result.events[-1].type == "Warning" and result.events[-1].reason == "Failed"
    assert bad_digest not in stored(home)
    # Bytes that did not verify are dropped at once; a download the failure cancelled
    # keeps its partial for a retry to resume, until gc.
    assert f"ingest/sha256-{bad_digest[7:]}.partial" not in partials(home)
    assert volume_files(home) == [] and result.pinned == []
    Caches(home).gc()
    assert stored(home) == set() and partials(home) == []


# -- the real registry killed mid-blob ---------------------------------------------------------------


def test_registry_killed_mid_blob_and_restarted_resumes_without_refetching(
        tmp_path: Path, registry_set: Any, plain_registry: Any, catalogue: dict[str, Any]) -> None:
    """The download of one layer is held mid-body; the registry is killed with SIGKILL and
    started again on the same port; released, the pull resumes that layer with a Range
    and fetches no finished layer twice."""
    ref = "fixtures/app:1.0"
    manifest = catalogue["images"][ref]["manifests"][0]
    config, *layers = [manifest["config"], *manifest["layers"]]
    victim = layers[1]["digest"]  # the second layer: the config and the first layer are done by then
    host, port = plain_registry.host.split(":")
    killed = False
    with CountingProxy((host, int(port))) as proxy:
        pause = proxy.pause_response(lambda m, p: m == "GET" and p.endswith(f"/blobs/{victim}"), after=60_000)
        store = Store(tmp_path)
        puller = Puller(store, HostPolicy(plain_http=frozenset({proxy.host})), concurrency=1,
                        retry=RetryPolicy(backoff=0.05))
        outcome: dict[str, Any] = {}

        def pull() -> None:
            try:
                outcome["result"] = puller.pull([parse(f"{proxy.host}/{ref}")])
            except BaseException as e:
                outcome["error"] = e

        thread = threading.Thread(target=pull)
        thread.start()
        try:
            assert pause.reached.wait(60), "the download never reached the held layer"
            registry_set.kill("plain")
            killed = True
            registry_set.restart("plain")
            killed = False
        finally:
            pause.release()
            thread.join(120)
            if killed:
                registry_set.restart("plain")  # other tests need it, whatever happened here
        assert not thread.is_alive()
        assert "error" not in outcome, outcome.get("error")
        gets = proxy.blob_gets()
    # Finished blobs once, the held one twice: the second time from where it stopped.
    assert {d: len(r) for d, r in gets.items()} == {config["digest"]: 1, layers[0]["digest"]: 1, victim: 2,
                                                     layers[2]["digest"]: 1}
    first, again = gets[victim]
    assert first.headers.get("range") is None
    resumed_at = int(again.headers["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at < layers[1]["size"]
    for blob in (config, *layers):
        data = store.blob_path(Digest.parse(blob["digest"])).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == blob["digest"]
    assert list(store.home.ingest.iterdir()) == []
    assert outcome["result"].blobs_fetched == 4


# -- dropped, cut and stalled connections: retried, then Ready -----------------------------------------------


def test_connection_reset_mid_blob_is_retried_and_the_cache_is_ready(tmp_path: Path) -> None:
    with FaultServer() as srv:
        image = srv.add_image([layer(300_000, 1), layer(50_000, 2)])
        victim = image.layers[0]
        srv.script(srv.blob_path(victim.digest), Reset(after=100_000))
        result = build_from(tmp_path, srv)
        ranges = srv.ranges(srv.blob_path(victim.digest))
    assert_ready_and_clean(tmp_path, result, list(image.blobs))
    # Retried once; from where the reset left it if the bytes before it arrived.
    assert len(ranges) == 2 and ranges[0] is None
    assert ranges[1] is None or 0 < int(ranges[1].removeprefix("bytes=").rstrip("-")) <= 100_000


def test_truncated_body_resumes_with_range_and_the_cache_is_ready(tmp_path: Path) -> None:
    with FaultServer() as srv:
        image = srv.add_image([layer(300_000, 3)])
        victim = image.layers[0]
        srv.script(srv.blob_path(victim.digest), Truncate(after=123_456))
        result = build_from(tmp_path, srv)
        ranges = srv.ranges(srv.blob_path(victim.digest))
    assert_ready_and_clean(tmp_path, result, list(image.blobs))
    assert ranges == [None, "bytes=123456-"]


def test_stalled_connections_time_out_and_the_retry_succeeds(tmp_path: Path) -> None:
    """Headers, then nothing: the read timeout fires (1 s), the retry completes the pull."""
    release = threading.Event()
    with FaultServer() as srv:
        image = srv.add_image([layer(200_000, 4)])
        victim = image.layers[0]
        srv.script(srv.manifest_path("v1"), Stall(release, after=0))
        srv.script(srv.blob_path(victim.digest), Stall(release, after=50_000))
        store = Store(tmp_path)
        puller = Puller(store, HostPolicy(plain_http=frozenset({srv.endpoint})),
                        retry=RetryPolicy(timeout=(2, 1), backoff=0.05))
        try:
            result = puller.pull([parse(f"{srv.reference}:v1")])
        finally:
            release.set()  # free the stalled server threads
        manifest_gets = srv.requests_to(srv.manifest_path("v1"))
        blob_gets = srv.requests_to(srv.blob_path(victim.digest))
    assert len(manifest_gets) == 2 and manifest_gets[1].at - manifest_gets[0].at >= 1.0
    assert [r.header("Range") for r in blob_gets] == [None, "bytes=50000-"]
    assert blob_gets[1].at - blob_gets[0].at >= 1.0  # the read timeout, not an early give-up
    assert result.blobs_fetched == 2
    for blob in image.blobs:
        assert store.blob_path(Digest.parse(blob.digest)).read_bytes() == blob.data
    assert list(store.home.ingest.iterdir()) == []


# -- content that does not verify: Failed, nothing kept -----------------------------------------------------


def test_corrupt_layer_fails_the_cache_and_is_not_stored(tmp_path: Path) -> None:
    with FaultServer() as srv:
        image = srv.add_image([layer(200_000, 5), layer(20_000, 6)])
        victim = image.layers[0]
        srv.always(srv.blob_path(victim.digest), Corrupt(position=1000))
        result = build_from(tmp_path, srv)
    assert_failed_and_clean(tmp_path, result, victim.digest, "digest mismatch")
    assert victim.digest in result.message


def test_wrong_docker_content_digest_on_the_manifest_fails_the_cache(tmp_path: Path) -> None:
    with FaultServer() as srv:
        image = srv.add_image([layer(20_000, 7)])
        srv.always(srv.manifest_path("v1"), WrongDigest())
        result = build_from(tmp_path, srv)
        blob_gets = sum(srv.count(srv.blob_path(b.digest)) for b in image.blobs)
    assert_failed_and_clean(tmp_path, result, image.manifest.digest, "digest mismatch")
    assert blob_gets == 0  # nothing is fetched for a manifest that did not verify


# -- 429 and 500: honoured, then Ready ----------------------------------------------------------------------------


def test_429_retry_after_is_honoured_in_a_cache_build(tmp_path: Path) -> None:
    with FaultServer() as srv:
        image = srv.add_image([layer(30_000, 8)])
        path = srv.blob_path(image.layers[0].digest)
        srv.fail(path, 429, headers={"Retry-After": "2"})
        result = build_from(tmp_path, srv)
        gets = srv.requests_to(path)
    assert_ready_and_clean(tmp_path, result, list(image.blobs))
    assert len(gets) == 2
    # The client waited what the registry asked (2 s), not its own first backoff (0.5 s).
    assert gets[1].at - gets[0].at >= 2.0


def test_500_burst_then_success_backs_off_and_the_cache_is_ready(tmp_path: Path) -> None:
    with FaultServer() as srv:
        image = srv.add_image([layer(30_000, 9)])
        path = srv.blob_path(image.layers[0].digest)
        srv.fail(path, 500, times=3)
        result = build_from(tmp_path, srv)
        gets = srv.requests_to(path)
    assert_ready_and_clean(tmp_path, result, list(image.blobs))
    assert len(gets) == 4  # the waits between them are full-jitter draws (tests/unit/test_transport.py)


# -- redirects: credentials stay with the registry ---------------------------------------------------------------


def test_redirect_to_another_host_does_not_forward_credentials(tmp_path: Path) -> None:
    with FaultServer() as srv, FaultServer() as other:
        image = srv.add_image([layer(40_000, 10)])
        srv.require_basic("team", "s3cret")
        srv.redirect_blobs(other)
        caches = Caches(tmp_path)
        caches.secrets.create("team:cred", srv.endpoint, "team", "s3cret")
        _, lease = caches.create("c", CacheSpec(images=[f"{srv.reference}:v1"], plain_http=[srv.endpoint],
                                                image_pull_secrets=["team:cred"]))
        result = Builder(caches).build("c", lease)
        served_by_other = [r for r in other.requests if r.path.startswith("/v2/")]
        to_registry = [r for r in srv.requests if r.path.startswith(f"/v2/{srv.repository}/")]
    assert_ready_and_clean(tmp_path, result, list(image.blobs))
    assert {r.path for r in served_by_other} == {srv.blob_path(b.digest) for b in image.blobs}
    assert all(r.header("Authorization") is None for r in other.requests)
    assert any((r.header("Authorization") or "").startswith("Basic ") for r in to_registry)


# -- limits: oversized manifests, decompression bombs -----------------------------------------------------------------


def _huge_manifest(srv: FaultServer, tag: str) -> None:
    config = srv.add_blob(b"{}")
    padding = "x" * (4 * 1024 * 1024)
    raw = (f'{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":'
           f'"application/vnd.oci.image.config.v1+json","digest":"{config.digest}","size":2}},'
           f'"layers":[],"annotations":{{"pad":"{padding}"}}}}').encode()
    srv.add_manifest(raw, OCI_MANIFEST, tag)


def test_manifest_over_the_cap_is_refused_by_imc_pull_and_nothing_is_stored(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with FaultServer() as srv:
        _huge_manifest(srv, "huge")
        out = subprocess.run([*IMC, "pull", "--plain-http", srv.endpoint, f"{srv.reference}:huge"],
                             check=False, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "IMC_HOME": str(home)})
    assert out.returncode == 7, out.stderr  # UnsupportedError
    assert "exceeds the 4194304-byte cap" in out.stderr and out.stderr.count("\n") == 1
    assert stored(home) == set() and partials(home) == []


def test_manifest_over_the_cap_without_length_fails_the_cache(tmp_path: Path) -> None:
    with FaultServer() as srv:
        _huge_manifest(srv, "huge")
        srv.always(srv.manifest_path("huge"), NoLength())
        result = build_from(tmp_path, srv, tag="huge")
    assert result.phase == "Failed" and "4194304-byte cap" in result.message
    assert stored(tmp_path) == set() and partials(tmp_path) == [] and volume_files(tmp_path) == []


def _zstd_bomb(valid_gib: int) -> bytes:
    """One zstd frame of RLE blocks that unpacks to ``valid_gib`` GiB of zeros, then bytes
    that do not decompress: counting past ``valid_gib`` * 0.8 GiB or so reads them and fails."""
    block = 128 << 10
    frame = bytearray(b"\x28\xb5\x2f\xfd")  # zstd magic
    frame += bytes([0b1100_0000, 7 << 3])  # 8-byte content size; window 2^17 = one block
    frame += (4 * valid_gib << 30).to_bytes(8, "little")
    rle = (block << 3) | (1 << 1)  # block type RLE, 128 KiB, not the last block
    frame += (rle.to_bytes(3, "little") + b"\x00") * ((valid_gib << 30) // block)
    frame += b"\x07\x00\x00" * 4096  # reserved block type: not zstd
    return bytes(frame)


def test_decompression_bomb_is_refused_by_the_capacity_check_with_bounded_work(tmp_path: Path) -> None:
    """80 GiB of zeros in 2.5 MB, then garbage. The count must stop past twice the size
    (40 GiB): it never reaches the garbage, which it would if it counted everything."""
    bomb = _zstd_bomb(80)
    with FaultServer() as srv:
        config = srv.add_blob(b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}')
        srv.add_blob(bomb)
        raw = (f'{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":'
               f'"application/vnd.oci.image.config.v1+json","digest":"{config.digest}","size":{config.size}}},'
               f'"layers":[{{"mediaType":"{ZSTD_LAYER}","digest":"{sha256(bomb)}","size":{len(bomb)}}}]}}').encode()
        srv.add_manifest(raw, OCI_MANIFEST, "bomb")
        started = time.monotonic()
        result = build_from(tmp_path, srv, tag="bomb")
        elapsed = time.monotonic() - started
    assert result.phase == "Failed", result.message
    assert "more than twice the cache's imageCacheSize of 20 GiB" in result.message
    assert elapsed < 60  # generous for slow machines: the whole 80 GiB would not count at all
    assert volume_files(tmp_path) == [] and partials(tmp_path) == []
    unpacked = tmp_path / "meta" / "unpacked"
    assert not unpacked.exists() or not any(p.name.endswith(sha256(bomb)[7:]) for p in unpacked.iterdir())
    Caches(tmp_path).gc()
    assert stored(tmp_path) == set()
