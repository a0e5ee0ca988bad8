"""Driving real ``imc`` processes from tests: run, start, pause at a stage, kill -9, and
check what a home directory holds afterwards.

A process is stopped at a stage with the library's test hook (``builder/faults.py``):
``IMC_TEST_PAUSE_AT=<stage>`` makes it write the stage to ``IMC_TEST_PAUSE_FILE`` and
block there; ``start_paused`` waits (bounded) for that file. It runs ``python -m
builder`` and reads its JSON output; it does not import ``builder``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

IMC = [sys.executable, "-m", "builder"]
DEADLINE = 60.0
ENDED = "the build process ended before finishing"


def imc_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMC_TEST_")}
    return {**env, "IMC_HOME": str(home), **extra}


def run_imc(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*IMC, *args], check=False, capture_output=True, text=True, env=imc_env(home), timeout=timeout)


def ok(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run imc; it must exit 0 without a traceback."""
    out = run_imc(home, *args)
    assert out.returncode == 0, f"imc {' '.join(args)}: exit {out.returncode}\n{out.stderr}"
    assert "Traceback" not in out.stderr, out.stderr
    return out


def start(home: Path, *args: str, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*IMC, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=imc_env(home, **extra))


def start_paused(home: Path, workdir: Path, stage: str, *args: str) -> subprocess.Popen[str]:
    """Start ``imc ARGS`` and return once it is blocked at ``stage``."""
    marker = workdir / f"paused-{stage}"
    marker.unlink(missing_ok=True)
    proc = start(home, *args, IMC_TEST_PAUSE_AT=stage, IMC_TEST_PAUSE_FILE=str(marker))
    deadline = time.monotonic() + DEADLINE
    while not marker.exists():  # polling an observable condition, with a deadline
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"imc {' '.join(args)} exited {proc.returncode} before reaching {stage}:\n{err}")
        if time.monotonic() > deadline:
            kill9(proc)
            pytest.fail(f"imc {' '.join(args)} did not reach {stage} in {DEADLINE}s")
        time.sleep(0.02)
    assert marker.read_text() == stage
    return proc


def kill9(proc: subprocess.Popen[str]) -> None:
    """SIGKILL (if still running) and reap."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)


def cache(home: Path, name: str) -> dict[str, Any]:
    """``imc cache get NAME -o json``."""
    return json.loads(ok(home, "cache", "get", name, "-o", "json").stdout)


def create_args(registry: str, name: str, *refs: str, flash: bool = False) -> list[str]:
    """``cache create NAME --wait -q`` of ``registry/ref`` images over plain HTTP."""
    args = ["cache", "create", name, "--wait", "-q", "--plain-http", registry]
    for ref in refs:
        args += ["--image", f"{registry}/{ref}"]
    return args + (["--flash"] if flash else [])


def assert_store_verifies(home: Path) -> None:
    out = run_imc(home, "layers", "verify", "-o", "json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["ok"]


def assert_ready_with_volume(home: Path, name: str) -> dict[str, Any]:
    """Ready, served from its packed volume, which verifies."""
    obj = cache(home, name)
    assert obj["status"]["phase"] == "Ready" and obj["status"]["source"] == "volume", obj["status"]
    assert obj["status"]["volume"]["state"] == "ready"
    ok(home, "volume", "verify", name)
    return obj


def assert_no_orphans(home: Path) -> None:
    """Run gc, then: no partial file, no volume without a record, no stray lock, and the
    store verifies."""
    ok(home, "gc")
    items = json.loads(ok(home, "cache", "list", "-o", "json").stdout)["items"]
    ids = {i["status"]["imageCacheId"] for i in items}
    volumes = {i["status"]["volume"].get("path") for i in items} - {None}
    assert list((home / "ingest").iterdir()) == []
    assert [p.name for p in (home / "volumes").iterdir() if p.name.endswith(".partial")] == []
    assert {str(p) for p in (home / "volumes").iterdir()} == volumes
    locks = [p.name for p in (home / "locks").iterdir()]
    assert [n for n in locks if n.startswith("blob-")] == []
    assert {n[len("cache-"):-len(".lock")] for n in locks if n.startswith("cache-")} <= ids
    assert_store_verifies(home)
