"""``imc serve --pull-through`` through upstream outages, with real parts: a registry:2
of the test's own (stopped, restarted, a tag deleted from it), the ``imc serve``
process, skopeo and podman pulling through it.

Every image pulled through before the outage is pulled again, byte-identical, while
the registry is stopped and after its tag is deleted; the log and ``/metrics`` say it
was stale. ``--offline`` serves the same without one connection.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from regfix import RegistrySet
from support.faultserver import Abort, FaultServer
from support.imccli import IMC, imc_env
from support.listener import accepted, listening

from builder.caches import Caches
from builder.registry.auth import Keychain
from builder.registry.hosts import HostPolicy
from builder.server.app import Server
from builder.server.registry import pull_through_puller

IMAGES = ("fixtures/app:1.0", "fixtures/app:2.0", "fixtures/oci-app:1.0", "fixtures/multi:1.0")
PODMAN_IMAGES = ("fixtures/app:1.0", "fixtures/oci-app:1.0")


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistrySet]:
    """A registry:2 of this test's own (the shared ones are never stopped), fixtures pushed."""
    rs = RegistrySet(tmp_path / "registry", modes=("plain",))
    try:
        rs.start()
        rs.push_fixtures()
        yield rs
    finally:
        rs.stop()


class Serving:
    """An ``imc serve`` process; its stderr (the log) is collected as it comes."""

    def __init__(self, home: Path, *args: str) -> None:
        self.proc = subprocess.Popen([*IMC, "serve", "--listen", "127.0.0.1:0", "--sweep-interval", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=imc_env(home))
        assert self.proc.stderr is not None
        self.lines: list[str] = []
        for _ in range(100):
            line = self.proc.stderr.readline()
            self.lines.append(line)
            if not line or "serving on http://" in line:
                break
        assert "serving on http://" in self.lines[-1], "".join(self.lines)
        self.address = self.lines[-1].split("serving on http://")[1].split()[0]
        self._drain = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")),
                                       daemon=True)  # type: ignore[union-attr]
        self._drain.start()

    def stop(self) -> str:
        """Stop it as Ctrl-C would; its whole log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self._drain.join(timeout=30)
        return "".join(self.lines)

    def stale_served(self) -> dict[str, float]:
        text = requests.get(f"http://{self.address}/metrics", timeout=10).text
        return {s.labels["reason"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "imc_stale_served_total"}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def skopeo_dir(address: str, ref: str, dest: Path) -> dict[str, bytes]:
    """``skopeo copy`` to a ``dir:`` layout; every file it wrote (manifest, config, layers)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{address}/{ref}",
                          f"dir:{dest}"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, f"skopeo copy {ref}: {out.stderr}"
    return {p.name: p.read_bytes() for p in sorted(dest.iterdir()) if p.name != "version"}


class Podman:
    """podman with a private vfs store under the test's directory (``podman pull``
    works here; nothing is run)."""

    def __init__(self, root: Path, run: Path) -> None:
        conf = root / "storage.conf"
        root.mkdir(parents=True, exist_ok=True)
        conf.write_text(f'[storage]\ndriver = "vfs"\nrunroot = "{run}"\ngraphroot = "{root}/root"\n')
        self.env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf), "TMPDIR": str(root)}
        self.argv = ["podman", "--root", str(root / "root"), "--runroot", str(run), "--storage-driver", "vfs",
                     "--cgroup-manager", "cgroupfs", "--events-backend", "file", "--tmpdir", str(root / "tmp")]

    def run(self, *args: str) -> str:
        out = subprocess.run([*self.argv, *args], capture_output=True, text=True, env=self.env, timeout=180)
        assert out.returncode == 0, f"podman {' '.join(args)}: {out.stderr}"
        return out.stdout

    def pull(self, address: str, ref: str) -> tuple[str, str]:
        """Pull (after removing any copy held), then the image's manifest digest and ID."""
        name = f"{address}/{ref}"
        subprocess.run([*self.argv, "rmi", "-f", name], capture_output=True, env=self.env, timeout=60)
        self.run("pull", "-q", "--tls-verify=false", name)
        image = json.loads(self.run("image", "inspect", name))[0]
        return image["Digest"], "sha256:" + image["Id"]


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[Podman]:
    run = Path(tempfile.mkdtemp(prefix="imc-podman-"))  # podman wants a short run root
    try:
        yield Podman(tmp_path / "podman", run)
    finally:
        shutil.rmtree(run, ignore_errors=True)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pull_everything(address: str, tmp_path: Path, podman: Podman, label: str) -> tuple[dict, dict]:
    copies = {ref: skopeo_dir(address, ref, tmp_path / label / ref.replace("/", "_")) for ref in IMAGES}
    pulled = {ref: podman.pull(address, ref) for ref in PODMAN_IMAGES}
    return copies, pulled


def test_pulls_through_a_stopped_upstream_and_a_deleted_tag_are_byte_identical(
        registry: RegistrySet, home: Path, tmp_path: Path, podman: Podman) -> None:
    host = registry.endpoints["plain"].host
    catalogue: dict[str, Any] = registry.catalogue or {}
    server = Serving(home, "--pull-through", "--upstream", host, "--plain-http", host)
    try:
        before, podman_before = pull_everything(server.address, tmp_path, podman, "before")
        for ref in PODMAN_IMAGES:
            manifest = catalogue["images"][ref]["manifests"][0]
            assert podman_before[ref] == (manifest["digest"], manifest["config"]["digest"])
        for ref, files in before.items():
            assert sha256(files["manifest.json"]) in {m["digest"] for m in catalogue["images"][ref]["manifests"]}
        assert server.stale_served() == {}

        registry.kill("plain")  # the upstream is gone mid-session
        during, podman_during = pull_everything(server.address, tmp_path, podman, "during")
        assert during == before and podman_during == podman_before
        stale = server.stale_served()
        assert set(stale) == {"unreachable"} and stale["unreachable"] >= len(IMAGES) + len(PODMAN_IMAGES)
    finally:
        log = server.stop()
    lines = [line for line in log.splitlines() if " stale as " in line]
    for ref in IMAGES:
        assert any(f"{host}/{ref} stale as sha256:" in line and " ago: " in line for line in lines), (ref, lines)

    # The registry is back, without the tag; a new server over the same home (the
    # resolutions are in the records) still serves it, stale.
    registry.restart("plain")
    digest = catalogue["images"]["fixtures/app:1.0"]["manifests"][0]["digest"]
    deleted = requests.delete(f"http://{host}/v2/fixtures/app/manifests/{digest}", timeout=10)
    assert deleted.status_code == 202
    assert requests.get(f"http://{host}/v2/fixtures/app/manifests/1.0", timeout=10).status_code == 404
    server = Serving(home, "--pull-through", "--upstream", host, "--plain-http", host)
    try:
        assert skopeo_dir(server.address, "fixtures/app:1.0", tmp_path / "deleted") == before["fixtures/app:1.0"]
        assert podman.pull(server.address, "fixtures/app:1.0") == podman_before["fixtures/app:1.0"]
        stale = server.stale_served()
        assert set(stale) == {"not_found"} and stale["not_found"] >= 2
        # What the upstream still holds is answered by it, not stale.
        assert skopeo_dir(server.address, "fixtures/app:2.0", tmp_path / "after") == before["fixtures/app:2.0"]
        assert server.stale_served() == stale
    finally:
        log = server.stop()
    assert any(f"{host}/fixtures/app:1.0 stale as {digest}" in line and "404" in line for line in log.splitlines()), log


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A listening socket posing as the upstream: it counts every connection made to it."""
    with listening() as sock:
        yield sock


def test_offline_serves_what_pull_through_recorded_and_never_connects(
        registry: RegistrySet, home: Path, tmp_path: Path, podman: Podman, listener: socket.socket) -> None:
    host = registry.endpoints["plain"].host
    online = Serving(home, "--pull-through", "--upstream", host, "--plain-http", host)
    try:
        before, podman_before = pull_everything(online.address, tmp_path, podman, "online")
    finally:
        online.stop()
    registry.kill("plain")
    nowhere = f"127.0.0.1:{listener.getsockname()[1]}"
    offline = Serving(home, "--offline", "--pull-through", "--upstream", nowhere, "--plain-http", nowhere)
    try:
        during, podman_during = pull_everything(offline.address, tmp_path, podman, "offline")
        assert during == before and podman_during == podman_before
        missing = requests.get(f"http://{offline.address}/v2/fixtures/base/manifests/1.0", timeout=10)
        assert missing.status_code == 404 and missing.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        assert offline.stale_served() == {}  # offline is not an error: nothing is counted stale
    finally:
        offline.stop()
    assert accepted(listener) == 0


def test_a_burst_while_the_upstream_is_down_makes_only_the_connections_the_back_off_allows(tmp_path: Path) -> None:
    """Forty clients at once, over HTTP, while the upstream resets every connection (a
    load balancer with no backend: the scripted server, since registry:2 cannot be made
    to): twenty ask for a tag pulled through before, twenty for a blob never held.
    Every one is answered (stale, or 503 at once); the upstream sees only the first
    failure and the probes the back-off allowed, never one connection per client."""
    with FaultServer(repository="team/app") as upstream:
        image = upstream.add_image([b"layer one " * 500, b"layer two " * 300], tag="1.0")
        missing = upstream.add_blob(b"never pulled").digest
        caches = Caches(tmp_path / "home")
        puller = pull_through_puller(caches.store, HostPolicy(plain_http=frozenset({upstream.endpoint})),
                                     Keychain(use_docker_config=False))
        server = Server(caches, ("127.0.0.1", 0), pull_through=puller, upstreams=[upstream.endpoint],
                        sweep_interval=0, drift_interval=0).start()
        base = f"http://{server.address}/v2/team/app"
        try:
            assert requests.get(f"{base}/manifests/1.0", timeout=30).content == image.manifest.data
            for path in (upstream.manifest_path("1.0"), upstream.blob_path(missing)):
                upstream.always(path, Abort())
            assert requests.get(f"{base}/manifests/1.0", timeout=30).status_code == 200  # stale: now down
            state = server.registry.upstream_state(upstream.endpoint)
            assert state.down
            connections, admitted = len(upstream.requests), state.attempts

            def ask(path: str) -> int:
                return requests.get(f"{base}/{path}", timeout=60).status_code

            with ThreadPoolExecutor(max_workers=40) as pool:
                statuses = list(pool.map(ask, [f"blobs/{missing}", "manifests/1.0"] * 20))
            assert statuses.count(200) == 20 and statuses.count(503) == 20
            probes = len(upstream.requests) - connections
            assert probes == state.attempts - admitted  # each connection one the back-off admitted
            assert probes <= 5  # windows of 2, 4, 8, 16 and 30 s: five probes would take a minute
        finally:
            server.stop()
