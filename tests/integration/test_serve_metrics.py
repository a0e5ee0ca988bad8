"""``/metrics`` of ``imc serve`` after a known sequence of pulls: exact counts.

Every request goes over one keep-alive connection, so the server has finished (and
recorded) a request before it reads the next one, ``GET /metrics`` included.
"""

from __future__ import annotations

import http.client
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from builder import __version__
from builder.build import Builder
from builder.caches import Caches
from builder.imagecache import CacheSpec
from builder.pull import Puller
from builder.registry.hosts import HostPolicy
from builder.server.app import Server

ACCEPT = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, " \
         "application/vnd.docker.distribution.manifest.v2+json"


class Client:
    """One HTTP/1.1 connection to the server."""

    def __init__(self, server: Server) -> None:
        host, port = server.address.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)

    def get(self, path: str) -> tuple[int, bytes]:
        self.conn.request("GET", path, headers={"Accept": ACCEPT})
        resp = self.conn.getresponse()
        return resp.status, resp.read()

    def metrics(self) -> dict[str, float]:
        status, body = self.get("/metrics")
        assert status == 200
        out = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


def series(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if re.match(re.escape(prefix) + r"(\{|$)", k)}


@pytest.fixture
def caches(tmp_path: Path, plain_registry: Any) -> Caches:
    caches = Caches(tmp_path / "home")
    host = plain_registry.host
    _, lease = caches.create("web", CacheSpec(images=[f"{host}/fixtures/app:1.0"], plain_http=[host]))
    assert Builder(caches).build("web", lease).phase == "Ready"
    return caches


@pytest.fixture
def server(caches: Caches) -> Iterator[Server]:
    server = Server(caches, ("127.0.0.1", 0), sweep_interval=0).start()
    yield server
    server.stop()


def test_hits_misses_bytes_and_durations_count_exactly(server: Server, catalogue: dict[str, Any]) -> None:
    image = catalogue["images"]["fixtures/app:1.0"]["manifests"][0]
    client = Client(server)
    for _ in range(2):  # 2 manifest hits
        assert client.get("/v2/fixtures/app/manifests/1.0")[0] == 200
    layers = image["layers"]
    served = [layers[0], layers[0], layers[-1]]
    for layer in served:  # 3 blob hits
        assert client.get(f"/v2/fixtures/app/blobs/{layer['digest']}")[0] == 200
    assert client.get("/v2/fixtures/app/manifests/9.9")[0] == 404  # 1 miss
    m = client.metrics()
    assert series(m, "imc_cache_hits_total") == {
        'imc_cache_hits_total{cache="web",kind="manifest"}': 2,
        'imc_cache_hits_total{cache="web",kind="blob"}': 3,
    }
    assert series(m, "imc_cache_misses_total") == {'imc_cache_misses_total{kind="manifest"}': 1}
    assert m['imc_served_bytes_total{kind="blob"}'] == sum(layer["size"] for layer in served)
    assert m["imc_upstream_bytes_total"] == 0
    assert m['imc_request_duration_seconds_count{kind="manifest"}'] == 3
    assert m['imc_request_duration_seconds_count{kind="blob"}'] == 3
    assert m['imc_request_duration_seconds_bucket{kind="blob",le="+Inf"}'] == 3
    assert m['imc_request_duration_seconds_sum{kind="blob"}'] > 0
    buckets = [v for k, v in m.items() if k.startswith('imc_request_duration_seconds_bucket{kind="blob"')]
    assert buckets == sorted(buckets)  # cumulative


def test_pull_through_counts_misses_and_upstream_bytes(tmp_path: Path, plain_registry: Any,
                                                       catalogue: dict[str, Any]) -> None:
    host = plain_registry.host
    caches = Caches(tmp_path / "home")
    puller = Puller(caches.store, HostPolicy(plain_http=frozenset({host})))
    server = Server(caches, ("127.0.0.1", 0), pull_through=puller, upstreams=[host], sweep_interval=0).start()
    try:
        client = Client(server)
        image = catalogue["images"]["fixtures/base:1.0"]["manifests"][0]
        assert client.get("/v2/fixtures/base/manifests/1.0")[0] == 200  # a miss, pulled through
        assert client.get(f"/v2/fixtures/base/blobs/{image['layers'][0]['digest']}")[0] == 200  # now a hit
        m = client.metrics()
        assert series(m, "imc_cache_misses_total") == {'imc_cache_misses_total{kind="manifest"}': 1}
        assert series(m, "imc_cache_hits_total") == {'imc_cache_hits_total{cache="",kind="blob"}': 1}
        blobs = sum(b["size"] for b in [image["config"], *image["layers"]])
        assert m["imc_upstream_bytes_total"] >= blobs
    finally:
        server.stop()


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_exposition_parses_with_prometheus_client_one_registry_per_server(server: Server, caches: Caches) -> None:
    other = Server(caches, ("127.0.0.1", 0), sweep_interval=0).start()
    try:
        client = Client(server)
        assert client.get("/v2/fixtures/app/manifests/1.0")[0] == 200
        assert client.get("/v2/fixtures/app/manifests/9.9")[0] == 404
        assert client.get("/v2/fixtures/app/manifests/-bad-")[0] == 400
        status, body = client.get("/metrics")
        assert status == 200
        f = families(body.decode())
        hits = {(s.labels["cache"], s.labels["kind"]): s.value for s in f["imc_cache_hits"].samples
                if s.name == "imc_cache_hits_total"}
        assert hits == {("web", "manifest"): 1}
        codes = {s.labels["code"]: s.value for s in f["imc_http_requests"].samples}
        assert codes == {"200": 1, "404": 1, "400": 1}  # /metrics itself is counted after it is answered
        [info] = f["imc_build_info"].samples  # the text format has no info type: a gauge of 1
        assert (info.name, info.labels, info.value) == ("imc_build_info", {"version": __version__}, 1)
        assert any(s.value > 0 for s in f["process_resident_memory_bytes"].samples)
        assert f["imc_request_duration_seconds"].type == "histogram"

        # The other server counted nothing of this: its own registry.
        status, body = Client(other).get("/metrics")
        f = families(body.decode())
        assert not [s for s in f["imc_cache_hits"].samples if s.name == "imc_cache_hits_total"]
        assert not f["imc_http_requests"].samples
    finally:
        other.stop()


def test_openmetrics_by_content_negotiation(server: Server) -> None:
    host, port = server.address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    resp = conn.getresponse()
    body = resp.read().decode()
    assert resp.getheader("Content-Type").startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")
    f = {m.name: m for m in openmetrics_families(body)}
    assert f["imc_served"].type == "counter" and f["imc_build"].type == "info"
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    assert resp.getheader("Content-Type").startswith("text/plain; version=0.0.4")
    assert "# EOF" not in resp.read().decode()
