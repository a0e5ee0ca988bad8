"""Serving through upstream outages: pull-through tags asked again, recorded, and
served stale when the upstream cannot answer; offline serving; the down window.

The upstream is the scripted ``FaultServer`` (a real registry cannot be made to answer
5xx, hang, or reset every connection on demand); the endpoint is called directly. The
down window runs on an injected clock, so no test waits for it. The same behaviour
against registry:2, skopeo and podman is in tests/integration/test_serve_outage.py.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.faultserver import Abort, FaultServer, Hold, Status
from test_serve_registry import body, code, get, tar_gz

from builder.caches import Caches
from builder.imagecache import Settings
from builder.registry.auth import Keychain
from builder.registry.hosts import HostPolicy
from builder.server.metrics import Metrics
from builder.server.registry import Outcome, RegistryEndpoint, pull_through_puller
from builder.server.upstream import UpstreamState

REPO = "test/app"


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def upstream() -> Any:
    with FaultServer(repository=REPO) as srv:
        yield srv


@pytest.fixture
def image(upstream: FaultServer) -> Any:
    return upstream.add_image([tar_gz("a", b"first layer " * 300), tar_gz("b", b"second layer " * 200)], tag="v2")


@pytest.fixture
def caches(tmp_path: Path) -> Caches:
    return Caches(tmp_path / "home")


@pytest.fixture
def clock() -> Clock:
    return Clock()


def pulling(caches: Caches, upstream: FaultServer, clock: Clock, stale_if_error: bool = True) -> RegistryEndpoint:
    policy = HostPolicy(plain_http=frozenset({upstream.endpoint}))
    return RegistryEndpoint(caches, pull_through_puller(caches.store, policy, Keychain(use_docker_config=False)),
                            [upstream.endpoint], stale_if_error=stale_if_error, clock=clock)


def pull_image(endpoint: RegistryEndpoint, image: Any) -> None:
    """What a client does: the manifest by tag, then every blob."""
    reply = get(endpoint, f"/v2/{REPO}/manifests/v2")
    assert reply.status == 200 and body(reply) == image.manifest.data
    for blob in image.blobs:
        got = get(endpoint, f"/v2/{REPO}/blobs/{blob.digest}")
        assert got.status == 200 and body(got) == blob.data


# -- UpstreamState -------------------------------------------------------------------------


def test_an_upstream_is_left_alone_for_a_growing_window_and_probed_once() -> None:
    clock = Clock()
    state = UpstreamState(clock, first=2.0, cap=5.0)
    assert state.admit() and state.admit() and not state.down  # up: everyone may connect
    state.unreachable("refused")
    state.unreachable("refused")  # a second request of the same outage changes nothing
    assert state.down and state.reason == "refused" and state.retry_after() == 2.0
    assert not state.admit()
    clock.now += 2.0
    assert state.admit()  # the probe
    assert not state.admit() and not state.admit()  # the others wait for it
    state.unreachable("refused again")
    assert state.retry_after() == 4.0 and state.reason == "refused again"
    clock.now += 4.0
    assert state.admit()
    state.unreachable("refused")
    assert state.retry_after() == 5.0  # capped
    clock.now += 5.0
    assert state.admit()
    state.reached()
    assert not state.down and state.retry_after() == 0.0 and state.admit()
    state.unreachable("refused")
    assert state.retry_after() == 2.0  # a new outage starts from the first window
    assert state.attempts == 6


# -- tags asked again, recorded -------------------------------------------------------------


@pytest.mark.parametrize("stale_if_error", [True, False])
def test_a_pulled_through_tag_is_asked_again_and_its_resolution_recorded(
        caches: Caches, upstream: FaultServer, image: Any, clock: Clock, stale_if_error: bool) -> None:
    endpoint = pulling(caches, upstream, clock, stale_if_error)
    first = get(endpoint, f"/v2/{REPO}/manifests/v2")
    assert first.status == 200 and body(first) == image.manifest.data
    assert first.outcome is not None and first.outcome.hit is False and first.outcome.upstream_bytes > 0
    recorded = caches.resolution(upstream.endpoint, REPO, "v2")
    assert recorded is not None and recorded.digest == image.manifest.digest
    assert recorded.media_type == "application/vnd.oci.image.manifest.v1+json"
    again = get(endpoint, f"/v2/{REPO}/manifests/v2")
    assert again.status == 200 and body(again) == image.manifest.data
    assert again.outcome == Outcome("manifest", hit=True, served=len(image.manifest.data))
    # Asked again with a HEAD, nothing fetched again.
    assert [r.method for r in upstream.requests_to(upstream.manifest_path("v2"), method=None)] == ["GET", "HEAD"]


def test_a_tag_moved_upstream_is_served_as_it_is_now(caches: Caches, upstream: FaultServer, image: Any,
                                                      clock: Clock) -> None:
    endpoint = pulling(caches, upstream, clock)
    pull_image(endpoint, image)
    moved = upstream.add_image([tar_gz("c", b"a new layer " * 100)], tag="v2")
    reply = get(endpoint, f"/v2/{REPO}/manifests/v2")
    assert reply.status == 200 and body(reply) == moved.manifest.data
    recorded = caches.resolution(upstream.endpoint, REPO, "v2")
    assert recorded is not None and recorded.digest == moved.manifest.digest


# -- stale if error ---------------------------------------------------------------------------


FAILURES = {
    "server_error": lambda srv: srv.always(srv.manifest_path("v2"), Status(503)),
    "not_found": lambda srv: srv.always(srv.manifest_path("v2"), Status(404)),
    "timeout": lambda srv: srv.always(srv.manifest_path("v2"), Hold(threading.Event(), timeout=30)),
    "unreachable": lambda srv: srv.always(srv.manifest_path("v2"), Abort()),
    "stopped": lambda srv: srv.stop(),
}


@pytest.mark.parametrize("failure", FAILURES)
def test_an_upstream_that_cannot_answer_gets_the_tag_served_stale(
        caches: Caches, upstream: FaultServer, image: Any, clock: Clock, failure: str,
        caplog: pytest.LogCaptureFixture) -> None:
    Settings(pull_timeout_seconds=1).save(caches.home.settings)
    endpoint, host = pulling(caches, upstream, clock), upstream.endpoint
    pull_image(endpoint, image)
    FAILURES[failure](upstream)
    blobs_asked = sum(upstream.count(upstream.blob_path(b.digest), method=None) for b in image.blobs)
    with caplog.at_level(logging.WARNING, logger="builder.server.registry"):
        reply = get(endpoint, f"/v2/{REPO}/manifests/v2")
    assert reply.status == 200 and body(reply) == image.manifest.data
    assert reply.headers["Docker-Content-Digest"] == image.manifest.digest
    reason = "unreachable" if failure == "stopped" else failure
    assert reply.outcome is not None and reply.outcome.stale == reason and reply.outcome.hit is True
    stale = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
    assert len(stale) == 1, stale
    assert f"{host}/{REPO}:v2" in stale[0] and image.manifest.digest in stale[0] and " ago" in stale[0]
    for blob in image.blobs:  # the blobs are local: the upstream is never asked
        got = get(endpoint, f"/v2/{REPO}/blobs/{blob.digest}")
        assert got.status == 200 and body(got) == blob.data
    if failure != "stopped":
        assert sum(upstream.count(upstream.blob_path(b.digest), method=None) for b in image.blobs) == blobs_asked
    assert endpoint.upstream_state(host).down is (reason == "unreachable")


@pytest.mark.parametrize("failure,status,error_code", [
    ("server_error", 503, "UNAVAILABLE"), ("unreachable", 503, "UNAVAILABLE"), ("not_found", 404, "MANIFEST_UNKNOWN"),
])
def test_without_stale_if_error_the_error_is_passed_on(caches: Caches, upstream: FaultServer, image: Any,
                                                       clock: Clock, failure: str, status: int,
                                                       error_code: str) -> None:
    endpoint = pulling(caches, upstream, clock, stale_if_error=False)
    pull_image(endpoint, image)
    FAILURES[failure](upstream)
    reply = get(endpoint, f"/v2/{REPO}/manifests/v2")
    assert (reply.status, code(reply)) == (status, error_code)
    assert reply.outcome is not None and reply.outcome.stale is None


def test_a_404_for_a_tag_never_served_is_a_404(caches: Caches, upstream: FaultServer, image: Any,
                                               clock: Clock) -> None:
    endpoint = pulling(caches, upstream, clock)
    pull_image(endpoint, image)
    reply = get(endpoint, f"/v2/{REPO}/manifests/never")
    assert (reply.status, code(reply)) == (404, "MANIFEST_UNKNOWN")


# -- the down window ----------------------------------------------------------------------------


def test_while_the_upstream_is_down_nothing_connects_and_what_is_not_held_is_503_at_once(
        caches: Caches, upstream: FaultServer, image: Any, clock: Clock) -> None:
    endpoint = pulling(caches, upstream, clock)
    pull_image(endpoint, image)
    upstream.always(upstream.manifest_path("v2"), Abort())
    missing = upstream.add_blob(b"a blob never pulled").digest
    upstream.always(upstream.blob_path(missing), Abort())
    assert get(endpoint, f"/v2/{REPO}/manifests/v2").outcome.stale == "unreachable"  # type: ignore[union-attr]
    asked = len(upstream.requests)
    for _ in range(3):
        stale = get(endpoint, f"/v2/{REPO}/manifests/v2")
        assert stale.status == 200 and body(stale) == image.manifest.data
        blob = get(endpoint, f"/v2/{REPO}/blobs/{missing}")
        assert (blob.status, code(blob)) == (503, "UNAVAILABLE") and blob.headers["Retry-After"] == "2"
        by_digest = get(endpoint, f"/v2/{REPO}/manifests/sha256:{'4' * 64}")
        assert (by_digest.status, code(by_digest)) == (503, "UNAVAILABLE")
        never = get(endpoint, f"/v2/{REPO}/manifests/never")
        assert (never.status, code(never)) == (503, "UNAVAILABLE")
    assert len(upstream.requests) == asked  # not one connection while down
    clock.now += 2.0
    assert get(endpoint, f"/v2/{REPO}/manifests/v2").status == 200  # the probe: it fails, still stale
    assert len(upstream.requests) == asked + 1
    assert endpoint.upstream_state(upstream.endpoint).retry_after() == 4.0
    upstream.always(upstream.manifest_path("v2"), None)
    clock.now += 4.0
    back = get(endpoint, f"/v2/{REPO}/manifests/v2")
    assert back.status == 200 and back.outcome is not None and back.outcome.stale is None
    assert not endpoint.upstream_state(upstream.endpoint).down


def test_a_burst_while_down_makes_only_the_connections_the_window_allows(
        caches: Caches, upstream: FaultServer, image: Any, clock: Clock) -> None:
    """Forty concurrent requests (the tag, and a blob not held) while the upstream resets
    every connection: none connects inside the window; after it, exactly one probes."""
    endpoint = pulling(caches, upstream, clock)
    pull_image(endpoint, image)
    missing = upstream.add_blob(b"not held").digest
    for path in (upstream.manifest_path("v2"), upstream.blob_path(missing)):
        upstream.always(path, Abort())
    get(endpoint, f"/v2/{REPO}/manifests/v2")  # the failure that opens the window
    asked = len(upstream.requests)

    def burst() -> list[int]:
        paths = [f"/v2/{REPO}/manifests/v2", f"/v2/{REPO}/blobs/{missing}"] * 20
        with ThreadPoolExecutor(max_workers=40) as pool:
            return list(pool.map(lambda p: get(endpoint, p).status, paths))

    statuses = burst()
    assert statuses.count(200) == 20 and statuses.count(503) == 20
    assert len(upstream.requests) == asked
    clock.now += 2.0
    statuses = burst()
    assert statuses.count(200) == 20 and statuses.count(503) == 20
    assert len(upstream.requests) == asked + 1  # one probe, one connection


# -- offline ----------------------------------------------------------------------------------


def test_offline_serves_the_recorded_tags_and_never_connects(caches: Caches, upstream: FaultServer, image: Any,
                                                             clock: Clock) -> None:
    pull_image(pulling(caches, upstream, clock), image)
    asked = len(upstream.requests)
    for offline in (RegistryEndpoint(caches, None, [upstream.endpoint], offline=True),
                    RegistryEndpoint(caches, offline=True)):
        pull_image(offline, image)
        ns = get(offline, f"/v2/{REPO}/manifests/v2", query={"ns": upstream.endpoint})
        assert ns.status == 200 and body(ns) == image.manifest.data
        for path in (f"/v2/{REPO}/manifests/never", f"/v2/{REPO}/blobs/sha256:{'5' * 64}"):
            assert get(offline, path).status == 404
    assert len(upstream.requests) == asked


def test_stale_serves_are_counted_by_reason() -> None:
    metrics = Metrics()
    for reason in ("unreachable", "unreachable", "not_found"):
        metrics.record(Outcome("manifest", hit=True, served=10, stale=reason))
    metrics.record(Outcome("manifest", hit=True, served=10))
    text, _ = metrics.render()
    samples = {(s.name, s.labels.get("reason")): s.value for f in text_string_to_metric_families(text.decode())
               for s in f.samples if s.name == "imc_stale_served_total"}
    assert samples == {("imc_stale_served_total", "unreachable"): 2.0, ("imc_stale_served_total", "not_found"): 1.0}
