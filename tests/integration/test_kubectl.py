"""The real ``kubectl`` against a real ``imc serve``: discovery, tables, create,
read in every output format, delete; builds pull from the harness's plain registry.

``imc serve`` runs as its own process on a free loopback port (``--listen
127.0.0.1:0``, the address read from its first line), with a temporary IMC_HOME;
the kubeconfig is what ``imc kubeconfig`` prints for that address. kubectl gets a
temporary HOME, so its discovery cache starts empty.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import selectors
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from support import certs
from support.imccli import imc_env

# The venv's kubectl when install-kubectl.sh put one there (none on PATH, or too old).
KUBECTL = str(Path(sys.executable).parent / "kubectl") if (Path(sys.executable).parent / "kubectl").exists() \
    else shutil.which("kubectl")
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
                             cwd=self.workdir, check=False, stdin=subprocess.DEVNULL)
        if check:
            assert out.returncode == 0, f"kubectl {' '.join(args)}: exit {out.returncode}\n{out.stderr}"
        return out

    def start(self, *args: str) -> subprocess.Popen[str]:
        assert KUBECTL is not None
        return subprocess.Popen([KUBECTL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env, cwd=self.workdir)

    def file(self, name: str, obj: dict[str, Any]) -> str:
        """Write ``obj`` as YAML in the working directory; its name, as kubectl is given it."""
        (self.workdir / name).write_text(yaml.safe_dump(obj, sort_keys=False))
        return name


def image_cache(name: str, registry: str, *refs: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "eci.alibabacloud.com/v1", "kind": "ImageCache",
            "metadata": {"name": name, "annotations": {"k8s.aliyun.com/plain-http-registry": registry}},
            "spec": {"images": [f"{registry}/{r}" for r in refs], **spec}}


@contextlib.contextmanager
def serving(tmp_path: Path, *serve_args: str, kubeconfig_args: tuple[str, ...] = ()) -> Iterator[Kube]:
    """``imc serve`` on a free loopback port and kubectl configured by ``imc kubeconfig``."""
    if KUBECTL is None:
        pytest.fail("kubectl is not installed: make install installs it (registry-fixtures/install-kubectl.sh)")
    home = tmp_path / "imc-home"
    proc = subprocess.Popen([*IMC, "serve", "--listen", "127.0.0.1:0", "--sweep-interval", "0", "--log-level", "warning",
                             *serve_args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=imc_env(home))
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # blocks until serve has bound its socket, or exited
        match = re.match(r"serving on https?://(\S+)", first)
        assert match, f"imc serve did not start: {first}{proc.stderr.read() if proc.poll() is not None else ''}"
        address = match.group(1)
        config = subprocess.run([*IMC, "kubeconfig", "--listen", address, *kubeconfig_args], capture_output=True,
                                text=True, env=imc_env(home), timeout=60, check=True).stdout
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


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[Kube]:
    with serving(tmp_path) as k:
        yield k


def read_until(proc: subprocess.Popen[str], done: Any, deadline: float = TIMEOUT) -> list[str]:
    """Lines of ``proc``'s output as they come, until ``done(line)``; fails at the deadline."""
    assert proc.stdout is not None
    lines: list[str] = []
    end = time.monotonic() + deadline
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = end - time.monotonic()
            if left <= 0 or not sel.select(timeout=left):
                pytest.fail(f"no matching line within {deadline}s; got {lines}")
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"the output ended without a matching line: {lines}\n{proc.stderr.read() if proc.stderr else ''}")
            lines.append(line.rstrip("\n"))
            if done(lines[-1]):
                return lines


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
    assert wide[0].split() == ["NAME", "AGE", "CACHEID", "PHASE", "PROGRESS", "SIZE", "IMAGES", "LAST-USED", "HITS",
                                "STALE"]
    assert wide[1].split()[5:] == ["20", f"{plain_registry.host}/fixtures/app:1.0", "0", "-"]  # never used, never checked

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


def test_apply_then_change_patch_replace_and_watch(kube: Kube, plain_registry: Any) -> None:
    host = plain_registry.host
    watch = kube.start("get", "imagecaches", "-w")
    try:
        web = image_cache("web", host, "fixtures/app:1.0")
        path = kube.file("web.yaml", web)
        assert kube.run("apply", "-f", path).stdout.strip() == "imagecache.eci.alibabacloud.com/web created"
        # The watch follows the build live: Creating first, then Ready.
        lines = read_until(watch, lambda line: line.split()[:1] == ["web"] and " Ready " in line)
        assert lines[0].split() == ["NAME", "AGE", "CACHEID", "PHASE", "PROGRESS"]
        phases = [line.split()[3] for line in lines[1:]]
        assert phases[-1] == "Ready" and "Creating" in phases[:-1]
    finally:
        watch.kill()
        watch.communicate(timeout=30)

    first = json.loads(kube.run("get", "imc", "web", "-o", "json").stdout)["metadata"]
    assert first["generation"] == 1
    # The same file changed: kubectl sends a merge patch; the new image rebuilds.
    web["spec"]["images"].append(f"{host}/fixtures/oci-app:1.0")
    kube.file("web.yaml", web)
    assert kube.run("apply", "-f", path).stdout.strip() == "imagecache.eci.alibabacloud.com/web configured"
    kube.run("wait", "--for=jsonpath={.status.phase}=Ready", "imagecache/web", "--timeout=120s")
    obj = json.loads(kube.run("get", "imc", "web", "-o", "json").stdout)
    assert obj["spec"]["images"] == web["spec"]["images"]
    assert obj["metadata"]["generation"] == 2 and obj["status"]["observedGeneration"] == 2
    assert int(obj["metadata"]["resourceVersion"]) > int(first["resourceVersion"])
    assert obj["metadata"]["uid"] == first["uid"]
    assert kube.run("apply", "-f", path).stdout.strip() == "imagecache.eci.alibabacloud.com/web unchanged"

    out = kube.run("patch", "imagecache", "web", "--type", "merge", "-p", '{"spec":{"retentionDays":7}}')
    assert out.stdout.strip() == "imagecache.eci.alibabacloud.com/web patched"
    out = kube.run("patch", "imc", "web", "--type", "json", "-p",
                   '[{"op":"replace","path":"/spec/retentionDays","value":9}]')
    assert out.stdout.strip() == "imagecache.eci.alibabacloud.com/web patched"
    obj = json.loads(kube.run("get", "imc", "web", "-o", "json").stdout)
    assert obj["spec"]["retentionDays"] == 9 and obj["metadata"]["generation"] == 4
    bad = kube.run("patch", "imc", "web", "--type", "json", "-p",
                   '[{"op":"test","path":"/spec/retentionDays","value":1}]', check=False)
    assert bad.returncode == 1
    assert bad.stderr.strip() == ('The ImageCache "web" is invalid: patch: operation 1 (test): the value at '
                                  "'/spec/retentionDays' is not 1")

    # A replace carrying a resourceVersion that is no longer current is a Conflict.
    stale = {**obj, "metadata": {**obj["metadata"], "resourceVersion": first["resourceVersion"]}}
    stale.pop("status")
    out = kube.run("replace", "-f", kube.file("stale.yaml", stale), check=False)
    assert out.returncode == 1
    assert out.stderr.strip() == (
        'Error from server (Conflict): error when replacing "stale.yaml": Operation cannot be fulfilled on '
        'imagecaches.eci.alibabacloud.com "web": the object has been modified; please apply your changes to the '
        'latest version and try again')
    current = json.loads(kube.run("get", "imc", "web", "-o", "json").stdout)
    current["spec"]["retentionDays"] = 30
    out = kube.run("replace", "-f", kube.file("current.yaml", current))
    assert out.stdout.strip() == "imagecache.eci.alibabacloud.com/web replaced"

    # kubectl edit, with an editor that changes the retention.
    editor = kube.workdir / "editor.sh"
    editor.write_text("#!/bin/sh\nsed -i 's/retentionDays: 30/retentionDays: 31/' \"$1\"\n")
    editor.chmod(editor.stat().st_mode | stat.S_IXUSR)
    kube.env["EDITOR"] = str(editor)
    assert kube.run("edit", "imc", "web").stdout.strip() == "imagecache.eci.alibabacloud.com/web edited"
    obj = json.loads(kube.run("get", "imc", "web", "-o", "json").stdout)
    assert obj["spec"]["retentionDays"] == 31

    assert kube.run("delete", "-f", path).stdout.strip() == 'imagecache.eci.alibabacloud.com "web" deleted'


def test_strict_field_validation_and_server_side_apply(kube: Kube, plain_registry: Any) -> None:
    obj = image_cache("strict", plain_registry.host, "fixtures/app:1.0")
    obj["spec"]["imageCacheSise"] = 40
    out = kube.run("apply", "-f", kube.file("typo.yaml", obj), check=False)
    assert out.returncode == 1
    assert 'unknown field "spec.imageCacheSise"' in out.stderr
    assert kube.run("get", "imc").stderr.strip() == "No resources found"
    del obj["spec"]["imageCacheSise"]
    path = kube.file("ssa.yaml", obj)
    assert kube.run("apply", "--server-side", "-f", path).stdout.strip() == (
        "imagecache.eci.alibabacloud.com/strict serverside-applied")
    kube.run("wait", "--for=jsonpath={.status.phase}=Ready", "imagecache/strict", "--timeout=120s")
    obj["spec"]["retentionDays"] = 3
    kube.file("ssa.yaml", obj)
    assert kube.run("apply", "--server-side", "-f", path).stdout.strip() == (
        "imagecache.eci.alibabacloud.com/strict serverside-applied")
    got = json.loads(kube.run("get", "imc", "strict", "-o", "json").stdout)
    assert got["spec"]["retentionDays"] == 3


def test_a_token_guards_the_api_but_not_the_registry(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    with serving(tmp_path, "--api-token-file", str(token), kubeconfig_args=("--api-token-file", str(token))) as kube:
        config = yaml.safe_load(Path(kube.env["KUBECONFIG"]).read_text())
        assert config["users"][0]["user"] == {"token": "s3cret-token-0123456789"}
        api = f"http://{kube.address}/apis/eci.alibabacloud.com/v1/imagecaches"
        assert requests.get(api, timeout=30).status_code == 401
        bad = requests.get(api, headers={"Authorization": "Bearer wrong-token-0123456789"}, timeout=30)
        assert bad.status_code == 401 and bad.json()["reason"] == "Unauthorized"
        assert "s3cret" not in bad.text
        good = requests.get(api, headers={"Authorization": "Bearer s3cret-token-0123456789"}, timeout=30)
        assert good.status_code == 200 and good.json()["kind"] == "ImageCacheList"
        # The registry endpoint stays open to pulls: the token guards the API only.
        assert requests.get(f"http://{kube.address}/v2/", timeout=30).status_code == 200
        # kubectl sends a kubeconfig's token only over TLS: over plain HTTP it is refused,
        # with one clear line.
        denied = kube.run("get", "imagecaches", check=False)
        assert denied.returncode == 1
        assert denied.stderr.strip().splitlines()[-1] == (
            "error: You must be logged in to the server (the server has asked for the client to provide credentials)")


def test_over_tls_kubectl_sends_the_token_and_pulls_verify_the_ca(tmp_path: Path, plain_registry: Any) -> None:
    tls = certs.issue(tmp_path / "tls")
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    with serving(tmp_path, "--allow-remote", "--tls-cert", str(tls.cert), "--tls-key", str(tls.key),
                 "--api-token-file", str(token),
                 kubeconfig_args=("--api-token-file", str(token), "--tls-ca", str(tls.ca))) as kube:
        config = yaml.safe_load(Path(kube.env["KUBECONFIG"]).read_text())
        cluster = config["clusters"][0]["cluster"]
        assert cluster["server"] == f"https://{kube.address}"
        assert base64.b64decode(cluster["certificate-authority-data"]) == tls.ca.read_bytes()
        assert config["users"][0]["user"] == {"token": "s3cret-token-0123456789"}

        assert kube.run("get", "imagecaches").stderr.strip() == "No resources found"
        anonymous = tmp_path / "anonymous.kubeconfig"  # the kubeconfig without its token
        anonymous.write_text(yaml.safe_dump({**config, "users": [{"name": "imc", "user": {}}]}))
        for other in (["--token=wrong-token-0123456789"],
                      [f"--kubeconfig={anonymous}", "--username=imc", "--password=s3cret-token-0123456789"]):
            denied = kube.run("get", "imagecaches", *other, check=False)
            assert denied.returncode == 1
            assert denied.stderr.strip().splitlines()[-1] == "error: You must be logged in to the server (Unauthorized)"
        # With no credentials at all, kubectl asks for a user name before it sends anything.
        denied = kube.run("get", "imagecaches", f"--kubeconfig={anonymous}", check=False)
        assert denied.returncode == 1 and denied.stdout == "Please enter Username: "

        path = kube.file("web.yaml", image_cache("web", plain_registry.host, "fixtures/app:1.0"))
        assert kube.run("apply", "-f", path).stdout.strip() == "imagecache.eci.alibabacloud.com/web created"
        kube.run("wait", "--for=jsonpath={.status.phase}=Ready", "imagecache/web", "--timeout=120s")
        digest = json.loads(kube.run("get", "imc", "web", "-o", "json").stdout)["status"]["images"][0]["digest"]

        # The registry endpoint is served over the same TLS: skopeo verifies it with the CA.
        source = f"docker://{kube.address}/fixtures/app:1.0"
        out = subprocess.run(["skopeo", "copy", "-q", "--src-cert-dir", str(tls.cert_dir), source,
                              f"dir:{tmp_path / 'app'}"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "sha256:" + hashlib.sha256((tmp_path / "app" / "manifest.json").read_bytes()).hexdigest() == digest

        # Clients that do not trust the CA refuse the server.
        out = subprocess.run(["skopeo", "inspect", "--raw", source], capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and "x509: certificate signed by unknown authority" in out.stderr
        other = certs.issue(tmp_path / "other")
        config["clusters"][0]["cluster"]["certificate-authority-data"] = base64.b64encode(
            other.ca.read_bytes()).decode()
        (tmp_path / "other.kubeconfig").write_text(yaml.safe_dump(config))
        out = kube.run("get", "imagecaches", f"--kubeconfig={tmp_path / 'other.kubeconfig'}", check=False)
        assert out.returncode == 1 and "x509: certificate signed by unknown authority" in out.stderr


def test_a_certificate_for_a_host_name_is_reached_with_kubeconfig_server(tmp_path: Path) -> None:
    """A node's certificate names its host, not the address serve listens on: kubectl
    verifies it only through a kubeconfig whose server is that name (``--server``)."""
    tls = certs.issue(tmp_path / "tls", "localhost")
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    with serving(tmp_path, "--allow-remote", "--tls-cert", str(tls.cert), "--tls-key", str(tls.key),
                 "--api-token-file", str(token),
                 kubeconfig_args=("--api-token-file", str(token), "--tls-ca", str(tls.ca))) as kube:
        by_address = kube.run("get", "imagecaches", check=False)  # https://127.0.0.1:PORT
        assert by_address.returncode == 1 and "cannot validate certificate for 127.0.0.1 because it doesn't contain any IP SANs" in by_address.stderr
        port = kube.address.rsplit(":", 1)[1]
        config = subprocess.run([*IMC, "kubeconfig", "--server", f"https://localhost:{port}/", "--api-token-file",
                                 str(token), "--tls-ca", str(tls.ca)], capture_output=True, text=True,
                                env=imc_env(tmp_path / "imc-home"), timeout=60, check=True).stdout
        assert yaml.safe_load(config)["clusters"][0]["cluster"]["server"] == f"https://localhost:{port}"
        Path(kube.env["KUBECONFIG"]).write_text(config)
        assert kube.run("get", "imagecaches").stderr.strip() == "No resources found"
