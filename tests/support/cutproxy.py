"""A TCP proxy in front of a real registry that drops one connection mid-response.

The registry stays real (its bytes, its Range handling); the proxy only simulates the
network failing once: the first time more than ``cut_after`` bytes flow back to the
client on one connection, it forwards exactly ``cut_after`` of them and closes both
sides. It records the request heads it forwarded, so a test can see the Range header
of the retry.
"""

from __future__ import annotations

import socket
import threading


class CutProxy:
    """Forward 127.0.0.1:<port> to ``target``; cut the first large response once."""

    def __init__(self, target: tuple[str, int], cut_after: int) -> None:
        self.target = target
        self.cut_after = cut_after
        self.cut = False
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> CutProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self._listener.close()
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=10)
            threading.Thread(target=self._upstream_pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._downstream_pump, args=(upstream, client), daemon=True).start()

    def _upstream_pump(self, client: socket.socket, upstream: socket.socket) -> None:
        """Client → registry, recording each request head."""
        try:
            while data := client.recv(65536):
                text = data.decode("latin-1")
                if text.startswith(("GET ", "HEAD ")):
                    with self._lock:
                        self.requests.append(text.split("\r\n\r\n")[0])
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            _close(upstream)

    def _downstream_pump(self, upstream: socket.socket, client: socket.socket) -> None:
        """Registry → client, cutting this connection once past ``cut_after`` bytes."""
        sent = 0
        try:
            while data := upstream.recv(65536):
                with self._lock:
                    cutting = not self.cut and sent + len(data) > self.cut_after
                    if cutting:
                        self.cut = True
                if cutting:
                    client.sendall(data[: self.cut_after - sent])
                    break
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            _close(client)
            _close(upstream)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class UploadCutProxy(CutProxy):
    """Like ``CutProxy``, but cuts the client → registry direction: once more than
    ``cut_upload_after`` request bytes (heads and bodies) have gone through, it forwards
    exactly that many and closes both sides, as a network failing mid-upload would.

    ``bytes_up`` counts every request byte forwarded, so a test can tell an upload that
    went on from where it stopped from one that started over.
    """

    def __init__(self, target: tuple[str, int], cut_upload_after: int) -> None:
        super().__init__(target, cut_after=1 << 62)
        self.cut_upload_after = cut_upload_after
        self.upload_cut = False
        self.bytes_up = 0

    def _upstream_pump(self, client: socket.socket, upstream: socket.socket) -> None:
        cutting = False
        try:
            while data := client.recv(65536):
                with self._lock:
                    if data[:8].split(b" ")[0] in (b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE"):
                        self.requests.append(data.decode("latin-1").split("\r\n\r\n")[0])
                    cutting = not self.upload_cut and self.bytes_up + len(data) > self.cut_upload_after
                    if cutting:
                        self.upload_cut = True
                        data = data[: self.cut_upload_after - self.bytes_up]
                    self.bytes_up += len(data)
                upstream.sendall(data)
                if cutting:
                    break
        except OSError:
            pass
        finally:
            _close(upstream)
            if cutting:
                _close(client)
