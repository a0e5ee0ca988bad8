"""``imc match`` against real caches built from the real registry: exact and
same-repository matches, an explicit id, no match, and auto-create (foreground and
background) ending in a Ready cache that holds the image."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.build import Builder
from builder.caches import Caches
from builder.cli import cli
from builder.digest import Digest
from builder.imagecache import CacheSpec
from builder.volume import Volume

# ``python -m builder`` once the command is registered in builder/cli/__init__.py;
# until then the same main() with the command added, so the tests run the real
# error handling and exit codes either way.
_SHIM = ("import sys; from builder.cli import cli, main; from builder.cli.match_cmd import match; "
         "cli.add_command(match); sys.argv[0] = 'imc'; main()")
IMC = [sys.executable, "-m", "builder"] if "match" in cli.commands else [sys.executable, "-c", _SHIM]


def run_imc(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IMC_HOME": str(home)}
    return subprocess.run([*IMC, *args], check=False, capture_output=True, text=True, env=env, timeout=180)


def pod_yaml(path: Path, registry: Any, *refs: str, name: str = "web-1", storage: str = "10Gi",
             annotations: dict[str, str] | None = None) -> Path:
    """A Pod asking for ``refs`` on ``registry``, each container with ``storage`` of
    ephemeral storage (the pod's is their sum)."""
    metadata: dict[str, Any] = {"name": name}
    if annotations:
        metadata["annotations"] = annotations
    containers = [{"name": f"c{i}", "image": f"{registry.host}/{ref}", "imagePullPolicy": "IfNotPresent",
                   "resources": {"requests": {"ephemeral-storage": storage}}} for i, ref in enumerate(refs)]
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
                                    "spec": {"containers": containers}}))
    return path


class Clock:
    """Steps an hour per reading, so the caches built in order have distinct ages."""

    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=1)

    def __call__(self) -> dt.datetime:
        self.now += dt.timedelta(hours=1)
        return self.now


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, plain_registry: Any) -> dict[str, Any]:
    """A home with three Ready caches, oldest first: app-1 (app:1.0), app-2 (app:2.0),
    base (base:1.0, 40 GiB)."""
    home = tmp_path_factory.mktemp("match-home")
    caches = Caches(home, clock=Clock())
    out: dict[str, Any] = {"home": home}
    for name, ref, size in (("app-1", "fixtures/app:1.0", 20), ("app-2", "fixtures/app:2.0", 20),
                            ("base", "fixtures/base:1.0", 40)):
        _, lease = caches.create(name, CacheSpec(images=[f"{plain_registry.host}/{ref}"], size_gib=size,
                                                 plain_http=[plain_registry.host]))
        result = Builder(caches).build(name, lease)
        assert result.phase == "Ready", result.message
        out[name] = result
    return out


def match_json(home: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None]:
    out = run_imc(home, "match", *args, "-o", "json")
    return out, (json.loads(out.stdout) if out.stdout.strip() else None)


def test_exact_image_picks_the_cache_holding_that_version(built: dict[str, Any], plain_registry: Any,
                                                          tmp_path: Path) -> None:
    pod = pod_yaml(tmp_path / "pod.yaml", plain_registry, "fixtures/app:1.0")
    out, doc = match_json(built["home"], "-f", str(pod))
    assert out.returncode == 0, out.stderr
    assert doc["cache"] == {"name": "app-1", "imageCacheId": built["app-1"].id, "phase": "Ready"}
    assert doc["created"] is False and doc["warnings"] == [] and out.stderr == ""
    assert [(c["name"], c["exactImages"], c["sameRepositoryImages"]) for c in doc["ranking"]] == [
        ("app-1", 1, 0), ("app-2", 0, 1)]  # base holds another repository: not a candidate
    assert Caches(built["home"]).get("app-1").last_used is not None
    table = run_imc(built["home"], "match", "-f", str(pod))
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAME", "CACHEID", "PHASE"]
    assert lines[1].split() == ["app-1", built["app-1"].id, "Ready"]
    assert lines[2].startswith("reason: 1 of 1 images with the same version")


def test_other_version_picks_the_newest_cache_of_the_same_repository(built: dict[str, Any], plain_registry: Any,
                                                                    tmp_path: Path) -> None:
    pod = pod_yaml(tmp_path / "pod.yaml", plain_registry, "fixtures/app:3.0")
    out, doc = match_json(built["home"], "-f", str(pod))
    assert out.returncode == 0, out.stderr
    assert doc["cache"]["name"] == "app-2"  # same degree and size as app-1, and newer
    assert [c["name"] for c in doc["ranking"]] == ["app-2", "app-1"]
    assert "0 of 1 images with the same version, 1 with the same repository" in doc["reason"]
    # Storage no 20 GiB cache satisfies leaves only the 40 GiB one, which holds another repository.
    big = pod_yaml(tmp_path / "big.yaml", plain_registry, "fixtures/app:3.0", storage="30Gi")
    out, doc = match_json(built["home"], "-f", str(big))
    assert out.returncode == 13 and doc["cache"] is None and doc["ranking"] == []
    assert out.stderr.startswith("imc: error: no Ready cache of at least 30 GiB") and out.stderr.count("\n") == 1


def test_explicit_cache_id_from_the_annotation(built: dict[str, Any], plain_registry: Any, tmp_path: Path) -> None:
    base = built["base"]
    pod = pod_yaml(tmp_path / "pod.yaml", plain_registry, "fixtures/base:1.0", "fixtures/app:1.0",
                   annotations={"k8s.aliyun.com/eci-image-snapshot-id": base.id})
    out, doc = match_json(built["home"], "-f", str(pod))
    assert out.returncode == 0, out.stderr
    assert doc["cache"] == {"name": "base", "imageCacheId": base.id, "phase": "Ready"}
    assert doc["reason"] == f"explicit cache id {base.id}" and doc["ranking"] == []
    assert out.stderr.startswith("imc: warning: image cache base") and "fixtures/app:1.0" in out.stderr
    # The flag overrides the annotation; a missing id fails clearly.
    out, doc = match_json(built["home"], "-f", str(pod), "--cache-id", built["app-1"].id)
    assert doc["cache"]["name"] == "app-1"
    missing = run_imc(built["home"], "match", "-f", str(pod), "--cache-id", "imc-00000000000000000")
    assert missing.returncode == 6
    assert missing.stderr == "imc: error: image cache id imc-00000000000000000 does not exist\n"


def test_no_match_without_auto_exits_13(built: dict[str, Any], plain_registry: Any) -> None:
    out = run_imc(built["home"], "match", "--image", f"{plain_registry.host}/fixtures/oci-app:1.0")
    assert out.returncode == 13
    assert out.stdout.startswith("reason: no Ready cache holds")
    assert out.stderr.startswith("imc: error: no Ready cache holds") and out.stderr.count("\n") == 1


def test_auto_create_with_wait_builds_a_ready_cache_holding_the_image(tmp_path: Path, plain_registry: Any,
                                                                      catalogue: dict[str, Any]) -> None:
    home = tmp_path / "home"
    pod = pod_yaml(tmp_path / "pod.yaml", plain_registry, "fixtures/oci-app:1.0", name="eci-42", storage="30Gi",
                   annotations={"k8s.aliyun.com/eci-image-cache": "true",
                                "k8s.aliyun.com/plain-http-registry": plain_registry.host})
    out, doc = match_json(home, "-f", str(pod), "--wait")
    assert out.returncode == 0, out.stderr
    assert doc["created"] is True and doc["cache"]["name"] == "auto-create-for-eci-42"
    assert doc["cache"]["phase"] == "Ready"
    cache = Caches(home).get("auto-create-for-eci-42")
    assert cache.phase == "Ready" and cache.auto and cache.instance_id == "eci-42"
    assert cache.spec.size_gib == 50  # 20 GiB plus the 30 GiB of storage
    assert cache.source == "volume"
    wanted = catalogue["images"]["fixtures/oci-app:1.0"]["digest"]
    assert [i.digest for i in cache.images] == [wanted]
    assert Volume.open(Path(cache.volume.path)).has(Digest.parse(wanted))
    # The next container asking the same is a hit on the automatic cache, which is now in use.
    out, doc = match_json(home, "-f", str(pod))
    assert out.returncode == 0 and doc["created"] is False and doc["cache"]["name"] == "auto-create-for-eci-42"
    assert Caches(home).get("auto-create-for-eci-42").last_used is not None


def test_auto_create_builds_in_the_background_without_wait(tmp_path: Path, plain_registry: Any) -> None:
    home = tmp_path / "home"
    out = run_imc(home, "match", "--image", f"{plain_registry.host}/fixtures/base:1.0", "--auto",
                  "--instance-id", "eci-7", "--plain-http", plain_registry.host)
    assert out.returncode == 0, out.stderr
    assert "auto-create-for-eci-7" in out.stdout and "building in the background" in out.stdout
    caches = Caches(home)
    deadline = time.monotonic() + 60
    while caches.get("auto-create-for-eci-7").phase == "Creating" and time.monotonic() < deadline:
        time.sleep(0.1)  # polling an observable state with a deadline
    assert caches.get("auto-create-for-eci-7").phase == "Ready"
