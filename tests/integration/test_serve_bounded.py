"""``imc serve --max-connections``: past the cap a connection is told to retry, and
the server stays up, bounded, and answers normally afterwards."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from builder.caches import Caches
from builder.server.app import Server

CAP = 4


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    server = Server(Caches(tmp_path / "home"), ("127.0.0.1", 0), sweep_interval=0, max_connections=CAP).start()
    yield server
    server.stop()


def connect(server: Server) -> http.client.HTTPConnection:
    host, port = server.address.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=30)


def get(conn: http.client.HTTPConnection, path: str) -> tuple[int, dict[str, str], bytes]:
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, dict(resp.getheaders()), resp.read()


def test_twice_the_cap_of_slow_clients(server: Server) -> None:
    baseline = threading.active_count()
    admitted_all = threading.Barrier(CAP + 1)
    release = threading.Event()

    def slow_client() -> list[int]:
        """Holds its keep-alive connection open between two requests until released."""
        conn = connect(server)
        try:
            first = get(conn, "/v2/")
            admitted_all.wait(timeout=30)
            assert release.wait(timeout=30)
            second = get(conn, "/v2/fixtures/app/manifests/1.0")
            return [first[0], second[0], json.loads(second[2])["errors"][0]["code"] == "MANIFEST_UNKNOWN"]
        finally:
            conn.close()

    def late_client() -> tuple[int, dict[str, str], bytes]:
        conn = connect(server)
        try:
            return get(conn, "/v2/")
        finally:
            conn.close()

    with ThreadPoolExecutor(2 * CAP) as pool:
        slow = [pool.submit(slow_client) for _ in range(CAP)]
        admitted_all.wait(timeout=30)  # every slow client was answered once and holds its connection
        assert server.connections == CAP
        assert threading.active_count() - baseline <= 2 * CAP  # the pool's clients and one thread each served
        late = [pool.submit(late_client) for _ in range(CAP)]
        refused = [f.result(timeout=30) for f in late]
        assert server.connections == CAP
        release.set()
        assert [f.result(timeout=30) for f in slow] == [[200, 404, True]] * CAP

    for status, headers, body in refused:
        assert status == 503
        assert headers["Retry-After"] == "1"
        assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    assert server.wait_connections(lambda n: n == 0)
    conn = connect(server)
    try:
        assert get(conn, "/v2/")[0] == 200
    finally:
        conn.close()
