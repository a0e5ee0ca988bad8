"""Caches shared through a registry: two imc homes stand in for two nodes.

Home A builds a cache from the real registry through a counting proxy, pushes it as
an OCI artifact to the real registry:2, home B pulls it and serves it; the images'
own registry (the proxy) sees no request while B serves. Interrupted uploads and
downloads resume instead of starting over; bad input fails clearly and registers
nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from support.cutproxy import CutProxy, UploadCutProxy

from builder.artifact import (
    ARTIFACT_TYPE,
    CONFIG_TYPE,
    VOLUME_TYPE,
    pull_cache,
    push_cache,
)
from builder.build import Builder
from builder.caches import Caches
from builder.imagecache import CacheSpec
from builder.reference import parse as parse_reference
from builder.registry.hosts import HostPolicy
from builder.registry.retry import RetryPolicy
from builder.server.app import Server

REFS = ("fixtures/app:1.0", "fixtures/oci-app:1.0", "fixtures/multi:1.0")
FAST = RetryPolicy(attempts=5, backoff=0.01, max_backoff=0.05)


def imc(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the imc CLI in a child process on ``home``."""
    return subprocess.run([sys.executable, "-m", "builder", "--home", str(home), *args], check=False,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "IMC_HOME": str(home)})


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def target(proxy_or_host: str) -> tuple[int, int]:
    host, port = proxy_or_host.split(":")
    return host, int(port)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def origin(registry_set: Any) -> Iterator[CutProxy]:
    """The images' own registry, behind a proxy that counts every request reaching it."""
    with CutProxy(target(registry_set.endpoints["plain"].host), cut_after=1 << 62) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def home_a(tmp_path_factory: pytest.TempPathFactory, origin: CutProxy) -> Path:
    """Node A: one Ready cache ``web`` of three images, built from the origin."""
    home = tmp_path_factory.mktemp("node-a")
    caches = Caches(home)
    _, lease = caches.create("web", CacheSpec(images=[f"{origin.host}/{r}" for r in REFS],
                                                    plain_http=[origin.host], retention_days=7))
    built = Builder(caches).build("web", lease)
    assert built.phase == "Ready", built.message
    return home


def volume_size(home: Path, name: str = "web") -> int:
    cache = Caches(home).get(name)
    assert cache.volume is not None
    return Path(cache.volume.path).stat().st_size


def test_push_pull_and_serve_on_another_node_without_the_origin(tmp_path: Path, home_a: Path, origin: CutProxy,
                                                                 plain_registry: Any,
                                                                 catalogue: dict[str, Any]) -> None:
    reg = plain_registry.host
    size = volume_size(home_a)
    part = max(64 << 10, size // 5)
    pushed = imc(home_a, "volume", "push", "web", f"{reg}/imc/web:v1", "--plain-http", reg,
                 "--part-size", str(part), "--chunk-size", str(part // 3 + 1), "-o", "json")
    assert pushed.returncode == 0, pushed.stderr
    result = json.loads(pushed.stdout)
    assert result["volumeBytes"] == size and result["parts"] == -(-size // part) >= 5
    assert result["partsUploaded"] == result["parts"] and result["partsSkipped"] == 0

    # The artifact as any OCI client sees it.
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    raw = requests.get(f"http://{reg}/v2/imc/web/manifests/v1", headers=accept, timeout=10)
    assert "sha256:" + hashlib.sha256(raw.content).hexdigest() == result["digest"]
    manifest = raw.json()
    assert manifest["artifactType"] == ARTIFACT_TYPE
    assert manifest["config"]["mediaType"] == CONFIG_TYPE
    assert {layer["mediaType"] for layer in manifest["layers"]} == {VOLUME_TYPE}
    assert sum(layer["size"] for layer in manifest["layers"]) == size
    config = requests.get(f"http://{reg}/v2/imc/web/blobs/{manifest['config']['digest']}", timeout=10).json()
    assert config["kind"] == "ImageCache" and config["metadata"]["name"] == "web"
    assert "events" not in config["status"] and "path" not in json.dumps(config["status"]["volume"])
    assert [i["name"] for i in config["status"]["images"]] == [f"{origin.host}/{r}" for r in REFS]

    # Pushing again sends nothing: every part is already there.
    again = imc(home_a, "volume", "push", "web", f"{reg}/imc/web:v1", "--plain-http", reg,
                "--part-size", str(part), "-o", "json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["partsSkipped"] == result["parts"]
    assert json.loads(again.stdout)["bytesSent"] == 0

    # Node B imports it.
    home_b = tmp_path / "node-b"
    pulled = imc(home_b, "volume", "pull", f"{reg}/imc/web:v1", "--plain-http", reg, "-o", "json")
    assert pulled.returncode == 0, pulled.stderr
    obj = json.loads(pulled.stdout)
    source = Caches(home_a).get("web")
    assert obj["metadata"]["name"] == "web" and obj["status"]["phase"] == "Ready"
    assert obj["status"]["progress"] == "100%" and obj["status"]["source"] == "volume"
    assert obj["status"]["imageCacheId"] == source.id  # a pod naming the id finds it on every node
    assert obj["spec"]["retentionDays"] == 7 and obj["status"]["expireDateTime"]
    assert [e["reason"] for e in obj["status"]["events"]] == ["Imported"]
    assert obj["status"]["events"][0]["message"].startswith(f"Imported from {reg}/imc/web:v1")
    cache_b = Caches(home_b).get("web")
    assert [(i.name, i.digest, i.index) for i in cache_b.images] == [(i.name, i.digest, i.index)
                                                                      for i in source.images]
    assert cache_b.volume is not None and Path(cache_b.volume.path).parent == home_b / "volumes"
    assert sha256(Path(cache_b.volume.path)) == sha256(Path(source.volume.path))  # type: ignore[union-attr]
    assert not list((home_b / "volumes").glob("*.partial"))
    assert imc(home_b, "volume", "verify", "web").returncode == 0
    inspected = imc(home_b, "volume", "inspect", "web", "-o", "yaml")
    assert inspected.returncode == 0, inspected.stderr
    assert yaml.safe_load(inspected.stdout)["contentBytes"] == size

    # B serves every image with no request to the origin.
    server = Server(Caches(home_b), ("127.0.0.1", 0), sweep_interval=0).start()
    try:
        before = len(origin.requests)
        for ref in REFS:
            dest = tmp_path / ref.replace("/", "_").replace(":", "_")
            out = subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false",
                                  f"docker://{server.address}/{ref}", f"dir:{dest}"],
                                 check=False, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr
            image = catalogue["images"][ref]["manifests"][0]
            assert sha256(dest / "manifest.json") == image["digest"]
            for blob in [image["config"], *image["layers"]]:
                assert sha256(dest / blob["digest"].split(":")[1]) == blob["digest"]
        layer = catalogue["images"]["fixtures/app:1.0"]["manifests"][0]["layers"][0]
        got = requests.get(f"http://{server.address}/v2/fixtures/app/blobs/{layer['digest']}", timeout=10)
        assert got.status_code == 200 and "sha256:" + hashlib.sha256(got.content).hexdigest() == layer["digest"]
        assert len(origin.requests) == before, origin.requests[before:]
    finally:
        server.stop()


def test_an_upload_cut_mid_volume_goes_on_instead_of_starting_over(tmp_path: Path, home_a: Path,
                                                                    plain_registry: Any) -> None:
    size = volume_size(home_a)
    part = max(64 << 10, size // 8)
    with UploadCutProxy(target(plain_registry.host), cut_upload_after=size // 2) as proxy:
        result = push_cache(Caches(home_a), "web", parse_reference(f"{proxy.host}/imc/resume:v1"),
                            HostPolicy(plain_http=frozenset({proxy.host})), part_size=part,
                            chunk_size=part // 4 + 1, retry=FAST)
        assert proxy.upload_cut
        # After the cut imc asked the registry where the session stood (GET on its upload URL)...
        cut_at = next(i for i, r in enumerate(proxy.requests) if "/blobs/uploads/" in r and r.startswith("PATCH"))
        assert any(r.startswith("GET ") and "/blobs/uploads/" in r for r in proxy.requests[cut_at:])
        # ...and, registry:2 having cancelled a session cut mid-PATCH, sent that part again, not the rest.
        assert proxy.bytes_up < 2 * size, (proxy.bytes_up, size)
        assert proxy.bytes_up < size + 2 * part + (256 << 10)
        assert result.bytes_sent < size + 2 * part
        assert result.parts_uploaded == result.parts
    # The artifact is whole: another node imports it and the volume verifies.
    reg = plain_registry.host
    cache = pull_cache(Caches(tmp_path / "node-b"), parse_reference(f"{reg}/imc/resume:v1"),
                       HostPolicy(plain_http=frozenset({reg})), name="resumed", retry=FAST)
    assert cache.phase == "Ready" and cache.volume is not None
    assert sha256(Path(cache.volume.path)) == sha256(Path(Caches(home_a).get("web").volume.path))  # type: ignore[union-attr]


def test_a_push_after_a_failed_push_sends_only_the_missing_parts(home_a: Path, plain_registry: Any) -> None:
    """A cut that the retries cannot get past (attempts=1) fails the push; the next
    push finds the parts that made it and sends only the others."""
    size = volume_size(home_a)
    part = max(64 << 10, size // 6)
    ref = "imc/retry:v1"
    with UploadCutProxy(target(plain_registry.host), cut_upload_after=size // 2) as proxy:
        with pytest.raises(Exception) as failed:
            push_cache(Caches(home_a), "web", parse_reference(f"{proxy.host}/{ref}"),
                       HostPolicy(plain_http=frozenset({proxy.host})), part_size=part,
                       retry=RetryPolicy(attempts=1, backoff=0.01))
        assert getattr(failed.value, "exit_code", None) == 3
    reg = plain_registry.host
    assert requests.get(f"http://{reg}/v2/imc/retry/manifests/v1", timeout=10).status_code == 404
    result = push_cache(Caches(home_a), "web", parse_reference(f"{reg}/{ref}"),
                        HostPolicy(plain_http=frozenset({reg})), part_size=part, retry=FAST)
    assert result.parts_skipped >= 1 and result.parts_uploaded >= 1
    assert result.bytes_sent <= size - result.parts_skipped * part + part


def test_a_download_cut_mid_part_resumes_with_range(tmp_path: Path, home_a: Path, plain_registry: Any) -> None:
    reg = plain_registry.host
    size = volume_size(home_a)
    push_cache(Caches(home_a), "web", parse_reference(f"{reg}/imc/web:dl"),
               HostPolicy(plain_http=frozenset({reg})), part_size=size, retry=FAST)  # one big part
    with CutProxy(target(reg), cut_after=size // 2) as proxy:
        out = imc(tmp_path / "node-b", "volume", "pull", f"{proxy.host}/imc/web:dl", "--plain-http", proxy.host,
                  "--name", "dl", "-o", "json")
        assert out.returncode == 0, out.stderr
        assert proxy.cut
        ranges = [line for r in proxy.requests for line in r.split("\r\n") if line.lower().startswith("range:")]
        assert len(ranges) == 1 and ranges[0].split("=")[1].split("-")[0].isdigit()
        assert int(ranges[0].split("=")[1].split("-")[0]) > 0
    assert json.loads(out.stdout)["status"]["phase"] == "Ready"
    assert imc(tmp_path / "node-b", "volume", "verify", "dl").returncode == 0


def test_a_symlink_at_the_partial_volume_is_never_written_through(tmp_path: Path, home_a: Path,
                                                                  plain_registry: Any) -> None:
    reg = plain_registry.host
    push_cache(Caches(home_a), "web", parse_reference(f"{reg}/imc/web:planted"),
               HostPolicy(plain_http=frozenset({reg})), retry=FAST)
    home = tmp_path / "node-b"
    Caches(home)  # creates the home's layout
    cache_id = Caches(home_a).get("web").id  # kept on import: the partial's name is known in advance
    canary = tmp_path / "outside" / "canary"
    canary.parent.mkdir()
    canary.write_bytes(b"not a volume\n")
    planted = home / "volumes" / f"{cache_id}-1.imcv.partial"
    planted.symlink_to(canary)
    out = imc(home, "volume", "pull", f"{reg}/imc/web:planted", "--plain-http", reg, "-o", "json")
    assert out.returncode == 0, out.stderr
    assert canary.read_bytes() == b"not a volume\n" and not canary.is_symlink()
    pulled = Caches(home).get("web")
    assert pulled.id == cache_id and pulled.phase == "Ready" and pulled.volume is not None
    volume = Path(pulled.volume.path)
    assert not volume.is_symlink() and sha256(volume) == sha256(Path(Caches(home_a).get("web").volume.path))
    assert not planted.exists() and not planted.is_symlink()


def test_pushing_a_cache_that_is_not_ready_is_refused(tmp_path: Path, plain_registry: Any,
                                                      origin: CutProxy) -> None:
    reg = plain_registry.host
    home = tmp_path / "home"
    caches = Caches(home)
    _, lease = caches.create("pending", CacheSpec(images=[f"{origin.host}/fixtures/app:1.0"],
                                                        plain_http=[origin.host]))
    try:
        out = imc(home, "volume", "push", "pending", f"{reg}/imc/pending:v1", "--plain-http", reg)
        assert out.returncode == 9, out.stderr
        assert "Creating" in out.stderr and "only a Ready cache" in out.stderr
    finally:
        lease.release()
    _, lease = caches.create("broken", CacheSpec(images=[f"{origin.host}/fixtures/nothing:1.0"],
                                                 plain_http=[origin.host]))
    assert Builder(caches).build("broken", lease).phase == "Failed"
    out = imc(home, "volume", "push", "broken", f"{reg}/imc/broken:v1", "--plain-http", reg)
    assert out.returncode == 9 and "Failed" in out.stderr
    for repo in ("pending", "broken"):
        assert requests.get(f"http://{reg}/v2/imc/{repo}/manifests/v1", timeout=10).status_code == 404


@pytest.mark.parametrize("ref", ["fixtures/app:1.0", "fixtures/multi:1.0"])
def test_pulling_an_ordinary_image_is_refused_and_registers_nothing(tmp_path: Path, plain_registry: Any,
                                                                    ref: str) -> None:
    reg = plain_registry.host
    home = tmp_path / "node-b"
    out = imc(home, "volume", "pull", f"{reg}/{ref}", "--plain-http", reg)
    assert out.returncode == 7, out.stderr
    assert "not an imc snapshot artifact" in out.stderr
    assert Caches(home).list() == []
    assert list((home / "volumes").iterdir()) == []


def test_pulling_under_a_name_in_use_is_refused_before_downloading(tmp_path: Path, home_a: Path,
                                                                   plain_registry: Any) -> None:
    reg = plain_registry.host
    push_cache(Caches(home_a), "web", parse_reference(f"{reg}/imc/web:named"),
               HostPolicy(plain_http=frozenset({reg})), retry=FAST)
    home = tmp_path / "node-b"
    assert imc(home, "volume", "pull", f"{reg}/imc/web:named", "--plain-http", reg, "-q").returncode == 0
    again = imc(home, "volume", "pull", f"{reg}/imc/web:named", "--plain-http", reg)
    assert again.returncode == 2 and "already exists" in again.stderr
    other = imc(home, "volume", "pull", f"{reg}/imc/web:named", "--plain-http", reg, "--name", "web-2", "-o", "json")
    assert other.returncode == 0, other.stderr
    first, second = Caches(home).get("web"), Caches(home).get("web-2")
    assert first.id != second.id  # the pushed id is taken here by the first import
    assert len(list((home / "volumes").glob("*.imcv"))) == 2


def test_push_asks_for_a_push_scoped_token(tmp_path: Path, home_a: Path, token_registry: Any) -> None:
    """Through bearer-token auth, the token request names pull,push for the repository."""
    secret = subprocess.run([sys.executable, "-m", "builder", "--home", str(home_a), "secret", "create", "team:push",
                             "--registry", token_registry.host, "--username", token_registry.username,
                             "--password-stdin"], input=token_registry.password + "\n", check=False,
                            capture_output=True, text=True, timeout=60)
    assert secret.returncode == 0, secret.stderr
    out = imc(home_a, "volume", "push", "web", f"{token_registry.host}/imc/token:v1", "--plain-http",
              token_registry.host, "--pull-secret", "team:push", "-q")
    assert out.returncode == 0, out.stderr
    stats = requests.get(token_registry.token_url + "/stats", timeout=10).json()
    assert stats["by_scope"].get("repository:imc/token:pull,push", 0) >= 1
