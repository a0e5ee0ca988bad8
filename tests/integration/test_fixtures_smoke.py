"""The harness itself works: every registry mode serves the catalogue as recorded.

These read through the real registry with plain ``requests`` (no imc code), so a
failure here means the fixtures, not the code under test, are broken.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from typing import Any

import pytest
import requests
from imagegen import ACCEPT_MANIFESTS, LARGE_REF, parse_challenge
from regfix import Endpoint

# Images read in each mode: a Docker v2 manifest, an OCI index, a second repository.
REFS = ["fixtures/base:1.0", "fixtures/multi:1.0", "team/other:1.0"]


def _get(endpoint: Endpoint, path: str, headers: dict[str, str] | None = None,
         auth: Any = None) -> requests.Response:
    return requests.get(endpoint.url(path), headers=headers or {}, auth=auth, verify=endpoint.verify, timeout=30)


def _check_manifest(resp: requests.Response, entry: dict[str, Any]) -> None:
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == entry["mediaType"]
    assert resp.headers["Docker-Content-Digest"] == entry["digest"]
    assert "sha256:" + hashlib.sha256(resp.content).hexdigest() == entry["digest"]
    assert len(resp.content) == entry["size"]


def _check_blob(resp: requests.Response, layer: dict[str, Any]) -> None:
    assert resp.status_code == 200, resp.text
    assert "sha256:" + hashlib.sha256(resp.content).hexdigest() == layer["digest"]
    assert len(resp.content) == layer["size"]


def _read_image(endpoint: Endpoint, catalogue: dict[str, Any], ref: str, auth: Any = None,
                headers: dict[str, str] | None = None) -> None:
    entry = catalogue["images"][ref]
    repo, tag = ref.rsplit(":", 1)
    _check_manifest(_get(endpoint, f"/v2/{repo}/manifests/{tag}", {"Accept": ACCEPT_MANIFESTS, **(headers or {})}, auth), entry)
    layer = entry["manifests"][0]["layers"][-1]
    _check_blob(_get(endpoint, f"/v2/{repo}/blobs/{layer['digest']}", headers, auth), layer)


@pytest.mark.parametrize("ref", REFS)
def test_plain_serves_catalogue(plain_registry: Endpoint, catalogue: dict[str, Any], ref: str) -> None:
    _read_image(plain_registry, catalogue, ref)


@pytest.mark.parametrize("ref", REFS)
def test_tls_serves_catalogue_with_ca(tls_registry: Endpoint, catalogue: dict[str, Any], ref: str) -> None:
    assert tls_registry.scheme == "https" and tls_registry.ca_file
    _read_image(tls_registry, catalogue, ref)


def test_tls_rejects_unknown_ca(tls_registry: Endpoint) -> None:
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(tls_registry.url("/v2/"), timeout=10)


@pytest.mark.parametrize("ref", REFS)
def test_basic_serves_catalogue_with_credentials(basic_registry: Endpoint, catalogue: dict[str, Any], ref: str) -> None:
    _read_image(basic_registry, catalogue, ref, auth=basic_registry.auth)


def test_basic_rejects_wrong_password(basic_registry: Endpoint) -> None:
    resp = _get(basic_registry, "/v2/fixtures/base/manifests/1.0", {"Accept": ACCEPT_MANIFESTS},
                auth=(basic_registry.username, "not-the-password"))
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"].startswith("Basic ")
    assert _get(basic_registry, "/v2/").status_code == 401


def _token_for(endpoint: Endpoint, path: str) -> str:
    """Follow the registry's Bearer challenge for ``path`` and return a token."""
    challenge = _get(endpoint, path, {"Accept": ACCEPT_MANIFESTS})
    assert challenge.status_code == 401
    scheme, params = parse_challenge(challenge.headers["WWW-Authenticate"])
    assert scheme == "bearer"
    assert params["realm"] == f"{endpoint.token_url}/token"
    resp = requests.get(params["realm"], params={"service": params["service"], "scope": params["scope"]},
                        auth=endpoint.auth, timeout=10)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["token"] == body["access_token"] and body["expires_in"] > 0
    return str(body["token"])


@pytest.mark.parametrize("ref", REFS)
def test_token_serves_catalogue_through_challenge(token_registry: Endpoint, catalogue: dict[str, Any], ref: str) -> None:
    repo, tag = ref.rsplit(":", 1)
    token = _token_for(token_registry, f"/v2/{repo}/manifests/{tag}")
    _read_image(token_registry, catalogue, ref, headers={"Authorization": f"Bearer {token}"})


def test_token_is_scoped_per_repository_and_counted(token_registry: Endpoint) -> None:
    stats_url = f"{token_registry.token_url}/stats"
    requests.post(f"{stats_url}/reset", timeout=10).raise_for_status()
    token = _token_for(token_registry, "/v2/fixtures/base/manifests/1.0")
    other = _get(token_registry, "/v2/team/other/manifests/1.0",
                 {"Accept": ACCEPT_MANIFESTS, "Authorization": f"Bearer {token}"})
    assert other.status_code == 401
    assert 'error="insufficient_scope"' in other.headers["WWW-Authenticate"]
    stats = requests.get(stats_url, timeout=10).json()
    assert stats["issued"] == 1
    assert stats["by_scope"] == {"repository:fixtures/base:pull": 1}


def test_token_issuer_requires_credentials(token_registry: Endpoint) -> None:
    url = f"{token_registry.token_url}/token"
    assert requests.get(url, params={"scope": "repository:fixtures/base:pull"}, timeout=10).status_code == 401
    assert requests.get(url, auth=(token_registry.username, "wrong"), timeout=10).status_code == 401


def test_catalogue_shape(catalogue: dict[str, Any]) -> None:
    images = catalogue["images"]
    standard = {"fixtures/base:1.0", "fixtures/app:1.0", "fixtures/app:2.0", "fixtures/oci-app:1.0",
                "fixtures/multi:1.0", "fixtures/docker-multi:1.0", "team/other:1.0"}
    # fixtures/large:1.0 joins once a test has used the large_image fixture
    assert set(images) - {LARGE_REF} == standard
    base_layers = [layer["digest"] for layer in images["fixtures/base:1.0"]["manifests"][0]["layers"]]
    assert [layer["digest"] for layer in images["fixtures/app:2.0"]["manifests"][0]["layers"]][:2] == base_layers
    oci = images["fixtures/oci-app:1.0"]["manifests"][0]["layers"]
    assert oci[0]["digest"] == base_layers[0]
    assert [layer["mediaType"].rsplit(".", 1)[1] for layer in oci] == ["tar+gzip", "tar+zstd", "tar"]
    multi = images["fixtures/multi:1.0"]["manifests"]
    assert [m["platform"]["architecture"] for m in multi] == ["amd64", "arm64", "unknown"]
    assert multi[2]["annotations"]["vnd.docker.reference.digest"] == multi[0]["digest"]
    blob_sizes = {b["digest"]: b["size"] for b in catalogue["blobs"]}
    for entry in images.values():
        for m in entry["manifests"]:
            assert m["totalLayerBytes"] == sum(layer["size"] for layer in m["layers"])
            assert all(blob_sizes[layer["digest"]] == layer["size"] for layer in m["layers"])


def test_skopeo_inspect_plain(plain_registry: Endpoint, catalogue: dict[str, Any]) -> None:
    result = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{plain_registry.host}/fixtures/oci-app:1.0"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    entry = catalogue["images"]["fixtures/oci-app:1.0"]
    assert info["Digest"] == entry["digest"]
    assert info["Layers"] == [layer["digest"] for layer in entry["manifests"][0]["layers"]]
