"""The registry client and the puller against a registry that misbehaves on purpose.

Every server runs on 127.0.0.1 (the redirect target is reached as ``localhost``). No
test sleeps: the client's ``sleep`` is injected and records the delays it was asked for,
and the puller's retry policy has no backoff. Every thread join is bounded.
"""

from __future__ import annotations

import email.utils
import json
import random
import socket
import threading
import time
from collections import defaultdict

import pytest
from support.faultserver import (
    DOCKER_SCHEMA1_SIGNED,
    Corrupt,
    Hold,
    IgnoreRange,
    NoLength,
    Status,
    Truncate,
    WrongDigest,
)

from builder.digest import Digest, hash_file
from builder.errors import (
    AuthError,
    DigestMismatchError,
    NotFoundError,
    RegistryError,
    TransportError,
    UnsupportedError,
)
from builder.oci import MAX_MANIFEST_SIZE, OCI_INDEX, Descriptor, Platform, parse_manifest
from builder.pull import BlobProgress, Puller
from builder.reference import parse
from builder.registry.auth import DockerConfig, Keychain, TokenCache
from builder.registry.client import Registry
from builder.registry.hosts import HostPolicy
from builder.registry.retry import RetryPolicy
from builder.store import Ingest, Store

AMD64 = Platform("linux", "amd64")
NO_BACKOFF = RetryPolicy(backoff=0.0, max_backoff=0.0)
JOIN_TIMEOUT = 30.0


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def policy_for(*servers) -> HostPolicy:
    return HostPolicy(plain_http=frozenset(s.endpoint for s in servers))


def keychain(endpoint: str | None = None, username: str = "u", password: str = "p") -> Keychain:
    configs = [DockerConfig(auths={endpoint: {"username": username, "password": password}})] if endpoint else []
    return Keychain(configs, use_docker_config=False)


def registry(server, sleeps, creds: Keychain | None = None, retry: RetryPolicy | None = None) -> Registry:
    return Registry(server.endpoint, policy_for(server), creds or keychain(), retry=retry, sleep=sleeps)


def puller(server, store: Store, creds: Keychain | None = None, **kwargs) -> Puller:
    kwargs.setdefault("retry", NO_BACKOFF)
    return Puller(store, policy_for(server), creds or keychain(), platform=AMD64, **kwargs)


def blob_files(store: Store) -> set[str]:
    return {p.name for p in (store.home.blobs / "sha256").iterdir()}


def index_entries(store: Store) -> list[dict]:
    return json.loads((store.home.store / "index.json").read_text())["manifests"]


def assert_verified(store: Store, blob) -> None:
    digest, size = hash_file(str(store.blob_path(Digest.parse(blob.digest))))
    assert (str(digest), size) == (blob.digest, blob.size)


# -- retries --------------------------------------------------------------------------


def test_500_twice_then_success_backs_off(server, sleeps):
    image = server.add_image([b"layer"])
    path = server.manifest_path("v1")
    server.fail(path, 500, times=2)
    fetched = registry(server, sleeps).get_manifest(server.repository, "v1")
    assert fetched.raw == image.manifest.data
    assert str(fetched.digest) == image.manifest.digest
    assert server.count(path) == 3
    assert sleeps.jittered([0.5, 1.0])  # exponential ceilings from RetryPolicy.backoff


def test_500_forever_gives_up_after_the_attempts(server, sleeps):
    server.add_image([b"layer"])
    path = server.manifest_path("v1")
    server.always(path, Status(503))
    retry = RetryPolicy(attempts=4, backoff=1.0, max_backoff=3.0)
    with pytest.raises(RegistryError) as info:
        registry(server, sleeps, retry=retry).get_manifest(server.repository, "v1")
    err = info.value
    assert err.temporary is True
    assert err.status == 503
    assert "503" in err.message
    assert server.count(path) == 4
    assert sleeps.jittered([1.0, 2.0, 3.0])  # capped at max_backoff


def test_429_retry_after_seconds_is_honoured(server, sleeps):
    server.add_image([b"layer"])
    path = server.manifest_path("v1")
    server.fail(path, 429, headers={"Retry-After": "3"})
    registry(server, sleeps).get_manifest(server.repository, "v1")
    assert sleeps.calls == [3.0]
    assert server.count(path) == 2


def test_429_retry_after_date_is_capped(server, sleeps):
    server.add_image([b"layer"])
    path = server.manifest_path("v1")
    far = email.utils.formatdate(time.time() + 3600, usegmt=True)
    server.fail(path, 429, headers={"Retry-After": far})
    server.fail(path, 429)  # no Retry-After: ordinary backoff (the second failure)
    registry(server, sleeps, retry=RetryPolicy(max_retry_after=60.0)).get_manifest(server.repository, "v1")
    assert sleeps.calls[0] == 60.0 and sleeps.jittered([60.0, 1.0])


def test_404_is_not_retried_and_carries_codes(server, sleeps):
    with pytest.raises(NotFoundError) as info:
        registry(server, sleeps).get_manifest(server.repository, "missing")
    assert info.value.codes == ("MANIFEST_UNKNOWN",)
    assert "MANIFEST_UNKNOWN" in info.value.message
    assert sleeps.calls == []
    assert server.count(server.manifest_path("missing")) == 1


def test_connection_refused_is_a_transport_error(sleeps):
    with socket.socket() as s:  # a port that was just free and has nobody listening now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"127.0.0.1:{port}"
    client = Registry(endpoint, HostPolicy(plain_http=frozenset({endpoint})), keychain(),
                      retry=RetryPolicy(attempts=3), sleep=sleeps)
    with pytest.raises(TransportError) as info:
        client.get_manifest("test/app", "v1")
    assert "connection refused" in info.value.message
    assert endpoint in info.value.message
    assert info.value.temporary is True
    assert sleeps.jittered([0.5, 1.0])  # refused is temporary: retried, then given up


# -- blobs: truncation and resume ------------------------------------------------------------


def test_truncated_blob_resumes_with_range(server, sleeps, tmp_path):
    data = payload(300_000, seed=1)
    blob = server.add_blob(data)
    path = server.blob_path(blob.digest)
    server.script(path, Truncate(after=100_000))
    digest = Digest.parse(blob.digest)
    sink = Ingest(tmp_path / "partial", digest, len(data))
    progress: list[int] = []
    registry(server, sleeps).fetch_blob(server.repository, digest, len(data), sink, progress.append)
    assert server.ranges(path) == [None, "bytes=100000-"]
    assert sum(progress) == len(data) and min(progress) > 0
    assert sleeps.jittered([0.5])
    sink.commit(tmp_path / "final")
    assert (tmp_path / "final").read_bytes() == data


def test_server_ignoring_range_restarts_cleanly(server, sleeps, tmp_path):
    data = payload(250_000, seed=2)
    blob = server.add_blob(data)
    path = server.blob_path(blob.digest)
    server.script(path, Truncate(after=70_000), IgnoreRange())
    digest = Digest.parse(blob.digest)
    sink = Ingest(tmp_path / "partial", digest, len(data))
    progress: list[int] = []
    registry(server, sleeps).fetch_blob(server.repository, digest, len(data), sink, progress.append)
    assert server.ranges(path) == [None, "bytes=70000-"]
    assert -70_000 in progress  # the restart took back what was counted
    assert sum(progress) == len(data)
    sink.commit(tmp_path / "final")  # raises unless size and digest are right
    assert (tmp_path / "final").read_bytes() == data


def test_pull_resumes_a_truncated_layer_end_to_end(server, tmp_path):
    layer = payload(400_000, seed=3)
    image = server.add_image([b"small layer", layer])
    path = server.blob_path(image.layers[1].digest)
    server.script(path, Truncate(after=123_456))
    store = Store(tmp_path / "home")
    result = puller(server, store).pull([parse(f"{server.reference}:v1")])
    assert server.ranges(path) == [None, "bytes=123456-"]
    for blob in (*image.blobs, image.manifest):
        assert_verified(store, blob)
    assert [i.name for i in store.images()] == [f"{server.reference}:v1"]
    assert result.blobs_fetched == 3
    assert not list(store.home.ingest.iterdir())


def test_pull_restarts_when_resume_is_ignored_end_to_end(server, tmp_path):
    layer = payload(200_000, seed=4)
    image = server.add_image([layer])
    path = server.blob_path(image.layers[0].digest)
    server.script(path, Truncate(after=50_000), IgnoreRange())
    store = Store(tmp_path / "home")
    events = []
    puller(server, store, on_event=events.append).pull([parse(f"{server.reference}:v1")])
    assert server.ranges(path) == [None, "bytes=50000-"]
    assert_verified(store, image.layers[0])
    moved = sum(e.delta for e in events if isinstance(e, BlobProgress) and str(e.digest) == image.layers[0].digest)
    assert moved == len(layer)


def test_partial_left_in_ingest_is_resumed(server, tmp_path):
    layer = payload(300_000, seed=5)
    image = server.add_image([layer])
    blob = image.layers[0]
    store = Store(tmp_path / "home")
    partial = store.home.ingest / f"sha256-{Digest.parse(blob.digest).hex}.partial"
    partial.write_bytes(layer[:180_000])  # what an interrupted download left
    result = puller(server, store).pull([parse(f"{server.reference}:v1")])
    assert server.ranges(server.blob_path(blob.digest)) == ["bytes=180000-"]
    assert_verified(store, blob)
    assert not partial.exists()
    assert result.images[0].name == f"{server.reference}:v1"


def test_complete_partial_left_in_ingest_is_committed(server, tmp_path):
    # A download can stop after its last write but before the rename (a crash, or a pull
    # cancelled because another blob failed). Asking for "bytes=<size>-" then gets 416
    # from a real registry, so the client must not ask at all.
    layer = payload(100_000, seed=6)
    image = server.add_image([layer])
    blob = image.layers[0]
    store = Store(tmp_path / "home")
    partial = store.home.ingest / f"sha256-{Digest.parse(blob.digest).hex}.partial"
    partial.write_bytes(layer)
    puller(server, store).pull([parse(f"{server.reference}:v1")])
    assert server.count(server.blob_path(blob.digest)) == 0
    assert_verified(store, blob)


def test_complete_but_corrupt_partial_is_fetched_again(server, tmp_path):
    layer = payload(100_000, seed=7)
    image = server.add_image([layer])
    blob = image.layers[0]
    store = Store(tmp_path / "home")
    partial = store.home.ingest / f"sha256-{Digest.parse(blob.digest).hex}.partial"
    partial.write_bytes(b"\0" + layer[1:])  # right size, wrong bytes
    puller(server, store).pull([parse(f"{server.reference}:v1")])
    assert server.ranges(server.blob_path(blob.digest)) == [None]
    assert_verified(store, blob)


# -- content that does not verify --------------------------------------------------------------


def test_corrupt_blob_is_refused_and_not_stored(server, tmp_path):
    image = server.add_image([payload(50_000, seed=8)])
    bad = image.layers[0]
    server.always(server.blob_path(bad.digest), Corrupt(position=1234))
    store = Store(tmp_path / "home")
    with pytest.raises(DigestMismatchError) as info:
        puller(server, store).pull([parse(f"{server.reference}:v1")])
    assert bad.digest in info.value.message
    assert Digest.parse(bad.digest).hex not in blob_files(store)
    assert not store.has(Digest.parse(bad.digest))
    assert index_entries(store) == []
    assert store.images() == []
    # bytes that can never verify are dropped (other blobs' partials may stay, for resume)
    assert not (store.home.ingest / f"sha256-{Digest.parse(bad.digest).hex}.partial").exists()


def test_blob_longer_than_its_descriptor_is_refused(server, tmp_path):
    data = payload(10_000, seed=9)
    image = server.add_image([data])
    layer = image.layers[0]
    # the manifest claims fewer bytes than the server sends
    doc = json.loads(image.manifest.data)
    doc["layers"][0]["size"] = 9_000
    server.add_manifest(json.dumps(doc).encode(), tag="short")
    store = Store(tmp_path / "home")
    with pytest.raises(DigestMismatchError, match="more than the 9000 bytes"):
        puller(server, store).pull([parse(f"{server.reference}:short")])
    assert not store.has(Digest.parse(layer.digest))
    assert store.images() == []


def test_wrong_docker_content_digest_on_manifest(server, sleeps):
    server.add_image([b"layer"])
    server.script(server.manifest_path("v1"), WrongDigest())
    with pytest.raises(DigestMismatchError) as info:
        registry(server, sleeps).get_manifest(server.repository, "v1")
    assert "registry claims" in info.value.message


def test_manifest_not_matching_the_pinned_digest(server, sleeps):
    image = server.add_image([b"layer"])
    other = Digest.of(b"something else")
    server.add_manifest(image.manifest.data, tag=str(other))  # served under the wrong name
    with pytest.raises(DigestMismatchError) as info:
        registry(server, sleeps).get_manifest(server.repository, str(other), expected=other)
    assert f"expected {other}" in info.value.message


def huge_manifest() -> bytes:
    doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                      "digest": str(Digest.of(b"c")), "size": 1},
           "layers": [], "annotations": {"pad": "x" * MAX_MANIFEST_SIZE}}
    return json.dumps(doc).encode()


def test_manifest_over_the_cap_is_refused(server, sleeps):
    server.add_manifest(huge_manifest(), tag="huge")
    with pytest.raises(UnsupportedError) as info:
        registry(server, sleeps).get_manifest(server.repository, "huge")
    assert "cap" in info.value.message
    assert sleeps.calls == []  # not retried


def test_manifest_over_the_cap_without_content_length(server, sleeps):
    server.add_manifest(huge_manifest(), tag="huge")
    server.script(server.manifest_path("huge"), NoLength())
    with pytest.raises(UnsupportedError, match="cap"):
        registry(server, sleeps).get_manifest(server.repository, "huge")


def test_pull_refuses_huge_and_schema1_manifests(server, tmp_path):
    server.add_manifest(huge_manifest(), tag="huge")
    schema1 = json.dumps({"schemaVersion": 1, "name": server.repository, "tag": "old",
                          "fsLayers": [{"blobSum": str(Digest.of(b"x"))}], "history": [],
                          "signatures": []}).encode()
    server.add_manifest(schema1, media_type=DOCKER_SCHEMA1_SIGNED, tag="old")
    store = Store(tmp_path / "home")
    with pytest.raises(UnsupportedError, match="cap"):
        puller(server, store).pull([parse(f"{server.reference}:huge")])
    with pytest.raises(UnsupportedError) as info:
        puller(server, store).pull([parse(f"{server.reference}:old")])
    assert "schema 1" in info.value.message
    assert store.images() == []


# -- auth and redirects ---------------------------------------------------------------------------


def test_redirect_to_another_host_drops_credentials(server, other_server, tmp_path):
    image = server.add_image([payload(80_000, seed=10), payload(20_000, seed=11)])
    server.require_basic("u", "p")
    server.redirect_blobs(other_server, host="localhost")
    store = Store(tmp_path / "home")
    puller(server, store, keychain(server.endpoint)).pull([parse(f"{server.reference}:v1")])
    for blob in image.blobs:
        assert_verified(store, blob)
        path = server.blob_path(blob.digest)
        redirected = server.requests_to(path)
        assert redirected and all(r.header("Authorization") == keychain(server.endpoint).resolve(
            server.endpoint).basic_header() for r in redirected)  # the registry host got credentials
        assert other_server.count(path) == 1
    assert other_server.requests  # the blobs really came from the other host
    assert other_server.authorizations() == [None] * len(other_server.requests)  # ...without credentials


def test_basic_auth_wrong_password_is_refused_without_leaking_it(server, sleeps):
    server.add_image([b"layer"])
    server.require_basic("u", "right-password")
    client = registry(server, sleeps, keychain(server.endpoint, "u", "Wr0ng-Pa55word"))
    with pytest.raises(AuthError) as info:
        client.get_manifest(server.repository, "v1")
    assert info.value.status == 401
    assert "Wr0ng-Pa55word" not in info.value.message
    assert "Wr0ng-Pa55word" not in repr(info.value)
    with pytest.raises(AuthError) as again:  # the second time, the known challenge is answered up front
        client.get_manifest(server.repository, "v1")
    assert "rejected" in again.value.message and "'u'" in again.value.message
    assert "Wr0ng-Pa55word" not in again.value.message
    assert sleeps.calls == []  # a refusal is not retried


def test_basic_auth_right_password_and_no_credentials(server, sleeps):
    image = server.add_image([b"layer"])
    server.require_basic("u", "p")
    fetched = registry(server, sleeps, keychain(server.endpoint)).get_manifest(server.repository, "v1")
    assert fetched.raw == image.manifest.data
    with pytest.raises(AuthError, match="none found"):
        registry(server, sleeps).get_manifest(server.repository, "v1")


# -- the puller -----------------------------------------------------------------------------------


def test_pull_selects_the_platform_from_an_index(server, tmp_path):
    amd = server.add_image([b"amd64 layer"], tag=None)
    arm = server.add_image([b"arm64 layer"], tag=None, platform=("linux", "arm64"))
    attestation = server.add_blob(b'{"attestation": true}')

    def entry(blob, os_, arch, **extra):
        return {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": blob.digest,
                "size": blob.size, "platform": {"os": os_, "architecture": arch}, **extra}

    index = server.add_manifest(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        entry(attestation, "unknown", "unknown",
              annotations={"vnd.docker.reference.type": "attestation-manifest"}),
        entry(arm.manifest, "linux", "arm64"),
        entry(amd.manifest, "linux", "amd64"),
    ]}).encode(), OCI_INDEX, tag="multi")
    store = Store(tmp_path / "home")
    result = puller(server, store).pull([parse(f"{server.reference}:multi")])
    (pulled,) = result.images
    assert str(pulled.descriptor.digest) == amd.manifest.digest
    assert str(pulled.index_digest) == index.digest
    assert pulled.platform == AMD64
    for blob in amd.blobs:
        assert_verified(store, blob)
    assert server.count(server.blob_path(arm.layers[0].digest)) == 0
    assert server.count(server.manifest_path(arm.manifest.digest)) == 0
    (stored,) = store.images()
    assert stored.name == f"{server.reference}:multi"
    assert str(stored.index_digest) == index.digest
    assert stored.descriptor.platform == AMD64


def test_second_pull_reuses_every_blob(server, tmp_path):
    image = server.add_image([payload(30_000, seed=12), payload(40_000, seed=13)])
    store = Store(tmp_path / "home")
    first = puller(server, store).pull([parse(f"{server.reference}:v1")])
    second = puller(server, store).pull([parse(f"{server.reference}:v1")])
    assert (first.blobs_fetched, first.blobs_reused) == (3, 0)
    assert (second.blobs_fetched, second.blobs_reused, second.bytes_fetched) == (0, 3, 0)
    for blob in image.blobs:
        assert server.count(server.blob_path(blob.digest)) == 1


def test_two_pullers_at_once_download_each_blob_once(server, tmp_path):
    image = server.add_image([payload(150_000, seed=14), payload(250_000, seed=15)])
    home = tmp_path / "home"
    stores = [Store(home), Store(home)]  # two handles on one store, as two processes would have

    # Each blob's download is held until both pullers are inside ensure_blob for that
    # blob, so the second one meets the per-blob lock (or the finished blob) for real.
    entered: dict[str, int] = defaultdict(int)
    both_in = {blob.digest: threading.Event() for blob in image.blobs}
    lock = threading.Lock()
    for blob in image.blobs:
        server.always(server.blob_path(blob.digest), Hold(both_in[blob.digest], timeout=10))

    def counting(store: Store) -> None:
        real = store.ensure_blob

        def ensure_blob(digest, size, download):
            with lock:
                entered[str(digest)] += 1
                if entered[str(digest)] == 2:
                    both_in[str(digest)].set()
            return real(digest, size, download)

        store.ensure_blob = ensure_blob  # type: ignore[method-assign]

    for store in stores:
        counting(store)
    results: list = [None, None]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = puller(server, stores[i]).pull([parse(f"{server.reference}:v1")])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=JOIN_TIMEOUT)
        assert not t.is_alive()
    assert errors == []
    assert all(event.is_set() for event in both_in.values())  # they really overlapped
    for blob in image.blobs:
        assert server.count(server.blob_path(blob.digest)) == 1
        assert_verified(stores[0], blob)
    assert results[0].blobs_fetched + results[1].blobs_fetched == 3
    assert results[0].blobs_reused + results[1].blobs_reused == 3
    assert [i.name for i in stores[0].images()] == [f"{server.reference}:v1"]


# -- store maintenance ------------------------------------------------------------------------------


def stored_image(store: Store, name: str, layers: list[bytes], named: bool = True) -> tuple[Descriptor, list[Digest]]:
    config = json.dumps({"os": "linux", "architecture": "amd64", "tag": name}).encode()
    blobs = [config, *layers]
    for data in blobs:
        store.put_bytes(Digest.of(data), data)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": str(Digest.of(config)), "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                       "digest": str(Digest.of(d)), "size": len(d)} for d in layers]}).encode()
    node = parse_manifest(manifest)
    store.put_bytes(node.digest, manifest)
    desc = Descriptor(node.media_type, node.digest, len(manifest))
    if named:
        store.add_image(name, desc)
    return desc, [node.digest, *(Digest.of(d) for d in blobs)]


def test_gc_removes_unreferenced_blobs_only(tmp_path):
    store = Store(tmp_path)
    shared = b"shared layer"
    _, keep = stored_image(store, "reg/a:1", [shared, b"only a"])
    _, gone = stored_image(store, "reg/b:1", [shared, b"only b"], named=False)  # held by no name
    stray = b"nobody needs me"
    store.put_bytes(Digest.of(stray), stray)
    (store.home.ingest / f"sha256-{'0' * 64}.partial").write_bytes(b"abandoned")
    sizes = {d: store.size(d) for d, _ in store.all_blobs()}

    report = store.gc()
    remaining = {d for d, _ in store.all_blobs()}
    assert remaining == set(keep)  # a's manifest, config and both layers (one shared with b)
    removed = {d for d in gone if d not in keep} | {Digest.of(stray)}
    assert len(removed) == 4  # b's manifest, config and own layer, and the stray
    assert report.blobs_removed == 4
    assert report.bytes_freed == sum(sizes[d] for d in removed)
    assert report.partials_removed == 1
    assert not list(store.home.ingest.iterdir())
    assert store.gc().blobs_removed == 0
    assert store.verify().ok


def test_gc_keeps_an_images_index_and_pinned_roots(tmp_path):
    store = Store(tmp_path)
    desc, blobs = stored_image(store, "reg/a:1", [b"layer"])
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                        "manifests": [{**desc.to_json(), "platform": {"os": "linux", "architecture": "amd64"}}]})
    index_digest = Digest.of(index.encode())
    store.put_bytes(index_digest, index.encode())
    store.add_image("reg/a:1", desc, index_digest)
    rooted = b"held by a cache"
    store.put_bytes(Digest.of(rooted), rooted)
    store.gc(pinned=lambda: {Digest.of(rooted)})
    assert {d for d, _ in store.all_blobs()} == {*blobs, index_digest, Digest.of(rooted)}


def test_verify_quarantines_a_corrupted_blob(tmp_path):
    store = Store(tmp_path)
    _, blobs = stored_image(store, "reg/a:1", [b"layer one", b"layer two"])
    victim = Digest.of(b"layer two")
    path = store.blob_path(victim)
    assert path.stat().st_mode & 0o777 == 0o444  # stored read-only
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[3] ^= 0x01
    path.write_bytes(bytes(data))

    report = store.verify()
    assert report.corrupt == [str(victim)]
    assert report.missing == [str(victim)]  # an image still needs it
    assert report.checked == len(blobs)
    assert not report.ok
    assert not path.exists()
    quarantined = store.home.quarantine / f"sha256-{victim.hex}"
    assert quarantined.read_bytes() == bytes(data)  # kept for inspection
    others = {d for d, _ in store.all_blobs()}
    assert others == set(blobs) - {victim}
    again = store.verify()
    assert again.corrupt == [] and again.missing == [str(victim)]


def test_verify_of_a_clean_store(tmp_path):
    store = Store(tmp_path)
    _, blobs = stored_image(store, "reg/a:1", [b"x" * 5000])
    report = store.verify()
    assert report.ok
    assert report.checked == len(blobs)
    assert report.bytes == sum(store.size(d) for d in blobs)


def test_ingest_commit_refuses_wrong_size_and_digest(tmp_path):
    data = b"exact bytes"
    digest = Digest.of(data)
    short = Ingest(tmp_path / "a.partial", digest, len(data))
    short.write(data[:-1])
    with pytest.raises(DigestMismatchError, match="got 10 bytes, expected 11"):
        short.commit(tmp_path / "a")
    short.close()
    assert (tmp_path / "a.partial").exists()  # kept: it can still be resumed
    wrong = Ingest(tmp_path / "b.partial", digest, len(data))
    wrong.write(b"Exact bytes")
    with pytest.raises(DigestMismatchError, match="mismatch"):
        wrong.commit(tmp_path / "b")
    assert not (tmp_path / "b.partial").exists()  # dropped: it can never become this blob
    assert not (tmp_path / "b").exists()


# -- more transport faults ----------------------------------------------------------------


def test_manifest_cut_short_is_retried(server, sleeps):
    image = server.add_image([b"layer"])
    path = server.manifest_path("v1")
    server.script(path, Truncate(after=20))
    fetched = registry(server, sleeps).get_manifest(server.repository, "v1")
    assert fetched.raw == image.manifest.data
    assert server.count(path) == 2
    assert sleeps.jittered([0.5])


def test_resume_after_redirect_sends_range_to_the_other_host(server, other_server, sleeps, tmp_path):
    data = payload(200_000, seed=20)
    blob = server.add_blob(data)
    server.redirect_blobs(other_server)
    path = server.blob_path(blob.digest)
    other_server.script(path, Truncate(after=64_000))
    digest = Digest.parse(blob.digest)
    sink = Ingest(tmp_path / "partial", digest, len(data))
    registry(server, sleeps).fetch_blob(server.repository, digest, len(data), sink)
    assert server.ranges(path) == [None, "bytes=64000-"]
    assert other_server.ranges(path) == [None, "bytes=64000-"]
    sink.commit(tmp_path / "final")
    assert (tmp_path / "final").read_bytes() == data


def test_wrong_content_range_restarts_the_blob(server, sleeps, tmp_path):
    data = payload(100_000, seed=21)
    blob = server.add_blob(data)
    path = server.blob_path(blob.digest)
    # the resume is answered 206 for a different offset than asked for
    server.script(path, Truncate(after=30_000),
                  Status(206, {"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"}, body=data))
    digest = Digest.parse(blob.digest)
    sink = Ingest(tmp_path / "partial", digest, len(data))
    registry(server, sleeps).fetch_blob(server.repository, digest, len(data), sink)
    assert server.ranges(path) == [None, "bytes=30000-", None]  # dropped what it had, started over
    sink.commit(tmp_path / "final")
    assert (tmp_path / "final").read_bytes() == data


# -- bearer tokens ----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bearer_token_fetched_once_and_scoped(server, sleeps):
    image = server.add_image([b"layer"])
    server.require_bearer(service="svc")
    client = Registry(server.endpoint, policy_for(server), keychain(), TokenCache(FakeClock()), sleep=sleeps)
    assert client.get_manifest(server.repository, "v1").raw == image.manifest.data
    assert client.get_manifest(server.repository, image.manifest.digest).raw == image.manifest.data
    (token,) = server.tokens
    assert token.scope == f"repository:{server.repository}:pull"
    assert token.service == "svc"
    assert token.authorization is None  # anonymous: no credentials configured
    # the first request learnt the challenge; later ones send the cached token up front
    auths = [r.header("Authorization") for r in server.requests if r.path.startswith("/v2/")]
    assert auths == [None, "Bearer token-1", "Bearer token-1"]


def test_bearer_token_with_credentials_and_expiry(server, sleeps):
    server.add_image([b"layer"])
    server.require_bearer(expires_in=120, credentials=("u", "p"))
    clock = FakeClock()
    client = Registry(server.endpoint, policy_for(server), keychain(server.endpoint), TokenCache(clock),
                      sleep=sleeps)
    client.get_manifest(server.repository, "v1")
    clock.now += 100  # still valid
    client.get_manifest(server.repository, "v1")
    assert len(server.tokens) == 1
    assert server.tokens[0].authorization == keychain(server.endpoint).resolve(server.endpoint).basic_header()
    clock.now += 20  # past expires_in less the margin: a fresh token, without a failed request
    client.get_manifest(server.repository, "v1")
    assert [t.value for t in server.tokens] == ["token-1", "token-2"]
    assert sleeps.calls == []


def test_revoked_bearer_token_is_replaced(server, sleeps):
    server.add_image([b"layer"])
    server.require_bearer()
    client = registry(server, sleeps)
    client.get_manifest(server.repository, "v1")
    server.revoke_tokens()
    client.get_manifest(server.repository, "v1")
    assert [t.value for t in server.tokens] == ["token-1", "token-2"]
    last = [r.header("Authorization") for r in server.requests_to(server.manifest_path("v1"))][-2:]
    assert last == ["Bearer token-1", "Bearer token-2"]


def test_bearer_token_service_refusing_credentials(server, sleeps):
    server.add_image([b"layer"])
    server.require_bearer(credentials=("u", "right"))
    client = registry(server, sleeps, keychain(server.endpoint, "u", "S3cret-wrong"))
    with pytest.raises(AuthError) as info:
        client.get_manifest(server.repository, "v1")
    assert "token service refused user 'u'" in info.value.message
    assert "S3cret-wrong" not in info.value.message


def test_manifest_cut_short_every_time_gives_up(server, sleeps):
    server.add_image([b"layer"])
    path = server.manifest_path("v1")
    server.always(path, Truncate(after=20))
    with pytest.raises(TransportError) as info:
        registry(server, sleeps, retry=RetryPolicy(attempts=3)).get_manifest(server.repository, "v1")
    assert "test/app:v1" in info.value.message
    assert server.count(path) == 3
    assert sleeps.jittered([0.5, 1.0])
