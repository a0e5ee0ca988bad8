"""The pull path against real registry:2 processes, in every mode the harness runs.

Library-level tests check what was stored (every blob verified against the
catalogue the harness wrote); CLI-level tests check what a user sees: one line,
the right exit code, and nothing left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
from support.cutproxy import CutProxy

from builder.digest import Digest
from builder.errors import AuthError, TLSError
from builder.oci import Platform
from builder.pull import Puller
from builder.reference import parse
from builder.registry.auth import DockerConfig, Keychain, TokenCache
from builder.registry.hosts import HostPolicy
from builder.store import Store

IMC = [sys.executable, "-m", "builder"]


def blobs_of(catalogue: dict[str, Any], ref: str, platform: str = "linux/amd64") -> list[dict[str, Any]]:
    """The config and layers of ``ref`` for ``platform`` as the harness pushed them."""
    for m in catalogue["images"][ref]["manifests"]:
        p = m.get("platform") or {}
        if f"{p.get('os')}/{p.get('architecture')}" == platform:
            return [m["config"], *m["layers"]]
    raise AssertionError(f"{ref} has no {platform} manifest")


def assert_stored(store: Store, blobs: list[dict[str, Any]]) -> None:
    """Every blob is in the store, byte-exact: rehash it here, independently of imc."""
    for blob in blobs:
        path = store.blob_path(Digest.parse(blob["digest"]))
        data = path.read_bytes()
        assert len(data) == blob["size"]
        assert "sha256:" + hashlib.sha256(data).hexdigest() == blob["digest"]


def keychain_for(endpoint: Any) -> Keychain:
    return Keychain([DockerConfig(auths={endpoint.host: {"username": endpoint.username,
                                                          "password": endpoint.password}})],
                    use_docker_config=False)


def run_imc(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IMC_HOME": str(home), "DOCKER_CONFIG": str(home / "no-docker-config")}
    return subprocess.run([*IMC, *args], capture_output=True, text=True, input=stdin, env=env, timeout=120)


def store_files(home: Path) -> list[str]:
    """Every blob and partial file under an imc home."""
    return sorted(str(p.relative_to(home)) for p in home.rglob("*")
                  if p.is_file() and ("blobs" in p.parts or "ingest" in p.parts))


# -- each registry mode -------------------------------------------------------------------


def test_plain_http_pull_stores_every_blob_verified(tmp_path: Path, plain_registry: Any,
                                                    catalogue: dict[str, Any]) -> None:
    store = Store(tmp_path)
    puller = Puller(store, HostPolicy(plain_http=frozenset({plain_registry.host})))
    result = puller.pull([parse(f"{plain_registry.host}/fixtures/app:1.0")])
    blobs = blobs_of(catalogue, "fixtures/app:1.0")
    assert_stored(store, blobs)
    assert result.bytes_fetched == sum(b["size"] for b in blobs)
    (image,) = store.images()
    assert image.name == f"{plain_registry.host}/fixtures/app:1.0"
    assert str(image.descriptor.digest) == catalogue["images"]["fixtures/app:1.0"]["digest"]


def test_tls_verified_with_the_ca(tmp_path: Path, tls_registry: Any, catalogue: dict[str, Any]) -> None:
    store = Store(tmp_path)
    Puller(store, HostPolicy(ca_file=tls_registry.ca_file)).pull([parse(f"{tls_registry.host}/fixtures/oci-app:1.0")])
    assert_stored(store, blobs_of(catalogue, "fixtures/oci-app:1.0"))


def test_tls_without_the_ca_fails_and_names_the_flags(tmp_path: Path, tls_registry: Any) -> None:
    store = Store(tmp_path)
    with pytest.raises(TLSError) as err:
        Puller(store).pull([parse(f"{tls_registry.host}/fixtures/base:1.0")])
    assert "certificate verify failed" in err.value.message
    assert f"--insecure {tls_registry.host}" in err.value.message
    assert list(store.all_blobs()) == []


def test_tls_listed_insecure_skips_verification(tmp_path: Path, tls_registry: Any, catalogue: dict[str, Any]) -> None:
    store = Store(tmp_path)
    Puller(store, HostPolicy(insecure=frozenset({tls_registry.host}))).pull(
        [parse(f"{tls_registry.host}/fixtures/base:1.0")])
    assert_stored(store, blobs_of(catalogue, "fixtures/base:1.0"))


def test_insecure_listing_matches_the_port_exactly(tmp_path: Path, tls_registry: Any) -> None:
    host_only = tls_registry.host.split(":")[0]
    with pytest.raises(TLSError):
        Puller(Store(tmp_path), HostPolicy(insecure=frozenset({host_only}))).pull(
            [parse(f"{tls_registry.host}/fixtures/base:1.0")])


def test_basic_auth_through_a_pull_secret(tmp_path: Path, basic_registry: Any, catalogue: dict[str, Any]) -> None:
    home = tmp_path / "home"
    created = run_imc(home, "secret", "create", "team:registry", "--registry", basic_registry.host,
                      "--username", basic_registry.username, "--password-stdin", stdin=basic_registry.password + "\n")
    assert created.returncode == 0, created.stderr
    assert basic_registry.password not in created.stdout + created.stderr
    secret_file = home / "secrets" / "team" / "registry.json"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    pulled = run_imc(home, "pull", "-q", "--plain-http", basic_registry.host, "--pull-secret", "team:registry",
                     f"{basic_registry.host}/fixtures/app:1.0")
    assert pulled.returncode == 0, pulled.stderr
    assert_stored(Store(home), blobs_of(catalogue, "fixtures/app:1.0"))


def test_basic_auth_wrong_password_is_one_line_exit_5_without_the_password(tmp_path: Path,
                                                                          basic_registry: Any) -> None:
    home = tmp_path / "home"
    wrong = "not-the-password-" + basic_registry.password[:4]
    run_imc(home, "secret", "create", "team:wrong", "--registry", basic_registry.host,
            "--username", basic_registry.username, "--password-stdin", stdin=wrong + "\n")
    pulled = run_imc(home, "pull", "--plain-http", basic_registry.host, "--pull-secret", "team:wrong",
                     f"{basic_registry.host}/fixtures/app:1.0")
    assert pulled.returncode == 5
    assert pulled.stderr.count("\n") == 1 and pulled.stderr.startswith("imc: error:")
    assert "rejected" in pulled.stderr
    assert wrong not in pulled.stderr + pulled.stdout
    assert store_files(home) == []


def test_basic_auth_without_credentials_says_so(tmp_path: Path, basic_registry: Any) -> None:
    with pytest.raises(AuthError, match="requires credentials"):
        Puller(Store(tmp_path), HostPolicy(plain_http=frozenset({basic_registry.host})),
               Keychain(use_docker_config=False)).pull([parse(f"{basic_registry.host}/fixtures/base:1.0")])


def _token_stats(endpoint: Any) -> dict[str, int]:
    return requests.get(f"{endpoint.token_url}/stats", timeout=10).json()["by_scope"]


def test_token_auth_across_two_repositories_and_past_expiry(tmp_path: Path, token_registry: Any,
                                                           catalogue: dict[str, Any]) -> None:
    requests.post(f"{token_registry.token_url}/stats/reset", timeout=10).raise_for_status()
    now = [1000.0]
    tokens = TokenCache(clock=lambda: now[0])
    store = Store(tmp_path)
    puller = Puller(store, HostPolicy(plain_http=frozenset({token_registry.host})), keychain_for(token_registry),
                    tokens=tokens)
    puller.pull([parse(f"{token_registry.host}/fixtures/app:1.0"), parse(f"{token_registry.host}/team/other:1.0")])
    assert_stored(store, blobs_of(catalogue, "fixtures/app:1.0") + blobs_of(catalogue, "team/other:1.0"))
    # One token per repository scope, reused for every manifest and blob of it.
    assert _token_stats(token_registry) == {"repository:fixtures/app:pull": 1, "repository:team/other:pull": 1}

    now[0] += 3600  # past the token's lifetime: the next pull must ask for a fresh one
    puller.pull([parse(f"{token_registry.host}/fixtures/app:2.0")])
    assert _token_stats(token_registry)["repository:fixtures/app:pull"] == 2
    assert_stored(store, blobs_of(catalogue, "fixtures/app:2.0"))


def test_token_refused_by_the_registry_is_refreshed(tmp_path: Path, token_registry: Any) -> None:
    requests.post(f"{token_registry.token_url}/stats/reset", timeout=10).raise_for_status()
    tokens = TokenCache()
    puller = Puller(Store(tmp_path), HostPolicy(plain_http=frozenset({token_registry.host})),
                    keychain_for(token_registry), tokens=tokens)
    puller.pull([parse(f"{token_registry.host}/fixtures/base:1.0")])
    transport = puller.registry(token_registry.host).transport
    key = transport._token_key(transport._challenge, "repository:fixtures/base:pull")  # type: ignore[arg-type]
    tokens.put(key, "revoked-token", 3600)  # the registry will answer 401 to it
    puller.pull([parse(f"{token_registry.host}/fixtures/base:1.0")])
    assert _token_stats(token_registry)["repository:fixtures/base:pull"] == 2


def test_multi_arch_index_selects_the_platform(tmp_path: Path, plain_registry: Any, catalogue: dict[str, Any]) -> None:
    store = Store(tmp_path)
    ref = "fixtures/multi:1.0"
    result = Puller(store, HostPolicy(plain_http=frozenset({plain_registry.host})),
                    platform=Platform.parse("linux/arm64")).pull([parse(f"{plain_registry.host}/{ref}")])
    assert_stored(store, blobs_of(catalogue, ref, "linux/arm64"))
    assert str(result.images[0].index_digest) == catalogue["images"][ref]["digest"]
    assert store.has(Digest.parse(catalogue["images"][ref]["digest"]))
    amd64_only = {b["digest"] for b in blobs_of(catalogue, ref)} - {b["digest"] for b in blobs_of(catalogue, ref, "linux/arm64")}
    assert not any(store.has(Digest.parse(d)) for d in amd64_only)


def test_docker_manifest_list_and_unknown_platform(tmp_path: Path, plain_registry: Any) -> None:
    home = tmp_path / "home"
    out = run_imc(home, "pull", "--plain-http", plain_registry.host, "--platform", "linux/s390x",
                  f"{plain_registry.host}/fixtures/docker-multi:1.0")
    assert out.returncode == 7
    assert "no image for platform linux/s390x" in out.stderr and "linux/arm64" in out.stderr


def test_skopeo_reads_oci_images_from_the_store(tmp_path: Path, plain_registry: Any, catalogue: dict[str, Any]) -> None:
    store = Store(tmp_path)
    name = f"{plain_registry.host}/fixtures/oci-app:1.0"
    Puller(store, HostPolicy(plain_http=frozenset({plain_registry.host}))).pull([parse(name)])
    out = subprocess.run(["skopeo", "inspect", f"oci:{store.home.store}:{name}"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["Digest"] == catalogue["images"]["fixtures/oci-app:1.0"]["digest"]


# -- reuse, resume, concurrency ---------------------------------------------------------------


def test_second_image_fetches_only_the_blobs_not_yet_stored(tmp_path: Path, plain_registry: Any,
                                                           catalogue: dict[str, Any]) -> None:
    store = Store(tmp_path)
    puller = Puller(store, HostPolicy(plain_http=frozenset({plain_registry.host})))
    puller.pull([parse(f"{plain_registry.host}/fixtures/app:1.0")])
    held = {b["digest"] for b in blobs_of(catalogue, "fixtures/app:1.0")}
    second = blobs_of(catalogue, "fixtures/app:2.0")
    result = puller.pull([parse(f"{plain_registry.host}/fixtures/app:2.0")])
    assert result.bytes_fetched == sum(b["size"] for b in second if b["digest"] not in held)
    assert result.bytes_reused == sum(b["size"] for b in second if b["digest"] in held)
    assert result.blobs_reused >= 2


def test_dropped_connection_mid_blob_resumes_with_range(tmp_path: Path, plain_registry: Any,
                                                       catalogue: dict[str, Any]) -> None:
    host, port = plain_registry.host.split(":")
    with CutProxy((host, int(port)), cut_after=150_000) as proxy:
        store = Store(tmp_path)
        Puller(store, HostPolicy(plain_http=frozenset({proxy.host})), concurrency=1).pull(
            [parse(f"{proxy.host}/fixtures/base:1.0")])
    assert proxy.cut
    ranges = [line for req in proxy.requests for line in req.split("\r\n") if line.lower().startswith("range:")]
    assert len(ranges) == 1 and ranges[0].lower().startswith("range: bytes=") and not ranges[0].endswith("=0-")
    assert_stored(store, blobs_of(catalogue, "fixtures/base:1.0"))
    assert list(store.home.ingest.iterdir()) == []


def test_two_processes_pulling_the_same_image_fetch_each_blob_once(tmp_path: Path, plain_registry: Any,
                                                                  catalogue: dict[str, Any]) -> None:
    home = tmp_path / "home"
    Store(home)  # create the layout first so both processes start on equal terms
    env = {**os.environ, "IMC_HOME": str(home)}
    args = [*IMC, "pull", "-o", "json", "--plain-http", plain_registry.host,
            f"{plain_registry.host}/fixtures/app:1.0", f"{plain_registry.host}/fixtures/oci-app:1.0"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    results = [json.loads(o[0]) for o in outs]
    fetched: dict[str, int] = {}
    for result in results:
        by_this_process = {b["digest"] for image in result["images"] for b in image["blobs"] if b["fetched"]}
        for digest in by_this_process:
            fetched[digest] = fetched.get(digest, 0) + 1
    unique = {b["digest"] for ref in ("fixtures/app:1.0", "fixtures/oci-app:1.0") for b in blobs_of(catalogue, ref)}
    assert set(fetched) == unique
    assert all(count == 1 for count in fetched.values()), fetched
    assert_stored(Store(home), [b for ref in ("fixtures/app:1.0", "fixtures/oci-app:1.0")
                                for b in blobs_of(catalogue, ref)])


# -- bad input from the command line ------------------------------------------------------------


@pytest.mark.parametrize("ref", ["Bad/Repo:1", "app:", "app@sha256:1234", "a//b"])
def test_malformed_reference_exit_2(tmp_path: Path, ref: str) -> None:
    out = run_imc(tmp_path / "home", "pull", ref)
    assert out.returncode == 2
    assert out.stderr.startswith("imc: error: invalid ") and out.stderr.count("\n") == 1


def test_refused_connection_exit_3(tmp_path: Path) -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = run_imc(tmp_path / "home", "pull", "--plain-http", f"127.0.0.1:{port}", f"127.0.0.1:{port}/x/y:1")
    assert out.returncode == 3
    assert "connection refused" in out.stderr and out.stderr.count("\n") == 1


def test_unknown_tag_and_repository_exit_6(tmp_path: Path, plain_registry: Any) -> None:
    home = tmp_path / "home"
    for ref in ("fixtures/app:9.9", "nope/missing:1.0"):
        out = run_imc(home, "pull", "--plain-http", plain_registry.host, f"{plain_registry.host}/{ref}")
        assert out.returncode == 6, out.stderr
        assert "not found" in out.stderr
        assert "MANIFEST_UNKNOWN" in out.stderr or "NAME_UNKNOWN" in out.stderr
    assert store_files(home) == []


def test_pull_by_a_digest_that_is_not_there_exit_6(tmp_path: Path, plain_registry: Any) -> None:
    out = run_imc(tmp_path / "home", "pull", "--plain-http", plain_registry.host,
                  f"{plain_registry.host}/fixtures/app@sha256:{'ab' * 32}")
    assert out.returncode == 6


def test_pull_by_digest_verifies(tmp_path: Path, plain_registry: Any, catalogue: dict[str, Any]) -> None:
    digest = catalogue["images"]["fixtures/base:1.0"]["digest"]
    out = run_imc(tmp_path / "home", "pull", "-o", "json", "--plain-http", plain_registry.host,
                  f"{plain_registry.host}/fixtures/base@{digest}")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["images"][0]["digest"] == digest


def test_layers_list_inspect_verify_and_gc(tmp_path: Path, plain_registry: Any, catalogue: dict[str, Any]) -> None:
    home = tmp_path / "home"
    for ref in ("fixtures/app:1.0", "fixtures/app:2.0"):
        assert run_imc(home, "pull", "-q", "--plain-http", plain_registry.host,
                       f"{plain_registry.host}/{ref}").returncode == 0
    listed = json.loads(run_imc(home, "layers", "list", "-o", "json").stdout)
    by_digest = {row["digest"]: row for row in listed}
    shared = blobs_of(catalogue, "fixtures/base:1.0")[1]["digest"]
    assert sorted(by_digest[shared]["images"]) == [f"{plain_registry.host}/fixtures/app:1.0",
                                                   f"{plain_registry.host}/fixtures/app:2.0"]
    inspected = json.loads(run_imc(home, "layers", "inspect", shared[7:19], "-o", "json").stdout)
    assert inspected["digest"] == shared and inspected["compression"] == "gzip"

    verified = run_imc(home, "layers", "verify", "-o", "json")
    assert verified.returncode == 0 and json.loads(verified.stdout)["ok"]

    # Corrupt one blob behind imc's back: verify finds it, quarantines it, exits 4.
    victim = Store(home).blob_path(Digest.parse(shared))
    victim.chmod(0o644)
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    verified = run_imc(home, "layers", "verify", "-o", "json")
    assert verified.returncode == 4
    report = json.loads(verified.stdout)
    assert report["corrupt"] == [shared] and shared in report["missing"]
    assert not victim.exists()

    # gc keeps what images need and removes what nothing needs: app:2.0's blobs, fetched
    # without naming the image (as a cache's build does), are needed by nothing.
    home = tmp_path / "gc-home"
    assert run_imc(home, "pull", "-q", "--plain-http", plain_registry.host,
                   f"{plain_registry.host}/fixtures/app:1.0").returncode == 0
    Puller(Store(home), HostPolicy(plain_http=frozenset({plain_registry.host}))).pull(
        [parse(f"{plain_registry.host}/fixtures/app:2.0")], record=False)
    gc = json.loads(run_imc(home, "gc", "-o", "json").stdout)
    only_v2 = {b["digest"] for b in blobs_of(catalogue, "fixtures/app:2.0")} - {
        b["digest"] for b in blobs_of(catalogue, "fixtures/app:1.0")}
    assert gc["blobsRemoved"] >= len(only_v2)
    assert not any(Store(home).has(Digest.parse(d)) for d in only_v2)
    assert Store(home).has(Digest.parse(blobs_of(catalogue, "fixtures/app:1.0")[-1]["digest"]))
