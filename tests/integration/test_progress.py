"""What a person sees on a terminal and what a CI log receives, from the real commands.

On a pseudo-terminal (as a user's shell gives imc) the live display carries a
percentage, a rate and a time left, a row per layer and the build's phase; through
a pipe (as a CI job captures it) there is no escape code, every blob or part has
its line and the total is said. ``-q`` says nothing.
"""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from builder.units import human

IMC = [sys.executable, "-m", "builder"]
REF = "fixtures/app:1.0"
TIME_LEFT = re.compile(r"\d+:\d\d:\d\d left")
PERCENT = re.compile(r"\b\d{1,3}%")
CSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def env_for(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TERM")}
    return {**env, "IMC_HOME": str(home), "DOCKER_CONFIG": str(home / "no-docker-config"),
            "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "60"}


def on_terminal(home: Path, *args: str) -> tuple[int, str]:
    """Run imc with stdout and stderr on a pseudo-terminal; everything it drew, raw."""
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen([*IMC, *args], stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary,
                                env=env_for(home), close_fds=True)
    finally:
        os.close(secondary)
    out = bytearray()
    try:
        while True:
            try:
                data = os.read(primary, 65536)
            except OSError:  # EIO: the child closed its side
                break
            if not data:
                break
            out += data
    finally:
        os.close(primary)
    drawn = out.decode(errors="replace")
    assert "\x1b[" in drawn, drawn  # drawn live, not printed line by line
    return proc.wait(timeout=120), CSI.sub("", drawn)


def through_pipe(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*IMC, *args], capture_output=True, text=True, env=env_for(home), timeout=120)


def blobs_of(catalogue: dict[str, Any], ref: str) -> list[dict[str, Any]]:
    manifest = catalogue["images"][ref]["manifests"][0]
    return [manifest["config"], *manifest["layers"]]


def test_pull_on_a_terminal_shows_each_layer_percentage_rate_and_time_left(tmp_path: Path, plain_registry: Any,
                                                                          catalogue: dict[str, Any]) -> None:
    reg = plain_registry.host
    code, out = on_terminal(tmp_path, "pull", f"{reg}/{REF}", "--plain-http", reg)
    assert code == 0, out
    assert PERCENT.search(out) and "100%" in out
    assert TIME_LEFT.search(out), out
    assert re.search(r"\d+(\.\d)? [kM]?B/s", out)
    for blob in blobs_of(catalogue, REF):
        assert blob["digest"].removeprefix("sha256:")[:12] in out  # a row per layer


def test_pull_again_on_a_terminal_says_the_layers_already_exist(tmp_path: Path, plain_registry: Any) -> None:
    reg = plain_registry.host
    assert through_pipe(tmp_path, "pull", "-q", f"{reg}/{REF}", "--plain-http", reg).returncode == 0
    code, out = on_terminal(tmp_path, "pull", f"{reg}/{REF}", "--plain-http", reg)
    assert code == 0, out
    assert "already exists" in out and "100%" in out


def test_pull_through_a_pipe_has_no_escape_codes_and_says_the_total(tmp_path: Path, plain_registry: Any,
                                                                    catalogue: dict[str, Any]) -> None:
    reg = plain_registry.host
    blobs = blobs_of(catalogue, REF)
    total = sum(b["size"] for b in blobs)
    out = through_pipe(tmp_path, "pull", f"{reg}/{REF}", "--plain-http", reg)
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stderr and "\r" not in out.stderr
    assert f"{len(blobs)} blobs, {human(total)} in total" in out.stderr
    assert f"{human(total)} of {human(total)} (100%) fetched" in out.stderr
    for blob in blobs:
        assert sum(blob["digest"].removeprefix("sha256:")[:12] in line for line in out.stderr.splitlines()) == 1

    quiet = through_pipe(tmp_path / "quiet", "pull", "-q", f"{reg}/{REF}", "--plain-http", reg)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_build_and_volume_push_pull_show_phases_and_parts(tmp_path: Path, plain_registry: Any) -> None:
    reg = plain_registry.host
    home = tmp_path / "a"
    code, out = on_terminal(home, "cache", "create", "web", "--image", f"{reg}/{REF}", "--plain-http", reg,
                            "--wait")
    assert code == 0, out
    assert "[Ready]" in out and "100%" in out and TIME_LEFT.search(out)

    code, out = on_terminal(home, "volume", "push", "web", f"{reg}/imc/progress:v1", "--plain-http", reg,
                            "--part-size", "256k")
    assert code == 0, out
    assert "100%" in out and TIME_LEFT.search(out)
    assert re.search(r"uploaded +part 1/\d+", out)

    pulled = through_pipe(tmp_path / "b", "volume", "pull", f"{reg}/imc/progress:v1", "--plain-http", reg)
    assert pulled.returncode == 0, pulled.stderr
    assert "\x1b" not in pulled.stderr
    parts = re.search(r"^(\d+) parts, (\S+ \S+) in total$", pulled.stderr, re.MULTILINE)
    assert parts, pulled.stderr
    assert len(re.findall(r"^  downloaded part \d+/", pulled.stderr, re.MULTILINE)) == int(parts.group(1))
    assert f"of {parts.group(2)} (100%) downloaded" in pulled.stderr
    assert "verifying the volume" in pulled.stderr
