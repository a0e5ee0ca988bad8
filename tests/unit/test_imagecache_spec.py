"""ImageCache objects as the documentation writes them: null fields take their
defaults, the documented annotation names are recognised exactly, and quota usage and
single-endpoint options read as a user expects."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from builder.caches import Caches
from builder.errors import ValidationError
from builder.home import Home
from builder.imagecache import (
    CLOUD_ONLY_ANNOTATIONS,
    SIZE_DEFAULT,
    AnnotationReport,
    CacheSpec,
    ImageCache,
    Settings,
    spec_from_object,
)

DOCUMENTED_CLOUD_ONLY = {
    "k8s.aliyun.com/vswitch-ids": "vsw-2zeet2ksvw7f14ryz****",
    "k8s.aliyun.com/security-group-id": "sg-2ze63v3jtm8e6s****",
    "k8s.aliyun.com/resource-group-id": "rg-acfmzw2jz2z****",
    "k8s.aliyun.com/acr-instance-ids": "cri-j36zhodptmyq****",
    "k8s.aliyun.com/eip-instance-id": "eip-bp1q5n8cq4p7f6dzu****",
    "k8s.aliyun.com/auto-create-eip": "true",
    "k8s.aliyun.com/eip-bandwidth": "5",
    "k8s.aliyun.com/eip-internet-charge-type": "PayByTraffic",
    "k8s.aliyun.com/eip-isp": "BGP",
    "k8s.aliyun.com/eip-common-bandwidth-package-id": "cbwp-2zeukbj916scmj51m****",
}


def parse(text: str) -> tuple[str, CacheSpec, AnnotationReport]:
    return spec_from_object(yaml.safe_load(text))


HEADER = "apiVersion: eci.alibabacloud.com/v1\nkind: ImageCache\nmetadata:\n  name: imagecache-sample\n"


# -- null fields ---------------------------------------------------------------------------


def test_null_size_and_retention_take_their_defaults_as_the_documentation_writes_them() -> None:
    name, spec, report = parse(HEADER + "spec:\n  images:\n  - centos:latest\n  - busybox:latest\n"
                               "  imagePullSecrets:\n  imageCacheSize:\n  retentionDays:\n")
    assert name == "imagecache-sample"
    assert spec.size_gib == SIZE_DEFAULT and spec.retention_days is None and spec.image_pull_secrets == []
    assert spec.images == ["docker.io/library/centos:latest", "docker.io/library/busybox:latest"]
    assert report == AnnotationReport()


def test_json_nulls_are_unset_fields_too() -> None:
    _, spec, _ = spec_from_object({"apiVersion": "eci.alibabacloud.com/v1", "kind": "ImageCache",
                                   "metadata": {"name": "web", "annotations": None},
                                   "spec": {"images": ["busybox:1.36"], "imageCacheSize": None,
                                            "retentionDays": None, "imagePullSecrets": None}})
    assert (spec.size_gib, spec.retention_days, spec.image_pull_secrets, spec.annotations) == (20, None, [], {})


def test_null_annotation_is_unset_and_not_recorded() -> None:
    _, spec, report = parse(HEADER + "  annotations:\n    k8s.aliyun.com/imc-size:\n"
                            "    k8s.aliyun.com/imc-retention-days:\n    k8s.aliyun.com/imc-enable-flash:\n"
                            "    k8s.aliyun.com/vswitch-ids:\nspec:\n  images: [busybox:1.36]\n  imageCacheSize: 30\n")
    assert spec.size_gib == 30 and spec.retention_days is None and spec.flash is False
    assert spec.annotations == {} and report == AnnotationReport()


def test_a_null_required_field_is_still_missing() -> None:
    with pytest.raises(ValidationError, match=r"spec\.images: want a list"):
        parse(HEADER + "spec:\n  images:\n")
    with pytest.raises(ValidationError, match="name None"):
        parse("apiVersion: eci.alibabacloud.com/v1\nkind: ImageCache\nmetadata:\n  name:\nspec: {images: [a]}\n")


# -- annotation names ------------------------------------------------------------------------


def test_every_documented_cloud_only_annotation_is_recognised_and_recorded() -> None:
    assert set(CLOUD_ONLY_ANNOTATIONS) == set(DOCUMENTED_CLOUD_ONLY)
    _, spec, report = spec_from_object({"apiVersion": "eci.alibabacloud.com/v1", "kind": "ImageCache",
                                        "metadata": {"name": "web", "annotations": DOCUMENTED_CLOUD_ONLY},
                                        "spec": {"images": ["busybox:1.36"]}})
    assert report == AnnotationReport(cloud_only=tuple(DOCUMENTED_CLOUD_ONLY))
    assert spec.annotations == DOCUMENTED_CLOUD_ONLY


@pytest.mark.parametrize("key", ["k8s.aliyun.com/eci-vswitch", "k8s.aliyun.com/eci-security-group",
                                 "k8s.aliyun.com/eci-with-eip", "k8s.aliyun.com/eci-image-cache",
                                 "k8s.aliyun.com/vswitch-id"])
def test_undocumented_names_are_unknown_not_cloud_only(key: str) -> None:
    _, spec, report = spec_from_object({"apiVersion": "eci.alibabacloud.com/v1", "kind": "ImageCache",
                                        "metadata": {"name": "web", "annotations": {key: "x"}},
                                        "spec": {"images": ["busybox:1.36"]}})
    assert report == AnnotationReport(unknown=(key,))
    assert spec.annotations == {key: "x"}


def test_unknown_imc_annotation_is_still_an_error() -> None:
    with pytest.raises(ValidationError, match=r"unknown annotation k8s\.aliyun\.com/imc-with-eip"):
        parse(HEADER + "  annotations:\n    k8s.aliyun.com/imc-with-eip: 'true'\nspec: {images: [a]}\n")


def test_report_is_one_event_for_all_cloud_only_and_a_warning_per_unknown() -> None:
    cache = ImageCache(name="web", id="imc-x", spec=CacheSpec(images=["a"]), created="2026-11-30T00:00:00Z")
    AnnotationReport(cloud_only=tuple(DOCUMENTED_CLOUD_ONLY), unknown=("k8s.aliyun.com/eci-vswitch",)).record(cache)
    [ignored] = [e for e in cache.events if e.reason == "AnnotationIgnored"]
    assert ignored.type == "Normal"
    assert all(key in ignored.message for key in DOCUMENTED_CLOUD_ONLY)
    [unknown] = [e for e in cache.events if e.reason == "UnknownAnnotation"]
    assert unknown.type == "Warning" and "k8s.aliyun.com/eci-vswitch" in unknown.message


def test_create_records_the_report_as_events(tmp_path: Path) -> None:
    caches = Caches(tmp_path)
    _, spec, report = spec_from_object({"apiVersion": "eci.alibabacloud.com/v1", "kind": "ImageCache",
                                        "metadata": {"name": "web", "annotations": {
                                            **DOCUMENTED_CLOUD_ONLY, "k8s.aliyun.com/eci-vswitch": "v"}},
                                        "spec": {"images": ["127.0.0.1:1/a:1"]}})
    created, lease = caches.create("web", spec, no_effect=report)
    lease.release()
    reasons = [e.reason for e in created.events]
    assert reasons == ["Creating", "AnnotationIgnored", "UnknownAnnotation"]
    assert created.to_object()["metadata"]["annotations"]["k8s.aliyun.com/vswitch-ids"].startswith("vsw-")


# -- the command line --------------------------------------------------------------------------


def imc(home: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """The real command in its own process: errors must come out as one line and a code."""
    return subprocess.run([sys.executable, "-m", "builder", "--home", str(home), *args], input=stdin,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("registry", ["a,b", "registry.example.com, 127.0.0.1:5000", "", " , "])
def test_secret_create_wants_exactly_one_registry(tmp_path: Path, registry: str) -> None:
    out = imc(tmp_path, "secret", "create", "team:cred", "--registry", registry, "--username", "u",
              "--password-stdin", stdin="pw\n")
    assert out.returncode == 2
    assert out.stderr == f"imc: error: --registry: want one registry endpoint (host or host:port), got {registry!r}\n"
    assert not (tmp_path / "secrets").exists() or not any((tmp_path / "secrets").iterdir())


def test_config_get_shows_usage_against_each_quota(tmp_path: Path) -> None:
    Settings(max_manual_caches=10).save(Home(tmp_path).settings)
    caches = Caches(tmp_path)
    for name, auto in (("one", False), ("two", False), ("auto-create-for-eci-1", True)):
        _, lease = caches.create(name, CacheSpec(images=["127.0.0.1:1/a:1"]), auto=auto)
        lease.release()
    out = imc(tmp_path, "config", "get", "-o", "json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["usage"] == {"manual": {"used": 2, "limit": 10}, "automatic": {"used": 1, "limit": 5}}
    assert doc["max_manual_caches"] == 10 and doc["max_auto_caches"] == 5
    table = imc(tmp_path, "config", "get").stdout.splitlines()
    assert "manual caches: 2 of 10" in table and "automatic caches: 1 of 5" in table
