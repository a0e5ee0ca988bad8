"""``imc serve --tls-cert --tls-key``: every endpoint over HTTPS, the handshake in the
connection's own thread (a client that never sends one holds up nobody), bad
certificate flags refused before listening, and the clear-text warning of
``--allow-remote`` without TLS. kubectl and skopeo over TLS are in test_kubectl.py."""

from __future__ import annotations

import hashlib
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from support import certs
from support.imccli import imc_env

from builder.build import Builder
from builder.caches import Caches
from builder.imagecache import CacheSpec
from builder.server import app
from builder.server.app import Server, tls_context

IMC = [sys.executable, "-m", "builder"]


@pytest.fixture
def tls(tmp_path: Path) -> certs.Certs:
    return certs.issue(tmp_path / "tls")


@pytest.fixture
def server(tmp_path: Path, tls: certs.Certs, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.setattr(app, "HANDSHAKE_SECONDS", 3.0)
    server = Server(Caches(tmp_path / "home"), ("127.0.0.1", 0), sweep_interval=0,
                    tls=tls_context(tls.cert, tls.key)).start()
    yield server
    server.stop()


def test_every_endpoint_answers_over_tls_only(server: Server, tls: certs.Certs) -> None:
    assert server.url.startswith("https://")
    for path in ("/v2/", "/apis/eci.alibabacloud.com/v1/imagecaches", "/metrics"):
        assert requests.get(server.url + path, verify=tls.ca, timeout=30).status_code == 200
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        requests.get(server.url + "/v2/", timeout=30)
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://{server.address}/v2/", timeout=30)


def test_blobs_and_ranges_leave_whole_through_tls(tmp_path: Path, tls: certs.Certs, plain_registry: Any,
                                                  catalogue: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """sendfile cannot write into TLS: volume extents are sent in blocks, here made small
    so that a blob takes many, the last one partial, from an offset inside the volume."""
    monkeypatch.setattr(app, "TLS_BLOCK", 1000)
    caches = Caches(tmp_path / "home")
    host = plain_registry.host
    _created, lease = caches.create("web", CacheSpec(images=[f"{host}/fixtures/app:1.0"], plain_http=[host]))
    assert Builder(caches).build("web", lease).phase == "Ready"
    server = Server(caches, ("127.0.0.1", 0), sweep_interval=0, tls=tls_context(tls.cert, tls.key)).start()
    try:
        blob = catalogue["images"]["fixtures/app:1.0"]["manifests"][0]["layers"][0]
        url = f"{server.url}/v2/fixtures/app/blobs/{blob['digest']}"
        whole = requests.get(url, verify=tls.ca, timeout=30)
        assert whole.status_code == 200 and "sha256:" + hashlib.sha256(whole.content).hexdigest() == blob["digest"]
        assert blob["size"] > 3000
        for start, end in ((0, 0), (999, 1000), (1, blob["size"] - 2)):
            part = requests.get(url, headers={"Range": f"bytes={start}-{end}"}, verify=tls.ca, timeout=30)
            assert part.status_code == 206 and part.content == whole.content[start:end + 1]
    finally:
        server.stop()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_below_1_2_is_refused(server: Server, tls: certs.Certs) -> None:
    """The client is able to speak TLS 1.1: the server is the one that refuses it."""
    client = ssl.create_default_context(cafile=tls.ca)
    client.maximum_version = ssl.TLSVersion.TLSv1_1
    client.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    client.set_ciphers("DEFAULT:@SECLEVEL=0")
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as raw, \
            pytest.raises(ssl.SSLError, match="TLSV1_ALERT_PROTOCOL_VERSION"):
        client.wrap_socket(raw, server_hostname=host)


def test_a_client_that_never_handshakes_holds_up_nobody(server: Server, tls: certs.Certs) -> None:
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as silent:
        assert server.wait_connections(lambda n: n == 1)
        # The accept loop is free: another client is served while the first sends nothing.
        ping = requests.get(server.url + "/v2/", headers={"Connection": "close"}, verify=tls.ca, timeout=30)
        assert ping.status_code == 200
        silent.setblocking(False)
        with pytest.raises(BlockingIOError):  # still open, waiting for its handshake
            silent.recv(1)
        silent.settimeout(30)
        # Past the handshake timeout the silent connection is closed, and its thread ends.
        assert silent.recv(1) == b""
        assert server.wait_connections(lambda n: n == 0)


@pytest.mark.parametrize("flags, line", [
    (["--tls-cert", "{cert}"], "--tls-cert and --tls-key go together: give both, or neither"),
    (["--tls-key", "{key}"], "--tls-cert and --tls-key go together: give both, or neither"),
    (["--tls-cert", "{dir}/missing.pem", "--tls-key", "{key}"],
     "--tls-cert {dir}/missing.pem: cannot read it: No such file or directory"),
    (["--tls-cert", "{cert}", "--tls-key", "{dir}"], "--tls-key {dir}: cannot read it: Is a directory"),
    (["--tls-cert", "{cert}", "--tls-key", "{other_key}"], "--tls-key {other_key} does not match --tls-cert {cert}"),
    (["--tls-cert", "{key}", "--tls-key", "{key}"], "--tls-cert {key}: no PEM certificate in it"),
    (["--tls-cert", "{cert}", "--tls-key", "{cert}"], "--tls-key {cert}: no PEM private key in it"),
])
def test_bad_certificate_flags_exit_2_before_listening(tmp_path: Path, tls: certs.Certs, flags: list[str],
                                                       line: str) -> None:
    other = certs.issue(tmp_path / "other")
    names = {"cert": tls.cert, "key": tls.key, "dir": tls.cert.parent, "other_key": other.key}
    out = subprocess.run([*IMC, "serve", "--listen", "127.0.0.1:0", *(f.format(**names) for f in flags)],
                         capture_output=True, text=True, env=imc_env(tmp_path / "home"), timeout=60,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 2
    assert out.stderr == f"imc: error: {line.format(**names)}\n"


def test_kubeconfig_with_a_ca_is_https_and_needs_the_token(tmp_path: Path, tls: certs.Certs) -> None:
    def kubeconfig(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*IMC, "kubeconfig", "--listen", "127.0.0.1:5050", *args], capture_output=True,
                              text=True, env=imc_env(tmp_path / "home"), timeout=60)

    out = kubeconfig("--tls-ca", str(tls.ca))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == ("imc: error: --tls-ca needs --api-token-file: over https kubectl sends the token, and "
                          "without one it asks for a user name and password that imc serve does not take\n")
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    out = kubeconfig("--tls-ca", str(tls.key), "--api-token-file", str(token))
    assert out.returncode == 2 and out.stderr == f"imc: error: --tls-ca {tls.key}: not a PEM CA certificate\n"
    out = kubeconfig("--tls-ca", str(tls.ca), "--api-token-file", str(token))
    assert out.returncode == 0 and "server: https://127.0.0.1:5050\n" in out.stdout


@pytest.mark.parametrize(("args", "line"), [
    (["--server", "https://node-7.example.com:5050"], "an https --server needs --api-token-file: over https kubectl "
     "sends the token, and without one it asks for a user name and password that imc serve does not take"),
    (["--server", "http://node-7.example.com:5050", "--tls-ca", "{ca}", "--api-token-file", "{token}"],
     "--tls-ca needs an https:// --server, not http://node-7.example.com:5050"),
    (["--server", "https://node-7.example.com:5050/apis", "--api-token-file", "{token}"],
     "--server 'https://node-7.example.com:5050/apis': want http://HOST[:PORT] or https://HOST[:PORT]"),
    (["--server", "node-7.example.com:5050", "--api-token-file", "{token}"],
     "--server 'node-7.example.com:5050': want http://HOST[:PORT] or https://HOST[:PORT]"),
    (["--server", "https://imc:hunter2-secret@node-7:5050", "--api-token-file", "{token}"],
     "--server: a user or password in the URL is not used; kubectl sends the --api-token-file token"),
])
def test_kubeconfig_server_is_checked(tmp_path: Path, tls: certs.Certs, args: list[str], line: str) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    out = subprocess.run([*IMC, "kubeconfig", *(a.format(ca=tls.ca, token=token) for a in args)],
                         capture_output=True, text=True, env=imc_env(tmp_path / "home"), timeout=60)
    assert (out.returncode, out.stdout, out.stderr) == (2, "", f"imc: error: {line}\n")
    assert "hunter2" not in out.stderr


@pytest.mark.parametrize("tls_flags", [False, True])
def test_allow_remote_without_tls_warns_of_clear_text(tmp_path: Path, tls: certs.Certs, tls_flags: bool) -> None:
    flags = ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)] if tls_flags else []
    proc = subprocess.Popen([*IMC, "serve", "--listen", "127.0.0.1:0", "--allow-remote", "--sweep-interval", "0",
                             *flags], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=imc_env(tmp_path / "home"))
    try:
        assert proc.stderr is not None
        banner = [proc.stderr.readline() for _ in range(5)]
        url = banner[0].split()[-1]
        assert url.startswith("https://" if tls_flags else "http://"), banner
        requests.get(url + "/v2/", verify=tls.ca, timeout=30)
        # The next line is the warning, or (with TLS) the request's access-log line.
        line = proc.stderr.readline()
        if tls_flags:
            assert '"GET /v2/" 200' in line, line
        else:
            assert line.split(" ", 2)[1:] == [
                "warning", "builder.cli.serve_cmd: --allow-remote without --tls-cert: bearer tokens and registry "
                "traffic go in clear text, and kubectl sends no token to an http:// server\n"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
