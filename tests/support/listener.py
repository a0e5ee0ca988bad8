"""A listening socket that never answers, posing as an upstream: tests count the
connections made to it (none, for a server that must not connect)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def listening() -> Iterator[socket.socket]:
    """A non-blocking listening socket on a free loopback port, closed afterwards."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=64)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def accepted(sock: socket.socket) -> int:
    """Connections the listening socket has received since last asked (drained)."""
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1
