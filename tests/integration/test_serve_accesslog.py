"""The access log of ``imc serve``: one line per request with what an operator needs,
and never a credential, in text and in JSON."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
from pathlib import Path

import pytest
from support.imccli import IMC, imc_env

from builder.server.accesslog import redact_target

SECRET = "s3cr3t-Value-0123456789"


def serve_and_request(tmp_path: Path, *args: str) -> tuple[str, list[str]]:
    """Start ``imc serve``, send requests bearing secrets on one keep-alive connection,
    stop it; its banner and the log lines of the requests before the last."""
    proc = subprocess.Popen([*IMC, "serve", "--listen", "127.0.0.1:0", "--sweep-interval", "0", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=imc_env(tmp_path / "home"))
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        match = re.match(r"serving on http://(\S+)", first)
        assert match, first
        host, port = match.group(1).rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        for path in (f"/v2/?token={SECRET}&ns=registry.example&X-Amz-Signature={SECRET}",
                     "/v2/fixtures/app/tags/list?n=5",
                     "/v2/"):  # the server logged the earlier requests before it read this one
            conn.request("GET", path, headers={"Authorization": f"Bearer {SECRET}"})
            conn.getresponse().read()
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    rest = proc.stderr.read()  # through the same buffer that read the first line
    return first + rest, (first + rest).splitlines()


def test_text_access_log_has_the_request_and_never_the_secret(tmp_path: Path) -> None:
    output, lines = serve_and_request(tmp_path)
    assert SECRET not in output
    assert "metrics:  http://" in output and "log:      stderr, text, level info" in output
    access = [line for line in lines if "builder.server.access" in line]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z info builder\.server\.access: 127\.0\.0\.1 "
                        r'"GET /v2/\?token=REDACTED&ns=registry\.example&X-Amz-Signature=REDACTED" 200 2 '
                        r"\d+\.\d{3}s", access[0]), access[0]
    assert re.search(r'"GET /v2/fixtures/app/tags/list\?n=5" 404 \d+ ', access[1]), access[1]


def test_json_access_log_lines_parse(tmp_path: Path) -> None:
    output, lines = serve_and_request(tmp_path, "--log-format", "json")
    assert SECRET not in output
    records = [json.loads(line) for line in lines if line.startswith("{")]
    access = [r for r in records if r["logger"] == "builder.server.access"]
    first, second = access[0], access[1]
    assert {k: first[k] for k in ("client", "method", "path", "status", "bytes", "level")} == {
        "client": "127.0.0.1", "method": "GET", "status": 200, "bytes": 2, "level": "info",
        "path": "/v2/?token=REDACTED&ns=registry.example&X-Amz-Signature=REDACTED"}
    assert first["duration"] >= 0 and first["time"].endswith("Z")
    assert (second["path"], second["status"]) == ("/v2/fixtures/app/tags/list?n=5", 404)
    assert second["bytes"] > 0


def test_log_level_warning_leaves_requests_out(tmp_path: Path) -> None:
    output, _ = serve_and_request(tmp_path, "--log-level", "warning")
    assert "builder.server.access" not in output


@pytest.mark.parametrize("target,logged", [
    ("/v2/x/blobs/sha256:ab?access_token=abc", "/v2/x/blobs/sha256:ab?access_token=REDACTED"),
    ("/v2/\r\nforged line", "/v2/forged%20line"),
    ("/v2/\x1b[2Jx", "/v2/%1B%5B2Jx"),
    ("/apis/x?watch=true&resourceVersion=7&continue=opaque", "/apis/x?watch=true&resourceVersion=7&continue=REDACTED"),
])
def test_redact_target(target: str, logged: str) -> None:
    assert redact_target(target) == logged
