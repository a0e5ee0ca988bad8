"""The real ``kubectl`` against a real ``imc serve``: discovery, tables, create,
read in every output format, delete; builds pull from the harness's plain registry.

``imc serve`` runs as its own process on a free loopback port (``--listen
127.0.0.1:0``, the address read from its first line), with a temporary IMC_HOME;
the kubeconfig is what ``imc kubeconfig`` prints for that address. kubectl gets a
temporary HOME, so its discovery cache starts empty.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.imccli import imc_env

KUBECTL = shutil.which("kubectl")
IMC = [sys.executable, "-m", "builder"]
TIMEOUT = 120


@dataclass
class Kube:
    """kubectl wired to one running ``imc serve``."""

    address: str
    env: dict[str, str]
    workdir: Path

    def run(self, *args: str, check: bool = True, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
        assert KUBECTL is not None
        out = subprocess.run([KUBECTL, *args], capture_output=True, text=True, env=self.env, timeout=timeout,
                             cwd=self.workdir, check=False)
        if check:
            assert out.returncode == 0, f"kubectl {' '.join(args)}: exit {out.returncode}\n{out.stderr}"
        return out

    def file(self, name: str, obj: dict[str, Any]) -> str:
        """Write ``obj`` as YAML in the working directory; its name, as kubectl is given it."""
        (self.workdir / name).write_text(yaml.safe_dump(obj, sort_keys=False))
        return name


def image_cache(name: str, registry: str, *refs: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "eci.alibabacloud.com/v1", "kind": "ImageCache",
            "metadata": {"name": name, "annotations": {"k8s.aliyun.com/plain-http-registry": registry}},
            "spec": {"images": [f"{registry}/{r}" for r in refs], **spec}}


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[Kube]:
    if KUBECTL is None:
        pytest.fail("kubectl is not installed: make install installs it (registry-fixtures/install-deps.sh)")
    home = tmp_path / "imc-home"
    proc = subprocess.Popen([*IMC, "serve", "--listen", "127.0.0.1:0", "--sweep-interval", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=imc_env(home))
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # blocks until serve has bound its socket, or exited
        match = re.match(r"serving on http://(\S+)", first)
        assert match, f"imc serve did not start: {first}{proc.stderr.read() if proc.poll() is not None else ''}"
        address = match.group(1)
        config = subprocess.run([*IMC, "kubeconfig", "--listen", address], capture_output=True, text=True,
                                env=imc_env(home), timeout=60, check=True).stdout
        (tmp_path / "kubeconfig").write_text(config)
        work = tmp_path / "work"
        work.mkdir()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path / "kube-home"),
               "KUBECONFIG": str(tmp_path / "kubeconfig")}
        yield Kube(address, env, work)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def test_kubeconfig_points_at_the_server(kube: Kube) -> None:
    config = yaml.safe_load((Path(kube.env["KUBECONFIG"])).read_text())
    assert config["clusters"][0]["cluster"]["server"] == f"http://{kube.address}"
    out = kube.run("version", "-o", "json")
    assert json.loads(out.stdout)["serverVersion"]["major"] == "1"


def test_api_resources_lists_imagecaches(kube: Kube) -> None:
    out = kube.run("api-resources", "--api-group", "eci.alibabacloud.com")
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["NAME", "SHORTNAMES", "APIVERSION", "NAMESPACED", "KIND"]
    assert lines[1].split() == ["imagecaches", "imc", "eci.alibabacloud.com/v1", "false", "ImageCache"]
    explain = kube.run("explain", "imagecache.spec")
    assert "imageCacheSize" in explain.stdout and "retentionDays" in explain.stdout


def test_create_get_in_every_format_and_delete(kube: Kube, plain_registry: Any) -> None:
    path = kube.file("web.yaml", image_cache("web", plain_registry.host, "fixtures/app:1.0"))
    out = kube.run("create", "-f", path, "--validate=false")
    assert out.stdout.strip() == "imagecache.eci.alibabacloud.com/web created"
    wait = kube.run("wait", "--for=jsonpath={.status.phase}=Ready", "imagecache/web", "--timeout=120s")
    assert wait.stdout.strip() == "imagecache.eci.alibabacloud.com/web condition met"

    table = kube.run("get", "imagecaches").stdout.splitlines()
    assert table[0].split() == ["NAME", "AGE", "CACHEID", "PHASE", "PROGRESS"]
    name, age, cache_id, phase, progress = table[1].split()
    assert (name, phase, progress) == ("web", "Ready", "100%")
    assert re.fullmatch(r"\d+s", age) and re.fullmatch(r"imc-[a-z0-9]{17}", cache_id)

    wide = kube.run("get", "imc", "-o", "wide").stdout.splitlines()
    assert wide[0].split() == ["NAME", "AGE", "CACHEID", "PHASE", "PROGRESS", "SIZE", "IMAGES"]
    assert wide[1].split()[5:] == ["20", f"{plain_registry.host}/fixtures/app:1.0"]

    obj = json.loads(kube.run("get", "imagecache", "web", "-o", "json").stdout)
    assert obj["kind"] == "ImageCache" and obj["status"]["imageCacheId"] == cache_id
    assert yaml.safe_load(kube.run("get", "imc/web", "-o", "yaml").stdout) == obj
    listed = json.loads(kube.run("get", "imc", "-o", "json").stdout)
    assert [i["metadata"]["name"] for i in listed["items"]] == ["web"]
    jsonpath = kube.run("get", "imc", "web", "-o", "jsonpath={.status.phase} {.spec.imageCacheSize}")
    assert jsonpath.stdout == "Ready 20"

    out = kube.run("delete", "imagecache", "web")
    assert out.stdout.strip() == 'imagecache.eci.alibabacloud.com "web" deleted'
    missing = kube.run("get", "imc", "web", check=False)
    assert missing.returncode == 1
    assert missing.stderr.strip() == 'Error from server (NotFound): imagecaches.eci.alibabacloud.com "web" not found'
    assert kube.run("get", "imc").stderr.strip() == "No resources found"


def test_delete_by_file_and_errors_print_one_clear_line(kube: Kube) -> None:
    path = kube.file("bad.yaml", image_cache("bad", "127.0.0.1:1", "x/y:1", imageCacheSize=10))
    out = kube.run("create", "-f", path, "--validate=false", check=False)
    assert out.returncode == 1
    assert out.stderr.strip() == ('The ImageCache "bad" is invalid: spec.imageCacheSize: 10 is out of range '
                                  '(valid 20 to 32768)')
    path = kube.file("gone.yaml", image_cache("gone", "127.0.0.1:1", "x/y:1"))
    kube.run("create", "-f", path, "--validate=false")
    dup = kube.run("create", "-f", path, "--validate=false", check=False)
    assert dup.returncode == 1
    assert dup.stderr.strip() == ('Error from server (AlreadyExists): error when creating "gone.yaml": '
                                  'imagecaches.eci.alibabacloud.com "gone" already exists')
    out = kube.run("delete", "-f", path)
    assert out.stdout.strip() == 'imagecache.eci.alibabacloud.com "gone" deleted'
    assert kube.run("get", "imc").stderr.strip() == "No resources found"
