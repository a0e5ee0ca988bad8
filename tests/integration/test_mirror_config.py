"""containerd pulls through ``imc serve`` with the hosts.toml ``imc mirror-config
--containerd`` prints: a real containerd daemon (private root, state and socket, no
privileges) and ``ctr images pull --hosts-dir``, with a proxy in front of the registry
counting what reaches it; skopeo reads the registries.conf ``--podman`` prints. The
harness registry speaks plain HTTP, as ``--plain-http`` says."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from support.cutproxy import CutProxy

from builder.build import Builder
from builder.caches import Caches
from builder.cli import cli
from builder.imagecache import CacheSpec
from builder.server.app import Server

REF = "fixtures/app:1.0"
# Plugins that need privileges, kernel modules or a runtime; pulling needs none of them.
DISABLED = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
            "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
            "io.containerd.internal.v1.opt", "io.containerd.runtime.v1.linux", "io.containerd.runtime.v2.task"]


class Containerd:
    """A containerd daemon of the test's own: root, state and socket in a short tmp dir
    (a Unix socket path has 108 bytes at most)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ctrd", dir="/tmp"))
        self.address = str(self.dir / "containerd.sock")
        config = self.dir / "config.toml"
        config.write_text("version = 2\ndisabled_plugins = [" + ", ".join(f'"{p}"' for p in DISABLED) + "]\n")
        self.log = (self.dir / "containerd.log").open("w")
        self.proc = subprocess.Popen(["containerd", "--config", str(config), "--root", str(self.dir / "root"),
                                      "--state", str(self.dir / "state"), "--address", self.address],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ctr", "--address", self.address, *args], capture_output=True, text=True, timeout=120)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while self.ctr("version").returncode != 0:
            exited = self.proc.poll()
            if exited is not None or time.monotonic() > deadline:
                raise AssertionError(f"containerd did not start ({exited}): {(self.dir / 'containerd.log').read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def containerd() -> Iterator[Containerd]:
    daemon = Containerd()
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def upstream(plain_registry: Any) -> Iterator[CutProxy]:
    host, port = plain_registry.host.split(":")
    with CutProxy((host, int(port)), cut_after=1 << 62) as proxy:
        yield proxy


@pytest.fixture
def server(tmp_path: Path, upstream: CutProxy) -> Iterator[Server]:
    caches = Caches(tmp_path / "home")
    _created, lease = caches.create("web", CacheSpec(images=[f"{upstream.host}/{REF}"], plain_http=[upstream.host]))
    assert Builder(caches).build("web", lease).phase == "Ready"
    served = Server(caches, ("127.0.0.1", 0), sweep_interval=0).start()
    yield served
    served.stop()


def hosts_dir(tmp_path: Path, registry: str, *args: str) -> Path:
    """Write what ``imc mirror-config --containerd`` prints where ``--hosts-dir`` reads it."""
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "cli"), "mirror-config", "--containerd",
                                      "--registry", registry, "--plain-http", registry, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    first = result.output.split("\n\n# containerd reads these files")[0]
    assert f'server = "http://{registry}"' in first  # the harness registry speaks plain HTTP
    path = tmp_path / "certs.d" / registry / "hosts.toml"
    path.parent.mkdir(parents=True)
    path.write_text(first)
    return tmp_path / "certs.d"


@pytest.mark.parametrize("extra", [(), ("--pull-only",)])
def test_ctr_pulls_through_imc_serve_with_the_generated_hosts_toml(tmp_path: Path, containerd: Containerd,
                                                                   upstream: CutProxy, server: Server,
                                                                   catalogue: dict[str, Any], extra: tuple[str, ...]
                                                                   ) -> None:
    certs = hosts_dir(tmp_path, upstream.host, "--server", server.address, *extra)
    assert 'dial_timeout = "1s"' in (certs / upstream.host / "hosts.toml").read_text()  # 1.6 reads past it
    before = len(upstream.requests)
    image = f"{upstream.host}/{REF}"
    pulled = containerd.ctr("images", "pull", "--hosts-dir", str(certs), image)
    assert pulled.returncode == 0, pulled.stderr
    entry = catalogue["images"][REF]
    listed = containerd.ctr("images", "ls")
    assert any(line.split()[0] == image and entry["digest"] in line for line in listed.stdout.splitlines()), listed.stdout
    content = containerd.ctr("content", "ls", "-q").stdout.split()
    manifest = entry["manifests"][0]
    assert {manifest["digest"], manifest["config"]["digest"], *(b["digest"] for b in manifest["layers"])} <= set(content)
    reached = upstream.requests[before:]
    assert not [r for r in reached if "/blobs/" in r.split("\r\n")[0]], reached  # every blob came from imc serve
    if extra:
        assert [r.split()[0] for r in reached] == ["HEAD"] * len(reached) and reached, reached  # tags resolved upstream
    else:
        assert reached == [], reached


def test_ctr_falls_back_to_the_registry_when_imc_serve_is_down(tmp_path: Path, containerd: Containerd,
                                                               upstream: CutProxy, server: Server,
                                                               catalogue: dict[str, Any]) -> None:
    certs = hosts_dir(tmp_path, upstream.host, "--server", server.address)
    server.stop()
    before = len(upstream.requests)
    pulled = containerd.ctr("images", "pull", "--hosts-dir", str(certs), f"{upstream.host}/{REF}")
    assert pulled.returncode == 0, pulled.stderr
    layers = catalogue["images"][REF]["manifests"][0]["layers"]
    fetched = [r.split()[1] for r in upstream.requests[before:] if r.startswith("GET ") and "/blobs/" in r.split()[1]]
    assert {b["digest"] for b in layers} <= {path.rsplit("/", 1)[1] for path in fetched}


def registries_conf(tmp_path: Path, registry: str, server: str, *args: str) -> Path:
    """What ``imc mirror-config --podman`` prints, in a file skopeo reads as registries.conf."""
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "cli"), "mirror-config", "--podman", "--registry",
                                      registry, "--server", server, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    path = tmp_path / "registries.conf"
    path.write_text(result.output)
    return path


def test_skopeo_reads_the_podman_mirror_and_falls_back_to_a_plain_http_registry(
        tmp_path: Path, upstream: CutProxy, server: Server, catalogue: dict[str, Any]) -> None:
    image = f"docker://{upstream.host}/{REF}"
    digest = catalogue["images"][REF]["manifests"][0]["digest"]

    def inspect(conf: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["skopeo", "--registries-conf", str(conf), "inspect", "--no-tags", "--format",
                               "{{.Digest}}", image], capture_output=True, text=True, timeout=120)

    conf = registries_conf(tmp_path, upstream.host, server.address, "--plain-http", upstream.host)
    before = len(upstream.requests)
    out = inspect(conf)
    assert out.returncode == 0 and out.stdout.strip() == digest, out.stderr
    assert upstream.requests[before:] == []  # imc serve answered
    server.stop()
    out = inspect(conf)  # the mirror is down: the registry answers, over plain HTTP
    assert out.returncode == 0 and out.stdout.strip() == digest, out.stderr
    assert len(upstream.requests) > before
    out = inspect(registries_conf(tmp_path, upstream.host, server.address))
    assert out.returncode != 0 and "server gave HTTP response to HTTPS client" in out.stderr
