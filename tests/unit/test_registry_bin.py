"""The fixtures find the registry:2 binary on PATH or in IMC_REGISTRY_BIN, and say what
to install when there is none."""

from __future__ import annotations

from pathlib import Path

import pytest
import regfix


def executable(directory: Path, name: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def bare_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PATH holding only an empty directory of ours, IMC_REGISTRY_BIN unset."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.delenv(regfix.REGISTRY_BIN_ENV, raising=False)
    return bindir


def test_upstream_name_registry_is_found_on_path(bare_path: Path) -> None:
    found = executable(bare_path, "registry")
    assert regfix.registry_bin() == str(found)


def test_debian_name_comes_first(bare_path: Path) -> None:
    executable(bare_path, "registry")
    debian = executable(bare_path, "docker-registry")
    assert regfix.registry_bin() == str(debian)


def test_env_overrides_path(bare_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    executable(bare_path, "docker-registry")
    chosen = executable(tmp_path, "my-distribution")
    monkeypatch.setenv(regfix.REGISTRY_BIN_ENV, str(chosen))
    assert regfix.registry_bin() == str(chosen)


def test_env_naming_no_executable_is_refused(bare_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = tmp_path / "not-executable"
    plain.write_text("")
    monkeypatch.setenv(regfix.REGISTRY_BIN_ENV, str(plain))
    with pytest.raises(RuntimeError, match=f"IMC_REGISTRY_BIN={plain} is not an executable file"):
        regfix.registry_bin()


def test_none_found_names_both_binaries_and_packages(bare_path: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as err:
        regfix.RegistrySet(tmp_path / "work", modes=("plain",)).start()
    message = str(err.value)
    for needed in ("docker-registry nor registry", "docker-distribution (Fedora)", "IMC_REGISTRY_BIN"):
        assert needed in message
    assert "\n" not in message
