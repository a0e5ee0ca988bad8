"""Kubernetes Secrets as pull secrets, end to end against the suite's registries with
auth: a Secret applied beside the ImageCache that names it, one Secret for two
registries, and a pod's own imagePullSecrets used for its automatic cache."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import yaml
from support.imccli import IMC, imc_env, ok


def kubectl_secret(*args: str) -> str:
    out = subprocess.run(["kubectl", "create", "secret", *args, "--dry-run=client", "-o", "yaml"],
                         capture_output=True, text=True, check=True, timeout=60)
    return out.stdout


def secret_files(home: Path) -> list[Path]:
    return sorted((home / "secrets").rglob("*.json"))


def test_apply_takes_a_secret_for_two_registries_beside_the_cache(tmp_path: Path, basic_registry: Any,
                                                                   token_registry: Any) -> None:
    home = tmp_path / "home"
    auth = base64.b64encode(f"{basic_registry.username}:{basic_registry.password}".encode()).decode()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {basic_registry.host: {"auth": auth}, token_registry.host: {"auth": auth}}}))
    secret = kubectl_secret("generic", "registries.team", "--type=kubernetes.io/dockerconfigjson",
                            f"--from-file=.dockerconfigjson={config}", "-n", "ci")
    hosts = f"{basic_registry.host},{token_registry.host}"
    manifest = tmp_path / "app.yaml"
    manifest.write_text(secret + f"""---
apiVersion: eci.alibabacloud.com/v1
kind: ImageCache
metadata:
  name: both
  annotations:
    k8s.aliyun.com/plain-http-registry: "{hosts}"
spec:
  images:
  - {basic_registry.host}/fixtures/app:1.0
  - {token_registry.host}/team/other:1.0
  imagePullSecrets:
  - ci:registries.team
""")
    out = ok(home, "apply", "-f", str(manifest), "--wait", "-q")
    assert out.stdout.splitlines()[0] == (f"secret ci:registries.team stored for "
                                          f"{', '.join(sorted([basic_registry.host, token_registry.host]))}")
    assert basic_registry.password not in out.stdout + out.stderr
    obj = yaml.safe_load(ok(home, "cache", "get", "both", "-o", "yaml").stdout)
    assert obj["status"]["phase"] == "Ready", obj["status"].get("message")
    assert obj["spec"]["imagePullSecrets"] == ["ci:registries.team"]
    [stored] = secret_files(home)
    assert stored.name == "registries.team.json" and stored.stat().st_mode & 0o777 == 0o600
    assert ok(home, "secret", "list").stdout.split() == ["ci:registries.team"]

    # An update naming a Secret of the same file is planned with that Secret counted in.
    other = kubectl_secret("generic", "other", "--type=kubernetes.io/dockerconfigjson",
                           f"--from-file=.dockerconfigjson={config}", "-n", "ci")
    renamed = manifest.read_text().split("---\n", 1)[1].replace("- ci:registries.team", "- ci:other")
    update = tmp_path / "update.yaml"
    update.write_text(other + "---\n" + renamed)
    dry = ok(home, "apply", "-f", str(update), "--dry-run")
    assert "secret ci:other would be stored" in dry.stdout
    assert "imagecache both would be configured" in dry.stdout and "imagePullSecrets" in dry.stdout
    assert ok(home, "secret", "list").stdout.split() == ["ci:registries.team"]

    # An update that is refused stores none of the file's Secrets either.
    update.write_text(other + "---\n" + renamed.replace("- ci:other", "- ci:missing"))
    refused = subprocess.run([*IMC, "apply", "-f", str(update)], env=imc_env(home), capture_output=True, text=True,
                             timeout=60, check=False)
    assert refused.returncode != 0 and "ci:missing" in refused.stderr
    assert ok(home, "secret", "list").stdout.split() == ["ci:registries.team"]


def test_bad_secret_in_a_file_applies_nothing(tmp_path: Path, basic_registry: Any) -> None:
    home = tmp_path / "home"
    manifest = tmp_path / "app.yaml"
    manifest.write_text(f"""apiVersion: eci.alibabacloud.com/v1
kind: ImageCache
metadata: {{name: web}}
spec:
  images: [{basic_registry.host}/fixtures/app:1.0]
---
apiVersion: v1
kind: Secret
metadata: {{name: cred}}
type: Opaque
data: {{password: {base64.b64encode(basic_registry.password.encode()).decode()}}}
""")
    out = subprocess.run([*IMC, "apply", "-f", str(manifest)], env=imc_env(home), capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 2
    assert out.stderr.startswith("imc: error: document 2: ") and "has type 'Opaque'" in out.stderr
    assert secret_files(home) == [] and ok(home, "cache", "list").stdout.strip() == "No image caches."


def test_secret_from_kubectl_file_and_the_pods_own_pull_secrets_for_its_automatic_cache(
        tmp_path: Path, basic_registry: Any) -> None:
    home = tmp_path / "home"
    secret = tmp_path / "secret.yaml"
    secret.write_text(kubectl_secret("docker-registry", "cred.v1", f"--docker-server={basic_registry.host}",
                                     f"--docker-username={basic_registry.username}",
                                     f"--docker-password={basic_registry.password}"))
    stored = subprocess.run([*IMC, "secret", "create", "team:cred.v1", "--from-file", str(secret)],
                            env=imc_env(home), capture_output=True, text=True, timeout=60, check=False)
    assert stored.returncode == 0, stored.stderr
    assert stored.stdout == f"secret team:cred.v1 stored for {basic_registry.host}\n"
    pod = tmp_path / "pod.yaml"
    pod.write_text(f"""apiVersion: v1
kind: Pod
metadata:
  name: web-0
  namespace: team
  annotations:
    k8s.aliyun.com/eci-image-cache: "true"
    k8s.aliyun.com/plain-http-registry: "{basic_registry.host}"
spec:
  imagePullSecrets:
  - name: cred.v1
  containers:
  - name: app
    image: {basic_registry.host}/fixtures/app:1.0
    imagePullPolicy: IfNotPresent
""")
    out = ok(home, "match", "-f", str(pod), "--wait", "-q", "-o", "json")
    result = json.loads(out.stdout)
    assert result["created"] and result["cache"]["name"] == "auto-create-for-web-0"
    obj = yaml.safe_load(ok(home, "cache", "get", "auto-create-for-web-0", "-o", "yaml").stdout)
    assert obj["status"]["phase"] == "Ready", obj["status"].get("message")
    assert obj["spec"]["imagePullSecrets"] == ["team:cred.v1"]
