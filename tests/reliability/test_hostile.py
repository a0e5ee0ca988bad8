"""Hostile input, end to end: odd bytes in names, tags and digests on the registry
endpoint, in cache names on the CLI and the API; oversized and malformed request
bodies; unknown media types; symlinks planted in the home; pull secrets with unsafe
permissions; credentials, which must never show up anywhere but their secret file;
and pull-through, which connects only to the registries the operator listed.

Requests to the server are sent raw (a socket, or ``http.client``): ``requests``
would normalise the very paths these tests are about. Every refusal must be a clean
4xx with a machine-readable body (a spec error, or a Kubernetes ``Status``), every CLI
refusal a one-line error with its exit code, and nothing may be written by a request
that was refused. A canary file next to the home checks that no response or command
ever reaches outside it.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import http.client
import json
import os
import secrets
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import imagegen  # registry-fixtures/, on the path from tests/conftest.py
import pytest
import yaml
from support.countproxy import CountingProxy
from support.faultserver import OCI_CONFIG, OCI_INDEX, FaultServer
from support.listener import accepted

from builder.build import Builder
from builder.caches import Caches
from builder.imagecache import CacheSpec
from builder.registry.auth import Keychain
from builder.registry.hosts import HostPolicy
from builder.server.app import Server
from builder.server.registry import pull_through_puller

IMC = [sys.executable, "-m", "builder"]
API = "/apis/eci.alibabacloud.com/v1/imagecaches"
UNKNOWN_DIGEST = "sha256:" + "0" * 64
PASSWD_MARK = b"root:x:0:0"
OCI_ACCEPT = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, " \
             "application/vnd.docker.distribution.manifest.v2+json, " \
             "application/vnd.docker.distribution.manifest.list.v2+json"


# -- helpers ---------------------------------------------------------------------------------------


def imc(home: Path, *args: str | bytes, stdin: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the CLI against ``home``; arguments may be bytes (argv is bytes on Linux)."""
    return subprocess.run([*IMC, "--home", str(home), *args], input=stdin, capture_output=True, timeout=timeout,
                          env={**os.environ, "IMC_HOME": str(home)}, check=False)


def text(out: subprocess.CompletedProcess) -> str:
    return (out.stdout + out.stderr).decode(errors="replace")


def raw_request(address: str, request_line: bytes, headers: bytes = b"", body: bytes = b"") -> tuple[int, bytes, bytes]:
    """Send one request exactly as given and read the whole answer (the connection is
    closed by ``Connection: close``). Returns (status, body, everything received)."""
    host, port = address.rsplit(":", 1)
    received = b""
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request_line + b"\r\nHost: imc\r\nConnection: close\r\n" + headers + b"\r\n" + body)
        try:
            while chunk := sock.recv(1 << 16):
                received += chunk
        except ConnectionResetError:
            pass  # the server may reset after answering a request whose body it did not read
    head, _, payload = received.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1."), f"no HTTP status line in the answer: {received[:300]!r}"
    return int(status_line.split()[1]), payload, received


def snapshot(home: Path) -> dict[str, str]:
    """Every path under ``home`` with its content hash (or link target), except lock files
    and the SQLite files (compared by their rows: readers touch the files)."""
    out: dict[str, str] = {}
    for p in sorted(home.rglob("*")):
        rel = p.relative_to(home)
        if rel.parts[0] == "locks" or p.name.startswith("caches.db"):
            continue
        if p.is_symlink():
            out[str(rel)] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[str(rel)] = "dir"
        else:
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cache_rows(home: Path) -> list[tuple[str, str]]:
    db = home / "caches.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT name, id FROM caches ORDER BY name").fetchall()


def file_digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def assert_spec_error(status: int, body: bytes, received: bytes, canary: bytes) -> None:
    assert 400 <= status < 500, (status, received[:400])
    doc = json.loads(body)
    assert isinstance(doc["errors"][0]["code"], str) and doc["errors"][0]["code"], doc
    assert canary not in received and PASSWD_MARK not in received


def assert_status_failure(status: int, body: bytes, canary: bytes | None = None) -> dict[str, Any]:
    assert 400 <= status < 500, (status, body[:400])
    doc = json.loads(body)
    assert doc["kind"] == "Status" and doc["status"] == "Failure" and doc["code"] == status, doc
    assert doc["message"] and doc["reason"]
    if canary is not None:
        assert canary not in body
    return doc


def ping(address: str) -> None:
    """The server still answers: ``GET /v2/`` is 200."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/v2/")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b"{}"
    finally:
        conn.close()


def make_canary(directory: Path, name: str = "canary.txt", repeat: int = 64) -> tuple[Path, bytes]:
    """A file outside every home whose bytes must never be served, changed or removed."""
    directory.mkdir(parents=True, exist_ok=True)
    content = (b"imc-canary-" + secrets.token_hex(8).encode() + b"\n") * repeat
    path = directory / name
    path.write_bytes(content)
    path.chmod(0o644)
    return path, content


def assert_canary_intact(path: Path, content: bytes) -> None:
    assert not path.is_symlink() and path.is_file(), f"{path} was removed or replaced"
    assert path.read_bytes() == content, f"{path} was written to"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644, f"{path} had its mode changed"


# -- a served home, shared by the endpoint and API tests ----------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, plain_registry: Any,
           catalogue: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A home beside a canary file: a Ready cache ``web`` (fixtures/app:1.0, from its
    volume), fixtures/base:1.0 pulled into the store, and a server over both."""
    root = tmp_path_factory.mktemp("hostile")
    home = root / "home"
    _, content = make_canary(root)
    host = plain_registry.host
    caches = Caches(home)
    _, lease = caches.create("web", CacheSpec(images=[f"{host}/fixtures/app:1.0"], plain_http=[host]))
    assert Builder(caches).build("web", lease).phase == "Ready"
    out = imc(home, "pull", "-q", "--plain-http", host, f"{host}/fixtures/base:1.0")
    assert out.returncode == 0, text(out)
    server = Server(caches, ("127.0.0.1", 0), sweep_interval=0).start()
    try:
        yield {"home": home, "server": server, "address": server.address, "canary": content, "host": host,
               "app": catalogue["images"]["fixtures/app:1.0"]["manifests"][0],
               "base": catalogue["images"]["fixtures/base:1.0"]["manifests"][0]}
    finally:
        server.stop()


# -- the registry endpoint: names, tags, digests ---------------------------------------------------

ODD_NAMES: list[bytes] = [
    b"..", b"../..", b"../../../etc/passwd", b"%2e%2e", b"%2e%2e/%2e%2e/canary.txt", b"fixtures/..%2f..%2fcanary.txt",
    b"fixtures/../../..", b"%00", b"fixtures%00/app", b"fix\x00tures/app", b"fixtures/app%00",
    b"f\xc3\xa9/app", b"\xe2\x80\xae/app", b"\xff\xfe/app", b"fixtures/\xf0\x9f\x92\xa9",
    b"a" * 300, b"a/" * 200 + b"a", b"fixtures//app", b"/fixtures/app", b"fixtures/app/", b"./fixtures/app",
    b"fixtures/./app", b"\\..\\..\\canary.txt", b"Fixtures/App", b"~root/app", b".hidden/app", b"-x/app",
    b"fixtures/app\r\nX-Injected: 1",
]
ODD_TAGS: list[bytes] = [
    b"..", b"%2e%2e", b"..%2f..%2fcanary.txt", b"%00", b"1.0%00", b"1.0\x00", b"\xc3\xa9", b"\xff", b"\xe2\x80\xae1.0",
    b"a" * 129, b"a" * 5000, b"-bad", b".hidden", b"1.0%2f..", b"1.0\\..", b"latest;rm", b"%",
]
ODD_DIGESTS: list[bytes] = [
    b"sha256:..", b"sha256:" + b"0" * 63, b"sha256:" + b"0" * 65, b"sha256:" + b"G" * 64, b"sha256:" + b"A" * 64,
    b"SHA256:" + b"0" * 64, b"sha256:%2e%2e%2f..%2fcanary.txt", b"sha256:" + b"0" * 60 + b"%00", b"sha256:\x00",
    b"md5:abc", b"sha256:\xff\xfe", b"sha256:" + b"a" * 5000, b"sha512:" + b"0" * 127, b"..%2f..%2fcanary.txt",
    b"sha256:../../canary.txt", b"sha256+x:" + b"0" * 64, b":", b"sha256:",
]
ODD_NS: list[bytes] = [b"..%2f..", b"%00", b"a" * 3000, b"127.0.0.1:1%2f..", b"%ff%fe", b"%C3%A9", b"-x", b"host:99999999"]


def endpoint_requests() -> list[bytes]:
    paths: list[bytes] = []
    for name in ODD_NAMES:
        paths += [b"/v2/" + name + b"/manifests/1.0", b"/v2/" + name + b"/blobs/" + UNKNOWN_DIGEST.encode(),
                  b"/v2/" + name + b"/tags/list"]
    for tag in ODD_TAGS:
        paths.append(b"/v2/fixtures/app/manifests/" + tag)
    for digest in ODD_DIGESTS:
        paths += [b"/v2/fixtures/app/blobs/" + digest, b"/v2/fixtures/app/manifests/" + digest]
    for ns in ODD_NS:
        paths += [b"/v2/fixtures/app/manifests/1.0?ns=" + ns, b"/v2/fixtures/app/tags/list?ns=" + ns]
    paths += [b"/v2/../../canary.txt", b"/v2/%2e%2e/%2e%2e/canary.txt", b"/../../canary.txt", b"/v2/_catalog",
              b"/v2//manifests/1.0", b"/v2/fixtures/app/blobs/uploads/", b"/v2/fixtures/app/tags/other",
              b"/metrics/../../canary.txt"]
    return paths


ENDPOINT_REQUESTS = endpoint_requests()


def test_odd_names_tags_and_digests_on_the_registry_endpoint(served: dict[str, Any]) -> None:
    address, canary = served["address"], served["canary"]
    status, body, _ = raw_request(address, b"GET /v2/fixtures/app/manifests/1.0 HTTP/1.1",
                                  b"Accept: " + OCI_ACCEPT.encode() + b"\r\n")
    assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == served["app"]["digest"]
    for path in ENDPOINT_REQUESTS:
        for method in (b"GET", b"HEAD"):
            status, body, received = raw_request(address, method + b" " + path + b" HTTP/1.1")
            if method == b"HEAD":
                assert 400 <= status < 500, (path[:200], status)
                assert canary not in received
            else:
                assert_spec_error(status, body, received, canary)
    ping(address)


@pytest.mark.parametrize("request_line,headers", [
    (b"GET /v2/" + b"a" * 70000 + b"/manifests/1.0 HTTP/1.1", b""),  # a name longer than any request line
    (b"GET /v2/fixtures/app/manifests/" + b"a" * 70000 + b" HTTP/1.1", b""),
    (b"GET", b""),
    (b"GET /v2/fixtures/app/manifests/1.0 HTTP/1.1 trailing", b""),
    (b"GET /v2/fixtures/app/manifests/1.0 HTTP/1.1", b"X-Long: " + b"a" * 70000 + b"\r\n"),
    (b"GET /v2/fixtures/app/manifests/1.0 HTTP/1.1", b"".join(f"X-{i}: a\r\n".encode() for i in range(150))),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b""),  # a TLS ClientHello sent to the plain port
])
def test_malformed_requests_get_spec_errors(served: dict[str, Any], request_line: bytes, headers: bytes) -> None:
    """What the HTTP layer itself refuses (a request line or header too long, bad syntax)
    is answered like everything else: a status line and a spec error body."""
    status, body, received = raw_request(served["address"], request_line, headers)
    assert_spec_error(status, body, received, served["canary"])
    ping(served["address"])


def test_malformed_requests_on_the_api_get_status_objects(served: dict[str, Any]) -> None:
    status, body, _ = raw_request(served["address"], f"GET {API} HTTP/1.1".encode(),
                                  b"X-Long: " + b"a" * 70000 + b"\r\n")
    assert_status_failure(status, body, served["canary"])
    ping(served["address"])


@pytest.mark.parametrize("value", [
    b"bytes=" + b"9" * 5000 + b"-", b"bytes=-" + b"9" * 5000, b"bytes=0-" + b"9" * 5000, b"bytes=\xb2-",
    b"bytes=0-1,4-5", b"bytes=5-2", b"bytes=99999999999999999999-", b"bytes=-0", b"items=0-1", b"bytes=\x00-1",
])
def test_hostile_range_headers(served: dict[str, Any], value: bytes) -> None:
    layer = served["app"]["layers"][0]
    status, body, received = raw_request(served["address"],
                                         f"GET /v2/fixtures/app/blobs/{layer['digest']} HTTP/1.1".encode(),
                                         b"Range: " + value + b"\r\n")
    assert status in (206, 416), (status, received[:300])
    if status == 206:  # a range that could be honoured must be honoured exactly
        start, end = (int(x) for x in received.split(b"Content-Range: bytes ")[1].split(b"/")[0].split(b"-"))
        assert len(body) == end - start + 1
    ping(served["address"])


def test_content_length_that_is_not_a_number(served: dict[str, Any]) -> None:
    before = cache_rows(served["home"])
    for value in (b"\xb2", b"9" * 5000, b"-1", b"1e3", b"0x10", b"\xd9\xa3"):
        status, body, _ = raw_request(served["address"], f"POST {API} HTTP/1.1".encode(),
                                      b"Content-Type: application/json\r\nContent-Length: " + value + b"\r\n", b"{}")
        assert_status_failure(status, body)
        status, body, received = raw_request(served["address"], b"PUT /v2/fixtures/app/manifests/1.0 HTTP/1.1",
                                             b"Content-Length: " + value + b"\r\n", b"{}")
        assert_spec_error(status, body, received, served["canary"])
    assert cache_rows(served["home"]) == before
    ping(served["address"])


def test_an_unread_body_is_never_taken_for_the_next_request(served: dict[str, Any]) -> None:
    """A write to the read-only endpoint is refused without reading its body; that body
    must not then be parsed as a second request on the same connection."""
    host, port = served["address"].rsplit(":", 1)
    smuggled = b"GET /metrics HTTP/1.1\r\nHost: imc\r\n\r\n"
    for method in (b"PUT", b"POST", b"PATCH"):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(method + b" /v2/fixtures/app/blobs/uploads/ HTTP/1.1\r\nHost: imc\r\n"
                         + b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
            received = b""
            try:
                while chunk := sock.recv(1 << 16):  # ends when the server closes the connection
                    received += chunk
            except TimeoutError:
                pass  # the server kept the connection open: checked below
        assert received.startswith(b"HTTP/1.1 405 ")
        assert received.count(b"HTTP/1.1 ") == 1 and b"imc_served_total" not in received, received


# -- the API: cache names in paths and bodies ------------------------------------------------------------

ODD_CACHE_NAMES: list[Any] = [
    "..", "../../x", "a/b", "é", "x\x00", "\u202eweb", "A", "Web", "a" * 64, "a" * 100_000, "-x", "x-", "x_y", "x.y",
    " web", "web\n", "", "$(touch canary)", "web;rm -rf", 5, None, ["web"], {"name": "web"}, True,
]


def imagecache_doc(name: Any, image: str = "127.0.0.1:1/fixtures/app:1.0") -> dict[str, Any]:
    return {"apiVersion": "eci.alibabacloud.com/v1", "kind": "ImageCache", "metadata": {"name": name},
            "spec": {"images": [image]}}


def test_api_refuses_odd_cache_names_and_writes_nothing(served: dict[str, Any]) -> None:
    home, address = served["home"], served["address"]
    before, rows = snapshot(home), cache_rows(home)
    tried = 0
    for name in ODD_CACHE_NAMES:
        for content_type, body in (("application/json", json.dumps(imagecache_doc(name)).encode()),
                                   ("application/yaml", yaml.safe_dump(imagecache_doc(name)).encode())):
            status, answer, _ = raw_request(address, f"POST {API} HTTP/1.1".encode(),
                                            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n".encode(),
                                            body)
            assert_status_failure(status, answer, served["canary"])
            assert len(answer) < 8192, "a refusal must not echo a huge input back whole"
            tried += 1
    for raw_name in (b"..", b"..%2f..%2fweb", b"%00", b"web%00", b"web\x00", b"\xc3\xa9", b"\xff\xfe", b"WEB",
                     b"a" * 64, b"a" * 5000, b"web/..", b"web/../web", b"web;x", b"we%62"):
        for method in (b"GET", b"DELETE"):
            status, answer, _ = raw_request(address, method + b" " + API.encode() + b"/" + raw_name + b" HTTP/1.1")
            assert_status_failure(status, answer, served["canary"])
            tried += 1
    assert tried > 60
    assert cache_rows(home) == rows and [r[0] for r in rows] == ["web"]
    assert snapshot(home) == before
    ping(address)


def billion_laughs() -> bytes:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return ("\n".join(lines) + "\nmetadata: {name: laughs}\nspec: {images: *i}\n").encode()


def hostile_bodies() -> list[tuple[str, str, bytes]]:
    good = imagecache_doc("fine")
    as_yaml = yaml.safe_dump(good)
    return [
        ("2 MiB", "application/yaml", as_yaml.encode() + b"# " + b"x" * (2 << 20) + b"\n"),
        ("2 MiB JSON", "application/json", json.dumps({**good, "pad": "x" * (2 << 20)}).encode()),
        ("deep JSON", "application/json", b"[" * 100_000 + b"]" * 100_000),
        ("deep JSON object", "application/json", b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
        ("deep YAML flow", "application/yaml", b"[" * 5000 + b"]" * 5000),
        ("deep YAML block", "application/yaml", b"a:\n" + b"".join(b" " * i + b"- \n" for i in range(1, 300))),
        ("billion laughs", "application/yaml", billion_laughs()),
        ("YAML merge key alias", "application/yaml",
         b"base: &b {name: x}\nmetadata:\n  <<: *b\nspec: {images: [a/b:1]}\n"),
        ("invalid UTF-8", "application/yaml", b"\xff\xfe\xfd" + as_yaml.encode()),
        ("invalid UTF-8 in a value", "application/json", json.dumps(good).encode().replace(b"fine", b"fi\xc3\x28ne")),
        ("huge JSON number", "application/json",
         json.dumps(good).encode()[:-2] + b', "imageCacheSize": ' + b"9" * 5000 + b"}}"),
        ("huge YAML number", "application/yaml", as_yaml.encode() + b"  imageCacheSize: " + b"9" * 5000 + b"\n"),
        ("huge YAML hex number", "application/yaml", as_yaml.encode() + b"  imageCacheSize: 0x" + b"f" * 5000 + b"\n"),
        ("huge retention", "application/json",
         json.dumps({**good, "spec": {**good["spec"], "retentionDays": 10 ** 4000}}).encode()),
        ("YAML bad timestamp", "application/yaml", as_yaml.encode() + b"  retentionDays: 2024-13-45\n"),
        ("a list", "application/json", json.dumps([good]).encode()),
        ("a YAML list", "application/yaml", yaml.safe_dump([good]).encode()),
        ("a string", "application/json", b'"ImageCache"'),
        ("null", "application/yaml", b"~\n"),
        ("python tag", "application/yaml", b"!!python/object/apply:os.system ['touch canary']\n"),
        ("two documents", "application/yaml", (as_yaml + "---\n" + as_yaml).encode()),
        ("NUL bytes", "application/json", b'{"metadata": {"name": "x"}\x00\x00}'),
        ("empty", "application/json", b""),
        ("whitespace", "application/yaml", b"  \n\t\n"),
        ("wrong content type", "text/plain", json.dumps(good).encode()),
        ("lone surrogate", "application/json", json.dumps(imagecache_doc("\ud800")).encode()),
        ("images not a list", "application/json", json.dumps({**good, "spec": {"images": {"a": 1}}}).encode()),
        ("huge image list", "application/json",
         json.dumps({**good, "spec": {"images": [f"a/b:{i}" for i in range(50_000)]}}).encode()),
    ]


HOSTILE_BODIES = hostile_bodies()


@pytest.mark.parametrize("label,content_type,body", HOSTILE_BODIES, ids=[b[0] for b in HOSTILE_BODIES])
@pytest.mark.parametrize("accept", ["application/json", "application/yaml"])
def test_malformed_bodies_are_refused_and_change_nothing(served: dict[str, Any], label: str, content_type: str,
                                                         body: bytes, accept: str) -> None:
    home, address = served["home"], served["address"]
    before, rows = snapshot(home), cache_rows(home)
    headers = f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\nAccept: {accept}\r\n".encode()
    status, answer, _ = raw_request(address, f"POST {API} HTTP/1.1".encode(), headers, body)
    doc = json.loads(answer) if accept == "application/json" else yaml.safe_load(answer)
    assert 400 <= status < 500 and doc["kind"] == "Status" and doc["code"] == status, (status, answer[:300])
    assert len(answer) < 8192
    if content_type == "application/yaml" and status == 400 and "valid" in doc["message"]:
        assert "YAML" in doc["message"], doc["message"]  # a YAML body is not called invalid JSON
    ping(address)
    assert cache_rows(home) == rows
    assert snapshot(home) == before


# -- the CLI: cache names ------------------------------------------------------------------------------

CLI_ODD_NAMES: list[bytes] = [
    b"..", b"../../x", b"a/b", "é".encode(), b"A", b"x y", b"x\n", b"x\x01", b"\xff\xfe", "\u202eweb".encode(),
    b"a" * 64, b"a" * 100_000, b"-", b".", b"web;rm -rf ~", b"$(touch canary)", b"web\x1b[2J",
]


def test_cli_refuses_odd_cache_names_and_writes_nothing(served: dict[str, Any]) -> None:
    home = served["home"]
    before, rows = snapshot(home), cache_rows(home)
    runs: list[tuple[str | bytes, ...]] = []
    for name in CLI_ODD_NAMES:
        runs += [("cache", "create", "--image", "127.0.0.1:1/fixtures/app:1.0", "--", name),
                 ("cache", "get", "-o", "json", "--", name), ("cache", "delete", "--", name)]
    for name in CLI_ODD_NAMES[::4]:
        runs += [("cache", "events", "--", name), ("cache", "update", "--retention-days", "3", "--", name),
                 ("volume", "inspect", "--", name)]
    with ThreadPoolExecutor(4) as pool:  # independent processes: run a few at once
        results = list(pool.map(lambda args: (args, imc(home, *args)), runs))
    for args, out in results:
        shown = text(out)
        assert out.returncode == 2, (args[:2], args[-1][:40], out.returncode, shown[-400:])
        assert "Traceback" not in shown and shown.startswith("imc: error: "), shown[-400:]
        assert len(out.stderr) < 4096, "an error must not echo a huge argument back whole"
        assert served["canary"] not in out.stdout + out.stderr
    assert len(results) == len(CLI_ODD_NAMES) * 3 + len(CLI_ODD_NAMES[::4]) * 3
    assert cache_rows(home) == rows and snapshot(home) == before


# -- unknown media types --------------------------------------------------------------------------------

OPAQUE_LAYER = "application/vnd.example.opaque.layer.v1"
OPAQUE_CONFIG = "application/vnd.example.opaque.config.v1+json"


def push_opaque(registry: str, repository: str, config_type: str) -> dict[str, Any]:
    """An OCI image whose layer (and, if asked, config) has a media type nobody knows."""
    client = imagegen.RegistryClient(registry)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"imc-opaque-{os.getpid()}-{secrets.token_hex(4)}"
    work.mkdir()
    blobs = {"layer": os.urandom(300_000) + b"opaque", "config": json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()}
    digests = {}
    for key, data in blobs.items():
        path = work / key
        path.write_bytes(data)
        digests[key] = imagegen.sha256_digest(data)
        client.push_blob(repository, digests[key], len(data), path)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": imagegen.OCI_MANIFEST,
                           "config": {"mediaType": config_type, "digest": digests["config"],
                                      "size": len(blobs["config"])},
                           "layers": [{"mediaType": OPAQUE_LAYER, "digest": digests["layer"],
                                       "size": len(blobs["layer"])}]}).encode()
    client.put_manifest(repository, "1.0", manifest, imagegen.OCI_MANIFEST)
    for path in work.iterdir():
        path.unlink()
    work.rmdir()
    return {"manifest": manifest, "layer_bytes": blobs["layer"], "config_bytes": blobs["config"], **digests}


@pytest.mark.parametrize("config_type", [imagegen.OCI_CONFIG, OPAQUE_CONFIG])
def test_unknown_layer_media_type_is_pulled_cached_and_served_byte_exact(tmp_path: Path, plain_registry: Any,
                                                                          config_type: str) -> None:
    host = plain_registry.host
    repo = "hostile/opaque" if config_type == imagegen.OCI_CONFIG else "hostile/opaque-config"
    image = push_opaque(host, repo, config_type)
    home = tmp_path / "home"
    out = imc(home, "pull", "--plain-http", host, f"{host}/{repo}:1.0")
    assert out.returncode in (0, 7), text(out)
    if out.returncode == 7:  # refusing is allowed, clearly and without a crash
        assert "unsupported" in text(out).lower() and "Traceback" not in text(out)
        return
    store = home / "store" / "blobs" / "sha256"
    assert (store / image["layer"].split(":")[1]).read_bytes() == image["layer_bytes"]
    caches = Caches(home)
    _, lease = caches.create("opaque", CacheSpec(images=[f"{host}/{repo}:1.0"], plain_http=[host]))
    built = Builder(caches).build("opaque", lease)
    assert built.phase in ("Ready", "Failed"), built.phase
    if built.phase == "Failed":
        assert "unsupported" in built.message.lower(), built.message
        return
    server = Server(caches, ("127.0.0.1", 0), sweep_interval=0).start()
    try:
        status, body, _ = raw_request(server.address, f"GET /v2/{repo}/manifests/1.0 HTTP/1.1".encode(),
                                      f"Accept: {OCI_ACCEPT}\r\n".encode())
        assert status == 200 and body == image["manifest"]
        status, body, _ = raw_request(server.address, f"GET /v2/{repo}/blobs/{image['layer']} HTTP/1.1".encode())
        assert status == 200 and body == image["layer_bytes"]
        status, body, _ = raw_request(server.address, f"GET /v2/{repo}/blobs/{image['layer']} HTTP/1.1".encode(),
                                      b"Range: bytes=1000-200999\r\n")
        assert status == 206 and body == image["layer_bytes"][1000:201000]
        status, body, _ = raw_request(server.address, f"GET /v2/{repo}/blobs/{image['config']} HTTP/1.1".encode())
        assert status == 200 and body == image["config_bytes"]
    finally:
        server.stop()


def test_unknown_manifest_media_type_is_refused_clearly(tmp_path: Path) -> None:
    """registry:2 refuses to store a manifest of an unknown type, so the fault server
    serves it: as an image, as an index entry, and under a known type in the header."""
    home = tmp_path / "home"
    with FaultServer() as srv:
        config = srv.add_blob(b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}')
        layer = srv.add_blob(os.urandom(1000))
        odd_type = "application/vnd.example.manifest.v9+json"
        doc = {"schemaVersion": 2, "mediaType": odd_type, "config": config.descriptor(OCI_CONFIG),
               "layers": [layer.descriptor("application/vnd.oci.image.layer.v1.tar+gzip")]}
        manifest = srv.add_manifest(json.dumps(doc).encode(), odd_type, tag="odd")
        srv.add_manifest(json.dumps(doc).encode(), "application/vnd.oci.image.manifest.v1+json", tag="odd-header")
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {**manifest.descriptor(odd_type), "platform": {"os": "linux", "architecture": "amd64"}}]}
        srv.add_manifest(json.dumps(index).encode(), OCI_INDEX, tag="odd-index")
        srv.add_manifest(json.dumps({"schemaVersion": 2, "mediaType": ["not", "a", "string"]}).encode(),
                         "application/json", tag="odd-field")
        for tag in ("odd", "odd-header", "odd-index", "odd-field"):
            out = imc(home, "pull", "--platform", "linux/amd64", "--plain-http", srv.endpoint, f"{srv.reference}:{tag}")
            shown = text(out)
            assert out.returncode == 7, (tag, out.returncode, shown)
            assert "unsupported" in shown and "Traceback" not in shown, shown
        out = imc(home, "cache", "create", "odd", "--image", f"{srv.reference}:odd", "--plain-http", srv.endpoint,
                  "--wait", "-q")
        assert out.returncode == 12 and "Traceback" not in text(out), text(out)
        got = json.loads(imc(home, "cache", "get", "odd", "-o", "json").stdout)
        assert got["status"]["phase"] == "Failed"
        assert any("unsupported manifest media type" in e["message"] for e in got["status"]["events"])
    assert not any((home / "volumes").iterdir())


# -- symlinks planted in the home -------------------------------------------------------------------------


def pull_base(home: Path, host: str) -> subprocess.CompletedProcess:
    return imc(home, "pull", "-q", "--plain-http", host, f"{host}/fixtures/base:1.0")


def test_symlinked_blobs_are_not_served_verified_or_followed(tmp_path: Path, plain_registry: Any,
                                                             catalogue: dict[str, Any]) -> None:
    host = plain_registry.host
    home = tmp_path / "home"
    assert pull_base(home, host).returncode == 0
    canary, content = make_canary(tmp_path / "outside", repeat=2000)
    layer = catalogue["images"]["fixtures/base:1.0"]["manifests"][0]["layers"][0]
    blobs = home / "store" / "blobs" / "sha256"
    replaced = blobs / layer["digest"].split(":")[1]
    replaced.unlink()
    replaced.symlink_to(canary)
    # A link named by the canary's own digest: its target would even hash right.
    named = blobs / hashlib.sha256(content).hexdigest()
    named.symlink_to(canary)
    # A whole algorithm directory that is a link to somewhere else.
    elsewhere = tmp_path / "outside" / "algo"
    elsewhere.mkdir()
    (elsewhere / ("0" * 128)).write_bytes(content)
    (home / "store" / "blobs" / "sha512").symlink_to(elsewhere)

    server = Server(Caches(home), ("127.0.0.1", 0), sweep_interval=0).start()
    try:
        for digest in (layer["digest"], "sha256:" + named.name):
            status, _, received = raw_request(server.address,
                                              f"GET /v2/fixtures/base/blobs/{digest} HTTP/1.1".encode())
            assert status != 200 and content[:40] not in received, (status, received[:200])
    finally:
        server.stop()

    out = imc(home, "layers", "verify", "-o", "json")
    report = json.loads(out.stdout)
    assert out.returncode == 4, text(out)
    assert layer["digest"] in report["corrupt"] and "sha256:" + named.name in report["corrupt"]
    assert not replaced.exists() and not named.exists() and not replaced.is_symlink()
    out = imc(home, "gc")
    assert out.returncode == 0, text(out)
    assert_canary_intact(canary, content)
    assert (elsewhere / ("0" * 128)).read_bytes() == content
    # The next pull fetches the real blob again, as a regular file.
    assert pull_base(home, host).returncode == 0
    assert not replaced.is_symlink() and file_digest(replaced) == layer["digest"]
    assert_canary_intact(canary, content)


def test_a_symlink_in_ingest_is_never_written_through(tmp_path: Path, plain_registry: Any,
                                                      catalogue: dict[str, Any]) -> None:
    host = plain_registry.host
    home = tmp_path / "home"
    assert imc(home, "layers", "list").returncode == 0  # creates the layout
    canary, content = make_canary(tmp_path / "outside")
    layer = catalogue["images"]["fixtures/base:1.0"]["manifests"][0]["layers"][0]
    partial = home / "ingest" / f"sha256-{layer['digest'].split(':')[1]}.partial"
    partial.symlink_to(canary)
    other, other_content = make_canary(tmp_path / "outside", "other.txt")
    (home / "ingest" / f"sha256-{'1' * 64}.partial").symlink_to(other)
    out = pull_base(home, host)
    assert out.returncode == 0, text(out)
    assert_canary_intact(canary, content)
    stored = home / "store" / "blobs" / "sha256" / layer["digest"].split(":")[1]
    assert not stored.is_symlink() and file_digest(stored) == layer["digest"]
    assert imc(home, "gc").returncode == 0
    assert_canary_intact(canary, content)
    assert_canary_intact(other, other_content)


def test_symlinks_in_volumes_are_never_written_through_or_served(tmp_path: Path, plain_registry: Any,
                                                                 catalogue: dict[str, Any]) -> None:
    host = plain_registry.host
    home = tmp_path / "home"
    caches = Caches(home)
    _, lease = caches.create("vol", CacheSpec(images=[f"{host}/fixtures/base:1.0"], plain_http=[host]))
    built = Builder(caches).build("vol", lease)
    assert built.phase == "Ready"
    outside = tmp_path / "outside"
    planted = {name: make_canary(outside, name) for name in ("orphan", "partial", "next")}
    (home / "volumes" / "imc-planted-1.imcv").symlink_to(planted["orphan"][0])
    (home / "volumes" / "imc-planted-1.imcv.partial").symlink_to(planted["partial"][0])
    # Where the next rebuild of this cache writes its volume.
    next_partial = home / "volumes" / f"{built.id}-{built.generation + 1}.imcv.partial"
    next_partial.symlink_to(planted["next"][0])
    out = imc(home, "cache", "update", "vol", "--image", f"{host}/fixtures/app:1.0", "--plain-http", host, "--wait",
              "-q")
    assert out.returncode == 0, text(out)
    for path, content in planted.values():
        assert_canary_intact(path, content)
    rebuilt = caches.get("vol")
    assert rebuilt.phase == "Ready" and rebuilt.generation == built.generation + 1
    volume = Path(rebuilt.volume.path)
    assert not volume.is_symlink()

    # Serve, then swap the volume for a link to a big canary: its bytes must not go out.
    big, big_content = make_canary(outside, "big", repeat=(volume.stat().st_size // 20) + 10)
    layer = catalogue["images"]["fixtures/app:1.0"]["manifests"][0]["layers"][0]  # gzip: sent with sendfile
    server = Server(caches, ("127.0.0.1", 0), sweep_interval=0).start()
    try:
        request = f"GET /v2/fixtures/app/blobs/{layer['digest']} HTTP/1.1".encode()
        status, body, _ = raw_request(server.address, request)
        assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == layer["digest"]
        volume.unlink()
        volume.symlink_to(big)
        host_, port = server.address.rsplit(":", 1)
        with socket.create_connection((host_, int(port)), timeout=30) as sock:
            sock.sendall(request + b"\r\nHost: imc\r\nConnection: close\r\n\r\n")
            received = b""
            try:
                while chunk := sock.recv(1 << 16):
                    received += chunk
            except ConnectionResetError:
                pass
        assert big_content[:40] not in received and not received.startswith(b"HTTP/1.1 200"), received[:300]
    finally:
        server.stop()
    assert imc(home, "gc").returncode == 0
    for path, content in [*planted.values(), (big, big_content)]:
        assert_canary_intact(path, content)


# -- pull secrets with unsafe permissions -------------------------------------------------------------------


def test_pull_secrets_with_unsafe_permissions_are_refused(tmp_path: Path, basic_registry: Any) -> None:
    host, password = basic_registry.host, basic_registry.password
    home = tmp_path / "home"
    secret = home / "secrets" / "team" / "cred.json"
    ref = f"{host}/fixtures/base:1.0"
    out = imc(home, "secret", "create", "team:cred", "--registry", host, "--username", basic_registry.username,
              "--password-stdin", stdin=password.encode() + b"\n")
    assert out.returncode == 0, text(out)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert imc(home, "pull", "-q", "--plain-http", host, "--pull-secret", "team:cred", ref).returncode == 0
    good = secret.read_bytes()

    def make_mode(mode: int) -> None:
        secret.chmod(mode)

    def make_symlink() -> None:
        target = tmp_path / "elsewhere.json"
        target.write_bytes(good)
        target.chmod(0o600)
        secret.unlink()
        secret.symlink_to(target)

    def make_directory() -> None:
        secret.unlink()
        secret.mkdir(mode=0o700)

    for label, damage in (("0644", lambda: make_mode(0o644)), ("0640", lambda: make_mode(0o640)),
                          ("0604", lambda: make_mode(0o604)), ("symlink", make_symlink),
                          ("directory", make_directory)):
        damage()
        rows = cache_rows(home)
        for args in (("pull", "-q", "--plain-http", host, "--pull-secret", "team:cred", ref),
                     ("cache", "create", "sec", "--image", ref, "--plain-http", host, "--pull-secret", "team:cred",
                      "--wait")):
            out = imc(home, *args)
            shown = text(out)
            assert out.returncode == 2, (label, args[0], out.returncode, shown)
            assert "chmod 600" in shown and "Traceback" not in shown, (label, shown)
            assert password not in shown
        assert cache_rows(home) == rows
        if secret.is_dir():
            secret.rmdir()
        else:
            secret.unlink()
        secret.write_bytes(good)
        secret.chmod(0o600)


def test_secret_create_does_not_write_through_a_planted_link(tmp_path: Path, basic_registry: Any) -> None:
    home = tmp_path / "home"
    canary, content = make_canary(tmp_path / "outside")
    (home / "secrets" / "team").mkdir(parents=True)
    (home / "secrets" / "team" / "cred.tmp").symlink_to(canary)
    out = imc(home, "secret", "create", "team:cred", "--registry", basic_registry.host, "--username",
              basic_registry.username, "--password-stdin", stdin=basic_registry.password.encode() + b"\n")
    assert out.returncode == 0, text(out)
    assert_canary_intact(canary, content)
    secret = home / "secrets" / "team" / "cred.json"
    assert not secret.is_symlink() and stat.S_IMODE(secret.stat().st_mode) == 0o600
    out = imc(home, "pull", "-q", "--plain-http", basic_registry.host, "--pull-secret", "team:cred",
              f"{basic_registry.host}/fixtures/base:1.0")
    assert out.returncode == 0, text(out)


# -- credentials never appear anywhere -------------------------------------------------------------------------


def leaked(data: bytes, needles: list[bytes]) -> list[bytes]:
    return [n for n in needles if n in data]


def test_credentials_never_appear_in_output_records_logs_or_answers(tmp_path: Path, basic_registry: Any,
                                                                    token_registry: Any) -> None:
    user, password = basic_registry.username, basic_registry.password
    assert token_registry.password == password
    needles = [password.encode(), base64.b64encode(password.encode()).rstrip(b"="),
               base64.b64encode(f"{user}:{password}".encode()).rstrip(b"=")]
    home = tmp_path / "home"
    basic, token = basic_registry.host, token_registry.host
    outputs: list[tuple[str, bytes]] = []

    def run(*args: str, stdin: bytes | None = None, expect: int = 0) -> subprocess.CompletedProcess:
        out = imc(home, "-v", *args, stdin=stdin)
        outputs.append((" ".join(args), out.stdout + out.stderr))
        assert out.returncode == expect, (args, out.returncode, text(out)[-2000:])
        return out

    for name, host, secret_password in (("team:basic", basic, password), ("team:token", token, password),
                                        ("team:basic-wrong", basic, "not-" + password[::-1]),
                                        ("team:token-wrong", token, "not-" + password[::-1])):
        run("secret", "create", name, "--registry", host, "--username", user, "--password-stdin",
            stdin=secret_password.encode() + b"\n")
    run("pull", "--plain-http", basic, "--pull-secret", "team:basic", f"{basic}/fixtures/app:1.0")
    run("pull", "-o", "json", "--plain-http", token, "--pull-secret", "team:token", f"{token}/team/other:1.0")
    run("pull", "--plain-http", basic, "--pull-secret", "team:basic-wrong", f"{basic}/fixtures/app:2.0", expect=5)
    run("pull", "--plain-http", token, "--pull-secret", "team:token-wrong", f"{token}/fixtures/app:2.0", expect=5)
    run("cache", "create", "basic-ok", "--image", f"{basic}/fixtures/base:1.0", "--plain-http", basic,
        "--pull-secret", "team:basic", "--wait")
    run("cache", "create", "token-ok", "--image", f"{token}/fixtures/oci-app:1.0", "--plain-http", token,
        "--pull-secret", "team:token", "--wait")
    run("cache", "create", "basic-bad", "--image", f"{basic}/fixtures/multi:1.0", "--plain-http", basic,
        "--pull-secret", "team:basic-wrong", "--wait", expect=12)
    run("cache", "create", "token-bad", "--image", f"{token}/fixtures/multi:1.0", "--plain-http", token,
        "--pull-secret", "team:token-wrong", "--wait", expect=12)
    # A build in the background writes its own log under logs/: wait for it through its lease.
    run("cache", "create", "bg-bad", "--image", f"{basic}/fixtures/docker-multi:1.0", "--plain-http", basic,
        "--pull-secret", "team:basic-wrong")
    bg = Caches(home).get("bg-bad")
    with open(home / "locks" / f"cache-{bg.id}.lock", "a+b") as lease:
        fcntl.flock(lease.fileno(), fcntl.LOCK_EX)  # returns once the builder released it
    for name in ("basic-ok", "token-ok", "basic-bad", "token-bad", "bg-bad"):
        run("cache", "get", name, "-o", "json")
        run("cache", "get", name, "-o", "yaml")
        run("cache", "get", name)
        run("cache", "events", name)
        run("cache", "events", name, "-o", "json")
    assert json.loads(imc(home, "cache", "get", "bg-bad", "-o", "json").stdout)["status"]["phase"] == "Failed"
    run("cache", "list", "-o", "json")
    run("cache", "list", "-o", "yaml")
    run("secret", "list", "-o", "json")
    run("secret", "list")
    run("layers", "list", "-o", "json")
    run("volume", "inspect", "basic-ok", "-o", "json")
    run("config", "get", "-o", "json")

    # The server over this home, with pull-through from the basic registry using the secret.
    proc = subprocess.Popen([*IMC, "-v", "--home", str(home), "serve", "--listen", "127.0.0.1:0", "--sweep-interval",
                             "0", "--pull-through", "--upstream", basic, "--plain-http", basic, "--pull-secret",
                             "team:basic"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    served: list[bytes] = []
    try:
        assert proc.stderr is not None
        first = b""
        for _ in range(100):  # debug lines may come first
            line = proc.stderr.readline()
            first += line
            if not line or b"serving on http://" in line:
                break
        assert b"serving on http://" in first, first
        address = first.split(b"serving on http://")[1].split()[0].decode()
        rest: list[bytes] = []
        drain = threading.Thread(target=lambda: rest.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
        drain.start()
        for path in (API, f"{API}/basic-ok", f"{API}/basic-bad", f"{API}/token-bad", f"{API}/bg-bad",
                     "/v2/fixtures/app/manifests/2.0", "/v2/fixtures/base/tags/list", "/metrics"):
            status, body, received = raw_request(address, f"GET {path} HTTP/1.1".encode(),
                                                  f"Accept: {OCI_ACCEPT}\r\n".encode())
            assert status == 200, (path, status, body[:300])
            served.append(received)
        _, _, received = raw_request(address, f"GET {API} HTTP/1.1".encode(), b"Accept: application/yaml\r\n")
        served.append(received)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    drain.join(timeout=30)
    outputs.append(("serve", first + b"".join(rest)))

    # Positive control: the secret file itself holds the credentials, so the search works.
    assert leaked((home / "secrets" / "team" / "basic.json").read_bytes(), needles)
    found: list[str] = []
    for label, data in outputs:
        if leaked(data, needles):
            found.append(f"output of imc {label}")
    for data in served:
        if leaked(data, needles):
            found.append(f"server answer {data[:80]!r}")
    for path in sorted(home.rglob("*")):
        if (path.is_file() and not path.is_symlink() and path.parent.parent != home / "secrets"
                and leaked(path.read_bytes(), needles)):
            found.append(str(path.relative_to(home)))
    with sqlite3.connect(home / "caches.db") as conn:
        for table in ("caches", "match_index"):
            for row in conn.execute(f"SELECT * FROM {table}"):
                if leaked(json.dumps(row).encode(), needles):
                    found.append(f"caches.db {table} row {row[0]}")
    assert {p.name for p in (home / "logs").iterdir()} == {"build-bg-bad.log"}
    assert len(outputs) > 40 and len(served) == 9
    assert not found, f"credentials found in: {found}"


# -- pull-through reaches only the registries the operator listed ----------------------------------


@pytest.fixture
def pull_through(tmp_path: Path, plain_registry: Any) -> Iterator[dict[str, Any]]:
    """imc serve --pull-through --upstream <registry:2 behind a counting proxy>, and a
    listening socket elsewhere on the node that no request may make imc connect to."""
    host, port = plain_registry.host.split(":")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    with CountingProxy((host, int(port))) as proxy:
        caches = Caches(tmp_path / "home")
        puller = pull_through_puller(caches.store, HostPolicy(plain_http=frozenset({proxy.host})),
                                     Keychain(use_docker_config=False))
        server = Server(caches, ("127.0.0.1", 0), pull_through=puller, upstreams=[proxy.host],
                        sweep_interval=0).start()
        try:
            yield {"server": server, "proxy": proxy, "listener": listener, "caches": caches}
        finally:
            server.stop()
            listener.close()


def test_an_unlisted_ns_never_opens_a_connection(pull_through: dict[str, Any]) -> None:
    """Every ``ns`` that is not the listed upstream, however it is spelled, is answered
    404 NAME_UNKNOWN with the same words. The request returns at all (the listener
    never answers, so a connection to it would hold the request), and the listener's
    accept queue is empty."""
    address, listener = pull_through["server"].address, pull_through["listener"]
    port = listener.getsockname()[1]
    upstream_host = pull_through["proxy"].host.split(":")[0]
    answers = set()
    for ns in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "127.0.0.1", upstream_host,
               "169.254.169.254", "metadata.google.internal", "10.0.0.1:5000", "registry.invalid"):
        for path in (f"/v2/foo/bar/manifests/latest?ns={ns}", f"/v2/foo/bar/blobs/{UNKNOWN_DIGEST}?ns={ns}",
                     f"/v2/foo/bar/manifests/{UNKNOWN_DIGEST}?ns={ns}"):
            status, body, _ = raw_request(address, f"GET {path} HTTP/1.1".encode())
            error = json.loads(body)["errors"][0]
            assert (status, error["code"]) == (404, "NAME_UNKNOWN"), (path, body)
            answers.add(error["message"])
    assert len(answers) == 1  # nothing says whether a host exists
    assert accepted(listener) == 0
    assert pull_through["proxy"].requests == []


def test_a_listed_ns_pulls_through_as_containerd_asks(pull_through: dict[str, Any],
                                                      catalogue: dict[str, Any]) -> None:
    """containerd, mirroring a registry, sends ``?ns=<registry>`` with every request."""
    address, proxy = pull_through["server"].address, pull_through["proxy"]
    image = catalogue["images"]["fixtures/base:1.0"]["manifests"][0]
    accept = f"Accept: {OCI_ACCEPT}\r\n".encode()
    status, body, _ = raw_request(address, f"GET /v2/fixtures/base/manifests/1.0?ns={proxy.host} HTTP/1.1".encode(),
                                  accept)
    assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == image["digest"]
    for blob in (image["config"], *image["layers"]):
        status, body, _ = raw_request(address,
                                      f"GET /v2/fixtures/base/blobs/{blob['digest']}?ns={proxy.host} HTTP/1.1".encode())
        assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == blob["digest"]
    assert accepted(pull_through["listener"]) == 0


def test_twenty_clients_missing_the_same_blob_cause_one_upstream_fetch(pull_through: dict[str, Any],
                                                                       catalogue: dict[str, Any]) -> None:
    """The first miss's upstream request is held at the proxy until the other nineteen
    requests are waiting inside the server; then exactly one HEAD and one GET of that
    blob reached the registry, and all twenty clients got its bytes."""
    server, proxy = pull_through["server"], pull_through["proxy"]
    layer = catalogue["images"]["fixtures/app:1.0"]["manifests"][0]["layers"][0]
    gate = proxy.hold(lambda method, path: path.endswith(layer["digest"]))
    path = f"/v2/fixtures/app/blobs/{layer['digest']}?ns={proxy.host}"
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = [pool.submit(raw_request, server.address, f"GET {path} HTTP/1.1".encode()) for _ in range(20)]
        assert gate.wait_for(1, timeout=60)
        deadline = threading.Event()
        for _ in range(600):  # until the other nineteen wait on the first (each check waits 0.1 s at most)
            if server.registry.upstream_waiters() == 19:
                break
            deadline.wait(0.1)
        assert server.registry.upstream_waiters() == 19
        gate.open()
        results = [a.result(timeout=120) for a in answers]
    assert all(status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == layer["digest"]
               for status, body, _ in results)
    asked = [r.method for r in proxy.requests if r.path.endswith(layer["digest"])]
    assert sorted(asked) == ["GET", "HEAD"]


def test_pull_through_with_allow_remote_needs_an_upstream(tmp_path: Path) -> None:
    for args in (["--allow-remote", "--listen", "0.0.0.0:0"], []):
        out = imc(tmp_path / "home", "serve", *args, "--pull-through", timeout=60)
        assert out.returncode == 2
        lines = out.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and "--pull-through needs --upstream" in lines[0], lines
