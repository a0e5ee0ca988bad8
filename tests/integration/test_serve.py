"""``imc serve`` against real pulls: skopeo copies from it byte-identically, with no
request to the upstream registry on a hit; pull-through on a miss; hostile URLs."""

from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support.cutproxy import CutProxy

from builder import build as build_module
from builder.build import Builder
from builder.caches import Caches
from builder.digest import Digest
from builder.imagecache import CacheSpec
from builder.pull import Puller
from builder.registry.auth import Keychain
from builder.registry.hosts import HostPolicy
from builder.server.app import Server
from builder.server.registry import pull_through_puller

REFS = ("fixtures/app:1.0", "fixtures/oci-app:1.0", "fixtures/multi:1.0")


@pytest.fixture
def upstream(plain_registry: Any) -> Iterator[CutProxy]:
    """The real registry behind a proxy that counts every request reaching it."""
    host, port = plain_registry.host.split(":")
    with CutProxy((host, int(port)), cut_after=1 << 62) as proxy:
        yield proxy


def build(caches: Caches, name: str, host: str, *refs: str, **kw: Any) -> Any:
    _created, lease = caches.create(name, CacheSpec(images=[f"{host}/{r}" for r in refs], plain_http=[host], **kw))
    result = Builder(caches).build(name, lease)
    assert result.phase == "Ready", result.message
    return result


@pytest.fixture
def served(tmp_path: Path, upstream: CutProxy) -> Iterator[tuple[Caches, Server]]:
    caches = Caches(tmp_path / "home")
    build(caches, "web", upstream.host, *REFS)
    server = Server(caches, ("127.0.0.1", 0), sweep_interval=0).start()
    yield caches, server
    server.stop()


def skopeo_copy(server: Server, ref: str, dest: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{server.address}/{ref}",
                           f"dir:{dest}"], capture_output=True, text=True, timeout=120)


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_skopeo_copies_byte_identical_images_with_no_upstream_request(tmp_path: Path, served: Any,
                                                                     upstream: CutProxy,
                                                                     catalogue: dict[str, Any]) -> None:
    _, server = served
    before = len(upstream.requests)
    for ref in REFS:
        dest = tmp_path / ref.replace("/", "_").replace(":", "_")
        out = skopeo_copy(server, ref, dest)
        assert out.returncode == 0, out.stderr
        entry = catalogue["images"][ref]
        manifest = entry["manifests"][0]  # linux/amd64
        assert sha256(dest / "manifest.json") == manifest["digest"]
        for blob in [manifest["config"], *manifest["layers"]]:
            assert sha256(dest / blob["digest"].split(":")[1]) == blob["digest"]
    assert len(upstream.requests) == before, upstream.requests[before:]


def test_manifest_by_tag_and_digest_head_and_accept(served: Any, catalogue: dict[str, Any]) -> None:
    _, server = served
    base = f"http://{server.address}/v2/fixtures/multi"
    accept = {"Accept": "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"}
    index = catalogue["images"]["fixtures/multi:1.0"]
    resp = requests.get(f"{base}/manifests/1.0", headers=accept, timeout=10)
    assert resp.status_code == 200
    assert resp.headers["Docker-Content-Digest"] == index["digest"]
    assert resp.headers["Content-Type"] == "application/vnd.oci.image.index.v1+json"
    assert "sha256:" + hashlib.sha256(resp.content).hexdigest() == index["digest"]
    head = requests.head(f"{base}/manifests/{index['manifests'][0]['digest']}", headers=accept, timeout=10)
    assert head.status_code == 200 and head.headers["Content-Length"] == str(index["manifests"][0]["size"])
    assert head.content == b""
    # The arm64 manifest was not cached (the cache holds the host's platform): a spec 404.
    missing = requests.get(f"{base}/manifests/{index['manifests'][1]['digest']}", headers=accept, timeout=10)
    assert missing.status_code == 404 and missing.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"


@pytest.mark.parametrize("ref,layer", [("fixtures/app:1.0", 1), ("fixtures/oci-app:1.0", 3)])
def test_blob_ranges_from_raw_and_compressed_volume_entries(served: Any, catalogue: dict[str, Any], ref: str,
                                                            layer: int) -> None:
    """Layer 1 of app is gzip (stored raw, sent with sendfile); layer 3 of oci-app is an
    uncompressed tar (stored as zstd frames, decompressed on the way out)."""
    _, server = served
    blob = catalogue["images"][ref]["manifests"][0]["layers"][layer - 1]
    url = f"http://{server.address}/v2/{ref.split(':')[0]}/blobs/{blob['digest']}"
    whole = requests.get(url, timeout=10)
    assert whole.status_code == 200 and "sha256:" + hashlib.sha256(whole.content).hexdigest() == blob["digest"]
    size = blob["size"]
    for start, end in ((0, 0), (1, 100), (size // 2, size - 1), (size - 10, size - 1)):
        part = requests.get(url, headers={"Range": f"bytes={start}-{end}"}, timeout=10)
        assert part.status_code == 206
        assert part.headers["Content-Range"] == f"bytes {start}-{end}/{size}"
        assert part.content == whole.content[start:end + 1]
    suffix = requests.get(url, headers={"Range": "bytes=-5"}, timeout=10)
    assert suffix.content == whole.content[-5:]
    beyond = requests.get(url, headers={"Range": f"bytes={size}-"}, timeout=10)
    assert beyond.status_code == 416 and beyond.headers["Content-Range"] == f"bytes */{size}"


@pytest.mark.parametrize("method,path,status,code", [
    ("GET", "/v2/../../etc/passwd/blobs/sha256:" + "0" * 64, 400, "NAME_INVALID"),
    ("GET", "/v2/fixtures/app/blobs/sha256:..%2F..%2Fetc", 400, "DIGEST_INVALID"),
    ("GET", "/v2/fixtures/app/blobs/md5:abc", 400, "DIGEST_INVALID"),
    ("GET", "/v2/Fixtures/App/manifests/1.0", 400, "NAME_INVALID"),
    ("GET", "/v2/fixtures/app/manifests/-bad-", 400, "TAG_INVALID"),
    ("GET", "/v2/fixtures/app/manifests/9.9", 404, "MANIFEST_UNKNOWN"),
    ("GET", "/v2/fixtures/app/blobs/sha256:" + "0" * 64, 404, "BLOB_UNKNOWN"),
    ("PUT", "/v2/fixtures/app/manifests/1.0", 405, "UNSUPPORTED"),
    ("POST", "/v2/fixtures/app/blobs/uploads/", 405, "UNSUPPORTED"),
    ("DELETE", "/v2/fixtures/app/manifests/1.0", 405, "UNSUPPORTED"),
    ("PATCH", "/v2/fixtures/app/blobs/uploads/x", 405, "UNSUPPORTED"),
    ("GET", "/v2/fixtures/app/tags/other", 404, "NOT_FOUND"),
    ("GET", "/nothing-here", 404, "NOT_FOUND"),
])
def test_hostile_and_unknown_requests(served: Any, method: str, path: str, status: int, code: str) -> None:
    """Sent with http.client, which (unlike requests) sends the path exactly as written."""
    _, server = served
    host, port = server.address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request(method, path, body=b"x" if method != "GET" else None)
    resp = conn.getresponse()
    assert resp.status == status
    assert json.loads(resp.read())["errors"][0]["code"] == code
    conn.close()


def test_writes_change_nothing(served: Any, tmp_path: Path) -> None:
    _caches, server = served
    files = sorted(str(p) for p in (tmp_path / "home").rglob("*") if p.is_file() and "locks" not in p.parts)
    requests.put(f"http://{server.address}/v2/fixtures/app/manifests/1.0", data=b"{}", timeout=10)
    requests.post(f"http://{server.address}/v2/fixtures/app/blobs/uploads/", data=b"x" * 1000, timeout=10)
    after = sorted(str(p) for p in (tmp_path / "home").rglob("*") if p.is_file() and "locks" not in p.parts)
    assert after == files


def test_v2_and_tags_list(served: Any) -> None:
    _, server = served
    ping = requests.get(f"http://{server.address}/v2/", timeout=10)
    assert ping.status_code == 200 and ping.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    tags = requests.get(f"http://{server.address}/v2/fixtures/app/tags/list", timeout=10).json()
    assert tags == {"name": "fixtures/app", "tags": ["1.0"]}


def test_miss_is_404_without_pull_through(served: Any, tmp_path: Path) -> None:
    _, server = served
    out = skopeo_copy(server, "fixtures/app:2.0", tmp_path / "x")
    assert out.returncode != 0 and "manifest unknown" in out.stderr.lower()


def test_pull_through_on_a_miss_stores_and_serves(tmp_path: Path, upstream: CutProxy,
                                                  catalogue: dict[str, Any]) -> None:
    caches = Caches(tmp_path / "home")
    puller = Puller(caches.store, HostPolicy(plain_http=frozenset({upstream.host})))
    server = Server(caches, ("127.0.0.1", 0), pull_through=puller, upstreams=[upstream.host], sweep_interval=0).start()
    try:
        dest = tmp_path / "copy"
        before = len(upstream.requests)
        out = skopeo_copy(server, "fixtures/app:2.0", dest)
        assert out.returncode == 0, out.stderr
        assert len(upstream.requests) > before
        manifest = catalogue["images"]["fixtures/app:2.0"]["manifests"][0]
        assert sha256(dest / "manifest.json") == manifest["digest"]
        assert [i.name for i in caches.store.images()] == [f"{upstream.host}/fixtures/app:2.0"]
        # A second pull asks the upstream what the tag names now, and fetches nothing more.
        before = len(upstream.requests)
        assert skopeo_copy(server, "fixtures/app:2.0", tmp_path / "again").returncode == 0
        asked = [r.split("\r\n")[0] for r in upstream.requests[before:]]
        assert asked and all(r.startswith("HEAD /v2/fixtures/app/manifests/2.0 ") for r in asked), asked
    finally:
        server.stop()


def test_a_blob_pulled_through_on_its_own_is_served_locally_and_kept_while_used(tmp_path: Path, upstream: CutProxy,
                                                                             catalogue: dict[str, Any]) -> None:
    """A runtime whose mirror has only the ``pull`` capability resolves manifests at the
    registry and asks imc serve for blobs alone: each is fetched once, then a hit, kept
    by gc until unused for ``auto_unused_days``, and fetched again after that."""
    now = dt.datetime.now(dt.UTC)
    caches = Caches(tmp_path / "home", clock=lambda: now)
    puller = pull_through_puller(caches.store, HostPolicy(plain_http=frozenset({upstream.host})),
                                 Keychain(use_docker_config=False))
    server = Server(caches, ("127.0.0.1", 0), pull_through=puller, upstreams=[upstream.host], sweep_interval=0).start()
    layer = catalogue["images"]["fixtures/app:1.0"]["manifests"][0]["layers"][0]
    url = f"http://{server.address}/v2/fixtures/app/blobs/{layer['digest']}?ns={upstream.host}"

    def get_layer() -> None:
        resp = requests.get(url, timeout=30)
        assert resp.status_code == 200 and "sha256:" + hashlib.sha256(resp.content).hexdigest() == layer["digest"]

    def misses() -> int:
        text = requests.get(f"http://{server.address}/metrics", timeout=10).text
        return sum(int(s.value) for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "imc_cache_misses_total")

    try:
        get_layer()
        asked = len(upstream.requests)
        assert asked > 0 and misses() == 1
        for _ in range(3):
            get_layer()
        assert len(upstream.requests) == asked and misses() == 1  # hits, served from the store
        assert caches.gc().blobs_removed == 0
        get_layer()
        assert len(upstream.requests) == asked
        days = caches.settings.auto_unused_days
        later = Caches(tmp_path / "home", clock=lambda: now + dt.timedelta(days=days, hours=1))
        assert later.gc().blobs_removed == 1
        assert not caches.store.has(Digest.parse(layer["digest"]))
        assert caches.store.home.pulled_records() == {}
        get_layer()  # gone: pulled through again
        assert len(upstream.requests) > asked
    finally:
        server.stop()


def test_flash_cache_serves_from_staging_while_packing(tmp_path: Path, upstream: CutProxy,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      catalogue: dict[str, Any]) -> None:
    caches = Caches(tmp_path / "home")
    server = Server(caches, ("127.0.0.1", 0), sweep_interval=0).start()
    served_during_pack: list[int] = []
    real_pack = build_module.volumes.pack
    layer = catalogue["images"]["fixtures/app:1.0"]["manifests"][0]["layers"][0]

    def pack_after_a_pull(*args: Any, **kw: Any) -> Any:
        resp = requests.get(f"http://{server.address}/v2/fixtures/app/blobs/{layer['digest']}", timeout=10)
        served_during_pack.append(resp.status_code)
        assert "sha256:" + hashlib.sha256(resp.content).hexdigest() == layer["digest"]
        return real_pack(*args, **kw)

    monkeypatch.setattr(build_module.volumes, "pack", pack_after_a_pull)
    try:
        build(caches, "flash", upstream.host, "fixtures/app:1.0", flash=True)
        assert served_during_pack == [200]
    finally:
        server.stop()


def test_imagecache_api_through_the_server(tmp_path: Path, plain_registry: Any) -> None:
    caches = Caches(tmp_path / "home")
    server = Server(caches, ("127.0.0.1", 0), sweep_interval=0).start()
    api = f"http://{server.address}/apis/eci.alibabacloud.com/v1/imagecaches"
    try:
        body = yaml.safe_dump({
            "apiVersion": "eci.alibabacloud.com/v1", "kind": "ImageCache",
            "metadata": {"name": "from-api",
                         "annotations": {"k8s.aliyun.com/plain-http-registry": plain_registry.host}},
            "spec": {"images": [f"{plain_registry.host}/fixtures/base:1.0"]}})
        created = requests.post(api, data=body, headers={"Content-Type": "application/yaml"}, timeout=30)
        assert created.status_code == 201, created.text
        assert created.json()["metadata"]["name"] == "from-api"
        server.builds.shutdown(wait=True)  # let the background build finish
        got = requests.get(f"{api}/from-api", timeout=10).json()
        assert got["status"]["phase"] == "Ready" and got["status"]["progress"] == "100%"
        listed = requests.get(api, timeout=10).json()
        assert listed["kind"] == "ImageCacheList" and [i["metadata"]["name"] for i in listed["items"]] == ["from-api"]
        deleted = requests.delete(f"{api}/from-api", timeout=10)
        assert deleted.status_code == 200
        assert deleted.json()["status"] == "Success" and deleted.json()["details"]["name"] == "from-api"
        assert requests.get(f"{api}/from-api", timeout=10).status_code == 404
    finally:
        server.stop()


def test_metrics_count_what_was_served(served: Any, catalogue: dict[str, Any]) -> None:
    _, server = served
    layer = catalogue["images"]["fixtures/app:1.0"]["manifests"][0]["layers"][0]
    for _ in range(3):
        requests.get(f"http://{server.address}/v2/fixtures/app/blobs/{layer['digest']}", timeout=10)
    text = requests.get(f"http://{server.address}/metrics", timeout=10).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("imc_served_total", (("cache", ""), ("kind", "blob")))] == 3
    assert samples[("imc_served_bytes_total", (("kind", "blob"),))] == 3 * layer["size"]


def test_serve_refuses_a_non_loopback_address_unless_allowed(tmp_path: Path) -> None:
    import os
    import sys
    out = subprocess.run([sys.executable, "-m", "builder", "serve", "--listen", "0.0.0.0:0"], capture_output=True,
                         text=True, env={**os.environ, "IMC_HOME": str(tmp_path)}, timeout=30)
    assert out.returncode == 2 and "--allow-remote" in out.stderr

