"""The registry endpoint of ``imc serve``, called directly (no HTTP server).

``RegistryEndpoint.handle`` takes a method, a path, the query and the headers and
returns a ``Reply``; these tests read its status, headers, body (bytes, a file extent
or chunks) and the ``Outcome`` the metrics count. The cache ``web`` is built once from a
scripted registry (the content has to come from somewhere); the image ``tools/jq:1``
is put into the store by hand; the endpoint itself never touches the network here.
"""

from __future__ import annotations

import gzip
import io
import json
import socket
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest
from support.faultserver import FaultServer, Hold, Stall
from support.listener import accepted, listening

from builder.build import Builder
from builder.caches import Caches
from builder.digest import Digest
from builder.errors import TransportError, ValidationError
from builder.imagecache import CacheSpec, Settings
from builder.oci import OCI_MANIFEST, Descriptor
from builder.registry.auth import Keychain
from builder.registry.hosts import HostPolicy, is_internal
from builder.server.registry import Outcome, RegistryEndpoint, Reply, pull_through_puller

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def tar_gz(name: str, data: bytes) -> bytes:
    """A one-file layer as registries hold them (the cache checks layers unpack)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return gzip.compress(out.getvalue(), mtime=0)


LAYERS = [tar_gz("a", bytes(range(256)) * 40), tar_gz("b", b"second layer " * 100)]


@pytest.fixture
def upstream() -> Any:
    with FaultServer(repository="test/app") as srv:
        yield srv


@pytest.fixture
def image(upstream: FaultServer) -> Any:
    return upstream.add_image(LAYERS, tag="v1")


@pytest.fixture
def caches(tmp_path: Path, upstream: FaultServer, image: Any) -> Caches:
    caches = Caches(tmp_path / "home")
    _created, lease = caches.create("web", CacheSpec(images=[f"{upstream.reference}:v1"],
                                                     plain_http=[upstream.endpoint]))
    assert Builder(caches).build("web", lease).phase == "Ready"
    return caches


@pytest.fixture
def local(caches: Caches) -> dict[str, Any]:
    """A small image put into the store by hand, named ``localhost:5000/tools/jq:1``."""
    store = caches.store
    layer, config = b"jq layer", json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": OCI_CONFIG, "digest": str(Digest.of(config)), "size": len(config)},
                           "layers": [{"mediaType": OCI_LAYER, "digest": str(Digest.of(layer)),
                                       "size": len(layer)}]}).encode()
    for data in (layer, config, manifest):
        store.put_bytes(Digest.of(data), data)
    store.add_image("localhost:5000/tools/jq:1", Descriptor(OCI_MANIFEST, Digest.of(manifest), len(manifest)))
    return {"manifest": manifest, "layer": layer}


@pytest.fixture
def endpoint(caches: Caches) -> RegistryEndpoint:
    return RegistryEndpoint(caches)


def get(endpoint: RegistryEndpoint, path: str, method: str = "GET", query: dict[str, str] | None = None,
        **headers: str) -> Reply:
    return endpoint.handle(method, path, query or {}, {k.replace("_", "-"): v for k, v in headers.items()})


def body(reply: Reply) -> bytes:
    """The bytes the HTTP layer would send, whichever kind of body the reply has."""
    if reply.extent is not None:
        path, offset, length = reply.extent
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)
    if reply.stream is not None:
        return b"".join(reply.stream)
    return reply.body


def code(reply: Reply) -> str:
    return json.loads(reply.body)["errors"][0]["code"]


# -- manifests -----------------------------------------------------------------------------


def test_manifest_by_tag_is_a_hit_on_the_cache(endpoint: RegistryEndpoint, image: Any) -> None:
    reply = get(endpoint, "/v2/test/app/manifests/v1")
    assert reply.status == 200
    assert body(reply) == image.manifest.data
    assert reply.headers["Docker-Content-Digest"] == image.manifest.digest
    assert reply.headers["Content-Type"] == OCI_MANIFEST
    assert reply.headers["Content-Length"] == str(image.manifest.size)
    assert reply.outcome == Outcome("manifest", hit=True, cache="web", served=image.manifest.size,
                                    served_cache="web")


def test_manifest_by_digest_and_head(endpoint: RegistryEndpoint, image: Any) -> None:
    reply = get(endpoint, f"/v2/test/app/manifests/{image.manifest.digest}")
    assert reply.status == 200 and body(reply) == image.manifest.data
    assert reply.outcome is not None and reply.outcome.hit and reply.outcome.cache == "web"
    head = get(endpoint, f"/v2/test/app/manifests/{image.manifest.digest}", "HEAD")
    assert head.status == 200 and body(head) == b""
    assert head.headers["Content-Length"] == str(image.manifest.size)
    assert head.headers["Docker-Content-Digest"] == image.manifest.digest


def test_a_cache_ready_just_after_a_miss_is_served_at_once(endpoint: RegistryEndpoint, upstream: FaultServer,
                                                           caches: Caches) -> None:
    """A miss rereads the records when they changed since the last read, however
    recent it was: a cache that became Ready meanwhile answers the very next request."""
    second = upstream.add_image([tar_gz("c", b"third layer " * 50)], tag="v2")
    assert get(endpoint, "/v2/test/app/manifests/v2").status == 404
    built = endpoint.index._built
    assert get(endpoint, "/v2/test/app/manifests/v2").status == 404
    assert endpoint.index._built == built  # nothing changed: a burst of misses reads the records once
    _created, lease = caches.create("api", CacheSpec(images=[f"{upstream.reference}:v2"],
                                                     plain_http=[upstream.endpoint]))
    assert Builder(caches).build("api", lease).phase == "Ready"
    reply = get(endpoint, "/v2/test/app/manifests/v2")
    assert reply.status == 200 and body(reply) == second.manifest.data
    assert reply.outcome is not None and reply.outcome.cache == "api"


def test_manifest_outside_accept_is_unknown(endpoint: RegistryEndpoint) -> None:
    reply = get(endpoint, "/v2/test/app/manifests/v1", Accept="application/vnd.oci.image.index.v1+json")
    assert reply.status == 404 and code(reply) == "MANIFEST_UNKNOWN"


def test_ns_selects_the_registry_of_a_tag(endpoint: RegistryEndpoint, upstream: FaultServer) -> None:
    assert get(endpoint, "/v2/test/app/manifests/v1", query={"ns": upstream.endpoint}).status == 200
    other = get(endpoint, "/v2/test/app/manifests/v1", query={"ns": "registry.example.com"})
    assert other.status == 404 and code(other) == "MANIFEST_UNKNOWN"


def test_image_in_the_store_is_served_as_no_cache(endpoint: RegistryEndpoint, local: dict[str, Any]) -> None:
    reply = get(endpoint, "/v2/tools/jq/manifests/1")
    assert reply.status == 200 and body(reply) == local["manifest"]
    assert reply.outcome == Outcome("manifest", hit=True, cache=None, served=len(local["manifest"]))
    blob = get(endpoint, f"/v2/tools/jq/blobs/{Digest.of(local['layer'])}")
    assert blob.status == 200 and body(blob) == local["layer"]
    assert blob.outcome == Outcome("blob", hit=True, cache=None, served=len(local["layer"]))


# -- blobs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("which", [0, 1])
def test_blob_whole_and_head(endpoint: RegistryEndpoint, image: Any, which: int) -> None:
    layer = image.layers[which]
    reply = get(endpoint, f"/v2/test/app/blobs/{layer.digest}")
    assert reply.status == 200 and body(reply) == layer.data
    assert reply.headers["Docker-Content-Digest"] == layer.digest
    assert reply.headers["Content-Length"] == str(layer.size)
    assert reply.headers["Accept-Ranges"] == "bytes"
    assert reply.outcome == Outcome("blob", hit=True, cache="web", served=layer.size)
    head = get(endpoint, f"/v2/test/app/blobs/{layer.digest}", "HEAD")
    assert head.status == 200 and body(head) == b"" and head.headers["Content-Length"] == str(layer.size)
    assert head.outcome == Outcome("blob", hit=True, cache="web")


@pytest.mark.parametrize("header,start,end", [
    ("bytes=0-0", 0, 1), ("bytes=10-99", 10, 100), ("bytes=100-", 100, None), ("bytes=-7", -7, None),
    ("bytes=5-999999999999999999999999", 5, None),
])
def test_blob_ranges(endpoint: RegistryEndpoint, image: Any, header: str, start: int, end: int | None) -> None:
    layer = image.layers[0]
    reply = get(endpoint, f"/v2/test/app/blobs/{layer.digest}", Range=header)
    want = layer.data[start:end]
    assert reply.status == 206 and body(reply) == want
    first = start % layer.size
    assert reply.headers["Content-Range"] == f"bytes {first}-{first + len(want) - 1}/{layer.size}"
    assert reply.headers["Content-Length"] == str(len(want))
    assert reply.outcome is not None and reply.outcome.served == len(want)


@pytest.mark.parametrize("header", ["bytes=999999-", "bytes=5-2", "bytes=-", "items=0-1", "bytes=0-1,4-5"])
def test_unsatisfiable_or_malformed_range_is_416(endpoint: RegistryEndpoint, image: Any, header: str) -> None:
    layer = image.layers[0]
    reply = get(endpoint, f"/v2/test/app/blobs/{layer.digest}", Range=header)
    assert reply.status == 416 and reply.headers["Content-Range"] == f"bytes */{layer.size}"
    assert reply.outcome is not None and reply.outcome.hit is None and reply.outcome.served is None


# -- invalid requests and misses -------------------------------------------------------------


@pytest.mark.parametrize("method,path,query,status,error", [
    ("GET", "/v2/../../etc/passwd/blobs/sha256:" + "0" * 64, {}, 400, "NAME_INVALID"),
    ("GET", "/v2/Test/App/manifests/v1", {}, 400, "NAME_INVALID"),
    ("GET", "/v2/test//app/manifests/v1", {}, 400, "NAME_INVALID"),
    ("GET", "/v2/test/app/blobs/sha256:..%2F..%2Fetc", {}, 400, "DIGEST_INVALID"),
    ("GET", "/v2/test/app/blobs/md5:abc", {}, 400, "DIGEST_INVALID"),
    ("GET", "/v2/test/app/blobs/sha256:" + "0" * 63, {}, 400, "DIGEST_INVALID"),
    ("GET", "/v2/test/app/manifests/sha256:XYZ", {}, 400, "DIGEST_INVALID"),
    ("GET", "/v2/test/app/manifests/-bad-", {}, 400, "TAG_INVALID"),
    ("GET", "/v2/test/app/manifests/v1", {"ns": "not a host"}, 400, "NAME_INVALID"),
    ("GET", "/v2/test/app/manifests/v1", {"ns": "../etc"}, 400, "NAME_INVALID"),
    ("GET", "/v2/test/app/tags/other", {}, 404, "NOT_FOUND"),
    ("GET", "/v2/test/app", {}, 404, "NOT_FOUND"),
    ("GET", "/nothing", {}, 404, "NOT_FOUND"),
    ("PUT", "/v2/test/app/manifests/v1", {}, 405, "UNSUPPORTED"),
    ("POST", "/v2/test/app/blobs/uploads/", {}, 405, "UNSUPPORTED"),
    ("DELETE", "/v2/test/app/manifests/v1", {}, 405, "UNSUPPORTED"),
])
def test_invalid_requests(endpoint: RegistryEndpoint, method: str, path: str, query: dict[str, str], status: int,
                          error: str) -> None:
    reply = get(endpoint, path, method, query)
    assert (reply.status, code(reply)) == (status, error)
    assert reply.outcome is None or reply.outcome.hit is None  # neither a hit nor a miss


@pytest.mark.parametrize("path,error", [
    ("/v2/test/app/manifests/v2", "MANIFEST_UNKNOWN"),
    ("/v2/other/app/manifests/v1", "MANIFEST_UNKNOWN"),
    ("/v2/test/app/manifests/sha256:" + "1" * 64, "MANIFEST_UNKNOWN"),
    ("/v2/test/app/blobs/sha256:" + "1" * 64, "BLOB_UNKNOWN"),
])
def test_misses_are_spec_404s(endpoint: RegistryEndpoint, path: str, error: str) -> None:
    reply = get(endpoint, path)
    assert (reply.status, code(reply)) == (404, error)
    assert reply.outcome is not None and reply.outcome.hit is False and reply.outcome.upstream_bytes == 0


def test_a_blob_is_not_a_manifest(endpoint: RegistryEndpoint, image: Any) -> None:
    reply = get(endpoint, f"/v2/test/app/manifests/{image.layers[0].digest}")
    assert reply.status == 404 and code(reply) == "MANIFEST_UNKNOWN"


# -- tags and the ping -----------------------------------------------------------------------


def test_ping(endpoint: RegistryEndpoint) -> None:
    for path in ("/v2", "/v2/"):
        reply = get(endpoint, path)
        assert reply.status == 200 and json.loads(reply.body) == {}


def test_tags_list(endpoint: RegistryEndpoint, upstream: FaultServer, local: dict[str, Any]) -> None:
    assert json.loads(get(endpoint, "/v2/test/app/tags/list").body) == {"name": "test/app", "tags": ["v1"]}
    assert json.loads(get(endpoint, "/v2/tools/jq/tags/list").body) == {"name": "tools/jq", "tags": ["1"]}
    scoped = get(endpoint, "/v2/test/app/tags/list", query={"ns": upstream.endpoint})
    assert json.loads(scoped.body)["tags"] == ["v1"]
    for path, query in (("/v2/unknown/repo/tags/list", {}), ("/v2/test/app/tags/list", {"ns": "localhost:5000"})):
        reply = get(endpoint, path, query=query)
        assert (reply.status, code(reply)) == (404, "NAME_UNKNOWN")


# -- pull-through: only the listed upstreams ---------------------------------------------------


@pytest.fixture
def listener() -> Any:
    """A listening socket nothing should connect to: accept() finds no connection."""
    with listening() as sock:
        yield sock


def pulling(caches: Caches, *upstreams: str, policy: HostPolicy | None = None) -> RegistryEndpoint:
    policy = policy or HostPolicy(plain_http=frozenset(upstreams))
    return RegistryEndpoint(caches, pull_through_puller(caches.store, policy, Keychain(use_docker_config=False)),
                            upstreams)


@pytest.mark.parametrize("path", ["/v2/foo/bar/manifests/latest", "/v2/foo/bar/manifests/sha256:" + "2" * 64,
                                  "/v2/foo/bar/blobs/sha256:" + "2" * 64])
def test_an_unlisted_ns_opens_no_connection(caches: Caches, upstream: FaultServer, listener: socket.socket,
                                            path: str) -> None:
    endpoint = pulling(caches, upstream.endpoint)
    before = len(upstream.requests)
    port = listener.getsockname()[1]
    for ns in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", "169.254.169.254", "registry.example.com"):
        reply = get(endpoint, path, query={"ns": ns})
        assert (reply.status, code(reply)) == (404, "NAME_UNKNOWN")
        assert json.loads(reply.body)["errors"][0]["message"] == ("not held here, and its registry is not an "
                                                                 "upstream of this server")  # the same for all
        assert reply.outcome is not None and reply.outcome.hit is False and reply.outcome.upstream_bytes == 0
    assert accepted(listener) == 0
    assert len(upstream.requests) == before


def test_an_unlisted_ns_is_still_served_what_is_local(caches: Caches, upstream: FaultServer, image: Any) -> None:
    endpoint = pulling(caches, "registry.example.com")
    reply = get(endpoint, "/v2/test/app/manifests/v1", query={"ns": upstream.endpoint})
    assert reply.status == 200 and body(reply) == image.manifest.data


def test_a_listed_ns_matches_host_and_port_exactly(caches: Caches, upstream: FaultServer) -> None:
    other = upstream.add_image([tar_gz("c", b"pulled through")], tag="v2")
    endpoint = pulling(caches, upstream.endpoint)
    host_only = get(endpoint, "/v2/test/app/manifests/v2", query={"ns": "127.0.0.1"})
    assert (host_only.status, code(host_only)) == (404, "NAME_UNKNOWN")
    reply = get(endpoint, "/v2/test/app/manifests/v2", query={"ns": upstream.endpoint.upper()})
    assert reply.status == 200 and body(reply) == other.manifest.data
    assert reply.outcome is not None and reply.outcome.hit is False and reply.outcome.upstream_bytes > 0


def test_without_ns_the_first_upstream_is_asked(caches: Caches, upstream: FaultServer) -> None:
    other = upstream.add_image([tar_gz("c", b"pulled through")], tag="v2")
    endpoint = pulling(caches, upstream.endpoint, "registry.example.com")
    reply = get(endpoint, "/v2/test/app/manifests/v2")
    assert reply.status == 200 and body(reply) == other.manifest.data


def test_pull_through_needs_an_upstream(caches: Caches) -> None:
    with pytest.raises(ValidationError, match="--pull-through needs --upstream"):
        pulling(caches)


def test_a_blob_pulled_on_its_own_is_served_locally_from_then_on(caches: Caches, upstream: FaultServer) -> None:
    layer = tar_gz("d", b"a layer no manifest asked for")
    digest = upstream.add_blob(layer).digest
    endpoint = pulling(caches, upstream.endpoint)
    first = get(endpoint, f"/v2/test/app/blobs/{digest}")
    assert first.status == 200 and body(first) == layer
    assert first.outcome is not None and first.outcome.hit is False and first.outcome.upstream_bytes == len(layer)
    asked = len(upstream.requests)
    for _ in range(3):
        again = get(endpoint, f"/v2/test/app/blobs/{digest}")
        assert again.status == 200 and body(again) == layer
        assert again.outcome == Outcome("blob", hit=True, served=len(layer))
    assert len(upstream.requests) == asked
    # A new server over the same home serves it too: it is recorded, not only remembered.
    assert get(RegistryEndpoint(caches), f"/v2/other/repo/blobs/{digest}").status == 200


# -- redirects from a pull-through upstream --------------------------------------------------


@pytest.mark.parametrize("host,internal", [
    ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("[::1]", True), ("10.1.2.3", True),
    ("172.16.0.1", True), ("192.168.1.1", True), ("169.254.169.254", True), ("fe80::1", True), ("fd00::1", True),
    ("100.64.0.1", True), ("0.0.0.0", True), ("::ffff:127.0.0.1", True), ("::ffff:10.0.0.1", True),
    ("224.0.0.1", True), ("localhost", True), ("8.8.8.8", False), ("2001:4860:4860::8888", False),
    ("1.1.1.1", False), ("::ffff:8.8.8.8", False),
])
def test_internal_addresses(host: str, internal: bool) -> None:
    assert is_internal(host) is internal


@pytest.mark.parametrize("endpoint,target,refused", [
    ("registry.example.com", "http://127.0.0.1:9000/blob", True),
    ("registry.example.com", "https://10.0.0.5/blob", True),
    ("registry.example.com", "https://[fe80::1]/blob", True),
    ("registry.example.com:443", "https://169.254.169.254/latest", True),
    ("registry.example.com", "https://storage.example.net/blob", False),  # another public host: allowed
    ("10.0.0.2:5000", "http://10.0.0.9:9000/blob", False),  # an internal upstream may
    ("[fd00::2]:5000", "http://127.0.0.1:9000/blob", False),
])
def test_redirects_from_a_public_upstream_into_the_network_are_refused(endpoint: str, target: str,
                                                                        refused: bool) -> None:
    public = {"registry.example.com", "storage.example.net"}
    policy = HostPolicy(internal_redirects=False, internal=lambda host: host not in public)
    if refused:
        with pytest.raises(TransportError, match="an internal address; refused"):
            policy.check_redirect(endpoint, target)
    else:
        policy.check_redirect(endpoint, target)
    HostPolicy().check_redirect(endpoint, target)  # imc pull and builds: the user named the registry


def test_pull_through_refuses_a_redirect_from_a_public_upstream_to_a_private_address(
        caches: Caches, upstream: FaultServer, other_server: FaultServer) -> None:
    """The upstream is on loopback here, so it is declared public for the test; the
    redirect goes to ``localhost``, an internal address."""
    layer = tar_gz("e", b"redirected layer")
    digest = upstream.add_blob(layer).digest
    upstream.redirect_blobs(other_server, host="localhost")
    policy = HostPolicy(plain_http=frozenset({upstream.endpoint}), internal=lambda host: host != "127.0.0.1")
    reply = get(pulling(caches, upstream.endpoint, policy=policy), f"/v2/test/app/blobs/{digest}")
    assert (reply.status, code(reply)) == (404, "BLOB_UNKNOWN")
    assert upstream.count(upstream.blob_path(digest), method=None) == 1 and other_server.requests == []
    assert not caches.store.has(Digest.parse(digest))
    # The same redirect from an upstream that is itself internal is followed.
    followed = get(pulling(caches, upstream.endpoint), f"/v2/test/app/blobs/{digest}")
    assert followed.status == 200 and body(followed) == layer
    assert other_server.count(other_server.blob_path(digest)) == 1


# -- bounded upstream work -------------------------------------------------------------------


def test_a_stalled_upstream_blob_is_given_up_after_the_stall_limit(caches: Caches, upstream: FaultServer) -> None:
    """The upstream answers the blob GET with its headers, then nothing for ten minutes; with
    ``pull_stall_seconds`` at 1 the request is answered 503 long before that."""
    Settings(pull_stall_seconds=1).save(caches.home.settings)
    layer = tar_gz("f", bytes(range(256)) * 400)
    digest = upstream.add_blob(layer).digest
    never, at_once = threading.Event(), threading.Event()
    at_once.set()
    upstream.script(upstream.blob_path(digest), Hold(at_once))  # the HEAD is answered
    upstream.always(upstream.blob_path(digest), Stall(never, timeout=600))  # every GET: headers, then nothing
    try:
        reply = get(pulling(caches, upstream.endpoint), f"/v2/test/app/blobs/{digest}")
        assert (reply.status, code(reply)) == (503, "UNAVAILABLE")  # not held, and the upstream did not answer
        assert upstream.count(upstream.blob_path(digest)) == 1  # gave up on the first stall, no retry
        assert not caches.store.has(Digest.parse(digest))
    finally:
        never.set()


def test_a_pull_through_ends_at_the_deadline(caches: Caches, upstream: FaultServer) -> None:
    """The upstream holds the manifest request for ten minutes; with
    ``pull_timeout_seconds`` at 1 the request is answered 503 long before that."""
    Settings(pull_timeout_seconds=1).save(caches.home.settings)
    upstream.add_image([tar_gz("g", b"held")], tag="held")
    never = threading.Event()
    upstream.always(upstream.manifest_path("held"), Hold(never, timeout=600))
    try:
        reply = get(pulling(caches, upstream.endpoint), "/v2/test/app/manifests/held")
        assert (reply.status, code(reply)) == (503, "UNAVAILABLE")
        assert upstream.count(upstream.manifest_path("held")) == 1  # no attempt after the deadline
    finally:
        never.set()
