"""Load: ``imc serve`` holding many concurrent clients of a cache of the large image.

The server runs as its own process (``python -m builder serve``), so its memory can be
read from ``/proc`` while it works. The clients are a few processes of this very file
(``python test_load.py --client SPEC``), each running client threads on keep-alive
connections: some pull whole blobs and check each body's sha256 against its digest,
some ask for random ``Range`` slices and compare them with the blob's real bytes (read
from the store, whose files are hashed first), some fetch manifests, tags and HEADs.
Every client connects and is answered once before any load starts (a READY/GO
handshake over the processes' pipes), so all of them are held at the same time; the
load then runs for a bounded time and a bounded number of requests. Meanwhile a
monitor asks ``GET /v2/`` on fresh connections and records how long each answer took,
and a sampler reads the server's VmRSS and open sockets.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

LOAD_SECONDS = 15.0
CLIENT_PROCESSES = 4
THREADS_PER_PROCESS = 15  # 60 clients
MIN_CLIENTS = 50
MAX_REQUESTS_PER_CLIENT = 400
PING_LIMIT_S = 2.0
RSS_LIMIT_MB = 300
REPOSITORY = "fixtures/large"
ACCEPT = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"
CHUNK = 1 << 20


# -- the client process (stdlib only) -------------------------------------------------------------


class Client(threading.Thread):
    """One client: a keep-alive connection, held from the handshake to the end."""

    def __init__(self, index: int, kind: str, spec: dict[str, Any], ready: threading.Barrier,
                 go: threading.Event) -> None:
        super().__init__(name=f"client-{index}", daemon=True)
        self.kind, self.spec, self.ready, self.go = kind, spec, ready, go
        self.rng = random.Random(spec["seed"] * 1000 + index)
        self.requests = 0
        self.bytes_verified = 0
        self.errors: list[str] = []
        self.held = False
        self.conn: http.client.HTTPConnection | None = None
        self.files = {b["digest"]: os.open(b["path"], os.O_RDONLY) for b in spec["blobs"]}

    def connect(self) -> http.client.HTTPConnection:
        host, port = self.spec["address"].rsplit(":", 1)
        return http.client.HTTPConnection(host, int(port), timeout=60)

    def run(self) -> None:
        try:
            self.conn = self.connect()
            self.get("/v2/", {}, 200)  # answered once: the server holds this connection now
            self.held = True
        except Exception as e:
            self.errors.append(f"connect: {e!r}")
        try:
            self.ready.wait(timeout=120)
        except threading.BrokenBarrierError:
            self.errors.append("handshake broken")
            return
        self.go.wait(timeout=120)
        deadline = self.spec["deadline"]
        while self.held and self.requests < self.spec["max_requests"] and time.monotonic() < deadline:
            try:
                getattr(self, f"do_{self.kind}")()
                self.requests += 1
            except Exception as e:
                self.errors.append(f"{self.kind}: {e!r}"[:300])
                self.conn.close()  # type: ignore[union-attr]
                self.conn = self.connect()
        if self.held:
            try:
                self.get("/v2/", {}, 200)  # the same connection still answers at the end
            except Exception as e:
                self.errors.append(f"final ping: {e!r}")
        self.conn.close()  # type: ignore[union-attr]

    def get(self, path: str, headers: dict[str, str], status: int, method: str = "GET") -> http.client.HTTPResponse:
        assert self.conn is not None
        self.conn.request(method, path, headers=headers)
        resp = self.conn.getresponse()
        if resp.status != status:
            body = resp.read()
            raise AssertionError(f"{method} {path} {headers}: {resp.status}, wanted {status}: {body[:200]!r}")
        if path == "/v2/":
            assert resp.read() == b"{}"
        return resp

    def blob(self, layers_only: bool = False) -> dict[str, Any]:
        blobs = self.spec["blobs"]
        return self.rng.choice([b for b in blobs if b["layer"]] if layers_only else blobs)

    def do_blob(self) -> None:
        """A whole blob, streamed and hashed: its sha256 must be its digest."""
        blob = self.blob()
        resp = self.get(f"/v2/{REPOSITORY}/blobs/{blob['digest']}", {}, 200)
        assert resp.getheader("Docker-Content-Digest") == blob["digest"]
        assert int(resp.getheader("Content-Length", "-1")) == blob["size"]
        h, n = hashlib.sha256(), 0
        while chunk := resp.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
        assert n == blob["size"] and "sha256:" + h.hexdigest() == blob["digest"], f"{blob['digest']}: bad body"
        self.bytes_verified += n

    def do_range(self) -> None:
        """A random slice (a-b, a-, or a suffix), compared with the blob's real bytes. The
        layers are sent with sendfile; the config is decompressed from zstd frames."""
        blob = self.blob(layers_only=self.rng.random() < 0.9)
        size, form = blob["size"], self.rng.random()
        if form < 0.7:
            start = self.rng.randrange(size)
            end = min(size - 1, start + self.rng.randrange(1, 2 << 20))
            header = f"bytes={start}-{end}"
        elif form < 0.85:
            start = max(0, size - self.rng.randrange(1, 1 << 20))
            end, header = size - 1, f"bytes={start}-"
        else:
            n = self.rng.randrange(1, 1 << 20)
            start, end, header = max(0, size - n), size - 1, f"bytes=-{n}"
        resp = self.get(f"/v2/{REPOSITORY}/blobs/{blob['digest']}", {"Range": header}, 206)
        assert resp.getheader("Content-Range") == f"bytes {start}-{end}/{size}", (header, resp.getheader("Content-Range"))
        body = resp.read()
        expected = os.pread(self.files[blob["digest"]], end - start + 1, start)
        assert body == expected, f"{blob['digest']} {header}: {len(body)} bytes differ from the blob's"
        self.bytes_verified += len(body)

    def do_manifest(self) -> None:
        """The manifest by tag and by digest, the tag list, and a HEAD of a blob."""
        step = self.requests % 4
        digest = self.spec["manifest_digest"]
        if step in (0, 1):
            ref = "1.0" if step == 0 else digest
            resp = self.get(f"/v2/{REPOSITORY}/manifests/{ref}", {"Accept": ACCEPT}, 200)
            body = resp.read()
            assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
            assert resp.getheader("Docker-Content-Digest") == digest
            self.bytes_verified += len(body)
        elif step == 2:
            body = self.get(f"/v2/{REPOSITORY}/tags/list", {}, 200).read()
            assert json.loads(body) == {"name": REPOSITORY, "tags": ["1.0"]}
        else:
            blob = self.blob()
            resp = self.get(f"/v2/{REPOSITORY}/blobs/{blob['digest']}", {}, 200, method="HEAD")
            assert resp.read() == b"" and int(resp.getheader("Content-Length", "-1")) == blob["size"]


def client_main(spec: dict[str, Any]) -> None:
    """Connect every client, say READY, wait for GO on stdin, run, print the results."""
    kinds: list[str] = spec["kinds"]
    ready = threading.Barrier(len(kinds) + 1)
    go = threading.Event()
    clients = [Client(i, kind, spec, ready, go) for i, kind in enumerate(kinds)]
    for c in clients:
        c.start()
    ready.wait(timeout=120)
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        ready.abort()
        return
    spec["deadline"] = time.monotonic() + spec["seconds"]
    go.set()
    for c in clients:
        c.join(timeout=spec["seconds"] + 180)
    print(json.dumps([{"kind": c.kind, "held": c.held, "requests": c.requests, "bytes": c.bytes_verified,
                       "errors": c.errors, "alive": c.is_alive()} for c in clients]), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client"]:
        client_main(json.loads(sys.argv[2]))
        sys.exit(0)


# -- the test ---------------------------------------------------------------------------------------
# Imported here: the client processes above need only the standard library.

import pytest  # noqa: E402

from builder.build import Builder  # noqa: E402
from builder.caches import Caches  # noqa: E402
from builder.digest import Digest, hash_file  # noqa: E402
from builder.imagecache import CacheSpec  # noqa: E402

pytestmark = pytest.mark.slow


def count_sockets(pid: int) -> int:
    """The sockets a process has open (its listening socket and its connections)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            continue
    return count


class Sampler(threading.Thread):
    """Reads the server's VmRSS and open sockets from /proc at a fixed interval."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(name="sampler", daemon=True)
        self.pid, self.interval = pid, interval
        self.stop = threading.Event()
        self.rss_kb: list[int] = []
        self.sockets: list[int] = []
        self.threads: list[int] = []

    def run(self) -> None:
        while not self.stop.wait(self.interval):  # a sampling period, not a synchronisation
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return  # the server exited; the test notices
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            self.rss_kb.append(int(fields["VmRSS"].split()[0]))
            self.threads.append(int(fields["Threads"]))
            try:
                self.sockets.append(count_sockets(self.pid))
            except OSError:
                return


class Monitor(threading.Thread):
    """``GET /v2/`` on a fresh connection, again and again, timing each answer."""

    def __init__(self, address: str, interval: float = 0.05) -> None:
        super().__init__(name="monitor", daemon=True)
        self.address, self.interval = address, interval
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.errors: list[str] = []

    def run(self) -> None:
        host, port = self.address.rsplit(":", 1)
        while not self.stop.is_set():
            started = time.monotonic()
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            try:
                conn.request("GET", "/v2/")
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200 or body != b"{}":
                    self.errors.append(f"{resp.status} {body[:100]!r}")
            except Exception as e:
                self.errors.append(repr(e))
            finally:
                conn.close()
            self.latencies.append(time.monotonic() - started)
            self.stop.wait(self.interval)


def start_server(home: Path) -> tuple[subprocess.Popen[bytes], str, list[bytes]]:
    proc = subprocess.Popen([sys.executable, "-m", "builder", "--home", str(home), "serve", "--listen",
                             "127.0.0.1:0", "--sweep-interval", "0"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    seen: list[bytes] = []
    for _ in range(100):
        line = proc.stderr.readline()
        seen.append(line)
        if not line or b"serving on http://" in line:
            break
    assert b"serving on http://" in seen[-1], b"".join(seen)
    address = seen[-1].split(b"serving on http://")[1].split()[0].decode()
    rest: list[bytes] = []
    threading.Thread(target=lambda: rest.append(proc.stderr.read()), daemon=True).start()  # type: ignore[union-attr]
    return proc, address, rest


def test_serve_holds_many_clients_of_the_large_image(tmp_path: Path, large_image: dict[str, Any],
                                                     plain_registry: Any) -> None:
    host = plain_registry.host
    home = tmp_path / "home"
    caches = Caches(home)
    _, lease = caches.create("large", CacheSpec(images=[f"{host}/{REPOSITORY}:1.0"], plain_http=[host]))
    built = Builder(caches).build("large", lease)
    assert built.phase == "Ready", built.message
    manifest = large_image["manifests"][0]
    blobs = []
    for desc, is_layer in [(manifest["config"], False), *[(layer, True) for layer in manifest["layers"]]]:
        path = caches.store.blob_path(Digest.parse(desc["digest"]))
        actual, size = hash_file(str(path), "sha256")
        assert str(actual) == desc["digest"] and size == desc["size"]  # the reference bytes are right
        blobs.append({"digest": desc["digest"], "size": desc["size"], "path": str(path), "layer": is_layer})

    kinds = (["blob"] * 5 + ["range"] * 6 + ["manifest"] * 4) * (THREADS_PER_PROCESS // 15)
    assert len(kinds) == THREADS_PER_PROCESS
    server, address, server_log = start_server(home)
    sampler, monitor = Sampler(server.pid), Monitor(address)
    clients: list[subprocess.Popen[bytes]] = []
    try:
        sampler.start()
        for n in range(CLIENT_PROCESSES):
            spec = {"address": address, "blobs": blobs, "manifest_digest": manifest["digest"], "kinds": kinds,
                    "seconds": LOAD_SECONDS, "max_requests": MAX_REQUESTS_PER_CLIENT, "seed": n}
            clients.append(subprocess.Popen([sys.executable, __file__, "--client", json.dumps(spec)],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        for proc in clients:  # every client of every process is connected and answered
            assert proc.stdout is not None and proc.stdout.readline() == b"READY\n"
        held_at_go = count_sockets(server.pid)
        monitor.start()
        for proc in clients:
            assert proc.stdin is not None
            proc.stdin.write(b"GO\n")
            proc.stdin.flush()
        results: list[dict[str, Any]] = []
        for proc in clients:
            out, _ = proc.communicate(timeout=LOAD_SECONDS + 240)
            assert proc.returncode == 0
            results += json.loads(out.splitlines()[-1])
        monitor.stop.set()
        monitor.join(timeout=60)
        assert server.poll() is None, "the server died under load"
    finally:
        monitor.stop.set()
        sampler.stop.set()
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    sampler.join(timeout=10)

    errors = [e for r in results for e in r["errors"]]
    held = sum(r["held"] for r in results)
    requests = sum(r["requests"] for r in results)
    verified = sum(r["bytes"] for r in results)
    by_kind = {k: sum(r["requests"] for r in results if r["kind"] == k) for k in ("blob", "range", "manifest")}
    peak_rss_mb = max(sampler.rss_kb) / 1024
    summary = (f"clients held {held} (server sockets at GO {held_at_go}, peak {max(sampler.sockets)}), "
               f"requests {requests} {by_kind}, bytes verified {verified} ({verified / 1e9:.2f} GB), "
               f"/v2/ answers {len(monitor.latencies)} max {max(monitor.latencies):.3f}s, "
               f"server peak RSS {peak_rss_mb:.1f} MB over {len(sampler.rss_kb)} samples, "
               f"peak threads {max(sampler.threads)}")
    print(f"\nload: {summary}")
    assert not errors, f"{len(errors)} errors, first: {errors[:5]}; {summary}"
    assert not monitor.errors, monitor.errors[:5]
    assert len(results) == CLIENT_PROCESSES * THREADS_PER_PROCESS >= MIN_CLIENTS
    assert held == len(results) and not any(r["alive"] for r in results)
    assert held_at_go >= held, summary  # the server held every client's connection at once
    assert all(r["requests"] > 0 and (r["bytes"] > 0 or r["kind"] == "manifest") for r in results), results
    assert all(n > 0 for n in by_kind.values())
    assert len(monitor.latencies) >= 20 and max(monitor.latencies) < PING_LIMIT_S, summary
    assert peak_rss_mb < RSS_LIMIT_MB, summary
    assert b"Traceback" not in b"".join(server_log)
