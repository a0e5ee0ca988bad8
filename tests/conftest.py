"""Shared pytest fixtures: real registry:2 processes with the fixture images pushed.

The harness lives in ``registry-fixtures/`` and never imports ``builder``, so a
bug in the code under test cannot make its own fixtures look right.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "registry-fixtures"))

# Imported after the sys.path entry above.
import imagegen
from regfix import Endpoint, RegistrySet


@pytest.fixture(scope="session")
def registry_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistrySet]:
    """The running :class:`RegistrySet` (plain, tls, basic, token) with fixtures pushed.

    Fault tests use it to ``kill(mode)`` / ``restart(mode)`` a registry; the
    processes are stopped after the session, also when it fails.
    """
    rs = RegistrySet(tmp_path_factory.mktemp("registries"))
    try:
        rs.start()
        rs.push_fixtures()
        yield rs
    finally:
        rs.stop()


@pytest.fixture(scope="session")
def registries(registry_set: RegistrySet) -> dict[str, Endpoint]:
    """Endpoints by mode: ``plain``, ``tls``, ``basic``, ``token``."""
    return registry_set.endpoints


@pytest.fixture(scope="session")
def catalogue(registry_set: RegistrySet) -> dict[str, Any]:
    """The catalogue of pushed images (see ``registry-fixtures/README.md``)."""
    assert registry_set.catalogue is not None
    return registry_set.catalogue


@pytest.fixture(scope="session")
def plain_registry(registries: dict[str, Endpoint]) -> Endpoint:
    """HTTP registry without auth."""
    return registries["plain"]


@pytest.fixture(scope="session")
def tls_registry(registries: dict[str, Endpoint]) -> Endpoint:
    """HTTPS registry; trust ``ca_file``."""
    return registries["tls"]


@pytest.fixture(scope="session")
def basic_registry(registries: dict[str, Endpoint]) -> Endpoint:
    """HTTP registry with htpasswd basic auth (``username``/``password``)."""
    return registries["basic"]


@pytest.fixture(scope="session")
def token_registry(registries: dict[str, Endpoint]) -> Endpoint:
    """HTTP registry with bearer-token auth; issuer stats at ``token_url + "/stats"``."""
    return registries["token"]


@pytest.fixture(scope="session")
def large_image(registry_set: RegistrySet) -> dict[str, Any]:
    """Push ``fixtures/large:1.0`` (~400 MB, cached in .fixtures-cache) and return its catalogue entry."""
    return registry_set.push_fixtures(large=True)["images"][imagegen.LARGE_REF]
