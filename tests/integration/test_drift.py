"""Tag drift against real registry:2: a tag moved upstream (pushed again with skopeo)
makes a cache Stale without touching what it serves; pointing back clears it; pinned
images never drift; a stopped registry is a rate-limited warning, not drift; the
on-drift policy updates; ``imc serve`` checks on its own and exposes ``imc_cache_stale``.

Every tag moved here lives under ``drift/``, a namespace no other test reads.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from regfix import RegistrySet
from test_caches import run_imc

from builder.build import Builder
from builder.caches import BuildLease, Caches
from builder.drift import DriftCheck
from builder.imagecache import CacheSpec, ImageCache
from builder.server.app import Server


class Clock:
    """The caches' clock, set by the test."""

    def __init__(self) -> None:
        self.now = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


def move_tag(registry: Any, source: str, target: str) -> None:
    """Point ``target`` (a tag under drift/) at ``source``'s manifest, as a push would."""
    subprocess.run(["skopeo", "copy", "-q", "--all", "--preserve-digests", "--src-tls-verify=false",
                    "--dest-tls-verify=false", f"docker://{registry.host}/{source}",
                    f"docker://{registry.host}/{target}"], check=True, capture_output=True, timeout=120)


def digest(catalogue: dict[str, Any], ref: str) -> str:
    return catalogue["images"][ref]["digest"]


def obj(home: Path, name: str) -> dict[str, Any]:
    return json.loads(run_imc(home, "cache", "get", name, "-o", "json").stdout)


def stale(o: dict[str, Any]) -> dict[str, Any] | None:
    return next((c for c in o["status"].get("conditions", []) if c["type"] == "Stale"), None)


def reasons(o: dict[str, Any], reason: str) -> list[dict[str, Any]]:
    return [e for e in o["status"]["events"] if e["reason"] == reason]


def listing(home: Path) -> dict[str, dict[str, str]]:
    lines = run_imc(home, "cache", "list").stdout.splitlines()
    header = lines[0].split()
    return {row.split()[0]: dict(zip(header, row.split(), strict=True)) for row in lines[1:]}


def build(caches: Caches, name: str, spec: CacheSpec) -> ImageCache:
    _, lease = caches.create(name, spec)
    return Builder(caches).build(name, lease)


def test_a_moved_tag_makes_the_cache_stale_and_pointing_back_clears_it(
        tmp_path: Path, plain_registry: Any, catalogue: dict[str, Any]) -> None:
    home, host = tmp_path / "home", plain_registry.host
    one, two = digest(catalogue, "fixtures/app:1.0"), digest(catalogue, "fixtures/app:2.0")
    move_tag(plain_registry, "fixtures/app:1.0", "drift/moved:live")
    image = f"{host}/drift/moved:live"
    made = run_imc(home, "cache", "create", "web", "--image", image, "--plain-http", host, "--wait", "-q")
    assert made.returncode == 0, made.stderr
    assert listing(home)["web"]["STALE"] == "-"  # never checked

    first = run_imc(home, "cache", "check")
    assert first.returncode == 0, first.stderr
    assert first.stdout.split("\n")[1].split() == ["web", image, one[:19], one[:19], "current"]
    assert stale(obj(home, "web"))["status"] == "False" and listing(home)["web"]["STALE"] == "no"

    move_tag(plain_registry, "fixtures/app:2.0", "drift/moved:live")
    moved = run_imc(home, "cache", "check", "web")
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout.splitlines()[0].split() == ["NAME", "IMAGE", "BUILT", "FROM", "NOW", "STATE"]
    assert moved.stdout.splitlines()[1].split() == ["web", image, one[:19], two[:19], "moved"]
    o = obj(home, "web")
    condition = stale(o)
    assert condition is not None and condition["status"] == "True" and condition["reason"] == "TagDrifted"
    assert set(condition) == {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}
    assert f"{image} now points at {two}" in condition["message"]
    assert condition["observedGeneration"] == o["metadata"]["generation"]
    [drifted] = reasons(o, "TagDrifted")
    assert drifted["type"] == "Warning" and image in drifted["message"]
    assert one in drifted["message"] and two in drifted["message"]
    # Nothing rebuilt: the cache still holds (and serves) what the tag pointed at before.
    assert o["status"]["phase"] == "Ready" and [i["digest"] for i in o["status"]["images"]] == [one]
    assert listing(home)["web"]["STALE"] == "yes"
    as_json = json.loads(run_imc(home, "cache", "check", "-o", "json").stdout)
    assert as_json == [{"name": "web", "stale": True, "images": [
        {"image": image, "state": "moved", "resolved": one, "current": two}]}]
    assert len(reasons(obj(home, "web"), "TagDrifted")) == 1  # the same move is reported once

    move_tag(plain_registry, "fixtures/app:1.0", "drift/moved:live")
    assert run_imc(home, "cache", "check", "web").returncode == 0
    o = obj(home, "web")
    assert stale(o)["status"] == "False" and stale(o)["reason"] == "TagsCurrent"
    assert [e["message"] for e in reasons(o, "TagCurrent")] == [
        f"{image}: the tag points at {one} again, what the cache holds"]
    assert listing(home)["web"]["STALE"] == "no"


def test_an_index_tag_is_compared_by_the_index_digest(
        tmp_path: Path, plain_registry: Any, catalogue: dict[str, Any]) -> None:
    """The cache holds one platform's manifest from the index; the tag pointed at the index."""
    caches = Caches(tmp_path / "home")
    move_tag(plain_registry, "fixtures/multi:1.0", "drift/index:live")
    built = build(caches, "multi", CacheSpec([f"{plain_registry.host}/drift/index:live"],
                                             plain_http=[plain_registry.host]))
    index = digest(catalogue, "fixtures/multi:1.0")
    assert built.images[0].index == index and built.images[0].digest != index
    [check] = DriftCheck(caches).check(["multi"])
    assert [(t.state, t.resolved, t.current) for t in check.tags] == [("current", index, index)]

    move_tag(plain_registry, "fixtures/docker-multi:1.0", "drift/index:live")
    [check] = DriftCheck(caches).check(["multi"])
    assert [(t.state, t.current) for t in check.tags] == [("moved", digest(catalogue, "fixtures/docker-multi:1.0"))]
    assert caches.get("multi").stale


@pytest.fixture
def own_registry(tmp_path: Path, plain_registry: Any) -> Iterator[tuple[RegistrySet, Any]]:
    """A registry of this test's own, to stop: the shared ones keep running."""
    rs = RegistrySet(tmp_path / "own", modes=("plain",))
    try:
        endpoint = rs.start()["plain"]
        subprocess.run(["skopeo", "copy", "-q", "--preserve-digests", "--src-tls-verify=false",
                        "--dest-tls-verify=false", f"docker://{plain_registry.host}/fixtures/app:1.0",
                        f"docker://{endpoint.host}/drift/down:live"], check=True, capture_output=True, timeout=120)
        yield rs, endpoint
    finally:
        rs.stop()


def test_an_unreachable_registry_is_not_drift_and_warns_at_most_hourly(
        tmp_path: Path, own_registry: tuple[RegistrySet, Any]) -> None:
    rs, endpoint = own_registry
    clock = Clock()
    caches = Caches(tmp_path / "home", clock=clock)
    subprocess.run(["skopeo", "copy", "-q", "--preserve-digests", "--src-tls-verify=false", "--dest-tls-verify=false",
                    f"docker://{endpoint.host}/drift/down:live", f"docker://{endpoint.host}/drift/down:other"],
                   check=True, capture_output=True, timeout=120)
    build(caches, "down", CacheSpec([f"{endpoint.host}/drift/down:live", f"{endpoint.host}/drift/down:other"],
                                    plain_http=[endpoint.host]))
    rs.kill("plain")

    def warnings() -> list[str]:
        return [e.message for e in caches.get("down").events if e.reason == "DriftCheckFailed"]

    [check] = DriftCheck(caches).check()
    assert [t.state for t in check.tags] == ["failed", "failed"] and not check.stale
    assert "connection refused" in (check.tags[0].error or "") and check.tags[1].error == check.tags[0].error
    assert len(warnings()) == 1 and "drift/down:live" in warnings()[0] and "drift/down:other" in warnings()[0]
    assert warnings()[0].startswith("cannot check 2 tags (the cache keeps serving; checked again later): ")
    assert caches.get("down").condition("Stale") is None and not caches.get("down").stale
    clock.now += dt.timedelta(minutes=59)
    DriftCheck(caches).check()
    assert len(warnings()) == 1
    clock.now += dt.timedelta(minutes=1)
    DriftCheck(caches).check()
    assert len(warnings()) == 2
    assert caches.get("down").phase == "Ready" and caches.get("down").source == "volume"

    shown = run_imc(tmp_path / "home", "cache", "check", "down")
    assert shown.returncode == 0
    assert f"down: cannot check {endpoint.host}/drift/down:live: cannot connect to {endpoint.host}" in shown.stdout


def test_images_pinned_by_digest_never_drift_and_are_not_asked_about(
        tmp_path: Path, own_registry: tuple[RegistrySet, Any], catalogue: dict[str, Any]) -> None:
    rs, endpoint = own_registry
    caches = Caches(tmp_path / "home")
    pinned = f"{endpoint.host}/drift/down@{digest(catalogue, 'fixtures/app:1.0')}"
    build(caches, "pinned", CacheSpec([pinned], plain_http=[endpoint.host]))
    rs.kill("plain")  # asking would fail: nothing is asked
    [check] = DriftCheck(caches).check()
    assert [(t.image, t.state) for t in check.tags] == [(pinned, "pinned")]
    cache = caches.get("pinned")
    assert cache.conditions == [] and not any(e.reason == "DriftCheckFailed" for e in cache.events)
    assert listing(tmp_path / "home")["pinned"]["STALE"] == "-"


def test_on_drift_update_rebuilds_to_the_new_digest(
        tmp_path: Path, plain_registry: Any, catalogue: dict[str, Any]) -> None:
    home, host = tmp_path / "home", plain_registry.host
    move_tag(plain_registry, "fixtures/app:1.0", "drift/policy:live")
    made = run_imc(home, "cache", "create", "auto", "--image", f"{host}/drift/policy:live", "--plain-http", host,
                   "--on-drift", "update", "--wait", "-q")
    assert made.returncode == 0, made.stderr
    assert obj(home, "auto")["metadata"]["annotations"]["imc.dev/on-drift"] == "update"
    move_tag(plain_registry, "fixtures/app:2.0", "drift/policy:live")

    caches = Caches(home)
    started: list[tuple[str, BuildLease]] = []
    [check] = DriftCheck(caches, lambda c, lease: started.append((c.name, lease))).check()
    assert check.stale and check.update == "started"
    assert [name for name, _ in started] == ["auto"] and caches.get("auto").phase == "Updating"
    done = Builder(caches).build("auto", started[0][1])
    assert done.phase == "Ready", done.message
    assert [i.digest for i in done.images] == [digest(catalogue, "fixtures/app:2.0")]
    condition = done.condition("Stale")
    assert condition is not None and (condition.status, condition.reason) == ("False", "Rebuilt")
    said = [(e.reason, e.message) for e in done.events]
    assert ("DriftUpdate", "on-drift is update: updating the cache to the digests its tags point at now") in said
    assert ("Updating", f"rebuilding: the tags of {host}/drift/policy:live moved since the last build") in said
    [again] = DriftCheck(caches, lambda c, lease: started.append((c.name, lease))).check()
    assert not again.stale and again.update is None and len(started) == 1

    turned = run_imc(home, "cache", "update", "auto", "--on-drift", "ignore", "-o", "json")
    assert turned.returncode == 0, turned.stderr
    assert "imc.dev/on-drift" not in json.loads(turned.stdout)["metadata"].get("annotations", {})  # the default
    assert caches.get("auto").events[-1].message == "imc.dev/on-drift: update -> ignore; no rebuild needed"
    move_tag(plain_registry, "fixtures/app:1.0", "drift/policy:live")
    [ignored] = DriftCheck(caches, lambda c, lease: started.append((c.name, lease))).check()
    assert ignored.stale and ignored.update is None and len(started) == 1


def test_the_on_drift_annotation_sets_the_policy_and_a_bad_value_is_refused(
        tmp_path: Path, plain_registry: Any) -> None:
    home, path = tmp_path / "home", tmp_path / "cache.yaml"

    def apply(value: str, key: str = "imc.dev/on-drift") -> subprocess.CompletedProcess[str]:
        path.write_text(f"""apiVersion: eci.alibabacloud.com/v1
kind: ImageCache
metadata:
  name: noted
  annotations:
    k8s.aliyun.com/plain-http-registry: "{plain_registry.host}"
    {key}: "{value}"
spec:
  images: ["{plain_registry.host}/fixtures/base:1.0"]
""")
        return run_imc(home, "apply", "-f", str(path), "--wait", "-q")

    bad = apply("rebuild")
    assert bad.returncode == 2
    assert bad.stderr.strip() == ('imc: error: document 1: annotation imc.dev/on-drift: want "update" or "ignore", '
                                  "got 'rebuild'")
    typo = apply("update", "imc.dev/on-drfit")
    assert typo.returncode == 2
    assert typo.stderr.strip() == ("imc: error: document 1: unknown annotation imc.dev/on-drfit "
                                   "(known: imc.dev/on-drift)")
    assert run_imc(home, "cache", "list").stdout.strip() == "No image caches."
    good = apply("update")
    assert good.returncode == 0, good.stderr
    assert Caches(home).get("noted").spec.on_drift == "update"


def test_serve_checks_every_interval_and_exposes_imc_cache_stale(
        tmp_path: Path, plain_registry: Any, catalogue: dict[str, Any]) -> None:
    caches, host = Caches(tmp_path / "home"), plain_registry.host
    move_tag(plain_registry, "fixtures/app:1.0", "drift/served:live")
    build(caches, "served", CacheSpec([f"{host}/drift/served:live"], plain_http=[host]))
    build(caches, "fresh", CacheSpec([f"{host}/fixtures/base:1.0"], plain_http=[host]))
    build(caches, "pinned", CacheSpec([f"{host}/fixtures/base@{digest(catalogue, 'fixtures/base:1.0')}"],
                                      plain_http=[host]))
    move_tag(plain_registry, "fixtures/app:2.0", "drift/served:live")
    server = Server(caches, ("127.0.0.1", 0), sweep_interval=0, drift_interval=0.05).start()
    try:
        assert server.wait_drift_rounds(1)
        with urllib.request.urlopen(f"http://{server.address}/metrics", timeout=30) as resp:
            text = resp.read().decode()
    finally:
        server.stop()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {s.labels["cache"]: s.value for s in families["imc_cache_stale"].samples} == {"served": 1.0, "fresh": 0.0}
    assert caches.get("served").stale and caches.get("served").phase == "Ready"


def test_serve_runs_the_on_drift_update_on_its_build_pool(
        tmp_path: Path, plain_registry: Any, catalogue: dict[str, Any]) -> None:
    caches, host = Caches(tmp_path / "home"), plain_registry.host
    move_tag(plain_registry, "fixtures/app:1.0", "drift/pool:live")
    build(caches, "pool", CacheSpec([f"{host}/drift/pool:live"], plain_http=[host], on_drift="update"))
    move_tag(plain_registry, "fixtures/app:2.0", "drift/pool:live")
    server = Server(caches, ("127.0.0.1", 0), sweep_interval=0, drift_interval=0).start()
    try:
        server.check_drift()
        assert server.drift_rounds == 1
        server.builds.shutdown(wait=True)  # the update the check queued runs to its end
    finally:
        server.stop()
    done = caches.get("pool")
    assert done.phase == "Ready" and [i.digest for i in done.images] == [digest(catalogue, "fixtures/app:2.0")]
    assert not done.stale and [e.reason for e in done.events if e.reason in ("TagDrifted", "DriftUpdate")] == [
        "TagDrifted", "DriftUpdate"]


def test_the_check_asks_with_the_caches_own_pull_secret(
        tmp_path: Path, plain_registry: Any, token_registry: Any, catalogue: dict[str, Any]) -> None:
    """The token registry shares the plain one's storage: a tag moved through one moves in both."""
    caches = Caches(tmp_path / "home")
    caches.secrets.create("team:registry", token_registry.host, token_registry.username, token_registry.password)
    move_tag(plain_registry, "fixtures/app:1.0", "drift/secret:live")
    build(caches, "private", CacheSpec([f"{token_registry.host}/drift/secret:live"], ["team:registry"],
                                       plain_http=[token_registry.host]))
    move_tag(plain_registry, "fixtures/app:2.0", "drift/secret:live")
    [check] = DriftCheck(caches).check()
    assert [(t.state, t.current) for t in check.tags] == [("moved", digest(catalogue, "fixtures/app:2.0"))]

    caches.secrets.path("team:registry").unlink()  # gone: the check fails, saying which, and changes nothing
    [failed] = DriftCheck(caches).check()
    assert [t.state for t in failed.tags] == ["failed"] and "pull secret team:registry does not exist" in (
        failed.tags[0].error or "")
    record = caches.get("private")
    assert record.stale and token_registry.password not in json.dumps(record.to_doc())
