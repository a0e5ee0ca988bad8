"""``make snapshot`` as a CI job runs it: the README's plain-shell recipe against the
suite's registry:2 (a test image pushed with skopeo, the snapshot built, verified and
pushed), then imported on a second home as another node would; and its failures, which
keep imc's exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
from regfix import Endpoint
from support.ci_recipes import RECIPE_REGISTRY, RECIPE_SOURCE, ROOT, shell_recipe

IMC = Path(sys.executable).parent / "imc"
SOURCE = "fixtures/app:1.0"
MANIFEST_TYPES = "application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json"


def ci_env(home: Path, summary: Path) -> dict[str, str]:
    """The job's environment: its own imc home, a step summary file, this venv's imc."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMC_TEST_", "MAKE"))}
    return {**env, "IMC_HOME": str(home), "GITHUB_STEP_SUMMARY": str(summary), "IMC": str(IMC)}


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


def manifest_digest(registry: Endpoint, repository: str, tag: str) -> str:
    resp = requests.head(registry.url(f"/v2/{repository}/manifests/{tag}"), headers={"Accept": MANIFEST_TYPES},
                         timeout=10)
    resp.raise_for_status()
    return resp.headers["Docker-Content-Digest"]


def test_readme_shell_recipe_builds_pushes_and_another_node_pulls(
        plain_registry: Endpoint, catalogue: dict[str, Any], tmp_path: Path) -> None:
    host = plain_registry.host
    # The recipe's registry is the suite's; its public source image is a fixture there.
    recipe = (shell_recipe()
              .replace("skopeo copy ", "skopeo copy --src-tls-verify=false ")
              .replace(RECIPE_SOURCE, f"docker://{host}/{SOURCE}")
              .replace(f"{RECIPE_REGISTRY}/", f"{host}/ci-recipe/")
              .replace(RECIPE_REGISTRY, host))
    summary = tmp_path / "step-summary.md"
    summary.write_text("earlier steps\n")
    installed = (ROOT / ".venv" / ".installed").stat().st_mtime_ns if (ROOT / ".venv" / ".installed").exists() else None

    done = run(["bash", "-euo", "pipefail", "-c", recipe], ci_env(tmp_path / "build-node", summary))

    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    # The venv exists: the target neither recreates it nor installs anything.
    assert "-m venv" not in done.stdout + done.stderr and "pip install" not in done.stdout + done.stderr
    if installed is not None:
        assert (ROOT / ".venv" / ".installed").stat().st_mtime_ns == installed
    image_digest = catalogue["images"][SOURCE]["digest"]
    pushed_digest = manifest_digest(plain_registry, "ci-recipe/imc/web", "v1")
    pushed = f"{host}/ci-recipe/imc/web:v1"
    line = done.stdout.splitlines()[-1]  # after skopeo's own lines
    assert line.startswith("snapshot web: Ready, 1 image, cache imc-")
    assert line.endswith(f"pushed {pushed}@{pushed_digest}")
    for step in ("+ imc cache create web", "+ imc volume verify web", f"+ imc volume push web {pushed}"):
        assert step in done.stderr

    text = summary.read_text()
    assert text.startswith("earlier steps\n### imc snapshot `web`\n")  # appended, not replaced
    assert f"| `{host}/ci-recipe/app:1.0` | `{image_digest}` |" in text
    layers = catalogue["images"][SOURCE]["manifests"][0]
    assert f"| {(layers['config']['size'] + layers['totalLayerBytes']) / 1000:.1f} kB |" in text
    assert f"- pushed: `{pushed}@{pushed_digest}`" in text

    node = tmp_path / "other-node"
    pulled = run([str(IMC), "--home", str(node), "volume", "pull", pushed, "--plain-http", host, "-o", "json"],
                 ci_env(node, tmp_path / "unused.md"))
    assert pulled.returncode == 0, pulled.stderr
    cache = json.loads(pulled.stdout)
    assert cache["metadata"]["name"] == "web"
    assert cache["status"]["phase"] == "Ready"
    assert [i["digest"] for i in cache["status"]["images"]] == [image_digest]
    verified = run([str(IMC), "--home", str(node), "volume", "verify", "web"], ci_env(node, tmp_path / "unused.md"))
    assert verified.returncode == 0, verified.stderr


def test_failed_build_keeps_its_exit_code_and_summary(plain_registry: Endpoint, tmp_path: Path) -> None:
    host = plain_registry.host
    summary = tmp_path / "step-summary.md"
    missing = f"{host}/ci-recipe/absent:1.0"
    env = ci_env(tmp_path / "home", summary)

    direct = run([sys.executable, "scripts/snapshot.py", "--name", "broken", "--images", missing,
                  "--plain-http", host, "--push", f"{host}/ci-recipe/imc/broken:v1"], env)
    assert direct.returncode == 12, direct.stderr
    assert direct.stdout == ""
    assert direct.stderr.splitlines()[-1] == "snapshot broken: imc cache create failed (exit 12)"
    text = summary.read_text()
    assert text.startswith("### imc snapshot `broken`: imc cache create failed (exit 12)\n")
    assert "absent/manifests/1.0: not found" in text
    assert "- pushed" not in text

    # make reports any failure as 2 and names the script's code.
    made = run(["make", "--no-print-directory", "snapshot", "NAME=broken2", f"IMAGES={missing}",
                f"PLAIN_HTTP={host}"], env)
    assert made.returncode == 2
    assert "Error 12" in made.stderr.splitlines()[-1]


@pytest.mark.parametrize(("args", "message"), [
    ([], "NAME is empty"),
    (["NAME=web"], "IMAGES is empty"),
    (["NAME=web", "IMAGES=a:1", "SIZE=big"], "SIZE='big': want a whole number of GiB"),
])
def test_bad_arguments_are_one_line_and_build_nothing(args: list[str], message: str, tmp_path: Path) -> None:
    env = ci_env(tmp_path / "home", tmp_path / "summary.md")
    made = run(["make", "--no-print-directory", "snapshot", *args], env)
    assert made.returncode == 2
    assert made.stderr.splitlines()[0].startswith(f"snapshot: error: {message}")
    flags = [f"--{key.lower()}={value}" for key, value in (a.split("=", 1) for a in args)]
    direct = run([sys.executable, "scripts/snapshot.py", *flags], env)
    assert direct.returncode == 2 and direct.stderr.count("\n") == 1, direct.stderr
    assert not (tmp_path / "home").exists() and not (tmp_path / "summary.md").exists()


def test_existing_cache_is_refused_before_building(plain_registry: Endpoint, tmp_path: Path) -> None:
    host = plain_registry.host
    env = ci_env(tmp_path / "home", tmp_path / "summary.md")
    first = run([sys.executable, "scripts/snapshot.py", "--name", "twice", "--images", f"{host}/{SOURCE}",
                 "--plain-http", host], env)
    assert first.returncode == 0, first.stderr
    again = run([sys.executable, "scripts/snapshot.py", "--name", "twice", "--images", f"{host}/{SOURCE}",
                 "--plain-http", host], env)
    assert again.returncode == 2
    assert again.stderr.startswith("snapshot: error: an image cache named twice already exists in ")
    assert "cache create" not in again.stderr
