"""Shared fixtures for the unit tests.

``tests/`` is not a package: the helpers under ``tests/support`` are imported as the
top-level package ``support``, which this file puts on ``sys.path``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
from support.faultserver import FaultServer


@pytest.fixture
def server():
    """A fault server for the repository ``test/app``, stopped after the test."""
    with FaultServer() as srv:
        yield srv


@pytest.fixture
def other_server():
    """A second fault server (the "other host" blob redirects point at)."""
    with FaultServer() as srv:
        yield srv


class SleepRecorder:
    """An injectable ``sleep`` that records the delays asked for and returns at once."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)

    def jittered(self, ceilings: list[float]) -> bool:
        """Whether the delays were full-jitter draws, one under each ceiling in turn."""
        return len(self.calls) == len(ceilings) and all(0 <= c <= top for c, top in zip(self.calls, ceilings, strict=True))


@pytest.fixture
def sleeps() -> SleepRecorder:
    return SleepRecorder()


@pytest.fixture(autouse=True)
def _no_host_docker_config(tmp_path_factory, monkeypatch):
    """Never read the developer's credentials: docker's config.json, containers' auth.json files, helpers."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path_factory.mktemp("docker-config")))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path_factory.mktemp("runtime")))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config-home")))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
