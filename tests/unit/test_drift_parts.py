"""Tag drift's parts: asking where a tag points (HEAD, or GET and hashing when the
registry omits the digest, which registry:2 never does: the scripted server), the
Stale condition's shape and transitions, records written before drift existed, the
on-drift policy in the spec, and the server's interval."""

from __future__ import annotations

import datetime as dt

import pytest
from support.faultserver import NoDigest, Status

from builder.cli.serve_cmd import parse_duration
from builder.errors import NotFoundError, ValidationError
from builder.imagecache import A_ON_DRIFT, CacheSpec, ImageCache, ResolvedImage
from builder.registry.client import Registry
from builder.registry.hosts import HostPolicy
from builder.registry.retry import RetryPolicy

T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


def client(server) -> Registry:
    return Registry(server.endpoint, HostPolicy(frozenset([server.endpoint])),
                    retry=RetryPolicy(attempts=1), sleep=lambda s: None)


def test_the_current_digest_comes_from_a_head_and_reads_no_manifest(server) -> None:
    image = server.add_image([b"layer"], tag="v1")
    assert str(client(server).current_digest(server.repository, "v1")) == image.manifest.digest
    path = server.manifest_path("v1")
    assert server.count(path, "HEAD") == 1 and server.count(path, "GET") == 0
    assert "application/vnd.oci.image.manifest.v1+json" in (server.requests_to(path, "HEAD")[0].header("Accept") or "")


def test_without_docker_content_digest_the_manifest_is_fetched_and_hashed(server) -> None:
    image = server.add_image([b"layer"], tag="v1")
    path = server.manifest_path("v1")
    server.script(path, NoDigest(), NoDigest())
    assert str(client(server).current_digest(server.repository, "v1")) == image.manifest.digest
    assert server.count(path, "HEAD") == 1 and server.count(path, "GET") == 1


def test_a_tag_gone_upstream_is_an_error_not_a_digest(server) -> None:
    server.add_image([b"layer"], tag="v1")
    server.script(server.manifest_path("v2"), Status(404))
    with pytest.raises(NotFoundError):
        client(server).current_digest(server.repository, "v2")


def cache(**kw) -> ImageCache:
    return ImageCache(name="web", id="imc-abcdefghijklmnopq", spec=CacheSpec(["host:5000/app:1"]),
                      created="2026-11-30T12:00:00Z",
                      images=[ResolvedImage("host:5000/app:1", "sha256:" + "a" * 64, "m", 1)], **kw)


def test_a_condition_moves_its_transition_time_only_when_its_status_changes() -> None:
    c = cache()
    c.set_condition("Stale", True, "TagDrifted", "one moved", when=T0)
    c.set_condition("Stale", True, "TagDrifted", "two moved", when=T0 + dt.timedelta(minutes=10))
    [shown] = c.to_object()["status"]["conditions"]
    assert shown == {"type": "Stale", "status": "True", "reason": "TagDrifted", "message": "two moved",
                     "lastTransitionTime": "2026-11-30T12:00:00Z", "observedGeneration": 1}
    assert c.stale
    c.set_condition("Stale", False, "TagsCurrent", "none moved", when=T0 + dt.timedelta(minutes=20))
    assert [x.last_transition_time for x in c.conditions] == ["2026-11-30T12:20:00Z"] and not c.stale


def test_a_rebuild_clears_stale() -> None:
    c = cache(moved_tags={"host:5000/app:1": "sha256:" + "b" * 64})
    c.set_condition("Stale", True, "TagDrifted", "moved", when=T0)
    c.resolved_again(when=T0 + dt.timedelta(hours=1))
    assert not c.stale and c.moved_tags == {} and c.conditions[0].reason == "Rebuilt"


def test_a_record_written_before_drift_existed_reads_as_never_checked() -> None:
    doc = cache().to_doc()
    for key in ("conditions", "moved_tags", "drift_warned"):
        del doc[key]
    del doc["spec"]["on_drift"]
    old = ImageCache.from_doc(doc)
    assert old.conditions == [] and not old.stale and old.spec.on_drift == "ignore"
    assert "conditions" not in old.to_object()["status"]
    assert A_ON_DRIFT not in old.to_object()["metadata"].get("annotations", {})


def test_the_on_drift_policy_is_validated_and_shown_as_imcs_own_annotation() -> None:
    spec, _ = CacheSpec.from_annotations(CacheSpec(["app:1"]), {A_ON_DRIFT: "Update"})
    assert spec.validated().on_drift == "update"
    assert cache().to_object()["metadata"].get("annotations") is None
    shown = ImageCache(**{**cache().__dict__, "spec": spec.validated()}).to_object()
    assert shown["metadata"]["annotations"][A_ON_DRIFT] == "update"
    with pytest.raises(ValidationError, match="on-drift: want ignore or update, got 'always'"):
        CacheSpec(["app:1"], on_drift="always").validated()
    with pytest.raises(ValidationError, match=r"unknown annotation imc.dev/on-drfit \(known: imc.dev/on-drift\)"):
        CacheSpec.from_annotations(CacheSpec(["app:1"]), {"imc.dev/on-drfit": "update"})


@pytest.mark.parametrize(("text", "seconds"), [("600", 600), ("0", 0), ("10m", 600), ("90s", 90), ("1h30m", 5400),
                                               ("0.5", 0.5), ("2h", 7200)])
def test_drift_intervals_read_as_seconds_or_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten", "10x", "-5", "m", "1m1h", "inf", "nan"])
def test_a_bad_drift_interval_is_refused(text: str) -> None:
    with pytest.raises(ValidationError, match="is not a duration"):
        parse_duration(text)
