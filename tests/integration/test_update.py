"""A re-apply means what it says: every changed field takes effect (a new size
re-packs the volume, the old one serving until the switch), or the update is refused
and nothing changes; ``imc apply --dry-run`` says what would change, field by field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from test_caches import _push_zstd_bomb, run_imc, spec

from builder.build import Builder
from builder.caches import Caches
from builder.imagecache import GIB
from builder.volume import Volume


def document(name: str, registry: Any, ref: str, size: int | None = None, retention: int | None = None,
             **annotations: str) -> str:
    notes = {"k8s.aliyun.com/plain-http-registry": registry.host, **annotations}
    lines = ["apiVersion: eci.alibabacloud.com/v1", "kind: ImageCache", "metadata:", f"  name: {name}",
             "  annotations:", *(f'    {k}: "{v}"' for k, v in notes.items()), "spec:", "  images:",
             f"  - {registry.host}/{ref}"]
    if size is not None:
        lines.append(f"  imageCacheSize: {size}")
    if retention is not None:
        lines.append(f"  retentionDays: {retention}")
    return "\n".join(lines) + "\n"


def apply(home: Path, path: Path, text: str, *flags: str) -> Any:
    path.write_text(text)
    return run_imc(home, "apply", "-f", str(path), *flags)


def test_a_larger_size_repacks_into_a_volume_of_that_size_while_the_old_one_serves(
        tmp_path: Path, plain_registry: Any) -> None:
    caches = Caches(tmp_path)
    _, lease = caches.create("app", spec(plain_registry, "fixtures/app:1.0"))
    first = Builder(caches).build("app", lease)
    assert first.phase == "Ready" and Volume.open(Path(first.volume.path)).capacity == 20 * GIB
    caches.gc()  # the store lets the layers go: the re-pack must not need the registry
    updating, lease = caches.update("app", size_gib=40)
    assert lease is not None and updating.phase == "Updating"
    assert updating.source == "volume" and updating.volume.path == first.volume.path  # still serving
    assert Path(first.volume.path).exists()
    result = Builder(caches).build("app", lease)
    assert result.phase == "Ready", result.message
    assert result.spec.size_gib == 40 and result.generation == first.generation + 1
    assert Volume.open(Path(result.volume.path)).capacity == 40 * GIB
    assert not Path(first.volume.path).exists()
    assert result.bytes_fetched == 0
    messages = [(e.reason, e.message) for e in result.events]
    assert ("Updating", "re-packing into a volume of 40 GiB (imageCacheSize: 20 -> 40)") in messages
    assert any(r == "LayerReused" and "copied from cache:app" in m for r, m in messages)


def test_apply_with_a_new_size_configures_and_repacks(tmp_path: Path, plain_registry: Any) -> None:
    home, path = tmp_path / "home", tmp_path / "app.yaml"
    assert apply(home, path, document("app", plain_registry, "fixtures/app:1.0"), "--wait", "-q").returncode == 0
    again = apply(home, path, document("app", plain_registry, "fixtures/app:1.0", size=30), "--wait", "-q")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "imagecache app configured (re-packing into a volume of 30 GiB)"
    obj = json.loads(run_imc(home, "cache", "get", "app", "-o", "json").stdout)
    assert obj["spec"]["imageCacheSize"] == 30 and obj["status"]["phase"] == "Ready"
    assert Volume.open(Path(Caches(home).get("app").volume.path)).capacity == 30 * GIB


def test_a_size_smaller_than_the_content_is_refused_and_changes_nothing(tmp_path: Path, plain_registry: Any) -> None:
    home, path = tmp_path / "home", tmp_path / "big.yaml"
    ref = _push_zstd_bomb(plain_registry, 21)  # 21 GiB unpacked
    created = apply(home, path, document("other", plain_registry, "fixtures/base:1.0")
                    + "---\n" + document("big", plain_registry, ref, size=25), "--wait", "-q")
    assert created.returncode == 0, created.stderr
    before = {c.name: c for c in Caches(home).list()}
    refused = run_imc(home, "cache", "update", "big", "--size", "20", "--wait", "-q")
    assert refused.returncode == 11
    assert refused.stderr.strip() == ("imc: error: imageCacheSize: 20 GiB is less than the 21.00 GiB the images "
                                      "of big need unpacked; the cache is unchanged")
    # In a file, the refusal of one document keeps every other from being applied too.
    both = apply(home, path, document("other", plain_registry, "fixtures/base:1.0", retention=3)
                 + "---\n" + document("big", plain_registry, ref, size=20), "--wait", "-q")
    assert both.returncode == 11 and both.stdout == ""
    assert {c.name: c for c in Caches(home).list()} == before


def test_changed_reuse_and_flash_annotations_take_effect(tmp_path: Path, plain_registry: Any) -> None:
    home, path = tmp_path / "home", tmp_path / "app.yaml"
    assert apply(home, path, document("app", plain_registry, "fixtures/base:1.0"), "--wait", "-q").returncode == 0
    again = apply(home, path, document("app", plain_registry, "fixtures/base:1.0", **{
        "k8s.aliyun.com/imc-enable-reuse": "true", "k8s.aliyun.com/imc-enable-flash": "true"}), "--wait", "-q")
    assert again.returncode == 0 and again.stdout.strip() == "imagecache app configured", again.stderr
    cache = Caches(home).get("app")
    assert cache.spec.reuse and cache.spec.flash and cache.phase == "Ready"
    assert cache.events[-1].reason == "Updated"
    assert cache.events[-1].message == ("k8s.aliyun.com/imc-enable-reuse: false -> true; "
                                        "k8s.aliyun.com/imc-enable-flash: false -> true; no rebuild needed")
    unchanged = apply(home, path, path.read_text(), "--wait", "-q")
    assert unchanged.returncode == 0 and unchanged.stdout.strip() == "imagecache app unchanged"
    assert len(Caches(home).get("app").events) == len(cache.events)


def test_apply_dry_run_prints_each_change_and_changes_nothing(tmp_path: Path, plain_registry: Any) -> None:
    home, path = tmp_path / "home", tmp_path / "app.yaml"
    assert apply(home, path, document("app", plain_registry, "fixtures/base:1.0"), "--wait", "-q").returncode == 0
    before = Caches(home).get("app")
    out = apply(home, path, document("app", plain_registry, "fixtures/app:1.0", size=40, retention=7,
                                     **{"k8s.aliyun.com/imc-enable-reuse": "true"})
                + "---\n" + document("fresh", plain_registry, "fixtures/base:1.0"), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "imagecache app would be configured (rebuilding with 1 images)",
        f"  images: [{plain_registry.host}/fixtures/base:1.0] -> [{plain_registry.host}/fixtures/app:1.0]",
        "  imageCacheSize: 20 -> 40",
        "  retentionDays: (unset) -> 7",
        "  k8s.aliyun.com/imc-enable-reuse: false -> true",
        "imagecache fresh would be created",
    ]
    assert [c.name for c in Caches(home).list()] == ["app"] and Caches(home).get("app") == before


def test_the_api_put_replaces_the_spec_and_repacks(tmp_path: Path, plain_registry: Any) -> None:
    from builder.server.api import BuildRunner, ImageCacheAPI

    caches = Caches(tmp_path)
    _, lease = caches.create("app", spec(plain_registry, "fixtures/base:1.0"))
    first = Builder(caches).build("app", lease)
    runner = BuildRunner(Builder(caches), workers=1)
    api = ImageCacheAPI(caches, runner)
    path = f"{ImageCacheAPI.PREFIX}/app"
    body = document("app", plain_registry, "fixtures/base:1.0", size=32).encode()
    headers = {"Content-Type": "application/yaml"}
    try:
        dry = api.handle("PUT", path + "?dryRun=All", headers, body)
        assert dry.status == 200 and json.loads(dry.body)["spec"]["imageCacheSize"] == 32
        assert caches.get("app") == first
        put = api.handle("PUT", path, headers, body)
        assert put.status == 200, put.body
        assert json.loads(put.body)["status"]["phase"] == "Updating"
    finally:
        runner.shutdown(wait=True)
    result = caches.get("app")
    assert result.phase == "Ready" and result.spec.size_gib == 32, result.message
    assert Volume.open(Path(result.volume.path)).capacity == 32 * GIB
