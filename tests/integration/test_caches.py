"""Image caches against the real registry: lifecycle, volumes, reuse, flash, expiry, bad input."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import imagegen
import pytest
import yaml
from support.clock import Clock

from builder import build as build_module
from builder.build import Builder
from builder.caches import BuildLease, Caches
from builder.cli import cache_cmds
from builder.cli import main as cli_main
from builder.cli.progress import PullLines
from builder.digest import Digest
from builder.errors import (
    AlreadyExistsError,
    CacheDeletedError,
    CacheStateError,
    NotFoundLocalError,
    QuotaError,
    ValidationError,
)
from builder.home import Home
from builder.imagecache import CacheSpec, Settings, parse_time
from builder.store import Store
from builder.volume import Volume

IMC = [sys.executable, "-m", "builder"]


def spec(registry: Any, *refs: str, **kw: Any) -> CacheSpec:
    return CacheSpec(images=[f"{registry.host}/{r}" for r in refs], plain_http=[registry.host], **kw)


def blobs_of(catalogue: dict[str, Any], ref: str) -> list[dict[str, Any]]:
    m = catalogue["images"][ref]["manifests"][0]
    return [m["config"], *m["layers"]]


def build(caches: Caches, name: str, s: CacheSpec) -> Any:
    _created, lease = caches.create(name, s)
    return Builder(caches).build(name, lease)


def volume_files(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "volumes").iterdir())


def run_imc(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IMC_HOME": str(home)}
    return subprocess.run([*IMC, *args], capture_output=True, text=True, env=env, input=stdin, timeout=180)


# -- create, ready, volume ---------------------------------------------------------------------


def test_create_builds_a_verified_volume_and_reports_ready(tmp_path: Path, plain_registry: Any,
                                                          catalogue: dict[str, Any]) -> None:
    caches = Caches(tmp_path)
    result = build(caches, "web", spec(plain_registry, "fixtures/app:1.0", "fixtures/oci-app:1.0", "fixtures/multi:1.0"))
    assert result.phase == "Ready" and result.progress == 100, result.message
    assert result.id.startswith("imc-") and result.source == "volume"
    reasons = [e.reason for e in result.events]
    assert reasons[0] == "Creating" and reasons[-1] == "Ready"
    assert {"ImageResolved", "LayerFetched", "CapacityChecked", "VolumePacked"} <= set(reasons)
    vol = Volume.open(Path(result.volume.path))
    for ref in ("fixtures/app:1.0", "fixtures/oci-app:1.0"):
        entry = catalogue["images"][ref]
        assert vol.has(Digest.parse(entry["digest"]))
        for blob in blobs_of(catalogue, ref):
            assert vol.read_range(Digest.parse(blob["digest"]), 0, blob["size"])
    index = catalogue["images"]["fixtures/multi:1.0"]
    assert vol.has(Digest.parse(index["digest"]))  # the index itself, byte-exact, for serving
    assert vol.verify().corrupt == []
    assert result.unpacked_bytes >= sum(layer["uncompressedSize"] for layer in blobs_of(catalogue, "fixtures/app:1.0")[1:])
    assert vol.content_bytes < 20 * 2**20  # the file takes its content's space, not the 20 GiB capacity
    # The staging copy is released once packed: gc reclaims the store, the volume still serves.
    caches.gc()
    assert list(caches.store.all_blobs()) == []
    assert Volume.open(Path(result.volume.path)).verify().corrupt == []


def test_restart_loses_nothing(tmp_path: Path, plain_registry: Any) -> None:
    first = build(Caches(tmp_path), "keep", spec(plain_registry, "fixtures/base:1.0", retention_days=7))
    again = Caches(tmp_path).get("keep")  # a new process's view
    assert again == first
    assert again.expire == (parse_time(again.created) + dt.timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_unreachable_registry_fails_with_expiry_a_day_later(tmp_path: Path) -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clock = Clock()
    caches = Caches(tmp_path, clock=clock)
    result = build(caches, "down", CacheSpec(images=[f"127.0.0.1:{port}/x/y:1"], plain_http=[f"127.0.0.1:{port}"]))
    assert result.phase == "Failed"
    assert "connection refused" in result.message and result.events[-1].type == "Warning"
    assert parse_time(result.expire) == clock.now + dt.timedelta(hours=24)
    assert volume_files(tmp_path) == []
    clock.now += dt.timedelta(hours=25)
    assert caches.gc().deleted == ["down"]
    with pytest.raises(NotFoundLocalError):
        caches.get("down")


def test_missing_tag_fails_clearly(tmp_path: Path, plain_registry: Any) -> None:
    result = build(Caches(tmp_path), "missing", spec(plain_registry, "fixtures/app:1.0", "fixtures/app:9.9"))
    assert result.phase == "Failed" and "not found" in result.message and "9.9" in result.message
    assert result.pinned == [] and volume_files(tmp_path) == []


# -- update and delete ---------------------------------------------------------------------------


def test_update_rebuilds_and_replaces_the_volume(tmp_path: Path, plain_registry: Any, catalogue: dict[str, Any]) -> None:
    caches = Caches(tmp_path)
    first = build(caches, "app", spec(plain_registry, "fixtures/app:1.0"))
    updated, lease = caches.update("app", images=[f"{plain_registry.host}/fixtures/app:2.0"])
    assert updated.phase == "Updating" and lease is not None
    with pytest.raises(CacheStateError):  # a second update while this one builds
        caches.update("app", retention_days=3)
    result = Builder(caches).build("app", lease)
    assert result.phase == "Ready" and result.generation == 2
    assert [i.name for i in result.images] == [f"{plain_registry.host}/fixtures/app:2.0"]
    assert volume_files(tmp_path) == [Path(result.volume.path).name]
    assert not Path(first.volume.path).exists()
    assert Volume.open(Path(result.volume.path)).has(Digest.parse(catalogue["images"]["fixtures/app:2.0"]["digest"]))


def test_failed_update_keeps_the_previous_volume_serving(tmp_path: Path, plain_registry: Any) -> None:
    caches = Caches(tmp_path)
    first = build(caches, "app", spec(plain_registry, "fixtures/app:1.0"))
    _, lease = caches.update("app", images=[f"{plain_registry.host}/fixtures/app:404"])
    result = Builder(caches).build("app", lease)
    assert result.phase == "UpdateFailed" and "not found" in result.message
    assert result.images == first.images and result.volume == first.volume and result.source == "volume"
    assert Volume.open(Path(first.volume.path)).verify().corrupt == []
    # UpdateFailed allows another update, which succeeds.
    _, lease = caches.update("app", images=[f"{plain_registry.host}/fixtures/app:2.0"])
    assert Builder(caches).build("app", lease).phase == "Ready"


def test_retention_only_update_needs_no_rebuild(tmp_path: Path, plain_registry: Any) -> None:
    caches = Caches(tmp_path)
    build(caches, "app", spec(plain_registry, "fixtures/base:1.0"))
    updated, lease = caches.update("app", retention_days=2)
    assert lease is None and updated.phase == "Ready" and updated.spec.retention_days == 2
    assert parse_time(updated.expire) == parse_time(updated.created) + dt.timedelta(days=2)


def test_update_while_creating_is_refused_and_changes_nothing(tmp_path: Path, plain_registry: Any) -> None:
    caches = Caches(tmp_path)
    created, lease = caches.create("busy", spec(plain_registry, "fixtures/base:1.0"))
    with pytest.raises(CacheStateError, match="Creating"):
        caches.update("busy", images=[f"{plain_registry.host}/fixtures/app:1.0"])
    assert caches.get("busy").spec == created.spec
    lease.release()


def test_builder_that_died_is_marked_failed(tmp_path: Path, plain_registry: Any) -> None:
    caches = Caches(tmp_path)
    _, lease = caches.create("orphan", spec(plain_registry, "fixtures/base:1.0"))
    lease.release()  # as if the builder process was killed before finishing
    found = Caches(tmp_path).get("orphan")
    assert found.phase == "Failed" and "ended before finishing" in found.message


def test_delete_reclaims_what_no_other_cache_needs(tmp_path: Path, plain_registry: Any) -> None:
    caches = Caches(tmp_path)
    a = build(caches, "a", spec(plain_registry, "fixtures/app:1.0"))
    b = build(caches, "b", spec(plain_registry, "fixtures/app:2.0"))
    caches.delete("a")
    assert not Path(a.volume.path).exists() and Path(b.volume.path).exists()
    caches.gc()
    assert [c.name for c in caches.list()] == ["b"]
    assert Volume.open(Path(b.volume.path)).verify().corrupt == []


# -- reuse and flash -------------------------------------------------------------------------------


def test_reuse_copies_shared_layers_from_another_cache(tmp_path: Path, plain_registry: Any,
                                                       catalogue: dict[str, Any]) -> None:
    caches = Caches(tmp_path)
    build(caches, "first", spec(plain_registry, "fixtures/app:1.0"))
    caches.gc()  # the store no longer holds the layers: only the first cache's volume does
    held = {b["digest"] for b in blobs_of(catalogue, "fixtures/app:1.0")}
    second = blobs_of(catalogue, "fixtures/app:2.0")
    result = build(caches, "second", spec(plain_registry, "fixtures/app:2.0", reuse=True))
    assert result.phase == "Ready"
    assert result.bytes_fetched == sum(b["size"] for b in second if b["digest"] not in held)
    assert result.bytes_reused == sum(b["size"] for b in second if b["digest"] in held)
    assert any("copied from cache:first" in e.message for e in result.events)
    # Without reuse, other caches' layers do not count: everything missing from the store is fetched.
    caches.gc()
    plain = build(caches, "third", spec(plain_registry, "fixtures/app:2.0"))
    assert plain.bytes_fetched == sum(b["size"] for b in second) and plain.bytes_reused == 0


def test_flash_is_usable_from_staging_before_the_volume_is_packed(tmp_path: Path, plain_registry: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    caches = Caches(tmp_path)
    seen = []
    real_pack = build_module.volumes.pack

    def observing_pack(*args: Any, **kw: Any) -> Any:
        seen.append(caches.get("fast"))  # what a reader sees while the volume is being packed
        return real_pack(*args, **kw)

    monkeypatch.setattr(build_module.volumes, "pack", observing_pack)
    result = build(caches, "fast", spec(plain_registry, "fixtures/app:1.0", flash=True))
    during = seen[0]
    assert during.phase == "Ready" and during.source == "staging" and during.volume_state == "packing"
    assert during.progress == 100
    assert result.source == "volume" and result.pinned == []
    reasons = [e.reason for e in result.events]
    assert reasons.index("FlashReady") < reasons.index("VolumePacked") < reasons.index("StagingReleased")


# -- expiry and quotas -------------------------------------------------------------------------------


def test_retention_and_unused_automatic_caches_expire(tmp_path: Path, plain_registry: Any) -> None:
    clock = Clock()
    caches = Caches(tmp_path, clock=clock)
    build(caches, "week", spec(plain_registry, "fixtures/base:1.0", retention_days=7))
    _, lease = caches.create("auto-create-for-eci-1", spec(plain_registry, "fixtures/base:1.0"), auto=True,
                             instance_id="eci-1")
    Builder(caches).build("auto-create-for-eci-1", lease)
    build(caches, "forever", spec(plain_registry, "fixtures/base:1.0"))
    clock.now += dt.timedelta(days=6)
    assert caches.gc().deleted == []
    clock.now += dt.timedelta(days=2)
    assert caches.gc().deleted == ["week"]
    clock.now += dt.timedelta(days=22)  # 30 days after creation, never used
    assert caches.gc().deleted == ["auto-create-for-eci-1"]
    assert [c.name for c in caches.list()] == ["forever"]


def test_quota_for_manual_and_automatic_caches(tmp_path: Path, plain_registry: Any) -> None:
    Settings(max_manual_caches=2).save(Home(tmp_path).settings)
    caches = Caches(tmp_path)
    for name in ("one", "two"):
        _, lease = caches.create(name, spec(plain_registry, "fixtures/base:1.0"))
        lease.release()
    with pytest.raises(QuotaError, match="2 manual image caches exist, the maximum is 2"):
        caches.create("three", spec(plain_registry, "fixtures/base:1.0"))
    # Automatic caches do not consume the manual quota; they have half of it.
    _, lease = caches.create("auto-create-for-x", spec(plain_registry, "fixtures/base:1.0"), auto=True)
    lease.release()
    with pytest.raises(QuotaError, match="automatic"):
        caches.create("auto-create-for-y", spec(plain_registry, "fixtures/base:1.0"), auto=True)
    assert sorted(c.name for c in caches.list()) == ["auto-create-for-x", "one", "two"]


# -- bad input: each rule once, nothing written ----------------------------------------------------------


@pytest.mark.parametrize("name,kw,message", [
    ("ok", {"images": [f"127.0.0.1:5000/r/i:{n}" for n in range(21)]}, "21 images given, at most 20"),
    ("ok", {"images": []}, "at least 1 image"),
    ("ok", {"size_gib": 19}, "imageCacheSize: 19 is out of range (valid 20 to 32768)"),
    ("ok", {"size_gib": 32769}, "imageCacheSize: 32769 is out of range"),
    ("ok", {"retention_days": 0}, "retentionDays: 0 is out of range (valid 1 to 65536)"),
    ("ok", {"retention_days": 65537}, "retentionDays: 65537 is out of range"),
    ("Bad-Name", {}, "name 'Bad-Name'"),
    ("ok", {"images": ["Not A Ref"]}, "invalid image reference"),
    ("ok", {"image_pull_secrets": ["nosuch:secret"]}, "pull secret nosuch:secret does not exist"),
])
def test_invalid_spec_writes_nothing(tmp_path: Path, name: str, kw: dict[str, Any], message: str) -> None:
    caches = Caches(tmp_path)
    fields = {"images": ["127.0.0.1:5000/r/i:1"], **kw}
    with pytest.raises(ValidationError) as err:
        caches.create(name, CacheSpec(**fields))
    assert message in err.value.message
    assert caches.list() == [] and volume_files(tmp_path) == []


def test_duplicate_name_is_refused(tmp_path: Path, plain_registry: Any) -> None:
    caches = Caches(tmp_path)
    first = build(caches, "dup", spec(plain_registry, "fixtures/base:1.0"))
    with pytest.raises(AlreadyExistsError, match="already exists") as refused:
        caches.create("dup", spec(plain_registry, "fixtures/app:1.0"))
    assert refused.value.exit_code == 2
    assert caches.get("dup") == first


def _push_zstd_bomb(endpoint: Any, gib: int, declare: bool = True) -> str:
    """An image whose one zstd layer unpacks to ``gib`` GiB of zeros in under 1 MB;
    its frame header declares that size unless ``declare`` is False."""
    block = 128 << 10
    frame = bytearray(b"\x28\xb5\x2f\xfd")  # zstd magic
    if declare:
        frame += bytes([0b1100_0000, 7 << 3])  # 8-byte content size; window 2^(10+7) = one block
        frame += (gib << 30).to_bytes(8, "little")
    else:
        frame += bytes([0, 7 << 3])  # no content size
    count = (gib << 30) // block
    rle = (block << 3) | (1 << 1)  # block type RLE, size 128 KiB
    for i in range(count):
        header = rle | (1 if i == count - 1 else 0)
        frame += header.to_bytes(3, "little") + b"\x00"
    layer = bytes(frame)
    import hashlib
    import tempfile
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [layer_digest]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": imagegen.OCI_MANIFEST,
        "config": {"mediaType": imagegen.OCI_CONFIG, "digest": imagegen.sha256_digest(config), "size": len(config)},
        "layers": [{"mediaType": imagegen.OCI_LAYER_ZSTD, "digest": layer_digest, "size": len(layer)}],
    }).encode()
    client = imagegen.RegistryClient(endpoint.host, endpoint.scheme)
    with tempfile.TemporaryDirectory() as tmp:
        for data in (layer, config):
            path = Path(tmp) / "blob"
            path.write_bytes(data)
            client.push_blob("fixtures/bomb", imagegen.sha256_digest(data), len(data), path)
    tag = f"{gib}g" if declare else f"{gib}g-undeclared"
    client.put_manifest("fixtures/bomb", tag, manifest, imagegen.OCI_MANIFEST)
    return f"fixtures/bomb:{tag}"


def test_images_larger_than_the_size_fail_before_packing(tmp_path: Path, plain_registry: Any) -> None:
    ref = _push_zstd_bomb(plain_registry, 21)
    result = build(Caches(tmp_path), "toobig", spec(plain_registry, ref))
    assert result.phase == "Failed"
    assert "need" in result.message and "imageCacheSize of 20 GiB" in result.message
    assert "at least 22 GiB" in result.message
    assert volume_files(tmp_path) == []


def test_flash_cache_whose_layers_understate_their_size_fails_after_all(tmp_path: Path, plain_registry: Any) -> None:
    """Flash readiness trusts the layers' size headers; the exact count that follows
    still fails the cache (it could never be packed) and releases the staging copy."""
    ref = _push_zstd_bomb(plain_registry, 21, declare=False)
    result = build(Caches(tmp_path), "sneaky", spec(plain_registry, ref, flash=True))
    reasons = [e.reason for e in result.events]
    assert reasons.index("FlashReady") < reasons.index("Failed")
    assert result.phase == "Failed" and "imageCacheSize of 20 GiB" in result.message
    assert result.pinned == [] and result.source is None and volume_files(tmp_path) == []


# -- YAML and the command line ------------------------------------------------------------------------------


def test_apply_yaml_documents_and_get_it_back(tmp_path: Path, plain_registry: Any) -> None:
    home = tmp_path / "home"
    manifest = tmp_path / "caches.yaml"
    manifest.write_text(f"""
apiVersion: eci.alibabacloud.com/v1
kind: ImageCache
metadata:
  name: first
  annotations:
    k8s.aliyun.com/imc-enable-reuse: "true"
    k8s.aliyun.com/plain-http-registry: "{plain_registry.host}"
    k8s.aliyun.com/vswitch-ids: "vsw-123"
spec:
  images:
  - {plain_registry.host}/fixtures/app:1.0
  imageCacheSize: 25
  retentionDays: 7
---
apiVersion: eci.alibabacloud.com/v1
kind: ImageCache
metadata:
  name: second
  annotations:
    k8s.aliyun.com/imc-enable-flash: "true"
    k8s.aliyun.com/plain-http-registry: "{plain_registry.host}"
spec:
  images: ["{plain_registry.host}/fixtures/base:1.0"]
""")
    out = run_imc(home, "apply", "-f", str(manifest), "--wait", "-q")
    assert out.returncode == 0, out.stderr
    assert "imagecache first created" in out.stdout and "imagecache second created" in out.stdout
    obj = yaml.safe_load(run_imc(home, "cache", "get", "first", "-o", "yaml").stdout)
    assert obj["apiVersion"] == "eci.alibabacloud.com/v1" and obj["kind"] == "ImageCache"
    assert obj["spec"] == {"images": [f"{plain_registry.host}/fixtures/app:1.0"], "imageCacheSize": 25,
                           "retentionDays": 7}
    assert obj["metadata"]["annotations"]["k8s.aliyun.com/imc-enable-reuse"] == "true"
    assert obj["status"]["phase"] == "Ready" and obj["status"]["progress"] == "100%"
    assert obj["status"]["imageCacheId"].startswith("imc-")
    assert any(e["reason"] == "AnnotationIgnored" and "vswitch-ids" in e["message"] for e in obj["status"]["events"])
    listing = run_imc(home, "cache", "list").stdout.splitlines()
    assert listing[0].split() == ["NAME", "AGE", "CACHEID", "PHASE", "PROGRESS", "STALE"]
    assert [line.split()[0] for line in listing[1:]] == ["first", "second"]
    assert all(line.split()[3:] == ["Ready", "100%", "-"] for line in listing[1:])
    # Applying the same file again changes nothing that needs a rebuild.
    again = run_imc(home, "apply", "-f", str(manifest), "--wait", "-q")
    assert again.returncode == 0 and "unchanged" in again.stdout


@pytest.mark.parametrize("doc,message", [
    ("apiVersion: v1\nkind: ImageCache\nmetadata: {name: x}\nspec: {images: [a]}\n", "apiVersion"),
    ("apiVersion: eci.alibabacloud.com/v1\nkind: ImageCache\nmetadata:\n  name: x\n  annotations:\n"
     "    k8s.aliyun.com/imc-enable-turbo: 'true'\nspec: {images: [a]}\n", "unknown annotation k8s.aliyun.com/imc-enable-turbo"),
    ("apiVersion: eci.alibabacloud.com/v1\nkind: ImageCache\nmetadata: {name: x}\nspec: {images: [a], size: 3}\n",
     "unknown field 'size'"),
    ("{not yaml: [", "not valid YAML"),
])
def test_apply_bad_documents_change_nothing(tmp_path: Path, doc: str, message: str) -> None:
    home = tmp_path / "home"
    path = tmp_path / "bad.yaml"
    good = ("apiVersion: eci.alibabacloud.com/v1\nkind: ImageCache\nmetadata: {name: good}\n"
            "spec: {images: ['127.0.0.1:1/a/b:1']}\n---\n")
    path.write_text(good + doc)
    out = run_imc(home, "apply", "-f", str(path))
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and out.stderr.count("\n") == 1
    assert "No image caches" in run_imc(home, "cache", "list").stdout


def test_cli_create_in_the_background_then_events_and_delete(tmp_path: Path, plain_registry: Any) -> None:
    home = tmp_path / "home"
    out = run_imc(home, "cache", "create", "bg", "--image", f"{plain_registry.host}/fixtures/app:1.0",
                  "--plain-http", plain_registry.host)
    assert out.returncode == 0, out.stderr
    assert "building in the background" in out.stdout
    caches = Caches(home)
    deadline = time.monotonic() + 60
    while caches.get("bg").phase == "Creating" and time.monotonic() < deadline:
        time.sleep(0.1)  # polling an observable state with a deadline
    assert caches.get("bg").phase == "Ready"
    events = run_imc(home, "cache", "events", "bg").stdout
    assert "VolumePacked" in events and "Ready" in events
    assert run_imc(home, "volume", "verify", "bg").returncode == 0
    deleted = run_imc(home, "cache", "delete", "bg")
    assert deleted.returncode == 0 and volume_files(home) == []
    missing = run_imc(home, "cache", "get", "bg")
    assert missing.returncode == 6 and "does not exist" in missing.stderr


def test_cli_wait_reports_failure_with_exit_code(tmp_path: Path, plain_registry: Any) -> None:
    out = run_imc(tmp_path / "home", "cache", "create", "nope", "--wait", "-q", "--image",
                  f"{plain_registry.host}/fixtures/app:0.0", "--plain-http", plain_registry.host)
    assert out.returncode == 12
    assert "image cache nope is Failed" in out.stderr and out.stderr.count("\n") == 1


def test_a_blob_lost_part_way_fails_the_build_with_the_reason_and_wait_exits_12(
        tmp_path: Path, plain_registry: Any, catalogue: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A store blob gone under a build is the build's failure, not a deleted cache."""
    home = tmp_path / "home"
    layer = Digest.parse(blobs_of(catalogue, "fixtures/app:1.0")[-1]["digest"])

    class LosingProgress(PullLines):
        def cache_event(self, event: Any) -> None:
            super().cache_event(event)
            if event.reason == "ImagesPulled":  # every blob is local now: one goes missing
                Store(home).blob_path(layer).unlink()

    @contextlib.contextmanager
    def losing_progress(quiet: bool) -> Iterator[PullLines]:
        yield LosingProgress(sys.stderr)

    monkeypatch.setattr(cache_cmds, "pull_progress", losing_progress)
    monkeypatch.setattr(sys, "argv", ["imc", "--home", str(home), "cache", "create", "lost", "--wait", "--image",
                                      f"{plain_registry.host}/fixtures/app:1.0", "--plain-http", plain_registry.host])
    with pytest.raises(SystemExit) as exited:
        cli_main()
    assert exited.value.code == 12
    err = capsys.readouterr().err
    assert "image cache lost is Failed" in err and f"blob {layer} is not in the store" in err
    cache = Caches(home).get("lost")
    assert cache.phase == "Failed" and f"blob {layer} is not in the store" in cache.message
    assert cache.events[-1].reason == "Failed" and cache.expire


def test_a_cache_deleted_under_its_build_says_so(tmp_path: Path, plain_registry: Any) -> None:
    caches = Caches(tmp_path)
    _, lease = caches.create("gone", spec(plain_registry, "fixtures/app:1.0"))

    def delete_it(event: Any) -> None:
        if event.reason == "ImagesPulled":
            caches.delete("gone")

    with pytest.raises(CacheDeletedError, match="gone was deleted while it was being built"):
        Builder(caches).build("gone", lease, on_event=delete_it)
    assert volume_files(tmp_path) == []


def test_cache_and_volume_commands_take_the_cache_id_as_well_as_the_name(tmp_path: Path, plain_registry: Any) -> None:
    home = tmp_path / "home"
    caches = Caches(home)
    built = build(caches, "web", spec(plain_registry, "fixtures/base:1.0"))
    assert built.phase == "Ready", built.message
    got = run_imc(home, "cache", "get", built.id, "-o", "json")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["metadata"]["name"] == "web"
    events = run_imc(home, "cache", "events", built.id)
    assert events.returncode == 0 and "VolumePacked" in events.stdout
    inspected = run_imc(home, "volume", "inspect", built.id, "-o", "json")
    assert inspected.returncode == 0, inspected.stderr
    assert run_imc(home, "volume", "verify", built.id).returncode == 0
    unknown = run_imc(home, "cache", "get", "imc-nosuchcacheid12345")
    assert unknown.returncode == 6 and "no cache has this name or id" in unknown.stderr
    deleted = run_imc(home, "cache", "delete", built.id)
    assert deleted.returncode == 0 and deleted.stdout.strip() == "imagecache web deleted"
    assert caches.list() == [] and volume_files(home) == []


def test_a_cache_named_like_an_id_is_found_by_its_name_first(tmp_path: Path, plain_registry: Any) -> None:
    caches = Caches(tmp_path)
    first, lease = caches.create("first", spec(plain_registry, "fixtures/base:1.0"))
    lease.release()
    lookalike, lease = caches.create(first.id, spec(plain_registry, "fixtures/base:1.0"))
    lease.release()
    assert caches.find(first.id).name == first.id
    assert caches.find(lookalike.id).name == first.id
    assert caches.find("first").id == first.id


def test_volume_export_loads_with_skopeo(tmp_path: Path, plain_registry: Any, catalogue: dict[str, Any]) -> None:
    home = tmp_path / "home"
    assert run_imc(home, "cache", "create", "exp", "--wait", "-q", "--image", f"{plain_registry.host}/fixtures/app:1.0",
                   "--image", f"{plain_registry.host}/fixtures/oci-app:1.0",
                   "--plain-http", plain_registry.host).returncode == 0
    archive = tmp_path / "exp.tar"
    out = run_imc(home, "volume", "export", "exp", "--format", "oci-archive", "-o", str(archive))
    assert out.returncode == 0, out.stderr
    for ref in ("fixtures/app:1.0", "fixtures/oci-app:1.0"):
        inspected = subprocess.run(["skopeo", "inspect", f"oci-archive:{archive}:{plain_registry.host}/{ref}"],
                                   capture_output=True, text=True, timeout=60)
        assert inspected.returncode == 0, inspected.stderr
        layers = json.loads(inspected.stdout)["Layers"]
        assert layers == [b["digest"] for b in blobs_of(catalogue, ref)[1:]]


def test_lease_cannot_be_taken_twice(tmp_path: Path) -> None:
    first = BuildLease(tmp_path / "x.lock")
    with pytest.raises(CacheStateError):
        BuildLease(tmp_path / "x.lock")
    first.release()
    BuildLease(tmp_path / "x.lock").release()


def test_update_without_changes_repacks_a_flash_cache_whose_packing_failed(tmp_path: Path, plain_registry: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    caches = Caches(tmp_path)
    real_pack = build_module.volumes.pack

    def failing_pack(*args: Any, **kw: Any) -> Any:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(build_module.volumes, "pack", failing_pack)
    broken = build(caches, "fl", spec(plain_registry, "fixtures/app:1.0", flash=True))
    assert broken.phase == "Ready" and broken.volume_state == "failed" and broken.source == "staging"
    monkeypatch.setattr(build_module.volumes, "pack", real_pack)
    updating, lease = caches.update("fl")
    assert lease is not None and updating.phase == "Updating" and updating.source == "staging"
    repaired = Builder(caches).build("fl", lease)
    assert repaired.phase == "Ready" and repaired.source == "volume" and repaired.pinned == []
    assert Volume.open(Path(repaired.volume.path)).verify().corrupt == []
