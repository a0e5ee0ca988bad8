"""Credentials where podman, skopeo and buildah keep them, against real registries.

Each test writes a containers-auth.json(5) file whose namespace-scoped entry is
right for one repository and whose host-wide entry is wrong: the repository under
the namespace is pulled (or pushed), one outside it is refused with the wrong
entry's user, and no password reaches the output.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.caches import Caches

IMC = [sys.executable, "-m", "builder"]
WRONG = "wrong-password-of-the-host-wide-entry"


def auth_file(path: Path, auths: dict[str, tuple[str, str]]) -> Path:
    """Write a containers-auth.json file as podman login does (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"auths": {key: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
                     for key, (user, password) in auths.items()}}
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    return path


def scoped(endpoint: Any, namespace: str) -> dict[str, tuple[str, str]]:
    """Right for ``namespace``, wrong for the rest of the registry."""
    return {f"{endpoint.host}/{namespace}": (endpoint.username, endpoint.password),
            endpoint.host: ("host-wide", WRONG)}


def run_imc(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """imc with none of the machine's credential files: each test says where they are."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "DOCKER_CONFIG")}
    base = {"IMC_HOME": str(home), "DOCKER_CONFIG": str(home / "docker"), "XDG_RUNTIME_DIR": str(home / "run"),
            "XDG_CONFIG_HOME": str(home / "config")}
    return subprocess.run([*IMC, *args], capture_output=True, text=True, timeout=180,
                          env={**clean, **base, **(env or {})})


def assert_no_secret(out: subprocess.CompletedProcess[str], *secrets: str) -> None:
    for secret in (WRONG, *secrets):
        assert secret not in out.stdout + out.stderr
        assert base64.b64encode(secret.encode()).decode()[:12] not in out.stdout + out.stderr


@pytest.mark.parametrize("mode", ["basic", "token"])
def test_authfile_namespace_entry_wins_over_a_wrong_host_wide_entry(tmp_path: Path, registries: dict[str, Any],
                                                                   mode: str) -> None:
    endpoint = registries[mode]
    authfile = auth_file(tmp_path / "auth.json", scoped(endpoint, "team"))
    home = tmp_path / "home"

    ok = run_imc(home, "pull", "-q", "--authfile", str(authfile), "--plain-http", endpoint.host,
                 f"{endpoint.host}/team/other:1.0")
    assert ok.returncode == 0, ok.stderr
    assert_no_secret(ok, endpoint.password)

    refused = run_imc(home, "pull", "-q", "--authfile", str(authfile), "--plain-http", endpoint.host,
                      f"{endpoint.host}/fixtures/base:1.0")
    assert refused.returncode == 5, refused.stderr
    assert "'host-wide'" in refused.stderr and refused.stderr.count("\n") == 1
    assert_no_secret(refused, endpoint.password)


def test_the_longest_namespace_wins_in_any_key_order(tmp_path: Path, basic_registry: Any) -> None:
    reg = basic_registry
    authfile = auth_file(tmp_path / "auth.json", {
        f"{reg.host}/fixtures/app": (reg.username, reg.password),
        f"{reg.host}/fixtures": ("namespace", WRONG),
        reg.host: ("host-wide", WRONG),
    })
    home = tmp_path / "home"
    ok = run_imc(home, "pull", "-q", "--authfile", str(authfile), "--plain-http", reg.host,
                 f"{reg.host}/fixtures/app:1.0")
    assert ok.returncode == 0, ok.stderr
    refused = run_imc(home, "pull", "-q", "--authfile", str(authfile), "--plain-http", reg.host,
                      f"{reg.host}/fixtures/base:1.0")
    assert refused.returncode == 5 and "'namespace'" in refused.stderr


def test_registry_auth_file_then_runtime_then_config_then_docker(tmp_path: Path, basic_registry: Any) -> None:
    reg = basic_registry
    home = tmp_path / "home"
    right = {reg.host: (reg.username, reg.password)}
    pull = ("pull", "-q", "--plain-http", reg.host, f"{reg.host}/fixtures/base:1.0")

    # docker's config.json alone is read
    auth_file(home / "docker" / "config.json", right)
    assert run_imc(home, *pull).returncode == 0
    # ~/.config/containers/auth.json comes before it
    auth_file(home / "config" / "containers" / "auth.json", {reg.host: ("config-home", WRONG)})
    refused = run_imc(home, *pull)
    assert refused.returncode == 5 and "'config-home'" in refused.stderr
    # $XDG_RUNTIME_DIR/containers/auth.json before that
    auth_file(home / "run" / "containers" / "auth.json", right)
    assert run_imc(home, *pull).returncode == 0
    # REGISTRY_AUTH_FILE replaces the runtime file; --authfile replaces REGISTRY_AUTH_FILE
    env_file = auth_file(tmp_path / "env-auth.json", {reg.host: ("from-env", WRONG)})
    refused = run_imc(home, *pull, env={"REGISTRY_AUTH_FILE": str(env_file)})
    assert refused.returncode == 5 and "'from-env'" in refused.stderr
    flag_file = auth_file(tmp_path / "flag-auth.json", right)
    ok = run_imc(home, *pull, "--authfile", str(flag_file), env={"REGISTRY_AUTH_FILE": str(env_file)})
    assert ok.returncode == 0, ok.stderr


def test_authfile_that_does_not_exist_is_a_usage_error(tmp_path: Path, basic_registry: Any) -> None:
    out = run_imc(tmp_path, "pull", "--authfile", str(tmp_path / "missing.json"), f"{basic_registry.host}/a:1")
    assert out.returncode == 2 and "missing.json" in out.stderr


def test_cache_build_and_volume_push_pull_use_the_authfile(tmp_path: Path, basic_registry: Any,
                                                          token_registry: Any) -> None:
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    authfile = auth_file(tmp_path / "auth.json", {**scoped(basic_registry, "fixtures"), **scoped(token_registry, "imc")})
    flags = ("--authfile", str(authfile), "--plain-http", f"{basic_registry.host},{token_registry.host}")

    built = run_imc(home_a, "cache", "create", "web", "--image", f"{basic_registry.host}/fixtures/app:1.0",
                    *flags, "--wait", "-q")
    assert built.returncode == 0, built.stderr
    # a build in the background inherits --authfile
    background = run_imc(home_a, "cache", "create", "bg", "--image", f"{basic_registry.host}/fixtures/base:1.0",
                         *flags)
    assert background.returncode == 0, background.stderr
    caches = Caches(home_a)
    deadline = time.monotonic() + 60
    while caches.get("bg").phase == "Creating" and time.monotonic() < deadline:
        time.sleep(0.1)  # polling an observable state with a deadline
    assert caches.get("bg").phase == "Ready", caches.get("bg").message

    pushed = run_imc(home_a, "volume", "push", "web", f"{token_registry.host}/imc/web:v1", *flags, "-q")
    assert pushed.returncode == 0, pushed.stderr
    refused = run_imc(home_a, "volume", "push", "web", f"{token_registry.host}/other/web:v1", *flags, "-q")
    assert refused.returncode == 5 and "'host-wide'" in refused.stderr
    pulled = run_imc(home_b, "volume", "pull", f"{token_registry.host}/imc/web:v1", *flags, "-q")
    assert pulled.returncode == 0, pulled.stderr
    for out in (built, pushed, refused, pulled):
        assert_no_secret(out, basic_registry.password, token_registry.password)


def test_apply_builds_with_the_authfile(tmp_path: Path, basic_registry: Any) -> None:
    reg = basic_registry
    authfile = auth_file(tmp_path / "auth.json", scoped(reg, "fixtures"))
    manifest = tmp_path / "caches.yaml"

    def apply(name: str, ref: str) -> subprocess.CompletedProcess[str]:
        manifest.write_text(yaml.safe_dump({
            "apiVersion": "eci.alibabacloud.com/v1", "kind": "ImageCache",
            "metadata": {"name": name, "annotations": {"k8s.aliyun.com/plain-http-registry": reg.host}},
            "spec": {"images": [f"{reg.host}/{ref}"]}}))
        return run_imc(tmp_path / "home", "apply", "-f", str(manifest), "--authfile", str(authfile), "--wait", "-q")

    built = apply("web", "fixtures/app:1.0")
    assert built.returncode == 0, built.stderr
    assert Caches(tmp_path / "home").get("web").phase == "Ready"
    refused = apply("other", "team/other:1.0")  # outside the namespace: the wrong host-wide entry
    assert refused.returncode == 12, refused.stderr
    assert "'host-wide'" in refused.stderr
    for out in (built, refused):
        assert_no_secret(out, reg.password)
