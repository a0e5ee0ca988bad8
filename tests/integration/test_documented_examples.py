"""The documentation's ImageCache examples apply as written: only the registry host is
the suite's (its basic-auth registry:2, which speaks plain HTTP, so each example also
lists it in k8s.aliyun.com/plain-http-registry) and the pull secrets exist."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml
from support.imccli import IMC, imc_env, ok

EXAMPLES = """\
apiVersion: eci.alibabacloud.com/v1
kind: ImageCache
metadata:
  name: imagecache-sample
  annotations:
    k8s.aliyun.com/vswitch-ids: "vsw-2zeet2ksvw7f14ryz****"
    k8s.aliyun.com/security-group-id: "sg-2ze63v3jtm8e6s****"
    k8s.aliyun.com/plain-http-registry: "REGISTRY"
spec:
  images:
  - REGISTRY/fixtures/app:1.0
  - REGISTRY/fixtures/base:1.0
  imagePullSecrets:
  - default:secret1
  - default:secret2
  - kube-system:secret3
  imageCacheSize:
   25
  retentionDays:
   7
---
apiVersion: eci.alibabacloud.com/v1
kind: ImageCache
metadata:
  name: imagecache-defaults
  annotations:
    k8s.aliyun.com/plain-http-registry: "REGISTRY"
spec:
  images:
  - REGISTRY/fixtures/oci-app:1.0
  imagePullSecrets:
  - default:secret1
  imageCacheSize:
  retentionDays:
---
apiVersion: eci.alibabacloud.com/v1
kind: ImageCache
metadata:
  name: imagecache-eip
  annotations:
    k8s.aliyun.com/resource-group-id: "rg-acfmzw2jz2z****"
    k8s.aliyun.com/acr-instance-ids: "cri-j36zhodptmyq****"
    k8s.aliyun.com/auto-create-eip: "true"
    k8s.aliyun.com/eip-bandwidth: "5"
    k8s.aliyun.com/eip-internet-charge-type: "PayByTraffic"
    k8s.aliyun.com/eip-isp: "BGP"
    k8s.aliyun.com/eip-common-bandwidth-package-id: "cbwp-2zeukbj916scmj51m****"
    k8s.aliyun.com/imc-enable-reuse: "true"
    k8s.aliyun.com/plain-http-registry: "REGISTRY"
spec:
  images:
  - REGISTRY/fixtures/app:2.0
  imagePullSecrets:
  - default:secret1
  imageCacheSize: 30
---
apiVersion: eci.alibabacloud.com/v1
kind: ImageCache
metadata:
  name: imagecache-flash
  annotations:
    k8s.aliyun.com/eip-instance-id: "eip-bp1q5n8cq4p7f6dzu****"
    k8s.aliyun.com/imc-enable-flash: "true"
    k8s.aliyun.com/imc-retention-days: "3"
    k8s.aliyun.com/plain-http-registry: "REGISTRY"
spec:
  images:
  - REGISTRY/fixtures/multi:1.0
  imagePullSecrets:
  - default:secret1
"""

CLOUD_ONLY = {
    "imagecache-sample": ["vswitch-ids", "security-group-id"],
    "imagecache-defaults": [],
    "imagecache-eip": ["resource-group-id", "acr-instance-ids", "auto-create-eip", "eip-bandwidth",
                       "eip-internet-charge-type", "eip-isp", "eip-common-bandwidth-package-id"],
    "imagecache-flash": ["eip-instance-id"],
}


def test_documented_examples_apply_as_written(tmp_path: Path, basic_registry: Any) -> None:
    home = tmp_path / "home"
    for secret in ("default:secret1", "default:secret2", "kube-system:secret3"):
        created = subprocess.run([*IMC, "secret", "create", secret, "--registry", basic_registry.host, "--username",
                                  basic_registry.username, "--password-stdin"], input=basic_registry.password + "\n",
                                 env=imc_env(home), capture_output=True, text=True, timeout=60, check=False)
        assert created.returncode == 0, created.stderr
    examples = tmp_path / "imagecaches.yaml"
    examples.write_text(EXAMPLES.replace("REGISTRY", basic_registry.host))

    out = ok(home, "apply", "-f", str(examples), "--wait", "-q")
    assert out.stdout.count(" created (imc-") == 4

    caches = {name: yaml.safe_load(ok(home, "cache", "get", name, "-o", "yaml").stdout) for name in CLOUD_ONLY}
    for name, obj in caches.items():
        assert obj["status"]["phase"] == "Ready", (name, obj["status"].get("message"))
        events = obj["status"]["events"]
        assert not [e for e in events if e["reason"] == "UnknownAnnotation"], name
        ignored = [e for e in events if e["reason"] == "AnnotationIgnored"]
        if CLOUD_ONLY[name]:
            [event] = ignored
            assert all(f"k8s.aliyun.com/{key}" in event["message"] for key in CLOUD_ONLY[name])
            assert all(f"k8s.aliyun.com/{key}" in obj["metadata"]["annotations"] for key in CLOUD_ONLY[name])
        else:
            assert ignored == []

    sample = caches["imagecache-sample"]
    assert sample["spec"]["imageCacheSize"] == 25 and sample["spec"]["retentionDays"] == 7
    assert sample["spec"]["imagePullSecrets"] == ["default:secret1", "default:secret2", "kube-system:secret3"]
    assert sample["status"]["expireDateTime"] is not None
    defaults = caches["imagecache-defaults"]
    assert defaults["spec"]["imageCacheSize"] == 20 and "retentionDays" not in defaults["spec"]
    assert defaults["status"]["expireDateTime"] is None
    assert caches["imagecache-eip"]["spec"]["imageCacheSize"] == 30
    assert caches["imagecache-eip"]["metadata"]["annotations"]["k8s.aliyun.com/imc-enable-reuse"] == "true"
    flash = caches["imagecache-flash"]
    assert flash["spec"]["retentionDays"] == 3
    assert any(e["reason"] == "FlashReady" for e in flash["status"]["events"])
