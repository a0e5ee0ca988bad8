"""Plans against the real registry: the bytes a plan says the build fetches are the
bytes the build then fetches, and a plan reads manifests and configs only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.countproxy import CountingProxy
from test_caches import _push_zstd_bomb, run_imc, volume_files

from builder.build import Builder
from builder.caches import Caches
from builder.imagecache import CacheSpec
from builder.plan import Plan, plan
from builder.pull import REGISTRY, BlobDone, Puller, PullEvent
from builder.reference import parse as parse_reference
from builder.registry.hosts import HostPolicy
from builder.store import Store


def proxied(registry: Any) -> CountingProxy:
    host, _, port = registry.host.partition(":")
    return CountingProxy((host, int(port)))


def proxy_spec(proxy: CountingProxy, *refs: str, **kw: Any) -> CacheSpec:
    return CacheSpec(images=[f"{proxy.host}/{r}" for r in refs], plain_http=[proxy.host], **kw)


def build_counting(caches: Caches, name: str, s: CacheSpec) -> dict[str, str]:
    """Build ``name``; every blob the pull placed, by digest, with where it came from."""
    origins: dict[str, str] = {}

    def seen(ev: PullEvent) -> None:
        if isinstance(ev, BlobDone):
            origins[str(ev.digest)] = ev.origin

    _created, lease = caches.create(name, s)
    result = Builder(caches).build(name, lease, on_pull=seen)
    assert result.phase == "Ready", result.message
    return origins


def planned(p: Plan) -> dict[str, tuple[str, int]]:
    return {str(b.descriptor.digest): (b.origin, b.descriptor.size) for i in p.images for b in i.blobs}


def assert_plan_is_what_the_build_does(p: Plan, origins: dict[str, str], proxy: CountingProxy) -> None:
    """Blob by blob, the plan's origin is the build's; the bytes to fetch are the bytes the
    build fetched, by its own events and by the registry's side of the proxy."""
    blobs = planned(p)
    assert {d: o for d, (o, _) in blobs.items()} == origins
    fetched = sum(size for d, (_, size) in blobs.items() if origins[d] == REGISTRY)
    assert p.totals().to_fetch == fetched
    assert set(proxy.blob_gets()) == {d for d, o in origins.items() if o == REGISTRY}


def test_plan_of_a_fresh_store_is_every_blob_and_matches_the_build(tmp_path: Path, plain_registry: Any,
                                                                   catalogue: dict[str, Any]) -> None:
    with proxied(plain_registry) as proxy:
        caches = Caches(tmp_path)
        s = proxy_spec(proxy, "fixtures/app:1.0", "fixtures/multi:1.0", "fixtures/oci-app:1.0")
        p = plan(caches, s)
        assert not any(Path(tmp_path, "store", "blobs").rglob("sha256/*")), "a plan writes nothing to the store"
        totals = p.totals()
        assert totals.in_store == 0 and totals.from_caches == 0 and totals.to_fetch == totals.bytes > 0
        assert totals.unpacked_estimated > 0 and p.fits
        proxy.reset()
        origins = build_counting(caches, "fresh", s)
        assert_plan_is_what_the_build_does(p, origins, proxy)
        multi = catalogue["images"]["fixtures/multi:1.0"]["manifests"][0]
        assert p.images[1].digest == multi["digest"] and p.images[1].platform == "linux/amd64"
        # Everything is local now: the plan's unpacked size is the build's own count, exactly.
        again = plan(caches, s)
        assert again.totals().to_fetch == 0 and again.totals().unpacked_estimated == 0
        assert again.unpacked == caches.get("fresh").unpacked_bytes


def test_plan_counts_the_shared_base_layers_the_store_holds(tmp_path: Path, plain_registry: Any,
                                                            catalogue: dict[str, Any]) -> None:
    with proxied(plain_registry) as proxy:
        store = Store(tmp_path)
        Puller(store, HostPolicy(frozenset([proxy.host]))).pull([parse_reference(f"{proxy.host}/fixtures/base:1.0")])
        caches = Caches(tmp_path, store)
        s = proxy_spec(proxy, "fixtures/app:1.0", "fixtures/app:2.0")
        p = plan(caches, s)
        base = catalogue["images"]["fixtures/base:1.0"]["manifests"][0]["layers"]
        assert p.totals().in_store == sum(layer["size"] for layer in base)
        # Layers the store holds are counted exactly, as the build counts them.
        assert all(not b.estimated for b in p.images[0].blobs if b.origin == "store")
        proxy.reset()
        origins = build_counting(caches, "shared", s)
        assert_plan_is_what_the_build_does(p, origins, proxy)
        assert all(origins[str(layer["digest"])] == "store" for layer in base)


@pytest.mark.parametrize("reuse", [True, False])
def test_plan_names_the_caches_whose_volumes_hold_layers(tmp_path: Path, plain_registry: Any, reuse: bool) -> None:
    """With reuse the build copies them (not fetched); without, the build fetches them
    and the plan says which caches hold them."""
    with proxied(plain_registry) as proxy:
        caches = Caches(tmp_path)
        build_counting(caches, "first", proxy_spec(proxy, "fixtures/app:1.0"))
        caches.gc()  # the layers are now only in first's volume
        assert not any(Path(tmp_path, "store", "blobs").rglob("sha256/*"))
        s = proxy_spec(proxy, "fixtures/app:1.0", "fixtures/app:2.0", reuse=reuse)
        p = plan(caches, s)
        totals = p.totals()
        assert totals.caches == ["first"] and totals.in_other_caches > 0
        if reuse:
            assert totals.from_caches == totals.in_other_caches and totals.to_fetch < totals.bytes
        else:
            assert totals.from_caches == 0 and totals.to_fetch == totals.bytes
        proxy.reset()
        origins = build_counting(caches, "second", s)
        assert_plan_is_what_the_build_does(p, origins, proxy)


def test_a_plan_moves_under_one_percent_of_the_image_bytes(tmp_path: Path, plain_registry: Any,
                                                           large_image: dict[str, Any]) -> None:
    image_bytes = sum(m["size"] + m["config"]["size"] + m["totalLayerBytes"] for m in large_image["manifests"])
    with proxied(plain_registry) as proxy:
        p = plan(Caches(tmp_path), proxy_spec(proxy, "fixtures/large:1.0"))
        assert p.totals().to_fetch > 0.99 * image_bytes
        layers = {str(layer["digest"]) for m in large_image["manifests"] for layer in m["layers"]}
        assert not layers & set(proxy.blob_gets()), "a plan never reads a layer"
        assert proxy.bytes_down < 0.01 * image_bytes
        assert p.bytes_read <= proxy.bytes_down


def test_cli_plan_tells_unknown_time_then_a_measured_one(tmp_path: Path, plain_registry: Any) -> None:
    home = tmp_path / "home"
    args = ["cache", "plan", "web", "--plain-http", plain_registry.host,
            "--image", f"{plain_registry.host}/fixtures/app:1.0"]
    first = run_imc(home, *args)
    assert first.returncode == 0, first.stderr
    assert "time:       unknown" in first.stdout and "(estimated)" in first.stdout
    doc = json.loads(run_imc(home, *args, "-o", "json").stdout)
    assert doc["transferRate"] is None and doc["estimatedSeconds"] is None and doc["fits"] is True
    pulled = run_imc(home, "pull", "-q", "--plain-http", plain_registry.host,
                     f"{plain_registry.host}/fixtures/base:1.0")
    assert pulled.returncode == 0, pulled.stderr
    doc = json.loads(run_imc(home, *args, "-o", "json").stdout)
    assert doc["transferRate"] > 0 and doc["estimatedSeconds"] is not None
    assert "time:       about" in run_imc(home, *args).stdout


def test_create_dry_run_prints_the_plan_and_creates_nothing(tmp_path: Path, plain_registry: Any) -> None:
    home = tmp_path / "home"
    out = run_imc(home, "cache", "create", "web", "--dry-run", "--plain-http", plain_registry.host,
                  "--image", f"{plain_registry.host}/fixtures/app:1.0", "-o", "yaml")
    assert out.returncode == 0, out.stderr
    assert "bytesToFetch:" in out.stdout
    assert json.loads(run_imc(home, "cache", "list", "-o", "json").stdout)["items"] == []
    assert volume_files(home) == [] and not any((home / "store" / "blobs").rglob("sha256/*"))


def test_a_size_too_small_exits_11_with_the_size_needed(tmp_path: Path, plain_registry: Any) -> None:
    home = tmp_path / "home"
    ref = f"{plain_registry.host}/{_push_zstd_bomb(plain_registry, 21)}"
    assert run_imc(home, "pull", "-q", "--plain-http", plain_registry.host, ref).returncode == 0
    args = ["cache", "plan", "big", "--plain-http", plain_registry.host, "--image", ref]
    refused = run_imc(home, *args)
    assert refused.returncode == 11
    last = refused.stderr.strip().splitlines()
    assert last == ["imc: error: image cache big: does not fit: the images need 21.00 GiB unpacked (exact), more "
                    "than the cache's imageCacheSize of 20 GiB; use a size of at least 22 GiB"]
    assert "does not fit" in refused.stdout  # the plan is still shown
    assert run_imc(home, *args, "--size", "22").returncode == 0
    dry = run_imc(home, "cache", "create", "big", "--dry-run", "--plain-http", plain_registry.host, "--image", ref)
    assert dry.returncode == 11 and json.loads(run_imc(home, "cache", "list", "-o", "json").stdout)["items"] == []


# -- the API's dryRun=All, through the real kubectl ----------------------------------------------------------------


def test_kubectl_dry_run_server_answers_the_plan_and_stores_nothing(tmp_path: Path, plain_registry: Any,
                                                                    catalogue: dict[str, Any]) -> None:
    from test_kubectl import image_cache, serving

    registry = plain_registry.host
    app = catalogue["images"]["fixtures/app:1.0"]["manifests"][0]
    app_bytes = app["config"]["size"] + app["totalLayerBytes"]
    with serving(tmp_path) as kube:
        name = kube.file("web.yaml", image_cache("web", registry, "fixtures/app:1.0"))
        out = kube.run("apply", "--dry-run=server", "-f", name, "-o", "json")
        planned = json.loads(out.stdout)["status"]["plan"]
        assert planned["total"]["bytesToFetch"] == app_bytes and planned["fits"] is True
        assert planned["images"][0]["image"] == f"{registry}/fixtures/app:1.0"
        assert "No resources found" in kube.run("get", "imagecaches").stderr
        kube.run("apply", "-f", name)
        kube.run("wait", "--for=jsonpath={.status.phase}=Ready", "imagecache/web", "--timeout=120s")
        # An update's plan: the layers of app:1.0 are in web's own volume (or the store).
        changed = kube.file("web2.yaml", image_cache("web", registry, "fixtures/app:1.0", "fixtures/app:2.0"))
        out = kube.run("apply", "--dry-run=server", "-f", changed, "-o", "json")
        obj = json.loads(out.stdout)
        assert len(obj["spec"]["images"]) == 2 and obj["status"]["phase"] == "Ready"
        total = obj["status"]["plan"]["total"]
        assert total["bytesToFetch"] < total["bytes"] and total["bytesToFetch"] > 0
        live = json.loads(kube.run("get", "imagecache", "web", "-o", "json").stdout)
        assert len(live["spec"]["images"]) == 1 and "plan" not in live["status"]


def test_kubectl_dry_run_of_images_too_large_warns_with_the_size_needed(tmp_path: Path, plain_registry: Any) -> None:
    from test_kubectl import image_cache, serving

    registry = plain_registry.host
    ref = _push_zstd_bomb(plain_registry, 21)
    with serving(tmp_path) as kube:
        assert run_imc(tmp_path / "imc-home", "pull", "-q", "--plain-http", registry, f"{registry}/{ref}").returncode == 0
        name = kube.file("big.yaml", image_cache("big", registry, ref))
        out = kube.run("create", "--dry-run=server", "-f", name, "-o", "yaml")
        assert "does not fit" in out.stderr and "use a size of at least 22 GiB" in out.stderr
        assert "fits: false" in out.stdout and "sizeNeededGiB: 22" in out.stdout
        missing = kube.file("gone.yaml", image_cache("gone", registry, "fixtures/nothing:1.0"))
        out = kube.run("create", "--dry-run=server", "-f", missing, "-o", "json")
        assert "could not be planned" in out.stderr
        assert "error" in json.loads(out.stdout)["status"]["plan"]


def test_apply_dry_run_server_plans_every_document_and_changes_nothing(tmp_path: Path, plain_registry: Any) -> None:
    home = tmp_path / "home"
    registry = plain_registry.host
    bomb = _push_zstd_bomb(plain_registry, 21)
    assert run_imc(home, "pull", "-q", "--plain-http", registry, f"{registry}/{bomb}").returncode == 0
    docs = [{"apiVersion": "eci.alibabacloud.com/v1", "kind": "ImageCache",
             "metadata": {"name": name, "annotations": {"k8s.aliyun.com/plain-http-registry": registry}},
             "spec": {"images": [f"{registry}/{ref}"]}} for name, ref in (("web", "fixtures/app:1.0"), ("big", bomb))]
    path = tmp_path / "caches.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    out = run_imc(home, "apply", "--dry-run=server", "-f", str(path))
    assert out.returncode == 11, out.stderr
    assert "imagecache web would be created" in out.stdout and "plan for image cache big:" in out.stdout
    assert out.stderr.strip().splitlines() == [
        "imc: error: image cache big: does not fit: the images need 21.00 GiB unpacked (exact), more than the "
        "cache's imageCacheSize of 20 GiB; use a size of at least 22 GiB"]
    doc = json.loads(run_imc(home, "apply", "--dry-run=server", "-f", str(path), "-o", "json").stdout)
    assert [(i["name"], i["fits"]) for i in doc["items"]] == [("web", True), ("big", False)]
    assert json.loads(run_imc(home, "cache", "list", "-o", "json").stdout)["items"] == []
    assert volume_files(home) == []


def test_an_image_named_twice_counts_once_as_in_the_build(tmp_path: Path, plain_registry: Any,
                                                          catalogue: dict[str, Any]) -> None:
    """A tag and the digest it points at are two references to one image: the build
    packs (and counts) its manifest and blobs once, and so does the plan."""
    with proxied(plain_registry) as proxy:
        caches = Caches(tmp_path)
        digest = catalogue["images"]["fixtures/multi:1.0"]["digest"]
        s = proxy_spec(proxy, "fixtures/multi:1.0", f"fixtures/multi@{digest}")
        p = plan(caches, s)
        assert p.totals().to_fetch == p.images[0].totals().to_fetch
        proxy.reset()
        origins = build_counting(caches, "twice", s)
        assert_plan_is_what_the_build_does(p, origins, proxy)
        assert plan(caches, s).unpacked == caches.get("twice").unpacked_bytes
