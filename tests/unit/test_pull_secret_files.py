"""Pull secrets from the files users have: the Secrets kubectl prints (dockerconfigjson,
the older dockercfg, stringData) and plain config.json, with several registries."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.errors import ValidationError
from builder.registry.auth import SecretStore, pull_secret_from_object

PASSWORD = "s3cret-Pa55"


def kubectl(*args: str) -> Any:
    """A Secret exactly as ``kubectl create secret … --dry-run=client -o yaml`` prints it."""
    out = subprocess.run(["kubectl", "create", "secret", *args, "--dry-run=client", "-o", "yaml"],
                         capture_output=True, text=True, check=True, timeout=60)
    return yaml.safe_load(out.stdout)


def test_docker_registry_secret_from_kubectl_with_a_dotted_name() -> None:
    obj = kubectl("docker-registry", "regcred.v2", "--docker-server=127.0.0.1:5000", "--docker-username=me",
                  f"--docker-password={PASSWORD}", "-n", "team")
    ref, auths = pull_secret_from_object(obj, "secret.yaml")
    assert ref == "team:regcred.v2"
    assert list(auths) == ["127.0.0.1:5000"] and auths["127.0.0.1:5000"]["password"] == PASSWORD


def test_namespace_defaults_to_default() -> None:
    obj = kubectl("docker-registry", "regcred", "--docker-server=https://index.docker.io/v1/",
                  "--docker-username=me", f"--docker-password={PASSWORD}")
    ref, auths = pull_secret_from_object(obj, "secret.yaml")
    assert ref == "default:regcred" and list(auths) == ["docker.io"]


def test_several_registries_in_one_dockerconfigjson(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    auth = base64.b64encode(f"me:{PASSWORD}".encode()).decode()
    config.write_text(json.dumps({"auths": {"a.example:5000": {"auth": auth},
                                            "b.example": {"username": "me", "password": PASSWORD}}}))
    obj = kubectl("generic", "multi", "--type=kubernetes.io/dockerconfigjson",
                  f"--from-file=.dockerconfigjson={config}")
    ref, auths = pull_secret_from_object(obj, "secret.yaml")
    assert ref == "default:multi" and sorted(auths) == ["a.example:5000", "b.example"]
    store = SecretStore(tmp_path / "secrets")
    path = store.store(ref, auths)
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = store.load(ref)
    assert loaded.lookup("a.example:5000").password == PASSWORD  # type: ignore[union-attr]
    assert loaded.lookup("b.example").username == "me"  # type: ignore[union-attr]
    # The plain config.json is accepted as it is, too.
    assert pull_secret_from_object(json.loads(config.read_text()), "config.json") == (None, auths)


def test_legacy_dockercfg_and_string_data() -> None:
    auth = base64.b64encode(f"me:{PASSWORD}".encode()).decode()
    obj = kubectl("generic", "old", "--type=kubernetes.io/dockercfg",
                  f"--from-literal=.dockercfg={json.dumps({'old.example': {'auth': auth, 'email': 'x@y'}})}")
    _, auths = pull_secret_from_object(obj, "secret.yaml")
    assert auths == {"old.example": {"auth": auth}}  # only the credential fields are kept
    string_data = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "ns"},
                   "type": "kubernetes.io/dockerconfigjson",
                   "stringData": {".dockerconfigjson": json.dumps({"auths": {"h:1": {"auth": auth}}})}}
    assert pull_secret_from_object(string_data, "s.yaml") == ("ns:s", {"h:1": {"auth": auth}})


def test_credential_helpers_in_a_file_are_not_kept() -> None:
    auth = base64.b64encode(b"me:pw").decode()
    _, auths = pull_secret_from_object({"auths": {"h:1": {"auth": auth}}, "credsStore": "evil",
                                        "credHelpers": {"h:1": "evil"}}, "config.json")
    assert auths == {"h:1": {"auth": auth}}


def secret(**fields: Any) -> dict[str, Any]:
    base = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "cred"},
            "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": base64.b64encode(json.dumps(
                {"auths": {"h:1": {"username": "me", "password": PASSWORD}}}).encode()).decode()}}
    return {**base, **fields}


@pytest.mark.parametrize(("obj", "message"), [
    (secret(type="Opaque"), "has type 'Opaque': want kubernetes.io/dockerconfigjson or kubernetes.io/dockercfg"),
    (secret(data={}), "has no data..dockerconfigjson"),
    (secret(data={".dockerconfigjson": "not base64!"}), "is not base64"),
    (secret(data={".dockerconfigjson": base64.b64encode(PASSWORD.encode()).decode()}), "is not JSON"),
    (secret(stringData={".dockerconfigjson": '{"auths": {}}'}), "no registry credentials"),
    (secret(stringData={".dockerconfigjson": json.dumps({"auths": {"h:1": {"auth": "@@" + PASSWORD}}})}),
     "registry h:1: credentials entry has an 'auth' field that is not base64"),
    (secret(metadata={"name": "Bad_Name"}), "invalid pull secret 'default:Bad_Name'"),
    (secret(apiVersion="v2"), "Secret apiVersion: want v1"),
    ({"kind": "ConfigMap"}, "want a Secret of type kubernetes.io/dockerconfigjson or a docker config.json"),
])
def test_bad_secrets_are_refused_without_showing_credentials(obj: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as err:
        pull_secret_from_object(obj, "secret.yaml")
    assert message in err.value.message
    assert PASSWORD not in err.value.message and "\n" not in err.value.message
