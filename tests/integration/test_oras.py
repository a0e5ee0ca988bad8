"""The ORAS ecosystem and imc snapshots, with the ORAS Python client (oras-py).

oras-py is used as its known limits allow: one repository, one thread, no auth
(registry:2 in plain mode). It pulls what ``imc volume push`` published, and the
files it writes put back together the volume byte for byte; what it pushes itself
is refused by ``imc volume pull`` as not an imc snapshot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import oras.client
import pytest
import requests

from builder.artifact import A_OFFSET, A_TITLE, push_cache
from builder.build import Builder
from builder.caches import Caches
from builder.imagecache import CacheSpec
from builder.reference import parse as parse_reference
from builder.registry.hosts import HostPolicy


@pytest.fixture(autouse=True)
def no_docker_login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """oras-py reads docker's config for credentials: none here."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))


def built_cache(home: Path, registry: str) -> Path:
    caches = Caches(home)
    _, lease = caches.create("web", CacheSpec(images=[f"{registry}/fixtures/app:1.0", f"{registry}/fixtures/base:1.0"],
                                              plain_http=[registry]))
    built = Builder(caches).build("web", lease)
    assert built.phase == "Ready", built.message
    assert built.volume is not None
    return Path(built.volume.path)


def test_oras_pulls_an_imc_snapshot_and_its_files_reassemble_the_volume(tmp_path: Path, plain_registry: Any) -> None:
    reg = plain_registry.host
    home = tmp_path / "home"
    volume = built_cache(home, reg)
    part = max(4096, volume.stat().st_size // 11 + 1)  # a dozen parts: the order matters
    target = f"{reg}/imc/oras:v1"
    pushed = push_cache(Caches(home), "web", parse_reference(target), HostPolicy(plain_http=frozenset({reg})),
                        part_size=part)
    assert pushed.parts >= 10

    out = tmp_path / "oras-out"
    client = oras.client.OrasClient(hostname=reg, insecure=True)
    files = [Path(f) for f in client.pull(target=target, outdir=str(out))]

    manifest = requests.get(f"http://{reg}/v2/imc/oras/manifests/v1", timeout=10,
                            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
    titles = [layer["annotations"][A_TITLE] for layer in manifest["layers"]]
    assert len(set(titles)) == len(titles) == pushed.parts  # one file per part, none overwritten
    assert sorted(f.name for f in files) == sorted(titles)
    assert titles == sorted(titles)  # the names sort in the volume's order
    assert all(t.startswith("web.imcv.part-") for t in titles)
    assert [int(layer["annotations"][A_OFFSET]) for layer in manifest["layers"]] == [
        i * part for i in range(pushed.parts)]

    # what the README tells a user to run
    subprocess.run("cat web.imcv.part-* > web.imcv", shell=True, cwd=out, check=True)
    assert (out / "web.imcv").read_bytes() == volume.read_bytes()


def test_an_artifact_oras_pushed_is_refused_by_imc_volume_pull(tmp_path: Path, plain_registry: Any) -> None:
    reg = plain_registry.host
    payload = tmp_path / "notes.txt"
    payload.write_text("not a snapshot\n")
    client = oras.client.OrasClient(hostname=reg, insecure=True)
    client.push(target=f"{reg}/oras/notes:v1", files=[str(payload)], disable_path_validation=True)

    home = tmp_path / "home"
    out = subprocess.run([sys.executable, "-m", "builder", "volume", "pull", f"{reg}/oras/notes:v1",
                          "--plain-http", reg], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "IMC_HOME": str(home), "DOCKER_CONFIG": str(tmp_path / "none")})
    assert out.returncode == 7, out.stderr
    assert "is not an imc snapshot artifact" in out.stderr and out.stderr.count("\n") == 1
    assert not (home / "volumes").exists() or not any((home / "volumes").iterdir())
    listed = subprocess.run([sys.executable, "-m", "builder", "cache", "list", "-o", "json"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "IMC_HOME": str(home)})
    assert json.loads(listed.stdout)["items"] == []
